"""Load generator: concurrent streaming clients against a running server (``fusionserve bench``).

Each client sends ``/v1/generate`` multipart requests (one random PNG, ``stream=true``,
``ignore_eos`` so every answer is ``max_tokens`` long) back to back until ``num_requests`` have been
sent in all or ``duration_s`` has passed. Measured on the client: time to first token, gaps between
token events, 429s (counted apart from errors) and anything else that went wrong.
"""
from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image


@dataclass
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    num_clients: int = 64
    num_requests: int = 256
    duration_s: float = 60.0
    max_tokens: int = 32
    image_size: int = 128
    prompt: str = "Describe the image."
    api_key: str | None = None
    request_timeout_s: float = 120.0


@dataclass
class LoadResult:
    num_ok: int = 0
    num_rejected: int = 0  # 429
    num_errors: int = 0
    errors: list[str] = field(default_factory=list)  # the first few
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    num_tokens: int = 0

    def error(self, message: str) -> None:
        self.num_errors += 1
        if len(self.errors) < 5:
            self.errors.append(message)

    @property
    def requests_per_s(self) -> float:
        return self.num_ok / self.wall_s if self.wall_s else 0.0

    @staticmethod
    def percentile(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> str:
        ms = lambda v: f"{1000 * v:.1f} ms"  # noqa: E731
        lines = [
            f"requests ok {self.num_ok}, 429 {self.num_rejected}, errors {self.num_errors} in {self.wall_s:.1f} s "
            f"({self.requests_per_s:.2f} req/s, {self.num_tokens / self.wall_s if self.wall_s else 0:.0f} tok/s)",
            f"time to first token p50 {ms(self.percentile(self.ttft_s, 50))}  p99 {ms(self.percentile(self.ttft_s, 99))}",
            f"inter-token latency p50 {ms(self.percentile(self.itl_s, 50))}  p99 {ms(self.percentile(self.itl_s, 99))}"
            + (f"  (mean {ms(statistics.fmean(self.itl_s))})" if self.itl_s else ""),
        ]
        return "\n".join(lines + [f"error: {e}" for e in self.errors])


def random_png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


async def _one(client: httpx.AsyncClient, spec: LoadSpec, image: bytes, result: LoadResult) -> None:
    data = {"prompt": spec.prompt, "max_tokens": str(spec.max_tokens), "temperature": "0", "stream": "true",
            "ignore_eos": "true"}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/generate", data=data, files={"image": ("a.png", image, "image/png")},
                             timeout=spec.request_timeout_s) as response:
        if response.status_code == 429:
            await response.aread()
            result.num_rejected += 1
            return
        if response.status_code != 200:
            result.error(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return
        last, finished = None, False
        async for event in sse_events(response):
            if "error" in event:
                result.error(str(event["error"]))
                return
            now = time.perf_counter()
            if event["token_ids"]:
                if last is None:
                    result.ttft_s.append(now - start)
                else:
                    result.itl_s.append((now - last) / len(event["token_ids"]))
                result.num_tokens += len(event["token_ids"])
                last = now
            finished = finished or event["finish_reason"] is not None
        if not finished:
            result.error("the stream ended without a finish_reason")
            return
        result.num_ok += 1


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON payloads of a server-sent-events stream (``[DONE]`` and other lines skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def run_load(spec: LoadSpec, one: Callable[..., Awaitable[None]] | None = None) -> LoadResult:
    """``one(client, spec, image, result)`` sends one request and records it (default: a multipart
    ``/v1/generate`` stream); ``spec.num_clients`` loops send ``spec.num_requests`` in all."""
    one = one or _one
    result = LoadResult()
    images = [random_png(spec.image_size, seed) for seed in range(4)]
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=spec.num_clients, max_keepalive_connections=spec.num_clients)
    sent = 0
    start = time.perf_counter()
    deadline = start + spec.duration_s

    async def client_loop(client: httpx.AsyncClient, k: int):
        nonlocal sent
        while sent < spec.num_requests and time.perf_counter() < deadline:
            sent += 1
            try:
                await one(client, spec, images[(k + sent) % len(images)], result)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
                result.error(f"{type(exc).__name__}: {exc}")
            if result.num_rejected and result.num_rejected % spec.num_clients == 0:
                await asyncio.sleep(0.01)  # against a full queue: do not spin

    async with httpx.AsyncClient(base_url=spec.url, headers=headers, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(spec.num_clients)))
    result.wall_s = time.perf_counter() - start
    return result
