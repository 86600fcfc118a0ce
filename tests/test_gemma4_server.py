"""Gemma 4 Unified over a real uvicorn server on 127.0.0.1: a random checkpoint from transformers' ``save_pretrained``
answers /v1/generate (image, audio, ``mm_processor_kwargs``) and /v1/chat/completions (image and ``input_audio``
parts, through the openai client) with transformers' greedy tokens; a Fuyu server refuses audio and media options."""
from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
import torch
from PIL import Image

from gemma4_fixtures import gemma4_folder, gemma4_processor  # noqa: F401 (fixtures)
from pipeline.config import EngineConfig
from serve.app import create_app
from serve.chat import ChatTemplate, parse_chat
from serve.protocol import ServerConfig
from server_fixtures import png_bytes, running_server, wav_bytes
from tokenization.gemma4_unified import Gemma4UnifiedLayout

GREEDY = {"max_tokens": "8", "temperature": "0", "ignore_eos": "true"}
IMAGE = png_bytes(60, 40, seed=3)


AUDIO, WAVE = wav_bytes()


@pytest.fixture(scope="module")
def hf_model(gemma4_folder):
    from transformers import Gemma4UnifiedForConditionalGeneration

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(gemma4_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def server(gemma4_folder):
    config = ServerConfig(max_audios=2)
    with running_server(create_app(EngineConfig(model=str(gemma4_folder), num_blocks=256, block_size=8), config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def _reference(processor, model, text: str, images=None, audio=None, max_tokens: int = 8, **image_kwargs):
    """transformers' greedy ids and prompt length for ``text`` (processor placeholders) and media."""
    kwargs = {"images_kwargs": image_kwargs} if image_kwargs else {}
    inputs = processor(text=text, images=images, audio=audio, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"].shape[1]


def _generate(client, prompt: str, files: list, **fields) -> dict:
    r = client.post("/v1/generate", data={"prompt": prompt, **GREEDY, **fields}, files=files)
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and words in error["message"], error
    return error


def test_generate_with_an_image_matches_transformers(client, gemma4_processor, hf_model):
    body = _generate(client, "Describe <image> please", [("image", ("a.png", IMAGE, "image/png"))])
    ids, num_prompt = _reference(gemma4_processor, hf_model, "Describe <|image|> please",
                                 [Image.open(io.BytesIO(IMAGE))])
    assert body["token_ids"] == ids and body["usage"]["prompt_tokens"] == num_prompt


def test_generate_with_an_audio_file_matches_transformers(client, gemma4_processor, hf_model):
    body = _generate(client, "Listen <audio> now", [("audio", ("a.wav", AUDIO, "audio/wav"))])
    ids, num_prompt = _reference(gemma4_processor, hf_model, "Listen <|audio|> now", audio=[WAVE])
    assert body["token_ids"] == ids and body["usage"]["prompt_tokens"] == num_prompt


def test_token_budget_per_request(client, gemma4_processor, hf_model):
    files = [("image", ("a.png", png_bytes(200, 150, seed=4), "image/png"))]
    full = _generate(client, "Describe <image>", files)
    small = _generate(client, "Describe <image>", files, mm_processor_kwargs=json.dumps({"max_soft_tokens": 70}))
    ids, num_prompt = _reference(gemma4_processor, hf_model, "Describe <|image|>",
                                 [Image.open(io.BytesIO(files[0][1][1]))], max_soft_tokens=70)
    assert small["token_ids"] == ids and small["usage"]["prompt_tokens"] == num_prompt
    assert full["usage"]["prompt_tokens"] - num_prompt > 100  # 280 -> 70 soft tokens at most


@pytest.mark.parametrize("options, words", [
    ('{"max_soft_tokens": 71}', "max_soft_tokens must be one of"),
    ('{"max_soft_tokenz": 70}', "mm_processor_kwargs.max_soft_tokenz is not a media option"),
    ('{"max_soft_tokens": "70"}', "mm_processor_kwargs.max_soft_tokens must be a positive integer"),
    ('[70]', "mm_processor_kwargs must be a JSON object"),
    ('{max_soft_tokens', "mm_processor_kwargs must be a JSON object"),
])
def test_bad_media_options_are_400(client, options, words):
    r = client.post("/v1/generate", data={"prompt": "x <image>", **GREEDY, "mm_processor_kwargs": options},
                    files=[("image", ("a.png", IMAGE, "image/png"))])
    _error(r, 400, words)


def test_bad_audio_is_400_and_the_server_goes_on(client):
    _error(client.post("/v1/generate", data={"prompt": "x", **GREEDY},
                       files=[("audio", ("a.wav", b"RIFF\x10\0\0\0WAVEjunk" + b"\x07" * 64, "audio/wav"))]),
           400, "WAV")
    _error(client.post("/v1/generate", data={"prompt": "x", **GREEDY},
                       files=[("audio", ("a.txt", AUDIO, "text/plain"))]), 415, "content type")
    _error(client.post("/v1/generate", data={"prompt": "x", **GREEDY},
                       files=[("audio", ("a.wav", AUDIO, "audio/wav"))] * 3), 400, "more than 2 audios")
    assert _generate(client, "Listen <audio>", [("audio", ("a.wav", AUDIO, "audio/wav"))])["finish_reason"] == "length"


def _messages(image: bytes, audio: bytes) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
                {"type": "text", "text": " and hear "},
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}]},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What now?"}]


def _hf_messages(pil: Image.Image) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "image", "image": pil},
                                         {"type": "text", "text": " and hear "}, {"type": "audio", "audio": WAVE}]},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What now?"}]


def test_chat_prompt_is_the_processors_chat_template(gemma4_folder, gemma4_processor):
    """The checkpoint's chat_template.jinja, rendered by us and laid out, gives apply_chat_template's ids."""
    template = ChatTemplate.from_pretrained(gemma4_folder)
    assert template.takes_parts
    req, media = parse_chat(json.dumps({"messages": _messages(IMAGE, AUDIO)}).encode(), template, ServerConfig())
    pil = Image.open(io.BytesIO(IMAGE))
    ref = gemma4_processor.apply_chat_template(_hf_messages(pil), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)
    ours = Gemma4UnifiedLayout.from_pretrained(gemma4_folder).build(
        req.prompt, images=[m.data for m in media if m.kind == "image"], audios=[m.data for m in media if m.kind == "audio"])
    assert ours.token_ids == list(ref["input_ids"][0])


def test_chat_through_the_openai_client(server, client, gemma4_processor, hf_model):
    api = openai.OpenAI(base_url=server + "/v1", api_key="none", timeout=120, max_retries=0)
    kw = dict(model=api.models.list().data[0].id, messages=_messages(IMAGE, AUDIO), max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    full = api.chat.completions.create(**kw)
    pil = Image.open(io.BytesIO(IMAGE))
    text = gemma4_processor.apply_chat_template(_hf_messages(pil), add_generation_prompt=True, tokenize=False)
    inputs = gemma4_processor(text=text, images=[pil], audio=[WAVE], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    # the same rendered prompt over multipart (the family's placeholders mark the media): ids and text
    same = _generate(client, text, [("image", ("a.png", IMAGE, "image/png")), ("audio", ("a.wav", AUDIO, "audio/wav"))])
    assert same["token_ids"] == ref
    assert full.choices[0].message.content == same["text"]
    assert full.usage.prompt_tokens == inputs["input_ids"].shape[1] and full.usage.completion_tokens == 8
    chunks = list(api.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == same["text"]
    big = dict(model=kw["model"], messages=_messages(png_bytes(200, 150, seed=4), AUDIO), max_tokens=1)
    small = api.chat.completions.create(**big, extra_body={"mm_processor_kwargs": {"max_soft_tokens": 70}})
    assert api.chat.completions.create(**big).usage.prompt_tokens - small.usage.prompt_tokens > 100


def test_chat_errors(client):
    bad = _messages(IMAGE, b"not audio at all")
    _error(client.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2}), 400, "not a supported audio")
    part = {"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}}
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}), 400,
           "not valid base64")
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "mm_processor_kwargs": {"max_soft_tokens": -1}}), 400,
           "mm_processor_kwargs.max_soft_tokens")


def test_models_reports_the_gemma_folder(client, gemma4_folder):
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == gemma4_folder.name and model["object"] == "model"
    assert model["max_model_len"] > 0 and model["modalities"] == ["image", "video", "audio"]


def test_fuyu_refuses_audio_and_media_options(tiny_checkpoint):
    app = create_app(EngineConfig(model=str(tiny_checkpoint), num_blocks=64, block_size=8), ServerConfig())
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        _error(c.post("/v1/generate", data={"prompt": "x", **GREEDY},
                      files=[("audio", ("a.wav", AUDIO, "audio/wav"))]), 400, "not audio")
        _error(c.post("/v1/generate", data={"prompt": "x <image>", **GREEDY, "mm_processor_kwargs": '{"max_soft_tokens": 70}'},
                      files=[("image", ("a.png", IMAGE, "image/png"))]), 400, "it takes none")
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(AUDIO).decode(), "format": "wav"}}
        _error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}), 400,
               "not audio")
        assert c.get("/v1/models").json()["data"][0]["modalities"] == ["image", "video"]
