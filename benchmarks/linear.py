"""The CPU linear kernels on the benchmark model's shapes, alternating in one run: torch's ``F.linear`` (MKL
sgemm), oneDNN with a prepacked weight and, up to 8 rows, our few-row op ``fusionserve::small_linear``
(``pipeline/models/packed_linear.py``, ``pipeline/models/csrc/small_linear_cpu.cpp``).

Rows: 1-8 (decode batches), 16, 64 (batched decode), 170 (one image prompt), 2048 (a full prefill step);
weights: hidden 512 -> 1536 (fused QKV), 512 -> 2048 and 2048 -> 512 (the MLP). Each call takes the next of
enough copies of the weight to fill ``--weights-mib`` (default 96: more than the last-level cache, as the
model's 100 MB of linears are), so the weights come from memory as they do in a step; ``--weights-mib 0``
times one hot weight instead. Median of ``--repeat`` timings of about ``--budget-ms`` each, the kernels
taking turns.

    .venv/bin/python -m benchmarks.linear [--threads 2] [--rows 1,2,4,8,16,64,170,2048] [--repeat 7]
                                          [--weights-mib 96]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.models.packed_linear import SMALL_MAX_ROWS, load_small_linear

SHAPES = ((512, 1536), (512, 2048), (2048, 512))  # (in, out)


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def timing_args(doc: str, rows: str) -> argparse.Namespace:
    """The options of a kernel benchmark (threads, rows, repeats, weights from memory), torch's threads set."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=rows)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--budget-ms", type=float, default=40.0, help="about this long per timing")
    p.add_argument("--weights-mib", type=float, default=96.0, help="distinct weight copies cycled through")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = timing_args(__doc__, "1,2,4,8,16,64,170,2048")
    small = load_small_linear()
    print(f"threads {args.threads}, torch {torch.__version__}, float32, weights from "
          f"{f'{args.weights_mib:g} MiB of copies' if args.weights_mib else 'one hot copy'}; ms per call, median "
          f"of {args.repeat}; few-row op {'built' if small else 'not built'}")
    print("| rows | in -> out | MKL (F.linear) | oneDNN packed | few-row op | best vs MKL | max abs diff |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    gen = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        for k, n in SHAPES:
            x = torch.randn(rows, k, generator=gen)
            copies = max(1, int(args.weights_mib * 2**20 // (4 * k * n)))
            ws = [torch.randn(n, k, generator=gen) / k ** 0.5 for _ in range(copies)]
            b = torch.randn(n, generator=gen)
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in ws]
            nxt = {name: itertools.cycle(range(copies)) for name in ("mkl", "dnn", "small")}
            kernels = {
                "mkl": lambda: F.linear(x, ws[next(nxt["mkl"])], b),
                "dnn": lambda: torch.ops.mkldnn._linear_pointwise(x, packs[next(nxt["dnn"])], b, "none", [], ""),
            }
            if small is not None and rows <= SMALL_MAX_ROWS:
                kernels["small"] = lambda: small(x, ws[next(nxt["small"])], b)
            ref = F.linear(x, ws[0], b)
            diff = max((torch.ops.mkldnn._linear_pointwise(x, packs[0], b, "none", [], "") - ref).abs().max().item(),
                       (small(x, ws[0], b) - ref).abs().max().item() if "small" in kernels else 0.0)
            calls = max(1, int(args.budget_ms / max(per_call_ms(kernels["mkl"], 2), 1e-3)))
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.repeat):
                for name, fn in kernels.items():
                    times[name].append(per_call_ms(fn, calls))
            ms = {name: statistics.median(t) for name, t in times.items()}
            cells = " | ".join(f"{ms[name]:.3f}" if name in ms else "" for name in ("mkl", "dnn", "small"))
            print(f"| {rows} | {k} -> {n} | {cells} | {ms['mkl'] / min(ms.values()):.2f}x | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
