"""serve/dynamo/inputs.py: a Dynamo token request -> the prompt ``/v1/chat/completions`` would build.

The reference is the OpenAI path itself (``serve.chat.parse_chat`` + ``Engine.build_prompt``) on the body the
client sent, and the tokenizer's own encoding of the rendered text (what Dynamo's frontend sends)."""
from __future__ import annotations

import base64
import json

import pytest

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from serve.chat import ChatTemplate, parse_chat
from serve.dynamo.inputs import InputBuilder
from serve.protocol import ServerConfig
from server_fixtures import png_bytes

TEMPLATE = ("{% for m in messages %}User: {% for part in m['content'] %}{% if part['type'] == 'text' %}"
            "{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}\n{% endfor %}Assistant:")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(EngineConfig(model=str(tiny_checkpoint), num_blocks=32))


@pytest.fixture(scope="module")
def builder(engine):
    return InputBuilder(ChatTemplate(TEMPLATE), engine.tokenizer, engine.eos_token_ids)


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": " this?"}]}]


def _dynamo_request(engine, url: str, **fields) -> dict:
    """What Dynamo's frontend sends for an image chat: text ids, the media apart, URLs blanked."""
    formatted = "User: What is<image> this?\nAssistant:"
    blanked = _messages("")
    return {"token_ids": engine.tokenizer.encode(formatted), "multi_modal_data": {"image_url": [{"Url": url}]},
            "extra_args": {"messages": blanked, "formatted_prompt": formatted},
            "stop_conditions": {"max_tokens": 5, "stop_token_ids_hidden": [2]},
            "sampling_options": {"temperature": 0.0}, **fields}


def test_an_image_request_is_the_chat_endpoints_prompt(engine, builder):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(24, 16)).decode()
    built = builder.build(_dynamo_request(engine, url))
    req, refs = parse_chat(json.dumps({"messages": _messages(url)}).encode(), ChatTemplate(TEMPLATE), ServerConfig())
    want = engine.build_prompt(req.prompt, [r.data for r in refs])
    got = engine.build_prompt(built.prompt, built.images)
    assert got.token_ids == want.token_ids and [m.content_hash for m in got.media] == [m.content_hash
                                                                                          for m in want.media]
    assert built.continuation == []
    assert (built.params.max_tokens, built.params.temperature) == (5, 0.0)


def test_a_migrated_request_goes_on_after_the_answer_so_far(engine, builder):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(24, 16)).decode()
    request = _dynamo_request(engine, url)
    request["token_ids"] = request["token_ids"] + [300, 301, 302]
    assert builder.build(request).continuation == [300, 301, 302]


def test_a_text_request_is_its_rendered_text(engine, builder):
    text = "User: Hello there\nAssistant:"
    built = builder.build({"token_ids": engine.tokenizer.encode(text)})
    assert engine.build_prompt(built.prompt).token_ids == engine.build_prompt([text]).token_ids


@pytest.mark.parametrize("fields, message", [
    ({"sampling_options": {"use_beam_search": True}}, "beam search"),
    ({"sampling_options": {"n": 2}}, "n must be 1"),
    ({"output_options": {"logprobs": 2}}, "logprobs"),
    ({"multi_modal_data": {"image_url": [{"Url": "data:,"}, {"Url": "data:,"}]}}, "more items"),
    ({"extra_args": {}, "token_ids": [5, 6]}, "without the chat messages"),
])
def test_what_the_worker_cannot_honour_is_a_value_error(engine, builder, fields, message):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode()
    with pytest.raises(ValueError, match=message):
        builder.build({**_dynamo_request(engine, url), **fields})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "  Hello there "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Yo"}, {"role": "developer", "content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " it?"}]}],
])
def test_the_plain_template_for_the_frontend_renders_our_plain_format(messages):
    """A checkpoint without a chat template: the frontend renders serve/dynamo/plain_chat.jinja, which must give
    the text serve/chat.py's plain format gives (the worker decodes the frontend's ids back to it)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from serve.dynamo.inputs import PLAIN_TEMPLATE

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(PLAIN_TEMPLATE.read_text()).render(messages=messages, add_generation_prompt=True)
    ours = ChatTemplate(None).render([("system" if m["role"] == "developer" else m["role"],
                                       m["content"] if isinstance(m["content"], str)
                                       else [p["text"] for p in m["content"]]) for m in messages])
    assert rendered == ours


@pytest.mark.slow  # a fresh interpreter imports torch and the server
def test_fusionserve_serve_imports_no_dynamo():
    import subprocess
    import sys

    code = ("import sys, serve.app, serve.cli, serve.chat, serve.engine_loop; "
            "print(sorted(m for m in sys.modules if m == 'dynamo' or m.startswith('dynamo.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
