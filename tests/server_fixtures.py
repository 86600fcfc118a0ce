"""Start a real uvicorn server on 127.0.0.1 (a free port) in a thread, for end-to-end tests; and a media
host on 127.0.0.1 that serves, redirects, stalls or serves too much.

    with running_server(create_app(EngineConfig(model=...), ServerConfig(...))) as base_url:
        httpx.get(base_url + "/health")
"""
from __future__ import annotations

import http.server
import io
import socket
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import uvicorn
from PIL import Image


@contextmanager
def running_server(app, ready_timeout_s: float = 120.0, wait_ready: bool = True) -> Iterator[str]:
    """Yields the base URL once ``/health`` answers 200 (any answer when not ``wait_ready``); stops the server
    (bounded) afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200 or not wait_ready:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"server at {base_url} did not become ready in {ready_timeout_s} s")
            time.sleep(0.05)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def openai_client(base_url: str, timeout_s: float = 60.0, api_key: str = "unused"):
    """The official client on a running server's ``/v1``, closed afterwards (no retries: a test sees every error)."""
    import openai

    with openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, timeout=timeout_s, max_retries=0) as client:
        yield client


def png_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def mp4_bytes(num_frames: int = 12, size: int = 48, fps: int = 6, height: int | None = None,
              preset: str | None = None) -> bytes:
    """A small h264 clip (``size`` x ``height or size``): a bright square moving right over a dark background."""
    import av

    width, height = size, height or size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": preset} if preset else None)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = np.full((height, width, 3), 30, dtype=np.uint8)
            x = (i * (width - 12)) // max(1, num_frames - 1)
            frame[18:30, x:x + 12] = (250, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def wav_bytes(num_samples: int = 6400, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A 16 kHz mono 16-bit WAV written with ``wave`` (a tone and noise), and its samples as a decoder gives them
    (s16 / 32768)."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16_000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 2000, num_samples)).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm.tobytes())
    return buf.getvalue(), pcm.astype(np.float32) / 32768


class MediaHost(http.server.ThreadingHTTPServer):
    """``/redirect``: 302 to ``/a.png``; ``/stall``: a 200 that trickles a byte every 50 ms (every read is
    quick, the whole never ends) for at most ``stall_s``; any other path: ``files[path]`` or 404. Records
    the Host header of each request and when each stalled connection was dropped by the client."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes], stall_s: float = 20.0):
        super().__init__(("127.0.0.1", 0), _MediaHandler)
        self.files, self.stall_s = files, stall_s
        self.hosts: list[str] = []
        self.stalls_dropped_after_s: list[float] = []
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MediaHost

    def do_GET(self):
        self.server.hosts.append(self.headers.get("Host", ""))
        path = self.path.split("?")[0]
        if path == "/redirect":
            self._head(302, 0, Location="/a.png")
        elif path == "/stall":
            self._head(200, 10**6)
            start = time.monotonic()
            try:
                while time.monotonic() - start < self.server.stall_s and not self.server.stopping.is_set():
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    self.server.stopping.wait(0.05)
            except OSError:  # the client gave up
                self.server.stalls_dropped_after_s.append(time.monotonic() - start)
        elif path in self.server.files:
            self._head(200, len(self.server.files[path]))
            self.wfile.write(self.server.files[path])
        else:
            self._head(404, 0)

    def _head(self, status: int, length: int, **headers):
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def media_host(files: dict[str, bytes], stall_s: float = 20.0) -> Iterator[MediaHost]:
    host = MediaHost(files, stall_s)
    thread = threading.Thread(target=host.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.stopping.set()
        host.shutdown()
        host.server_close()
        thread.join(timeout=10)
