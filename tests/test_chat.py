"""serve/chat.py: media positions come from content parts only; any JSON body is a request or a 4xx APIError."""
from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest

from serve.chat import ChatTemplate, parse_chat
from serve.protocol import APIError, ServerConfig
from tokenization import Interleaver, MediaSlot

CONFIG = ServerConfig(max_images=4, max_videos=2, allowed_media_hosts=("media.example",))
PLAIN = ChatTemplate(None)
TEMPLATE = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
IMAGE_URL = "data:image/png;base64," + base64.b64encode(b"not decoded by the parser").decode()
LITERAL = "In HTML, what does the <image> tag do? And <video>?"


def _chat(body, template=PLAIN):
    return parse_chat(json.dumps(body).encode(), template, CONFIG)


def _image(url=IMAGE_URL):
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text):
    return {"type": "text", "text": text}


def test_literal_markers_in_chat_text_are_text():
    req, media = _chat({"messages": [{"role": "user", "content": LITERAL}]})
    assert req.prompt == [LITERAL] and media == []
    req, media = _chat({"messages": [{"role": "user", "content": [_text(LITERAL), _image()]}]})
    assert req.prompt == [LITERAL, MediaSlot("image")] and [m.kind for m in media] == ["image"]


def test_media_land_where_their_parts_are_with_a_template():
    second = "data:image/png;base64," + base64.b64encode(b"second").decode()
    req, media = _chat({"messages": [
        {"role": "system", "content": "Answer <image> questions."},
        {"role": "user", "content": [_image(), _text("and <image> here"), _image(second)]}]}, TEMPLATE)
    assert req.prompt == ["<|system|>Answer <image> questions.\n<|user|>", MediaSlot("image"), "and <image> here",
                          MediaSlot("image"), "\n<|assistant|>"]
    assert [m.data for m in media] == [b"not decoded by the parser", b"second"]


def test_template_that_reorders_messages_keeps_media_with_their_slots():
    reverse = ChatTemplate("{% for m in messages|reverse %}[{{ m['content'] }}]{% endfor %}")
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"v").decode()}}
    req, media = _chat({"messages": [{"role": "user", "content": [_image()]},
                                     {"role": "assistant", "content": "ok"}, {"role": "user", "content": [video]}]},
                       reverse)
    assert req.prompt == ["[", MediaSlot("video"), "][ok][", MediaSlot("image"), "]"]
    assert [m.kind for m in media] == ["video", "image"]


@pytest.mark.parametrize("template", ["{{ messages[0]['content'] }}{{ messages[0]['content'] }}", "hello"])
def test_template_that_duplicates_or_drops_media_is_400(template):
    error = pytest.raises(APIError, _chat, {"messages": [{"role": "user", "content": [_image()]}]},
                          ChatTemplate(template)).value
    assert error.status == 400 and "template" in error.message


def test_chat_prompt_tokens_keep_the_literal_text(tiny_checkpoint):
    il = Interleaver.from_pretrained(tiny_checkpoint)
    tok, img = il.tokenizer, np.zeros((16, 24, 3), np.uint8)
    image_ids = ([tok.image_token_id] * 3 + [tok.newline_token_id]) * 2
    req, _ = _chat({"messages": [{"role": "user", "content": LITERAL}]})
    assert il.build(req.prompt).token_ids == [tok.bos_token_id] + tok.encode(LITERAL + "<0x04>")
    req, _ = _chat({"messages": [{"role": "user", "content": [_text("Look: "), _image(), _text(LITERAL)]}]})
    ids = il.build(req.prompt, images=[img]).token_ids
    assert ids == [tok.bos_token_id] + tok.encode("Look: ") + image_ids + tok.encode(LITERAL + "<0x04>")
    req, _ = _chat({"messages": [{"role": "user", "content": [_image(), _text("What is it?")]}]})
    assert il.build(req.prompt, images=[img]).token_ids == il.build("What is it?", images=[img]).token_ids


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _ok(extra: str) -> bytes:
    return ('{"messages": [{"role": "user", "content": "hi"}]' + extra + "}").encode()


HOSTILE = [
    _nested(10_000).encode(), ('{"messages": ' + _nested(10_000) + "}").encode(),
    ('{"a":' * 10_000 + "1" + "}" * 10_000).encode(), _ok(', "temperature": ' + _nested(900)),
    _ok(', "temperature": 1e999'), _ok(', "temperature": -1e999'), _ok(', "top_p": NaN'), _ok(', "seed": Infinity'),
    _ok(', "max_tokens": -0'), _ok(', "seed": ' + "1" + "0" * 400), _ok(', "max_tokens": ' + "9" * 5000),
    _ok(', "top_k": ' + "1" + "0" * 30), _ok(', "temperature": ' + "1" + "0" * 400),
    _ok(', "stop": ' + _nested(900)), _ok(', "stop": [1, 2]'), _ok(', "stream_options": {"include_usage": "yes"}'),
    _ok(', "n": 1.0'), _ok(', "seed": 1.5'), _ok(', "max_tokens": "16"'), _ok(', "ignore_eos": 1'),
    b'"just a string"', b"null", b"12", b"[]", b"", b"\xff\xfe{", b'{"messages": "hi"}',
    b'{"messages": {"role": "user"}}',
    b'{"messages": [["user", "hi"]]}', b'{"messages": [{"role": ["user"], "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}',
    b'{"messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": ["hi"]}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": ["data:"]}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://[::1"}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png"}}]}]}',
    b'{"messages": [{"role": "user", "content": [5]}]}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
    ('{"messages": [{"role": "' + "u" * 1_000_000 + '", "content": "hi"}]}').encode(),
    ('{"messages": [{"role": "user", "content": [{"type": "' + "t" * 1_000_000 + '"}]}]}').encode(),
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_are_400(body):
    with pytest.raises(APIError) as info:
        parse_chat(body, PLAIN, CONFIG)
    assert info.value.status == 400
    assert len(info.value.message) < 1000  # no echo of a huge value


def test_huge_strings_and_odd_numbers_parse():
    req, _ = _chat({"messages": [{"role": "user", "content": "x" * 5_000_000}], "stop": "y" * 100_000})
    assert req.prompt == ["x" * 5_000_000] and req.params.stop == ["y" * 100_000]
    req, _ = parse_chat(_ok(', "temperature": -0, "seed": -0, "top_p": 1e-300, "max_tokens": 2'), PLAIN, CONFIG)
    assert (req.params.temperature, req.params.seed, req.params.max_tokens) == (0, 0, 2)


def _values(rng: random.Random, depth: int = 0):
    kinds = [None, True, False, 0, -0.0, 1, -1, 2**63, 10**30, 0.5, 1e308, "", "x", "user", "text", "image_url",
             "data:image/png;base64,aGk=", "\ud800"]
    if depth < 3:
        kinds += [[], {}, "list", "dict"]
    value = rng.choice(kinds)
    if value == "list":
        return [_values(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if value == "dict":
        keys = ["role", "content", "type", "text", "image_url", "video_url", "url", "include_usage"]
        return {rng.choice(keys): _values(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return value


FIELDS = ["messages", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "min_p", "repetition_penalty", "seed", "stop", "ignore_eos"]


def _part(rng: random.Random):
    part = {"type": rng.choice(["text", "image_url", "video_url", _values(rng)])}
    for key in rng.sample(["text", "image_url", "video_url", "url"], rng.randint(0, 2)):
        part[key] = rng.choice([{"url": rng.choice([IMAGE_URL, "http://[::1", "file:///etc/passwd", 5])},
                                _values(rng)])
    return part


def test_fuzz_fields_give_a_request_or_a_4xx():
    rng = random.Random(11)
    message = {"role": "user", "content": [_text("hi"), _image()]}
    for _ in range(3000):
        body = {"messages": [message]}
        for name in rng.sample(FIELDS, rng.randint(1, 3)):
            body[name] = _values(rng)
        if rng.random() < 0.3:  # hostile message internals
            body["messages"] = [{k: _values(rng) if rng.random() < 0.3 else v for k, v in message.items()}]
        elif rng.random() < 0.5:
            body["messages"] = [{"role": "user", "content": [_part(rng) for _ in range(rng.randint(1, 3))]}]
        try:
            req, _ = parse_chat(json.dumps(body).encode(), PLAIN, CONFIG)
        except APIError as exc:
            assert exc.status in (400, 415), (body, exc.status)
        else:
            assert all(isinstance(s, (str, MediaSlot)) for s in req.prompt)


def _audio(data=b"RIFF....WAVE", fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def test_audio_parts_and_media_options():
    url = {"type": "audio_url", "audio_url": {"url": "data:audio/mpeg;base64," + base64.b64encode(b"mp3").decode()}}
    req, media = _chat({"messages": [{"role": "user", "content": [_text("Hear "), _audio(), _image(), url]}],
                        "mm_processor_kwargs": {"max_soft_tokens": 70}}, TEMPLATE)
    assert req.prompt == ["<|user|>Hear ", MediaSlot("audio"), MediaSlot("image"), MediaSlot("audio"),
                          "\n<|assistant|>"]
    assert [(m.kind, m.data) for m in media] == [("audio", b"RIFF....WAVE"), ("image", b"not decoded by the parser"),
                                                 ("audio", b"mp3")]
    assert req.media_options == {"max_soft_tokens": 70}


@pytest.mark.parametrize("body, status, words", [
    ({"content": [_audio(fmt="midi")]}, 400, "input_audio.format"),
    ({"content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}, 400, "needs"),
    ({"content": [_audio()] * 5}, 400, "more than 4 audios"),
    ({"content": "x", "mm_processor_kwargs": {"max_soft_tokens": True}}, 400, "mm_processor_kwargs.max_soft_tokens"),
    ({"content": "x", "mm_processor_kwargs": [70]}, 400, "mm_processor_kwargs must be a JSON object"),
])
def test_bad_audio_parts_and_options(body, status, words):
    extra = {k: v for k, v in body.items() if k != "content"}
    with pytest.raises(APIError) as raised:
        parse_chat(json.dumps({"messages": [{"role": "user", "content": body["content"]}], **extra}).encode(), PLAIN,
                   ServerConfig(max_audios=4))
    assert raised.value.status == status and words in raised.value.message


def test_templates_that_loop_over_parts_get_parts():
    loop = ChatTemplate("{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] | trim }}]{% endfor %}"
                        "{% endfor %}")
    assert loop.takes_parts and not TEMPLATE.takes_parts
    req, _ = _chat({"messages": [{"role": "user", "content": [_text(" a "), _image(), _text(" b ")]}]}, loop)
    assert req.prompt == ["[a][", MediaSlot("image"), "][b]"]


def test_user_turn_renders_the_template_with_structural_media(tmp_path):
    from serve.chat import ChatTemplate, user_turn
    from tokenization import MediaSlot

    plain = user_turn(ChatTemplate(None), "What is <image> here?", ["image"])
    assert plain == [MediaSlot("image"), "What is <image> here?"]  # the question stays text
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</t>{% endfor %}<assistant>")
    assert user_turn(template, "Hi?", ["image", "audio"]) == ["<user>", MediaSlot("image"), MediaSlot("audio"),
                                                              "Hi?</t><assistant>"]
