"""The CPU linear kernels: torch's ``F.linear`` (MKL sgemm) against oneDNN with a prepacked weight
(``pipeline/models/packed_linear.py``), on the benchmark model's shapes, alternating in one run.

Rows: 1 (batch-1 decode), 8, 16, 64 (batched decode), 170 (one image prompt), 2048 (a full prefill step);
weights: hidden 512 -> 1536 (fused QKV), 512 -> 2048 and 2048 -> 512 (the MLP). Median of ``--repeat``
timings of ``--calls`` calls each, the two kernels taking turns.

    .venv/bin/python -m benchmarks.linear [--threads 1] [--rows 1,8,16,64,170,2048] [--repeat 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ((512, 1536), (512, 2048), (2048, 512))  # (in, out)


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,8,16,64,170,2048")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--budget-ms", type=float, default=40.0, help="about this long per timing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, float32; ms per call, median of {args.repeat}")
    print("| rows | in -> out | MKL (F.linear) | oneDNN packed | oneDNN speed-up | max abs diff |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    gen = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        for k, n in SHAPES:
            x = torch.randn(rows, k, generator=gen)
            w, b = torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
            mkl = lambda: F.linear(x, w, b)  # noqa: E731
            dnn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")  # noqa: E731
            diff = (mkl() - dnn()).abs().max().item()
            calls = max(1, int(args.budget_ms / max(per_call_ms(mkl, 2), 1e-3)))
            a, c = [], []
            for _ in range(args.repeat):
                a.append(per_call_ms(mkl, calls))
                c.append(per_call_ms(dnn, calls))
            ma, mc = statistics.median(a), statistics.median(c)
            print(f"| {rows} | {k} -> {n} | {ma:.3f} | {mc:.3f} | {ma / mc:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
