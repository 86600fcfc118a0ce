"""The OpenAI-compatible API over a real uvicorn server, with the official openai client: the field table (every
refused field is a 400 naming it, every supported one is exercised), logprobs against transformers' own
log_softmax, n > 1, structured outputs, /v1/completions, the small endpoints."""
from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from tokenizers import Tokenizer

from pipeline.config import EngineConfig
from serve.app import create_app
from serve.openai_serving import VERSION
from serve.openai_fields import CHAT, COMPLETIONS, FIELDS, REFUSED, markdown_table
from serve.protocol import ServerConfig
from gemma4_fixtures import gemma4_folder  # noqa: F401 (fixture)
from server_fixtures import openai_client, png_bytes, running_server

MODEL = "tiny-fuyu"
HI = [{"role": "user", "content": "Hi there"}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = create_app(EngineConfig(model=str(tiny_checkpoint), num_blocks=300, block_size=8),
                     ServerConfig(model_name=MODEL))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def api(server):
    with openai_client(server, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    assert error["param"] == param, error
    if code:
        assert error["code"] == code, error
    return error


def _body(endpoint: str, **fields) -> dict:
    first = {"messages": HI} if endpoint == CHAT else {"prompt": "Hi there"}
    return {**first, "max_tokens": 2, **fields}


def _url(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == CHAT else "/v1/completions"


# the table

def _non_neutral(field) -> object:
    """A value that means "use it" for a refused field."""
    return {"store": True, "echo": True, "use_beam_search": True, "continue_final_message": True,
            "return_tokens_as_token_ids": True, "return_token_ids": True, "spaces_between_special_tokens": False,
            "include_reasoning": False, "length_penalty": 0.5, "priority": 1, "bad_words": ["x"],
            "modalities": ["text", "audio"], "service_tier": "flex", "chat_template_kwargs": {"x": 1},
            "suffix": "tail", "truncate_prompt_tokens": 4, "prompt_logprobs": 1}.get(field.name, "x")


REFUSED_CASES = [(e, f) for f in FIELDS if f.status == REFUSED for e in f.endpoints]


@pytest.mark.parametrize("endpoint, field", REFUSED_CASES, ids=[f"{e}-{f.name}" for e, f in REFUSED_CASES])
def test_each_refused_field_is_a_400_naming_it_and_its_neutral_values_pass(http, endpoint, field):
    _error(http.post(_url(endpoint), json=_body(endpoint, **{field.name: _non_neutral(field)})), 400, field.name,
           "unsupported_field")
    for value in field.neutral:
        if value is not None:
            r = http.post(_url(endpoint), json=_body(endpoint, **{field.name: value}))
            assert r.status_code == 200, (field.name, value, r.text)


# one request per supported / informational field and endpoint, with a non-default value: each must work
SUPPORTED_EXAMPLES = {
    "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3,
    "max_completion_tokens": 3, "temperature": 0.7, "top_p": 0.9, "n": 2, "seed": 7, "stop": ["zz"],
    "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"5": 3.0}, "top_logprobs": 2,
    "response_format": {"type": "json_object"}, "parallel_tool_calls": False, "user": "u-1",
    "safety_identifier": "s-1", "prompt_cache_key": "k", "metadata": {"a": "b"}, "best_of": 1, "top_k": 5,
    "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1, "stop_token_ids": [3],
    "include_stop_str_in_output": True, "skip_special_tokens": False, "ignore_eos": True,
    "structured_outputs": {"regex": "[ab]{1,3}"}, "mm_processor_kwargs": {},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}}
COVERED_ELSEWHERE = {"messages", "prompt", "logprobs", "tools", "tool_choice",  # tests below
                     "add_generation_prompt"}  # test_openai_tools.py (it needs a chat template)


def _example(endpoint: str, name: str) -> dict:
    if name == "logprobs":
        return {"logprobs": True} if endpoint == CHAT else {"logprobs": 2}
    if name == "top_logprobs":
        return {"logprobs": True, "top_logprobs": 2}
    if name == "stream_options":
        return {"stream": True, "stream_options": {"include_usage": True}}
    return {name: SUPPORTED_EXAMPLES[name]}


SUPPORTED_CASES = [(e, f.name) for f in FIELDS if f.status != REFUSED and f.name not in COVERED_ELSEWHERE
                   for e in f.endpoints]


def test_the_table_is_complete_and_rendered():
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    assert set(SUPPORTED_EXAMPLES) | COVERED_ELSEWHERE == {f.name for f in FIELDS if f.status != REFUSED}
    table = markdown_table()
    assert all(f"`{name}`" in table for name in names)


@pytest.mark.parametrize("endpoint, name", SUPPORTED_CASES, ids=[f"{e}-{n}" for e, n in SUPPORTED_CASES])
def test_each_supported_field_is_taken(http, endpoint, name):
    r = http.post(_url(endpoint), json=_body(endpoint, **_example(endpoint, name)))
    assert r.status_code == 200, r.text


def test_unknown_fields_are_a_400_naming_them(http):
    for endpoint in (CHAT, COMPLETIONS):
        _error(http.post(_url(endpoint), json=_body(endpoint, temprature=0)), 400, "temprature", "unknown_field")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, top_logprobs=2)), 400, "top_logprobs")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, logprobs=True, top_logprobs=21)), 400, "top_logprobs")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, temperature="hot")), 400, "temperature")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, logit_bias={"99999": 1})), 400, "logit_bias")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, logit_bias={"a": 1})), 400, "logit_bias")
    _error(http.post("/v1/completions", json=_body(COMPLETIONS, stop_token_ids=[100000])), 400, "stop_token_ids")
    _error(http.post("/v1/completions", json=_body(COMPLETIONS, n=2, best_of=3)), 400, "best_of")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, max_completion_tokens=0)), 400, "max_completion_tokens")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, stream_options={"include_usage": True})), 400,
           "stream_options")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, parallel_tool_calls="yes")), 400, "parallel_tool_calls")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, add_generation_prompt=False)), 400,
           "add_generation_prompt")  # no chat template: the layout places the beginning of the answer
    _error(http.post("/v1/chat/completions", json=_body(CHAT, user=5)), 400, "user")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, messages=[{"role": "user", "content": 5}])), 400,
           "messages")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, messages=[{"role": "user", "content": "x",
                                                                         "audio": {"id": "a"}}])), 400, "messages")


def test_the_model_is_checked(api, http):
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL
    _error(http.get("/v1/models/other"), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    _error(http.post("/v1/completions", json=_body(COMPLETIONS, model="other")), 404, "model", "model_not_found")
    assert http.post("/v1/chat/completions", json=_body(CHAT)).status_code == 200  # no model: the served one


# what the fields do

def test_stream_usage_on_every_chunk_null_until_the_last(api):
    chunks = list(api.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    chunks = list(api.completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 4


def test_default_max_tokens_is_the_rest_of_the_context(tiny_checkpoint):
    app = create_app(EngineConfig(model=str(tiny_checkpoint), num_blocks=64, block_size=8, max_model_len=40),
                     ServerConfig(model_name=MODEL))
    with running_server(app) as url, openai_client(url) as api:
        out = api.chat.completions.create(model=MODEL, messages=HI, **GREEDY)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens + out.usage.completion_tokens == 40
        out = api.completions.create(model=MODEL, prompt=[5, 6, 7], **GREEDY)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 37)


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' FuyuForCausalLM over the whole sequence: log_softmax of the next-token logits [S, V]."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0]
    return logits.float().log_softmax(-1)


def _hf_greedy_steps(hf_model, ids: list[int], num: int) -> list[torch.Tensor]:
    """transformers' FuyuForCausalLM, greedy: per generated token, log_softmax of its logits [V]."""
    seq, steps = list(ids), []
    for _ in range(num):
        steps.append(_hf_logprobs(hf_model, seq)[-1])
        seq.append(int(steps[-1].argmax()))
    return steps


def test_logprobs_are_transformers_log_softmax(api, http, hf_model):
    k, num = 5, 6
    # chat: OpenAI's format, the chosen token and the true top k (ids from /v1/generate on the same text)
    chat_ids = http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    steps = _hf_greedy_steps(hf_model, chat_ids, num)
    chat = api.chat.completions.create(model=MODEL, messages=HI, max_tokens=num, logprobs=True, top_logprobs=k,
                                       **GREEDY)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == num
    for entry, ref in zip(entries, steps):
        assert entry.logprob == pytest.approx(float(ref.max()), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref.topk(k).values.tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode()) and entry.top_logprobs[0].token == entry.token
    prompt = http.post("/tokenize", json={"prompt": "Hi there"}).json()["tokens"]
    gen = http.post("/v1/generate", files=[(n, (None, v)) for n, v in {
        "prompt": "Hi there", "max_tokens": str(num), "temperature": "0", "ignore_eos": "true",
        "logprobs": str(k)}.items()]).json()
    for entry, ref in zip(gen["logprobs"], _hf_greedy_steps(hf_model, prompt, num)):
        assert entry["token_id"] == int(ref.argmax())
        assert [t["token_id"] for t in entry["top_logprobs"]] == ref.topk(k).indices.tolist()
    # completions: the legacy format on a token-id prompt
    out = api.completions.create(model=MODEL, prompt=prompt, max_tokens=num, logprobs=k, **GREEDY)
    legacy = out.choices[0].logprobs
    steps = _hf_greedy_steps(hf_model, prompt, num)
    assert legacy.token_logprobs == pytest.approx([float(r.max()) for r in steps], abs=1e-4)
    assert legacy.tokens == [entry["token"] for entry in gen["logprobs"]]
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:j]) for j in range(num)]
    for top, ref in zip(legacy.top_logprobs, steps):  # token texts may repeat (ids outside the tokenizer)
        best = ref.topk(k).values.tolist()
        assert all(any(abs(v - r) < 1e-4 for r in best + [float(ref.max())]) for v in top.values())
    # streamed: the same entries, chunk by chunk
    streamed = [e for c in api.chat.completions.create(model=MODEL, messages=HI, max_tokens=num, logprobs=True,
                                                       top_logprobs=k, stream=True, **GREEDY)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert all(len(e.top_logprobs) == k for e in streamed)


def test_generate_form_takes_the_sampling_fields(http, hf_model):
    fields = {"prompt": "Hi", "max_tokens": "3", "temperature": "0", "ignore_eos": "true", "logprobs": "3",
              "presence_penalty": "0.0", "frequency_penalty": "0.0", "logit_bias": json.dumps({"9": 100}),
              "min_tokens": "1", "skip_special_tokens": "false", "include_stop_str_in_output": "true"}
    r = http.post("/v1/generate", files=[(n, (None, v)) for n, v in fields.items()])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == [9, 9, 9]  # a +100 bias wins every argmax
    assert [e["token_id"] for e in body["logprobs"]] == [9, 9, 9] and len(body["logprobs"][0]["top_logprobs"]) == 3
    r = http.post("/v1/generate", files=[(n, (None, v)) for n, v in {"prompt": "Hi", "max_tokens": "2", "n": "2",
                                                                       "seed": "3"}.items()])
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    bad = http.post("/v1/generate", files=[("prompt", (None, "Hi")), ("response_format", (None, "{nope"))])
    _error(bad, 400, "response_format")
    bad = http.post("/v1/generate", files=[("prompt", (None, "Hi")), ("stop_token_ids", (None, "[3, 100000]"))])
    _error(bad, 400, "stop_token_ids")
    _error(http.post("/v1/generate", files=[("prompt", (None, "Hi")), ("n", (None, "0"))]), 400, "n")


def test_n_choices_streamed_and_not(api):
    out = api.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, n=3, seed=1, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    one = api.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, **GREEDY)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens and out.usage.completion_tokens == 12
    chunks = list(api.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, n=2, stream=True, **GREEDY))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == one.choices[0].message.content  # greedy: n identical answers
    comp = api.completions.create(model=MODEL, prompt=["Hi", "Ho"], n=2, max_tokens=3, **GREEDY)
    assert sorted(c.index for c in comp.choices) == [0, 1, 2, 3]


def test_completions_prompts_in_every_form(api, http, hf_model, tiny_checkpoint):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    text = api.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, **GREEDY)
    as_ids = api.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    assert as_ids.choices[0].text == text.choices[0].text and text.choices[0].finish_reason == "length"
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    reference = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    chosen = api.completions.create(model=MODEL, prompt=ids, max_tokens=6, logprobs=0, **GREEDY).choices[0].logprobs
    assert chosen.tokens == [reference.decode([i], skip_special_tokens=False) for i in ref[0, len(ids):].tolist()]
    many = api.completions.create(model=MODEL, prompt=[ids, [5, 6]], max_tokens=6, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + 2 and many.usage.completion_tokens == 12
    two = api.completions.create(model=MODEL, prompt=["Hello world", "Hi"], max_tokens=6, **GREEDY)
    assert two.choices[0].text == text.choices[0].text
    streamed = list(api.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    _error(http.post("/v1/completions", json={"prompt": [5, 10**6]}), 400, "prompt")
    _error(http.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    _error(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400, "echo")
    _error(http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")


def test_structured_outputs(api, http):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["name", "n"], "additionalProperties": False}
    out = api.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, temperature=0,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": schema}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = api.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0,
                                 extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].text in ("yes", "no")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})), 400, "response_format")
    _error(http.post("/v1/chat/completions", json=_body(CHAT, response_format={"type": "xml"})), 400, "response_format")


def test_small_endpoints(http, tiny_checkpoint):
    assert http.get("/version").json() == {"version": VERSION}
    t = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert set(t) == {"count", "max_model_len", "tokens"} and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 2048
    chat = http.post("/tokenize", json={"messages": HI}).json()
    assert chat["count"] == http.post("/v1/chat/completions", json=_body(CHAT)).json()["usage"]["prompt_tokens"]
    url = "data:image/png;base64," + base64.b64encode(png_bytes(30, 20, seed=2)).decode()
    seen = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What?"}]}]
    with_image = http.post("/tokenize", json={"messages": seen}).json()
    usage = http.post("/v1/chat/completions", json=_body(CHAT, messages=seen)).json()["usage"]
    assert with_image["count"] == usage["prompt_tokens"] > chat["count"]
    reference = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    strs = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()["token_strs"]
    assert strs == [reference.decode([i], skip_special_tokens=False) for i in t["tokens"]]
    assert http.post("/detokenize", json={"model": MODEL, "tokens": t["tokens"]}).json() == {
        "prompt": reference.decode(t["tokens"], skip_special_tokens=False)}
    _error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    _error(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model", "model_not_found")
    _error(http.post("/tokenize", json={"prompt": "x", "truncate": 2}), 400, "truncate")


@pytest.mark.slow
def test_gemma4_unified_token_prompts_and_tokenize(gemma4_folder):
    app = create_app(EngineConfig(model=str(gemma4_folder), num_blocks=256, block_size=8), ServerConfig())
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
        body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        text = http.post("/v1/completions", json={"prompt": "Hello world", **body}).json()["choices"][0]
        as_ids = http.post("/v1/completions", json={"prompt": ids, **body}).json()["choices"][0]
        assert as_ids["text"] == text["text"] and as_ids["logprobs"]["tokens"] == text["logprobs"]["tokens"]
        chat = http.post("/tokenize", json={"messages": HI}).json()
        usage = http.post("/v1/chat/completions", json=_body(CHAT)).json()["usage"]
        assert chat["count"] == usage["prompt_tokens"]


def test_logit_bias_string_keys_steer_the_answer(api, tiny_checkpoint):
    piece = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).decode([42], skip_special_tokens=False)
    out = api.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, logprobs=True, logit_bias={"42": 100},
                                      **GREEDY)  # OpenAI's JSON: token ids as string keys
    assert [e.token for e in out.choices[0].logprobs.content] == [piece] * 3
    out = api.completions.create(model=MODEL, prompt="Hi", max_tokens=3, logprobs=0, logit_bias={"42": 100}, **GREEDY)
    assert out.choices[0].logprobs.tokens == [piece] * 3


HOSTILE = [  # (path, JSON body)
    ("/v1/completions", {"prompt": [[1, 2], "x"]}), ("/v1/completions", {"prompt": [[]]}),
    ("/v1/completions", {"prompt": [1.5]}), ("/v1/completions", {"prompt": [True]}),
    ("/v1/completions", {"prompt": [-1]}), ("/v1/completions", {"prompt": "x" * 300_000}),
    ("/v1/completions", {"prompt": ["x"] * 1000}), ("/v1/completions", {"prompt": {"a": 1}}),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}), ("/v1/completions", {"prompt": "x", "logprobs": True}),
    ("/v1/completions", {"prompt": "x", "n": 10**30}), ("/v1/completions", {"prompt": "x", "best_of": "2"}),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": []}}),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(", "choice": ["a"]}}),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "not ebnf ::= ::="}}),
    ("/v1/completions", {"prompt": "x", "structured_outputs": [1]}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": "a"}}), ("/v1/completions", {"prompt": "x", "logit_bias": []}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}), ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}), ("/v1/completions", {"prompt": "x", "min_tokens": 99}),
    ("/v1/completions", {"prompt": "x", "model": 5}),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}],
                              "tool_choice": "required"}),
    ("/v1/chat/completions", {"messages": HI, "tools": "f", "tool_choice": "none"}),
    ("/v1/chat/completions", {"messages": HI, "tools": [TOOL], "tool_choice": {"type": "function"}}),
    ("/v1/chat/completions", {"messages": HI, "tools": [TOOL], "tool_choice": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}),
    ("/tokenize", {}), ("/tokenize", {"prompt": 5}), ("/tokenize", {"prompt": "x", "messages": HI}),
    ("/tokenize", {"messages": "x"}), ("/tokenize", {"prompt": "x", "add_special_tokens": False}),
    ("/detokenize", {}), ("/detokenize", {"tokens": "x"}), ("/detokenize", {"tokens": [-1]}),
    ("/detokenize", {"tokens": [1], "x": 1}),
]


def test_hostile_bodies_are_never_a_server_error(http):
    for path, body in HOSTILE:
        r = http.post(path, json={"max_tokens": 2, **body} if "completions" in path else body)
        assert 400 <= r.status_code < 500, (path, str(body)[:200], r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "code", "param"}
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        for raw in (b"", b"[]", b"{", b'{"prompt": NaN}', b"\xff"):
            r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, raw, r.text)
    assert http.get("/health").status_code == 200
