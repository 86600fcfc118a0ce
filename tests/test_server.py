"""End to end over a real uvicorn server on 127.0.0.1: the openai client, multipart uploads, every error
code from real bad input, disconnects (KV freed, read from /metrics), 429 and 503."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import openai
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from serve.app import create_app
from serve.protocol import ServerConfig
from server_fixtures import media_host, mp4_bytes, png_bytes, running_server

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UPLOAD_LIMIT = 2 * 1024 * 1024


def _engine_config(checkpoint, **options) -> EngineConfig:
    return EngineConfig(model=str(checkpoint), **{"num_blocks": 300, "block_size": 8, **options})


MEDIA_IMAGE = png_bytes(20, 20, seed=11)
PADDED_IMAGE = MEDIA_IMAGE + b"\0" * (UPLOAD_LIMIT * 6 // 10)  # a PNG with trailing bytes: 60% of the limit


@pytest.fixture(scope="module")
def media():
    with media_host({"/a.png": MEDIA_IMAGE, "/padded.png": PADDED_IMAGE, "/big.png": b"\0" * (UPLOAD_LIMIT + 1)},
                    stall_s=20) as host:
        yield host


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media):
    config = ServerConfig(api_key=KEY, max_upload_bytes=UPLOAD_LIMIT, max_images=3, max_videos=1,
                          allowed_media_hosts=("127.0.0.1",), allowed_media_ports=(media.port,),
                          allow_private_media_addresses=True, media_fetch_timeout_s=2.0)
    with running_server(create_app(_engine_config(tiny_checkpoint), config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def _reference_ids(hf_model, hf_processor, image_bytes: bytes, text: str, max_tokens: int):
    ref_in = hf_processor(images=Image.open(io.BytesIO(image_bytes)), text=text, return_tensors="pt",
                          return_legacy_image_output=False)
    with torch.no_grad():
        ref = hf_model.generate(**ref_in, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    return ref[0, ref_in["input_ids"].shape[1]:].tolist(), ref_in["input_ids"].shape[1]


def _events(response: httpx.Response) -> list:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {f"{s.name}{json.dumps(s.labels, sort_keys=True) if s.labels else ''}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _expect_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    if code:
        assert error["code"] == code
    return error


GREEDY = {"max_tokens": "10", "temperature": "0", "ignore_eos": "true"}


def _fields(data: dict) -> list:
    """Form fields as multipart parts with no file (httpx sends urlencoded when there are no files)."""
    return [(name, (None, value)) for name, value in data.items()]


def test_openai_client_streaming_and_not(server, client, hf_model, hf_processor):
    image = png_bytes(44, 36, seed=5)
    api = openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=60, max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "What is this?"}]}]
    kw = dict(model=api.models.list().data[0].id, messages=messages, max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = api.chat.completions.create(**kw)
    ref_ids, num_prompt = _reference_ids(hf_model, hf_processor, image, "What is this?", 12)
    # the same image and question as multipart: its ids are transformers' greedy ids, its text the chat's text
    same = client.post("/v1/generate", data={"prompt": "What is this?", **GREEDY, "max_tokens": "12"},
                       files={"image": ("a.png", image, "image/png")}).json()
    assert same["token_ids"] == ref_ids
    assert full.choices[0].message.content == same["text"]
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (num_prompt, 12)
    chunks = list(api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_multipart_one_image_matches_transformers(client, hf_model, hf_processor):
    image = png_bytes(50, 30, seed=7)
    r = client.post("/v1/generate", data={"prompt": "What is this?", **GREEDY},
                    files={"image": ("a.png", image, "image/png")})
    assert r.status_code == 200, r.text
    ref_ids, num_prompt = _reference_ids(hf_model, hf_processor, image, "What is this?", 10)
    body = r.json()
    assert body["token_ids"] == ref_ids and body["usage"]["prompt_tokens"] == num_prompt
    assert body["finish_reason"] == "length"


def test_multipart_video_several_images_and_streaming(client):
    r = client.post("/v1/generate", data={"prompt": "Which way?", **GREEDY},
                    files={"video": ("clip.mp4", mp4_bytes(), "video/mp4")})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 10 and r.json()["usage"]["prompt_tokens"] > 8 * 36
    images = [("image", (f"{i}.png", png_bytes(20 + 9 * i, 24, seed=i), "application/octet-stream")) for i in range(3)]
    data = {"prompt": "Compare <image> with <image> and <image>", **GREEDY}
    full = client.post("/v1/generate", data=data, files=images)
    assert full.status_code == 200, full.text
    streamed = client.post("/v1/generate", data={**data, "stream": "true"}, files=images)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert sum((e["token_ids"] for e in events), []) == full.json()["token_ids"]
    assert "".join(e["text"] for e in events) == full.json()["text"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 10


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header that claims ``width`` x ``height``, then a tiny IDAT: 100 bytes in all."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg() -> bytes:
    return png_bytes(64, 48, seed=3, fmt="JPEG")


@pytest.mark.parametrize("name, data, content_type, status, code", [
    ("corrupt.jpg", _jpeg()[:300] + b"\x00" * 40, "image/jpeg", 400, "bad_media"),
    ("empty.png", b"", "image/png", 400, "bad_media"),
    ("notes.png", b"just some text, not a picture\n" * 20, "image/png", 400, "bad_media"),
    ("notes.txt", b"just some text\n", "text/plain", 415, "unsupported_media_type"),
    ("bomb.png", _png_claiming(100_000, 100_000), "image/png", 400, "bad_media"),
])
def test_bad_images(client, name, data, content_type, status, code):
    r = client.post("/v1/generate", data={"prompt": "What is <image>"}, files={"image": (name, data, content_type)})
    error = _expect_error(r, status, code)
    if name == "bomb.png":
        assert "100000x100000" in error["message"]


@pytest.mark.parametrize("data, code", [
    ({"prompt": "x", "max_tokens": "-1"}, "invalid_parameter"),
    ({"prompt": "x", "temperature": "hot"}, "invalid_parameter"),
    ({"prompt": "x", "top_p": "2"}, "invalid_parameter"),
    ({"prompt": "x", "nonsense": "1"}, "invalid_parameter"),
    ({"max_tokens": "3"}, "missing_prompt"),
    ({"prompt": "word " * 1200}, "invalid_parameter"),  # longer than the model's context
    ({"prompt": "<image> and <image>"}, "invalid_parameter"),  # markers without the images
])
def test_bad_form_parameters(client, data, code):
    error = _expect_error(client.post("/v1/generate", files=_fields(data)), 400, code)
    assert "form field" not in error["message"] or "nonsense" in data


def test_too_many_images_and_wrong_body_types(client):
    files = [("image", (f"{i}.png", png_bytes(8, 8, seed=i), "image/png")) for i in range(4)]
    _expect_error(client.post("/v1/generate", data={"prompt": "x"}, files=files), 400, "too_many_images")
    _expect_error(client.post("/v1/generate", json={"prompt": "x"}), 415, "unsupported_media_type")
    _expect_error(client.post("/v1/chat/completions", content=b"<xml/>", headers={"Content-Type": "text/xml"}),
                  415, "unsupported_media_type")
    _expect_error(client.post("/v1/chat/completions", content=b'{"messages": [', headers={
        "Content-Type": "application/json"}), 400, "invalid_json")
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}
    _expect_error(client.post("/v1/chat/completions", json=body), 400, "invalid_parameter")
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}]}]}
    _expect_error(client.post("/v1/chat/completions", json=body), 400, "remote_media_refused")
    _expect_error(client.get("/v1/nowhere"), 404)


def test_api_key(server, client):
    assert httpx.get(server + "/health").status_code == 200  # health needs no key
    _expect_error(httpx.get(server + "/v1/models"), 401, "invalid_api_key")
    _expect_error(httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"


def test_oversized_uploads_are_413_without_reading_them(server, client):
    # declared: 2 GB announced, a few bytes sent; the answer comes before the body
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 2147483648\r\n\r\n--b\r\n")
        answer = b""
        for _ in range(50):  # head and body may come in separate reads
            data = sock.recv(65536)
            answer += data
            if not data or b"payload_too_large" in answer:
                break
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer
    # undeclared (chunked): refused once the count passes the limit
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(UPLOAD_LIMIT // 65536 + 8):
            yield b"\0" * 65536
    r = client.post("/v1/generate", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    _expect_error(r, 413, "payload_too_large")
    assert client.get("/health").status_code == 200


def test_disconnect_mid_stream_frees_every_kv_block(server, client):
    before = _metrics(client).get('fusionserve_request_finish_total{"reason": "abort"}', 0.0)
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as own:
        with own.stream("POST", "/v1/generate", data={"prompt": "Go on", "max_tokens": "1500", "ignore_eos": "true",
                                                     "stream": "true"}, files={"image": ("a.png", png_bytes(30, 30))}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert _metrics(client)["fusionserve_kv_blocks_used"] > 0
    # the connection is closed; the server must abort the request and free its blocks
    for _ in range(500):
        m = _metrics(client)
        if m.get('fusionserve_request_finish_total{"reason": "abort"}', 0.0) == before + 1 and \
                m["fusionserve_kv_blocks_used"] == 0:
            break
        threading.Event().wait(0.02)
    assert m['fusionserve_request_finish_total{"reason": "abort"}'] == before + 1
    assert m["fusionserve_kv_blocks_used"] == 0 and m["fusionserve_kv_blocks_free"] == 300
    assert m["fusionserve_requests_running"] == 0


def _chat_urls(client, *urls: str) -> httpx.Response:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.post("/v1/chat/completions", json={"max_tokens": 4, "messages": [{"role": "user", "content": parts}]})


def test_fetch_from_allowed_host(client, media):
    url = f"http://127.0.0.1:{media.port}"
    assert _chat_urls(client, url + "/a.png").status_code == 200
    assert _chat_urls(client, url + "/padded.png").status_code == 200  # 60% of the budget: fits
    _expect_error(_chat_urls(client, url.replace("127.0.0.1", "localhost") + "/a.png"), 400, "remote_media_refused")
    assert "redirect" in _expect_error(_chat_urls(client, url + "/redirect"), 400, "media_fetch_failed")["message"]
    _expect_error(_chat_urls(client, url + "/big.png"), 413, "payload_too_large")
    _expect_error(_chat_urls(client, url + "/padded.png", url + "/padded.png"), 413, "payload_too_large")  # one budget
    start = time.monotonic()
    _expect_error(_chat_urls(client, url + "/stall"), 400, "media_fetch_timeout")  # trickles: every read is quick
    assert time.monotonic() - start < 6.0  # the 2 s deadline, not the source's 20 s
    assert client.get("/health").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_checkpoint):
    app = create_app(_engine_config(tiny_checkpoint, max_num_seqs=1), ServerConfig(max_queue_len=0))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", files=_fields({"prompt": "long", "max_tokens": "1500",
                                                              "ignore_eos": "true", "stream": "true"})) as first:
            assert first.status_code == 200
            r = c.post("/v1/generate", files=_fields({"prompt": "second"}))
            _expect_error(r, 429, "queue_full")
            assert int(r.headers["Retry-After"]) >= 1


def test_not_ready_is_503(tiny_checkpoint):
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        raise ValueError("never loads")

    app = create_app(_engine_config(tiny_checkpoint), ServerConfig(), engine_factory=slow_factory)
    with running_server(app, wait_ready=False) as url:
        _expect_error(httpx.get(url + "/health"), 503, "not_ready")
        _expect_error(httpx.post(url + "/v1/generate", files=_fields({"prompt": "x"})), 503, "not_ready")
        gate.set()


def _stats_fail_when(armed: threading.Event, checkpoint):
    def factory():
        engine = Engine(_engine_config(checkpoint))
        stats = engine.stats

        def failing():
            if armed.is_set():
                raise RuntimeError("stats exploded at 0x7f00")
            return stats()

        engine.stats = failing
        return engine

    return factory


def test_a_dead_engine_ends_open_streams_and_answers_503(tiny_checkpoint):
    armed = threading.Event()
    app = create_app(_engine_config(tiny_checkpoint), ServerConfig(), engine_factory=_stats_fail_when(armed,
                                                                                                     tiny_checkpoint))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        form = _fields({"prompt": "long", "max_tokens": "1500", "ignore_eos": "true", "stream": "true"})
        with c.stream("POST", "/v1/generate", files=form) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            assert "error" not in json.loads(next(lines)[6:])
            armed.set()
            start = time.monotonic()
            rest = list(lines)  # the stream ends (a hang is a ReadTimeout after 20 s)
            assert time.monotonic() - start < 10
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == "engine_error" and "restart" in error["message"] and "exploded" not in error["message"]
        assert "0x7f00" not in error["message"]
        _expect_error(c.get("/health"), 503, "not_ready")
        start = time.monotonic()
        _expect_error(c.post("/v1/generate", files=_fields({"prompt": "x", "max_tokens": "2"})), 503, "not_ready")
        _expect_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503)
        assert time.monotonic() - start < 2


def _hold_a_slow_upload(url: str) -> socket.socket:
    """A multipart upload whose body stops after its first bytes: the server admits it and waits."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi")
    return sock


def test_admission_before_the_body_is_read(tiny_checkpoint):
    config = ServerConfig(max_num_reading=1, admission_wait_s=0.5, body_read_timeout_s=3.0)
    app = create_app(_engine_config(tiny_checkpoint), config)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with _hold_a_slow_upload(url) as slow:
            for _ in range(250):
                if _metrics(c)["fusionserve_requests_reading"] == 1:
                    break
                time.sleep(0.02)
            assert _metrics(c)["fusionserve_requests_reading"] == 1  # it holds the one reading slot
            start = time.monotonic()
            r = c.post("/v1/generate", files=_fields({"prompt": "second", "max_tokens": "2"}))
            _expect_error(r, 429, "queue_full")  # after a short wait, with its body unread
            assert 0.4 < time.monotonic() - start < 3 and int(r.headers["Retry-After"]) >= 1
            answer = slow.recv(65536)  # the slow body runs out of time: 408, and its slot frees
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        r = c.post("/v1/generate", files=_fields({"prompt": "third", "max_tokens": "2"}))
        assert r.status_code == 200, r.text
        assert _metrics(c)["fusionserve_requests_reading"] == 0


def _deep(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def _chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}).encode()


_MSG = {"role": "user", "content": "hi"}
CHAT_FUZZ = [  # (raw JSON body, content type)
    (_deep(100_000), "application/json"),
    (b'{"messages": ' + _deep(50_000, '{"a":', "}").replace(b"}", b"1}", 1) + b"}", "application/json"),
    (b'{"messages": [{"role": "user", "content": ' + _deep(20_000) + b"}]}", "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN, "max_tokens": 2}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity, "max_tokens": 2}', "application/json"),
    (_chat_body(max_tokens=-(10**30)), "application/json"),
    (_chat_body(seed=2**64), "application/json"),
    (_chat_body(seed=-(2**70)), "application/json"),
    (_chat_body(top_k=10**20), "application/json"),
    (_chat_body(n=10**30), "application/json"),
    (_chat_body(temperature=1e308), "application/json"),
    (_chat_body(max_tokens=1.5), "application/json"),
    (_chat_body(max_tokens="2"), "application/json"),
    (_chat_body(max_tokens=True), "application/json"),
    (_chat_body(stream="yes"), "application/json"),
    (_chat_body(stream_options=[1]), "application/json"),
    (_chat_body(stream=True, stream_options={"include_usage": "no"}), "application/json"),
    (_chat_body(stop=5), "application/json"),
    (_chat_body(stop={"a": 1}), "application/json"),
    (_chat_body(stop=[1, 2]), "application/json"),
    (_chat_body(stop=["x" * 100_000]), "application/json"),
    (_chat_body(stop=["s"] * 20_000), "application/json"),
    (_chat_body(ignore_eos="maybe"), "application/json"),
    (_chat_body(logprobs={"x": 1}), "application/json"),
    (_chat_body(messages="hi"), "application/json"),
    (_chat_body(messages=None), "application/json"),
    (_chat_body(messages={"role": "user"}), "application/json"),
    (_chat_body(messages=[[_MSG]]), "application/json"),
    (_chat_body(messages=[{"role": ["user"], "content": "hi"}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": 5}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": {"type": "text"}}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [1, None, "x"]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ["x"]}}]}]),
     "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * 1_000_000}}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64,!!!!"}}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://" + "a" * 100_000}}]}]), "application/json"),
    (_chat_body(messages=[{"role": "user", "content": "word " * 300_000}]), "application/json"),  # 1.5 MB of text
    (_chat_body(messages=[{"role": "x" * 1_000_000, "content": "hi"}]), "application/json"),
    (_chat_body(model="m" * 1_000_000), "application/json"),
    (_chat_body(messages=[_MSG] * 20_000), "application/json"),
    (b"", "application/json"), (b"null", "application/json"), (b"[]", "application/json"),
    (b'"messages"', "application/json"), (b"true", "application/json"), (b"\xff\xfe\x00{", "application/json"),
    (b"\xef\xbb\xbf" + _chat_body(), "application/json"),
    (_chat_body().decode().encode("utf-16"), "application/json; charset=utf-16"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "\x00"}], "max_tokens": 2}', "application/json"),
    (_chat_body(), "text/plain"), (_chat_body(), "application/x-www-form-urlencoded"),
    (_chat_body(), "multipart/form-data; boundary=b"), (_chat_body(), "application/json; charset=\x7f"),
    (_chat_body(), "!!!"),
]
GENERATE_FUZZ = [  # (form fields, files, content type override)
    ({"prompt": "x", "max_tokens": "9" * 5000}, None, None),
    ({"prompt": "x", "max_tokens": "1e999"}, None, None),
    ({"prompt": "x", "max_tokens": "2", "temperature": "nan"}, None, None),
    ({"prompt": "x", "max_tokens": "2", "temperature": "inf"}, None, None),
    ({"prompt": "x", "max_tokens": "2", "seed": str(2**64)}, None, None),
    ({"prompt": "x", "max_tokens": "2", "seed": "-" + "9" * 100}, None, None),
    ({"prompt": "x", "max_tokens": "2", "top_k": str(10**20)}, None, None),
    ({"prompt": "x", "max_tokens": "2", "stream": "perhaps"}, None, None),
    ({"prompt": "x", "max_tokens": "2", "ignore_eos": "2"}, None, None),
    ({"prompt": "x" * (300 * 1024)}, None, None),
    ({"prompt": "x", "max_tokens": "2", "stop": "s" * 200_000}, None, None),
    ({"prompt": "\x00\ud800".encode("utf-8", "surrogatepass").decode("latin-1"), "max_tokens": "2"}, None, None),
    ({"prompt": "x", "max_tokens": "2"}, {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\xff" * 5000, "image/png")}, None),
    ({"prompt": "x", "max_tokens": "2"}, {"video": ("a.mp4", b"\x00" * 5000, "video/mp4")}, None),
    ({"prompt": "x", "max_tokens": "2"}, {"image": ("a.png", png_bytes(12, 12), "image/png; charset=\x7f")}, None),
    ({"prompt": "x", "max_tokens": "2"}, {"audio": ("a.wav", b"RIFF", "audio/wav")}, None),
    ({"prompt": "x", "max_tokens": "2"}, None, "multipart/form-data"),
    ({"prompt": "x", "max_tokens": "2"}, None, "multipart/form-data; boundary=" + "b" * 5000),
    ({"prompt": "x", "max_tokens": "2"}, None, "application/json"),
    ({"prompt": "x", "max_tokens": "2"}, None, "text/plain"),
    ({"prompt": "x", "max_tokens": "2"}, None, "!!!"),
]
RAW_GENERATE_FUZZ = [  # hand-made multipart bodies (boundary "b")
    b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
    b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n\xff\xfe\r\n--b--\r\n",
    b"--b\r\n" + b"X-Junk: " + b"h" * 100_000 + b"\r\n\r\nx\r\n--b--\r\n",
    b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx",  # never closed
    b"garbage without a boundary",
    b"".join(b"--b\r\nContent-Disposition: form-data; name=\"stop\"\r\n\r\ns\r\n" for _ in range(100)) + b"--b--\r\n",
]


def _no_server_error(r: httpx.Response, case) -> None:
    assert r.status_code < 500, (repr(case)[:300], r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "code", "param"} and "Traceback" not in error["message"]


def test_hostile_json_and_forms_are_never_a_server_error(client):
    for raw, content_type in CHAT_FUZZ:
        _no_server_error(client.post("/v1/chat/completions", content=raw, headers={"Content-Type": content_type}),
                         (raw, content_type))
    for fields, files, content_type in GENERATE_FUZZ:
        request = client.build_request("POST", "/v1/generate", files={**{k: (None, v) for k, v in fields.items()},
                                                                        **(files or {})})
        if content_type is not None:
            request.headers["Content-Type"] = content_type
        _no_server_error(client.send(request), (fields, files, content_type))
    for raw in RAW_GENERATE_FUZZ:
        _no_server_error(client.post("/v1/generate", content=raw,
                                     headers={"Content-Type": "multipart/form-data; boundary=b"}), raw)
    assert client.get("/health").status_code == 200


def test_an_unexpected_handler_error_is_a_generic_json_500(tiny_checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail at /srv/app.py line 12")

    monkeypatch.setattr("serve.app.parse_form", broken)
    app = create_app(_engine_config(tiny_checkpoint), ServerConfig())
    with running_server(app) as url:
        r = httpx.post(url + "/v1/generate", files=_fields({"prompt": "x"}), timeout=30)
    error = _expect_error(r, 500, "internal_error")
    assert "secret" not in error["message"] and "Traceback" not in r.text
