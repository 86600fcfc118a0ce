"""The float32 CPU linears: our few-row kernel for small decode steps, oneDNN's prepacked GEMM for the rest.

torch's ``F.linear`` on CPU is MKL's sgemm, which on this project's AMD EPYC (AVX2, two threads, the weights
coming from memory as in a model step) runs batched-decode and prefill shapes against hidden 512 / 2048 slower
than oneDNN with its weights reordered once into its own blocked layout: 1.4-2.0x at 12-16 rows, 1.2-1.5x at
64 (``benchmarks/linear.py``); vLLM's CPU backend runs every linear that way. With 1-8 rows a linear is a walk
over its weight, which both read at about half the memory bandwidth of two cores; ``fusionserve::small_linear``
(``csrc/small_linear_cpu.cpp``, built by ``attention/cpu_kernel.py``) reads it once, in order, split between
the threads: 1.5-2.1x MKL at one row, 2.4-3.7x at two to four, even with oneDNN at eight. So a
``PackedLinear`` keeps both weights: the original for steps of up to ``SMALL_MAX_ROWS`` rows (that kernel;
MKL's ``F.linear`` under ``min_rows`` when it could not be built), the packed copy for the rest. The price is a
second copy of each linear weight in memory (``EngineConfig.pack_linears=False`` keeps only one and runs
``F.linear``).
Results equal ``F.linear``'s up to float32 rounding (the summation order differs).
"""
from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attention import cpu_kernel

MIN_ROWS = 4  # oneDNN from here when the few-row kernel is not built (MKL below)
SMALL_MAX_ROWS = 8  # the few-row kernel up to here
SOURCE = Path(__file__).with_name("csrc") / "small_linear_cpu.cpp"
STEM = "fusionserve_small_linear"


def _register_fake() -> None:
    @torch.library.register_fake("fusionserve::small_linear")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])


def load_small_linear():
    """``torch.ops.fusionserve.small_linear``, built and loaded once per process; None when it cannot be."""
    return cpu_kernel.load_library(SOURCE, STEM, "small_linear", _register_fake, "CPU few-row linear op",
                                   "F.linear for 1-3 rows")


# packed weights by handle, for the compiled decode step: a torch.compile graph cannot hold a oneDNN-layout
# tensor (inductor's own oneDNN lowering wants it a frozen constant), so the graph calls this op with the handle
# (a constant of the graph) and the plain weight (for its shape); weak: a handle dies with its PackedLinear
_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_handles = itertools.count()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    """oneDNN's GEMM of ``x`` with the packed copy of ``weight`` registered under ``handle``."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], bias, "none", [], "")


# a plain library fragment rather than torch.library.custom_op: its call costs 10 us, not 30 (33 a step)
_LIBRARY = torch.library.Library("fusionserve", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias, int handle) -> Tensor")
_LIBRARY.impl("onednn_linear", onednn_linear, "CPU")


@torch.library.register_fake("fusionserve::onednn_linear", lib=_LIBRARY)
def _(x, weight, bias, handle):
    return x.new_empty(x.shape[0], weight.shape[0])


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An ``nn.Linear`` (same parameters, shared) whose flat calls run the few-row kernel up to
    ``SMALL_MAX_ROWS`` rows and oneDNN above (above ``min_rows`` when the few-row kernel is not built)."""

    def __init__(self, linear: nn.Linear, min_rows: int = MIN_ROWS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.small = load_small_linear()
        self.min_rows = SMALL_MAX_ROWS + 1 if self.small is not None else min_rows
        # a plain attribute, not a buffer: never saved, never in state_dict; 64: the row count it is tuned for
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 64)
        self.handle = next(_handles)
        _PACKED[self.handle] = self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] < self.min_rows:
            if self.small is not None:
                return self.small(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # the compiled decode step: through the op that takes a handle
            return torch.ops.fusionserve.onednn_linear(x.contiguous(), self.weight, self.bias, self.handle)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, min_rows={self.min_rows}"


def row_thresholds(model: nn.Module) -> set[int]:
    """The row counts at which ``model``'s packed linears change kernel (a compiled graph's guards)."""
    return {m.min_rows for m in model.modules() if isinstance(m, PackedLinear)}


def pack_linears(model: nn.Module, min_rows: int = MIN_ROWS) -> int:
    """Replaces every float32 CPU ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, min_rows))
    return len(targets)
