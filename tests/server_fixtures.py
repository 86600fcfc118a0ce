"""Start a real uvicorn server on 127.0.0.1 (a free port) in a thread, for end-to-end tests.

    with running_server(create_app(EngineConfig(model=...), ServerConfig(...))) as base_url:
        httpx.get(base_url + "/health")
"""
from __future__ import annotations

import io
import socket
import threading
import time
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


def png_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def mp4_bytes(num_frames: int = 12, size: int = 48, fps: int = 6) -> bytes:
    """A small h264 clip: a bright square moving right over a dark background."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = np.full((size, size, 3), 30, dtype=np.uint8)
            x = (i * (size - 12)) // max(1, num_frames - 1)
            frame[18:30, x:x + 12] = (250, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
