"""The CPU engine's two speed options against its plain eager path, in one process, taking turns.

Variants of the benchmark Fuyu (float32, cpu attention backend): ``eager, MKL`` (``pack_linears=False``: every
linear is torch's ``F.linear``), ``packed`` (the default, ``pipeline/models/packed_linear.py``: the few-row C++
linear up to 8 rows, oneDNN-packed linears above) and ``packed + compiled`` (``compile_decode=True``: every
decode-only step through torch.compile, ``pipeline/compiled_decode.py``; its compile time is printed). Per round and
variant: batch-1 TTFT (a 192x192 image prompt, ``max_tokens=1``), batch-1 decode ms per token (a 65-token
answer less the TTFT, over 64) and the 64-request workload of ``benchmarks.throughput`` (output tok/s; new
images every round, so no variant finds them in its prefix cache), with how many outputs equal the first
variant's.

    .venv/bin/python -m benchmarks.cpu_variants [--threads 2] [--rounds 2] [--requests 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import bench_checkpoint
from benchmarks.throughput import make_requests
from pipeline import Pipeline, SamplingParams

VARIANTS = {"eager, MKL": dict(pack_linears=False), "packed": {}, "packed + compiled": dict(compile_decode=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = bench_checkpoint(target_size=256)
    pipes = {}
    for name, options in VARIANTS.items():
        start = time.perf_counter()
        pipes[name] = Pipeline.from_pretrained(str(folder), keep_freed_memory=True, **options)
        print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)

    def workload(seed: int):
        requests = make_requests(args.requests, seed=seed)
        return ([{"prompt": text, "images": [image]} for text, image, _ in requests],
                [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, _, n in requests])

    def image(seed: int):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (192, 192, 3), dtype=np.uint8))

    def batch1(pipe, seed: int) -> tuple[float, float]:
        start = time.perf_counter()
        pipe.generate([{"prompt": "What is it?", "images": [image(seed)]}], SamplingParams(max_tokens=1))
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        pipe.generate([{"prompt": "What is it?", "images": [image(seed + 1)]}],
                      SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True))
        return ttft * 1e3, (time.perf_counter() - start - ttft) / 64 * 1e3

    warmup = [{"prompt": text, "images": [im]} for text, im, _ in make_requests(4, seed=5)]
    for pipe in pipes.values():
        pipe.generate(warmup, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    figures = {name: [] for name in pipes}
    for round_ in range(args.rounds):
        items, params = workload(100 + round_)
        reference = None
        for k, (name, pipe) in enumerate(pipes.items()):  # images new to every call: no prefix-cache hits
            ttft, decode = batch1(pipe, 1000 * round_ + 10 * k)
            start = time.perf_counter()
            outs = pipe.generate(items, params)
            tok_s = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
            ids = [o.token_ids for o in outs]
            reference = reference or ids
            same = sum(a == b for a, b in zip(ids, reference))
            figures[name].append((tok_s, ttft, decode))
            print(f"round {round_ + 1} {name}: {tok_s:.1f} tok/s, batch-1 TTFT {ttft:.1f} ms, decode {decode:.2f} "
                  f"ms/token, outputs equal to the first variant's {same}/{len(ids)}", flush=True)
    base = [statistics.median(v) for v in zip(*figures["eager, MKL"])]
    print(f"\nthreads {args.threads}, medians of {args.rounds} round(s)")
    print("| variant | output tok/s | vs eager, MKL | batch-1 TTFT | batch-1 decode ms/token | vs eager, MKL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in figures.items():
        tok_s, ttft, decode = (statistics.median(v) for v in zip(*rows))
        print(f"| {name} | {tok_s:.1f} | {tok_s / base[0]:.2f}x | {ttft:.1f} ms | {decode:.2f} ms | "
              f"{base[2] / decode:.2f}x |")


if __name__ == "__main__":
    main()
