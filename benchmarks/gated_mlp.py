"""Gemma 4 Unified's projections and MLP activation on the benchmark body's shapes (hidden 512, 8 heads of 64
over 4 KV heads, intermediate 2048), alternating in one run: q, k and v as three linears against the one
stacked ``qkv_proj``, gate and up as two against the one stacked ``gate_up_proj`` (each a ``PackedLinear``: the
few-row op up to 8 rows, oneDNN above, as the engine runs them), and the activation as torch's
``gelu(gate, approximate="tanh") * up`` against ``fusionserve::gelu_tanh_and_mul``
(``pipeline/models/gated_activation.py``).

Rows: 1-8 (decode batches), 64 (batched decode), 344 (one image prompt), 2048 (a full prefill step). The
linears cycle through enough copies of their weights to fill ``--weights-mib`` (the weights come from memory,
as in a step). Median of ``--repeat`` timings of about ``--budget-ms`` each, the variants taking turns.

    .venv/bin/python -m benchmarks.gated_mlp [--threads 2] [--rows 1,4,8,64,344,2048] [--repeat 7]
"""
from __future__ import annotations

import itertools
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.linear import per_call_ms, timing_args
from pipeline.models.gated_activation import GatedActivation
from pipeline.models.packed_linear import PackedLinear

HIDDEN, Q_OUT, KV_OUT, INTERMEDIATE = 512, 8 * 64, 4 * 64, 2048


def cycled(layers: list[list[nn.Module]]):
    """A function running the next copy's modules on x, in turn."""
    turn = itertools.cycle(layers)
    return lambda x: [m(x) for m in next(turn)]


def timed(variants: dict, x: torch.Tensor, repeat: int, budget_ms: float) -> dict[str, float]:
    calls = max(1, int(budget_ms / max(per_call_ms(lambda: variants[next(iter(variants))](x), 2), 1e-3)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            times[name].append(per_call_ms(lambda: fn(x), calls))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = timing_args(__doc__, "1,4,8,64,344,2048")
    torch.manual_seed(0)
    act = GatedActivation("gelu_pytorch_tanh")
    print(f"threads {args.threads}, torch {torch.__version__}, float32, weights from {args.weights_mib:g} MiB of "
          f"copies; ms per call, median of {args.repeat}; GELU op {'built' if act.op is not None else 'not built'}")
    copies = max(1, int(args.weights_mib * 2**20 // (4 * HIDDEN * 2 * INTERMEDIATE)))

    def linears(*outs: int) -> list[list[nn.Module]]:
        return [[PackedLinear(nn.Linear(HIDDEN, n, bias=False)) for n in outs] for _ in range(copies)]

    projections = {
        "q, k, v": cycled(linears(Q_OUT, KV_OUT, KV_OUT)), "qkv_proj": cycled(linears(Q_OUT + 2 * KV_OUT)),
        "gate, up": cycled(linears(INTERMEDIATE, INTERMEDIATE)), "gate_up_proj": cycled(linears(2 * INTERMEDIATE)),
    }
    activations = {"torch gelu * up": lambda h: F.gelu(h[:, :INTERMEDIATE], approximate="tanh") * h[:, INTERMEDIATE:],
                   "gelu_tanh_and_mul": act}
    print("| rows | q, k, v | qkv_proj | stacked vs three | gate, up | gate_up_proj | stacked vs two "
          "| torch gelu * up | gelu_tanh_and_mul | op vs torch | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN)
        h = torch.randn(rows, 2 * INTERMEDIATE) * 2
        ms = {**timed(projections, x, args.repeat, args.budget_ms),
              **timed(activations, h, args.repeat, args.budget_ms)}
        diff = (act(h) - activations["torch gelu * up"](h)).abs().max().item()
        print(f"| {rows} | {ms['q, k, v']:.3f} | {ms['qkv_proj']:.3f} | {ms['q, k, v'] / ms['qkv_proj']:.2f}x | "
              f"{ms['gate, up']:.3f} | {ms['gate_up_proj']:.3f} | {ms['gate, up'] / ms['gate_up_proj']:.2f}x | "
              f"{ms['torch gelu * up']:.3f} | {ms['gelu_tanh_and_mul']:.3f} | "
              f"{ms['torch gelu * up'] / ms['gelu_tanh_and_mul']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
