"""Tool calling over a real server, with the openai client, on a tiny checkpoint whose chat template renders tools
and tool messages: named and required tool choices give OpenAI tool_calls whose arguments follow the function's
schema (the tiny random model emits garbage on its own), streamed and not; "auto" is a 400; the history's tool
calls and tool results render as transformers renders them."""
from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import pytest
from transformers import PreTrainedTokenizerFast

from pipeline.config import EngineConfig
from serve.app import create_app
from serve.chat import ChatTemplate, parse_chat
from serve.protocol import ServerConfig
from server_fixtures import openai_client, running_server

TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{% for c in m.tool_calls %}<call>{{ c.function.name }}:{{ c.function.arguments.city }}</call>{% endfor %}\n"
    "{% elif m.role == 'tool' %}<|tool {{ m.tool_call_id }}|>{{ m.content }}\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
           "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "tool-fuyu"
    shutil.copytree(tiny_checkpoint, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def server(folder):
    app = create_app(EngineConfig(model=str(folder), num_blocks=300, block_size=8), ServerConfig())
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def api(server):
    with openai_client(server, timeout_s=120) as client:
        yield client


def _check_call(call, names=("get_weather",)):
    assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_history_tool_calls_and_results_render_as_transformers_does(folder):
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    as_transformers = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                               "arguments": json.loads(c["function"]["arguments"])}}
                                            for c in m["tool_calls"]]} if m.get("tool_calls") else m
                       for m in HISTORY]  # transformers' convention: arguments as an object
    expected = reference.apply_chat_template(as_transformers, tools=TOOLS, chat_template=TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    req, _ = parse_chat(json.dumps({"messages": HISTORY, "tools": TOOLS, "tool_choice": "none"}).encode(),
                        ChatTemplate(TEMPLATE), ServerConfig())
    assert req.prompt == [expected] and "sunny, 21 C" in expected and "get_time;" in expected


@pytest.mark.slow
def test_named_tool_choice_streamed_and_not(api):
    kw = dict(model="tool-fuyu", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=60, temperature=0)
    out = api.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_call(choice.message.tool_calls[0])
    chunks = list(api.chat.completions.create(stream=True, **kw))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == choice.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_required_tool_choice_picks_one_of_the_tools(api):
    kw = dict(model="tool-fuyu", messages=HISTORY, tools=TOOLS, tool_choice="required", max_tokens=80,
              temperature=1.0, seed=3)
    out = api.chat.completions.create(n=2, **kw)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        _check_call(choice.message.tool_calls[0], names=tuple(SCHEMAS))
    chunks = list(api.chat.completions.create(stream=True, **kw))
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1
    _check_call(calls[0], names=tuple(SCHEMAS))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_and_none(api, server):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "tool-call format" in r.json()["error"]["message"]
    out = api.chat.completions.create(model="tool-fuyu", messages=HISTORY, tools=TOOLS, tool_choice="none",
                                      max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"
    for bad, param in [({"tool_choice": "required"}, "tool_choice"),
                       ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                        "tool_choice"),
                       ({"tools": [{"type": "function"}], "tool_choice": "none"}, "tools"),
                       ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}},
                        "response_format")]:
        r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_add_generation_prompt_is_the_templates(server, folder):
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for flag in (True, False):
        ids = httpx.post(server + "/tokenize", json={"messages": ASK, "add_generation_prompt": flag}).json()["tokens"]
        text = reference.apply_chat_template(ASK, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=flag)
        assert text.endswith("<|assistant|>") == flag
        r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 1,
                                                              "add_generation_prompt": flag})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
    with_prompt = httpx.post(server + "/tokenize", json={"messages": ASK}).json()["count"]
    assert len(ids) < with_prompt
