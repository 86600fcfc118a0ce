"""oneDNN's prepacked float32 GEMM for the CPU linears of steps with many rows.

torch's ``F.linear`` on CPU is MKL's sgemm, which on this project's AMD EPYC (AVX2, one thread) runs
batched-decode and prefill shapes against hidden 512 / 2048 slower than oneDNN with its weights reordered
once into its own blocked layout: 1.4-1.8x at 4-8 rows, 1.1-1.3x at 16-170, 1.0-1.1x at 2048
(``benchmarks/linear.py``); vLLM's CPU backend runs every linear that way. At one or two rows MKL is the
faster (2x at one), so a ``PackedLinear`` keeps both: the original weight for steps under ``min_rows`` rows,
the packed copy for the rest. The price
is a second copy of each linear weight in memory (``EngineConfig.pack_linears=False`` keeps only one).
Results equal ``F.linear``'s up to float32 rounding (the summation order differs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 4


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An ``nn.Linear`` (same parameters, shared) whose calls with ``min_rows`` rows or more run oneDNN."""

    def __init__(self, linear: nn.Linear, min_rows: int = MIN_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.min_rows = linear.in_features, linear.out_features, min_rows
        self.weight, self.bias = linear.weight, linear.bias
        # a plain attribute, not a buffer: never saved, never in state_dict; 64: the row count it is tuned for
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] < self.min_rows:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, min_rows={self.min_rows}"


def pack_linears(model: nn.Module, min_rows: int = MIN_ROWS) -> int:
    """Replaces every float32 CPU ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, min_rows))
    return len(targets)
