"""Peak memory of a real server process (``python -m serve serve`` in a subprocess, peak RSS from
/proc/<pid>/status VmHWM) under 16 concurrent 60 MB uploads and a 4K clip, with --max-upload-mb 64.

Admission comes before reading, so at most ``max_num_reading`` (4) requests hold a body or decode media at
once, each up to ~3x its body (the raw JSON, its text, the decoded media), and video frames are resized as
they are decoded. The bound (stated in the README): peak RSS <= RSS at start-up + max_num_reading x 3 x the
upload limit + 256 MiB for a 4K decode; with the defaults, start-up + 1 GiB.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_fixtures import mp4_bytes, png_bytes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")]
MiB = 1024 * 1024
MAX_NUM_READING, MAX_UPLOAD = 4, 64 * MiB  # the server's defaults / --max-upload-mb 64
PEAK_RSS_ABOVE_START = MAX_NUM_READING * 3 * MAX_UPLOAD + 256 * MiB
CLIP_4K_BOUND = 320 * MiB  # what decoding 8 frames of a 3840x2160 clip may add (full-size frames: 400 MB more)
NUM_UPLOADS = 16
ANSWER_LEN = 200  # long enough that answered requests generate side by side: none may keep its upload meanwhile


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _padded_png(num_bytes: int, seed: int) -> bytes:
    """A small PNG followed by zeros (decoders stop at IEND): a big upload that decodes quickly."""
    image = png_bytes(48, 40, seed=seed)
    return image + b"\0" * (num_bytes - len(image))


def _chat_body(num_bytes: int) -> bytes:
    """~num_bytes of JSON: three padded PNGs as base64 data URLs."""
    part = base64.b64encode(_padded_png(num_bytes * 3 // 4 // 3, seed=1)).decode()
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + part}} for _ in range(3)]
    content.append({"type": "text", "text": "What is this?"})
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": ANSWER_LEN,
                       "ignore_eos": True}).encode()


@pytest.fixture
def server_process(tiny_checkpoint, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "serve", "--model", str(tiny_checkpoint), "--host",
                             "127.0.0.1", "--port", str(port), "--max-upload-mb", "64", "--num-blocks", "512", "--no-demo",
                             "--log-level", "warning"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


async def _uploads(url: str, chat_body: bytes, form_image: bytes) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=NUM_UPLOADS)) as c:
        async def chat():
            return (await c.post("/v1/chat/completions", content=chat_body,
                                 headers={"Content-Type": "application/json"})).status_code

        async def form():
            files = [("image", (f"{i}.png", form_image, "image/png")) for i in range(3)]
            data = {"prompt": "What is <image><image><image>", "max_tokens": str(ANSWER_LEN), "ignore_eos": "true"}
            return (await c.post("/v1/generate", data=data,
                                 files=files)).status_code

        return await asyncio.gather(*(chat() if k % 2 else form() for k in range(NUM_UPLOADS)))


def test_peak_rss_under_16_big_uploads_and_a_4k_clip(server_process):
    url, pid = server_process
    clip = mp4_bytes(num_frames=8, size=3840, height=2160, fps=4, preset="ultrafast")
    chat_body = _chat_body(60 * MiB)
    form_image = _padded_png(20 * MiB - 4096, seed=2)  # 3 per request: 60 MB
    assert len(chat_body) > 59 * MiB
    start = _vm_hwm(pid)
    warm = httpx.post(url + "/v1/generate", data={"prompt": "Which way?", "max_tokens": "2"},
                      files={"video": ("s.mp4", mp4_bytes(), "video/mp4")}, timeout=60)
    assert warm.status_code == 200, warm.text
    before_clip = _vm_hwm(pid)

    r = httpx.post(url + "/v1/generate", data={"prompt": "Which way?", "max_tokens": "2"},
                   files={"video": ("4k.mp4", clip, "video/mp4")}, timeout=120)
    assert r.status_code == 200, r.text
    clip_cost = _vm_hwm(pid) - before_clip

    statuses = asyncio.run(_uploads(url, chat_body, form_image))
    peak = _vm_hwm(pid)
    print(f"peak RSS {peak / MiB:.0f} MiB: {start / MiB:.0f} MiB at start-up, the 4K clip added {clip_cost / MiB:.0f} "
          f"MiB; upload statuses {sorted(statuses)}")
    assert set(statuses) <= {200, 429} and statuses.count(200) >= MAX_NUM_READING, statuses
    assert clip_cost < CLIP_4K_BOUND, f"the 4K clip added {clip_cost / MiB:.0f} MiB"
    assert peak - start < PEAK_RSS_ABOVE_START, f"peak RSS {peak / MiB:.0f} MiB, {start / MiB:.0f} MiB at start-up"
    assert httpx.get(url + "/health", timeout=10).status_code == 200
