"""Request parsing: form fields and chat bodies into prompt + media + SamplingParams, and the 4xx they raise."""
from __future__ import annotations

import base64
import json

import pytest
from transformers import PreTrainedTokenizerFast

from samples.random_checkpoint import build_tokenizer
from serve.chat import ChatTemplate, parse_chat
from serve.openai_fields import ServedModel
from serve.protocol import APIError, ServerConfig, check_media_type, parse_form
from tokenization import MediaSlot

CONFIG = ServerConfig(max_images=2, max_videos=1, default_max_tokens=7, allowed_media_hosts=("media.example",))
PLAIN = ChatTemplate(None)


def _error(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


def _chat(body, template=PLAIN):
    return parse_chat(json.dumps(body).encode(), template, CONFIG)


def test_form_fields_are_converted_and_validated():
    req = parse_form({"prompt": ["hi <image>"], "max_tokens": ["5"], "temperature": [" 0.5"], "top_k": ["3"],
                      "stop": ["a", "bc"], "stream": ["true"], "seed": ["9"]}, [b"x"], [], CONFIG)
    assert (req.prompt, req.images, req.stream) == ("hi <image>", [b"x"], True)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.seed) == (5, 0.5, 3, ["a", "bc"], 9)
    assert parse_form({"prompt": ["x"]}, [], [], CONFIG).params.max_tokens == 7  # the server default


@pytest.mark.parametrize("fields, words", [
    ({"max_tokens": ["ten"]}, "max_tokens must be an integer"),
    ({"temperature": ["hot"]}, "temperature must be a number"),
    ({"temperature": ["-1"]}, "temperature must be a finite number >= 0"),
    ({"top_p": ["1.5"]}, "top_p must be a number in (0, 1]"),
    ({"max_tokens": ["0"]}, "max_tokens must be an integer >= 1"),
    ({"temperature": ["nan"]}, "must be finite"),
    ({"stream": ["maybe"]}, "stream must be true or false"),
    ({"colour": ["red"]}, "unknown form field"),
    ({"seed": ["1", "2"]}, "given 2 times"),
])
def test_bad_form_fields_are_400(fields, words):
    error = _error(parse_form, {"prompt": ["x"], **fields}, [], [], CONFIG)
    assert error.status == 400 and words in error.message
    assert set(error.body()["error"]) == {"message", "type", "code", "param"}


def test_missing_prompt_and_too_many_media():
    assert _error(parse_form, {}, [], [], CONFIG).code == "missing_prompt"
    assert _error(parse_form, {"prompt": ["x"]}, [b"1", b"2", b"3"], [], CONFIG).code == "too_many_images"
    assert _error(parse_form, {"prompt": ["x"]}, [], [b"1", b"2"], CONFIG).code == "too_many_videos"


@pytest.mark.parametrize("content_type, kind, ok", [
    ("image/png", "image", True), ("application/octet-stream", "image", True), ("", "image", True),
    ("video/mp4", "video", True), ("text/plain", "image", False), ("image/png", "video", False),
    ("application/json; charset=utf-8", "video", False),
])
def test_declared_media_types(content_type, kind, ok):
    if ok:
        check_media_type(content_type, kind)
    else:
        assert _error(check_media_type, content_type, kind).status == 415


def test_chat_parts_become_media_slots_and_data_urls_become_bytes():
    png = b"\x89PNG fake bytes"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    req, media = _chat({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}],
        "max_completion_tokens": 4, "temperature": 0, "stop": "x", "stream": True,
        "stream_options": {"include_usage": True}})
    assert req.prompt == [MediaSlot("image"), "What is it?"]  # one user message: the plain format is the content
    assert [(m.kind, m.data) for m in media] == [("image", png)]
    assert (req.params.max_tokens, req.params.temperature, req.params.stop) == (4, 0, ["x"])
    assert req.stream and req.include_usage


def test_chat_plain_format_for_several_messages():
    req, _ = _chat({"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Shape?"}]})
    assert req.prompt == ["System: Be short.\nUser: Hi\nAssistant: Hello\nUser: Shape?"]
    served = ServedModel(CONFIG.model_name, max_model_len=100)
    req, _ = parse_chat(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(), PLAIN, CONFIG, served)
    assert req.params.max_tokens == 100  # what is left of the context: the engine stops a sequence at max_model_len


def test_chat_remote_urls_refused_unless_allowed():
    part = lambda url: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}  # noqa: E731
    error = _error(_chat, part("https://evil.example/cat.png"))
    assert error.status == 400 and error.code == "remote_media_refused"
    _, media = _chat(part("https://media.example/cat.png"))
    assert media[0].url == "https://media.example/cat.png" and media[0].data is None
    assert _error(_chat, part("file:///etc/passwd")).status == 400


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": []}', 400, "non-empty list"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "string or a list"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n must be"),
    (b'{"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}', 400, "unsupported content part"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}',
     400, "not valid base64"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]}',
     415, "content type"),
])
def test_bad_chat_bodies(body, status, words):
    error = _error(parse_chat, body, PLAIN, CONFIG)
    assert error.status == status and words in error.message


def test_chat_template_renders_as_transformers_does(tmp_path):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    reference = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", chat_template=template)
    reference.save_pretrained(tmp_path)  # where transformers puts the template (tokenizer_config / .jinja)
    messages = [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Shape?"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate.from_pretrained(tmp_path)
    assert ours.source is not None
    assert ours.render([(m["role"], m["content"]) for m in messages]) == expected
    req, _ = parse_chat(json.dumps({"messages": messages}).encode(), ours, CONFIG)
    assert req.prompt == [expected]  # "<image>" typed in the text stays text


def test_chat_template_errors_are_400():
    strict = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    error = _error(_chat, {"messages": [{"role": "user", "content": "x"}]}, strict)
    assert error.status == 400 and "system first" in error.message
