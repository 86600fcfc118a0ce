"""Load benchmark over loopback: concurrent streaming clients against a real server it starts itself.

    .venv/bin/python -m benchmarks.load [--model tiny|bench] [--clients 64] [--requests 192]

Phase 1: ``--clients`` clients (default 64) against a roomy queue: requests/s, p50/p99 time to first
token and inter-token latency, errors (target: 0). Phase 2: the same clients against a server with
``max_num_seqs=4`` and ``max_queue_len=4``: the overflow must come back as 429s, never as timeouts.
Both are bounded in request count and in time (``--duration-s``). ``fusionserve bench --url`` runs
phase-1-style load against a server you started.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchmarks.common import bench_checkpoint  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.load import LoadSpec, run_load  # noqa: E402
from serve.protocol import ServerConfig  # noqa: E402
from server_fixtures import running_server  # noqa: E402


def checkpoint(size: str) -> Path:
    if size == "bench":
        return bench_checkpoint()
    from samples.random_checkpoint import make_checkpoint

    return make_checkpoint(tempfile.mkdtemp(prefix="fusionserve-load-"), seed=0)


def phase(model: Path, device: str, spec: LoadSpec, title: str, engine: dict, server: dict):
    app = create_app(EngineConfig(model=str(model), device=device, **engine), ServerConfig(**server))
    with running_server(app) as url:
        spec.url = url
        result = asyncio.run(run_load(spec))
    print(f"## {title}\n{result.summary()}\n", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "bench"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--duration-s", type=float, default=120.0)
    args = p.parse_args()
    model = checkpoint(args.model)
    spec = dict(num_clients=args.clients, num_requests=args.requests, duration_s=args.duration_s,
                max_tokens=args.max_tokens, image_size=64)
    roomy = phase(model, args.device, LoadSpec(**spec), f"{args.clients} clients, roomy queue",
                  dict(max_num_seqs=64, num_blocks=4096, block_size=16), dict(max_queue_len=1024))
    small = phase(model, args.device, LoadSpec(**spec), f"{args.clients} clients, max_num_seqs=4 + queue 4",
                  dict(max_num_seqs=4, num_blocks=4096, block_size=16), dict(max_queue_len=4))
    ok = roomy.num_errors == 0 and small.num_errors == 0 and small.num_rejected > 0
    print("PASS: 0 errors; the small queue answered 429s" if ok else "FAIL: see errors above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
