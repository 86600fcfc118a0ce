"""fusionserve behind NVIDIA Dynamo on one machine: KV routing vs round-robin, and the frontend hop's cost.

1. A shared-prefix workload (32 chat requests, 4 distinct images, a long shared text, a question each) through
   Dynamo's frontend to 2 fusionserve workers, once with ``--router-mode kv`` and once with ``round-robin``:
   requests/s, time to first token, and each worker's prefix-cache hit rate over the run (its
   ``fusionserve_prefix_cache_*`` counters). The ratios are KV routing over round-robin, measured in this run.
2. The frontend hop at low load: the same text requests one at a time through frontend + 1 worker and to
   ``fusionserve serve`` directly; the ratio and the difference of their median latencies.

    python -m benchmarks.dynamo [--requests 32] [--clients 4] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchmarks.common import bench_checkpoint  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.dynamo.launch import Cluster  # noqa: E402
from serve.load import LoadResult, LoadSpec, run_load, sse_events  # noqa: E402
from serve.protocol import ServerConfig  # noqa: E402
from server_fixtures import running_server  # noqa: E402

NAME = "bench"
SHARED = ("You are looking at one picture from a set of four. Answer in a short sentence and name the main shape "
          "you see, its colour and where it sits in the frame. ") * 4
WORKER_ARGS = ("--torch-threads", "1", "--media-workers", "1", "--block-size", "16", "--num-blocks", "2048")


def chat_body(image: bytes | None, question: str, max_tokens: int) -> dict:
    content = [{"type": "text", "text": SHARED + question}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def chat_one(client: httpx.AsyncClient, spec: LoadSpec, image: bytes, result: LoadResult) -> None:
    """One streamed chat request (``run_load``'s per-request coroutine); TTFT is the first content chunk."""
    start = time.perf_counter()
    body = chat_body(image, f" Question {result.num_ok + result.num_errors}: what is it?", spec.max_tokens)
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=spec.request_timeout_s) as response:
        if response.status_code != 200:
            result.error(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return
        last, finished = None, False
        async for event in sse_events(response):
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    (result.ttft_s if last is None else result.itl_s).append(now - (last or start))
                    last = now
                finished = finished or choice.get("finish_reason") is not None
            if event.get("usage"):
                result.num_tokens += event["usage"]["completion_tokens"]
        if not finished:
            result.error("the stream ended without a finish_reason")
            return
        result.num_ok += 1


def hit_counters(cluster: Cluster) -> list[tuple[float, float]]:
    return [(cluster.metric(w, "fusionserve_prefix_cache_hit_tokens"),
             cluster.metric(w, "fusionserve_prefix_cache_query_tokens")) for w in cluster.workers]


def routing_phase(model, router_mode: str, spec: LoadSpec) -> tuple[LoadResult, list[str]]:
    with Cluster(str(model), num_workers=2, router_mode=router_mode, served_model_name=NAME,
                 worker_args=WORKER_ARGS) as cluster:
        spec.url = cluster.url
        asyncio.run(sequential_latencies(cluster.url, 2, spec.max_tokens))  # warm-up: text only, other prompts
        before = hit_counters(cluster)
        result = asyncio.run(run_load(spec, chat_one))
        after = hit_counters(cluster)
    rates = []
    for (hits0, queried0), (hits1, queried1) in zip(before, after):
        queried = queried1 - queried0
        rates.append(f"{(hits1 - hits0) / queried:.0%} of {queried:.0f}" if queried else "no requests")
    return result, rates


async def sequential_latencies(url: str, num: int, max_tokens: int) -> list[float]:
    """Seconds of each of ``num`` text requests sent one at a time (after 2 not counted)."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i in range(num + 2):
            body = {"model": NAME, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Tell me about shape number {i} in one line."}]}
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            if i >= 2:
                latencies.append(time.perf_counter() - start)
    return latencies


def hop_phase(model, num: int, max_tokens: int) -> tuple[float, float]:
    """Median latency (s) through frontend + 1 worker, then straight to ``fusionserve serve``."""
    with Cluster(str(model), num_workers=1, served_model_name=NAME, worker_args=WORKER_ARGS) as cluster:
        through = statistics.median(asyncio.run(sequential_latencies(cluster.url, num, max_tokens)))
    torch.set_num_threads(1)  # as each worker (--torch-threads 1)
    app = create_app(EngineConfig(model=str(model), block_size=16, num_blocks=2048), ServerConfig(model_name=NAME))
    with running_server(app) as url:
        direct = statistics.median(asyncio.run(sequential_latencies(url, num, max_tokens)))
    return through, direct


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--hop-requests", type=int, default=12)
    args = p.parse_args(argv)
    model = bench_checkpoint(target_size=128)
    results = {}
    for mode in ("kv", "round-robin"):
        spec = LoadSpec(num_clients=args.clients, num_requests=args.requests, max_tokens=args.max_tokens,
                        image_size=128, duration_s=600.0)
        results[mode] = routing_phase(model, mode, spec)
        result, rates = results[mode]
        print(f"--- router {mode}: {args.requests} requests, {args.clients} clients, 4 images + shared text")
        print(result.summary())
        print(f"prefix-cache hit rate per worker: {', '.join(rates)}")
    (kv, _), (rr, _) = results["kv"], results["round-robin"]
    ttft = lambda r: r.percentile(r.ttft_s, 50)  # noqa: E731
    print(f"KV routing / round-robin: {kv.requests_per_s / rr.requests_per_s:.2f}x requests/s, "
          f"{ttft(rr) / ttft(kv):.2f}x faster TTFT p50")
    through, direct = hop_phase(model, args.hop_requests, args.max_tokens)
    print(f"--- frontend hop, one request at a time ({args.max_tokens} tokens): through Dynamo "
          f"{1000 * through:.1f} ms, fusionserve serve {1000 * direct:.1f} ms median: "
          f"{through / direct:.2f}x ({1000 * (through - direct):+.1f} ms)")
    return 0 if kv.num_errors == rr.num_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
