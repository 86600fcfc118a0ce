"""The Gradio demo mounted at /demo on a real uvicorn server, driven through gradio_client on loopback:
streamed answers equal to the API's (whose ids are transformers' greedy ids), stats, examples, errors, Stop."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from serve.app import create_app
from samples.beeps import BEEP_PROMPTS
from serve.demo import AUDIO_QUESTION, AUDIO_QUESTIONS, DEMO_PATH, QUESTIONS, VIDEO_QUESTION, Demo, find_examples, mount_demo
from serve.protocol import ServerConfig
from gemma4_fixtures import gemma4_folder  # noqa: F401 (fixture)
from server_fixtures import mp4_bytes, png_bytes, running_server, wav_bytes

gradio_client = pytest.importorskip("gradio_client")
pytestmark = [
    # gradio 6.31's gr.Image(type="filepath") opens the upload with PIL to read its mode and never closes it
    pytest.mark.filterwarnings(r"ignore:unclosed file <_io.BufferedReader name='[^']*gradio[/\\]:ResourceWarning"),
]
ARGS = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": -1}
STATS = re.compile(r"(\d+) tokens in .* prompt: (\d+) tokens \((\d+) cached\) · (generating|finished: (\w+))")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "b_shapes.png").write_bytes(png_bytes(50, 30, seed=7))
    (folder / "a_shape.jpg").write_bytes(png_bytes(40, 40, seed=8, fmt="JPEG"))
    (folder / "a_shape.txt").write_text("What color is the shape?\n")
    (folder / "moving.mp4").write_bytes(mp4_bytes())
    (folder / "notes.md").write_text("not media")
    (folder / "beeps.wav").write_bytes(wav_bytes()[0])
    (folder / "beeps.txt").write_text("How many beeps are there?\n")
    return folder


@pytest.fixture(scope="module")
def demo_app(tiny_checkpoint, media_dir):
    engine_config = EngineConfig(model=str(tiny_checkpoint), num_blocks=300, block_size=8)
    engines = []

    def factory():
        engines.append(Engine(engine_config))
        return engines[-1]

    app = create_app(engine_config, ServerConfig(), engine_factory=factory)
    mount_demo(app, media_dir=media_dir)
    return app, engines


@pytest.fixture(scope="module")
def demo_server(demo_app):
    app, engines = demo_app
    with running_server(app) as url:
        yield url, engines


@pytest.fixture(scope="module")
def client(demo_server):
    return gradio_client.Client(demo_server[0] + DEMO_PATH + "/", verbose=False)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {f"{s.name}{json.dumps(s.labels, sort_keys=True) if s.labels else ''}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _finished(url: str, reason: str) -> float:
    return _metrics(url).get(f'fusionserve_request_finish_total{{"reason": "{reason}"}}', 0.0)


def _ask(client, image=None, video=None, question="What is this?", audio=None, **args) -> list[tuple[str, str]]:
    files = [m and gradio_client.handle_file(str(m)) for m in (image, video, audio)]
    job = client.submit(*files, question, *{**ARGS, **args}.values(), api_name="/answer")
    job.result(timeout=120)
    return [tuple(out) for out in job.outputs()]


def test_find_examples(media_dir, tmp_path):
    examples = find_examples(media_dir)
    assert [(e.image and e.image.split("/")[-1], e.video and e.video.split("/")[-1], e.question) for e in examples] == [
        ("a_shape.jpg", None, "What color is the shape?"),  # its .txt
        ("b_shapes.png", None, "Describe the image."),
        (None, "moving.mp4", VIDEO_QUESTION),
    ]
    assert find_examples(tmp_path / "missing") == []
    sounds = [e for e in find_examples(media_dir, with_audio=True) if e.audio]
    assert [(e.audio.split("/")[-1], e.image, e.video, e.question) for e in sounds] == [
        ("beeps.wav", None, None, "How many beeps are there?")]
    assert QUESTIONS == ("What color is the shape?", "What shape is this?", "How many shapes are there?",
                         "Describe the image.", "Which way is the shape moving?")
    assert AUDIO_QUESTIONS == tuple(BEEP_PROMPTS.values())  # the bundled model's sound questions


def test_image_answer_streams_transformers_ids_on_the_api_engine(demo_server, client, media_dir, hf_model,
                                                                 hf_processor):
    url, engines = demo_server
    image = media_dir / "b_shapes.png"
    ref_in = hf_processor(images=Image.open(image), text="What is this?", return_tensors="pt",
                          return_legacy_image_output=False)
    with torch.no_grad():
        ref = hf_model.generate(**ref_in, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_ids, num_prompt = ref[0, ref_in["input_ids"].shape[1]:].tolist(), ref_in["input_ids"].shape[1]
    api = httpx.post(url + "/v1/generate", data={"prompt": "What is this?", "max_tokens": "12", "temperature": "0"},
                     files={"image": ("b.png", image.read_bytes(), "image/png")}, timeout=60).json()
    assert api["token_ids"] == ref_ids[:len(api["token_ids"])]
    finished_before = _finished(url, api["finish_reason"])

    outputs = _ask(client, image=image)
    text, stats = outputs[-1]
    assert text == api["text"]
    completion, prompt, cached, _, reason = STATS.search(stats).groups()
    assert (int(completion), int(prompt), reason) == (len(api["token_ids"]), num_prompt, api["finish_reason"])
    assert int(cached) > 0  # the API request just ran this prompt: the demo shares its prefix cache
    assert "tokens/s" in stats
    # streamed: partial answers, each a prefix of the final one, came before it
    partial = [(t, STATS.search(s).groups()) for t, s in outputs[:-1]]
    assert partial and all(text.startswith(t) and g[3] == "generating" for t, g in partial)
    texts = [t for t, _ in partial]  # the page adds up the engine's deltas: the answer grows, it is never reset
    assert texts[-1] and all(later.startswith(t) for t, later in zip(texts, texts[1:]))
    counts = [int(g[0]) for _, g in partial]
    assert counts == sorted(counts) and counts[-1] < int(completion)
    # the same engine as the API: one model loaded, and the demo's request counted in the API's metrics
    assert len(engines) == 1
    assert _finished(url, api["finish_reason"]) == finished_before + 1


def test_video_matches_the_api(demo_server, client, media_dir):
    url, _ = demo_server
    clip = media_dir / "moving.mp4"
    api = httpx.post(url + "/v1/generate", data={"prompt": VIDEO_QUESTION, "max_tokens": "6", "temperature": "0"},
                     files={"video": ("m.mp4", clip.read_bytes(), "video/mp4")}, timeout=60).json()
    text, stats = _ask(client, video=clip, question=VIDEO_QUESTION, max_tokens=6)[-1]
    assert text == api["text"]
    assert int(STATS.search(stats).group(2)) == api["usage"]["prompt_tokens"]


def test_bad_input_is_a_message_for_the_user(client, media_dir, tmp_path):
    with pytest.raises(gradio_client.exceptions.AppError, match="Upload an image or a video"):
        _ask(client)
    with pytest.raises(gradio_client.exceptions.AppError, match="Type a question"):
        _ask(client, image=media_dir / "b_shapes.png", question="   ")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    with pytest.raises(gradio_client.exceptions.AppError, match="(?i)video"):
        _ask(client, video=broken, question=VIDEO_QUESTION)


def test_stop_aborts_the_request_and_frees_its_kv_blocks(demo_server, client, media_dir):
    url, _ = demo_server
    aborted_before = _finished(url, "abort")
    job = client.submit(gradio_client.handle_file(str(media_dir / "b_shapes.png")), None, None, "What is this?",
                        *{**ARGS, "max_tokens": 512}.values(), api_name="/answer")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.outputs(), "no streamed output within 60 s"
    job.cancel()
    while time.monotonic() < deadline and (_finished(url, "abort") == aborted_before
                                           or _metrics(url)["fusionserve_kv_blocks_used"] > 0):
        time.sleep(0.05)
    assert _finished(url, "abort") == aborted_before + 1
    assert _metrics(url)["fusionserve_kv_blocks_used"] == 0


def test_page_and_examples_are_served(demo_server, client, media_dir):
    url, _ = demo_server
    page = httpx.get(url + DEMO_PATH + "/", timeout=30)
    assert page.status_code == 200 and "fusionserve demo" in page.text
    config = httpx.get(url + DEMO_PATH + "/config", timeout=30).json()
    samples = [c for c in config["components"] if c.get("props", {}).get("label") == "Sample media"]
    assert samples and len(samples[0]["props"]["samples"]) == 3
    assert httpx.get(url + "/health").json()["status"] == "ok"  # the API routes beside it still answer


def test_sampling_controls_reach_the_engine(demo_server, client, media_dir):
    url, _ = demo_server
    image = media_dir / "a_shape.jpg"
    sampled = {"max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 5}
    api = httpx.post(url + "/v1/generate", data={"prompt": "What is this?", **{k: str(v) for k, v in sampled.items()}},
                     files={"image": ("a.jpg", image.read_bytes(), "image/jpeg")}, timeout=60).json()
    assert _ask(client, image=image, **sampled)[-1][0] == api["text"]
    assert _ask(client, image=image, max_tokens=8)[-1][0] != api["text"]  # greedy differs: the settings were used


def test_audio_is_shown_only_for_a_family_that_takes_it(demo_app, demo_server, media_dir):
    url, _ = demo_server
    assert asyncio.run(Demo(demo_app[0].state.front).takes_audio()) is False
    config = httpx.get(url + DEMO_PATH + "/config", timeout=30).json()
    (audio,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "audio"]
    assert audio["props"]["visible"] is False and audio["props"]["sources"] == ["upload", "microphone"]
    # the sample sound is on the page, in a column hidden until the page learns the model takes audio
    (sounds,) = [c for c in config["components"] if c.get("props", {}).get("label") == "Sample sounds"]
    assert len(sounds["props"]["samples"]) == 1
    updates = asyncio.run(Demo(demo_app[0].state.front).show_audio())
    assert [u["visible"] for u in updates] == [False, False, False]


def test_a_sound_for_a_model_without_audio_is_a_clear_message(client, media_dir):
    """The page hides the audio input from this Fuyu model; a sound sent through the page's API anyway is answered
    with a message, not a crash, and the page keeps answering."""
    with pytest.raises(gradio_client.exceptions.AppError, match="takes images and videos, not audio"):
        _ask(client, audio=media_dir / "beeps.wav", question="How many beeps are there?")
    assert _ask(client, image=media_dir / "b_shapes.png", max_tokens=4)[-1][0]


@pytest.fixture(scope="module")
def gemma_demo(gemma4_folder, media_dir):
    app = create_app(EngineConfig(model=str(gemma4_folder), num_blocks=256, block_size=8), ServerConfig())
    mount_demo(app, media_dir=media_dir)
    with running_server(app) as url:
        yield url, app


def test_an_audio_question_on_gemma_matches_the_api(gemma_demo, tmp_path):
    url, app = gemma_demo
    assert asyncio.run(Demo(app.state.front).takes_audio()) is True
    updates = asyncio.run(Demo(app.state.front).show_audio())  # input, example questions, sample sounds
    assert [u["visible"] for u in updates] == [True, True, True]
    sound = tmp_path / "tone.wav"
    sound.write_bytes(wav_bytes()[0])
    # the demo renders its question through the checkpoint's chat template, as the chat API does
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(sound.read_bytes()).decode(),
                                                         "format": "wav"}}
    api = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [audio_part, {"type": "text", "text": AUDIO_QUESTION}]}],
        "max_tokens": 8, "temperature": 0}).json()
    client = gradio_client.Client(url + DEMO_PATH + "/", verbose=False)
    text, stats = _ask(client, audio=sound, question=AUDIO_QUESTION, max_tokens=8)[-1]
    assert text == api["choices"][0]["message"]["content"]
    assert int(STATS.search(stats).group(2)) == api["usage"]["prompt_tokens"]
