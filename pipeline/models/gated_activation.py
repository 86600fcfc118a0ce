"""The gated MLP's activation over its fused gate-and-up output: ``act(gate) * up`` for ``x = [gate | up]``.

A gated MLP (Gemma's) runs one GEMM for its gate and up projections (their weights stacked at load,
``loading.load_weights``'s ``stacked``) and then this. For tanh-approximated GELU on float32 CPU tensors
``fusionserve::gelu_tanh_and_mul`` (``csrc/gelu_and_mul_cpu.cpp``, built by ``attention/cpu_kernel.py``) does it
in one pass, where torch takes three (its gelu evaluates tanh through Sleef: 16 ms for 2048 x 2048 on this
project's CPU, the product 5 more); elsewhere, or when the op could not be built, torch's ops. The op's result
equals torch's up to float32 rounding (it computes ``g / (1 + exp(-2u))``, which is ``0.5 g (1 + tanh(u))``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.attention import cpu_kernel

SOURCE = Path(__file__).with_name("csrc") / "gelu_and_mul_cpu.cpp"
STEM = "fusionserve_gelu_and_mul"

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
TANH_GELU = {"gelu_pytorch_tanh", "gelu_new"}


def _register_fake() -> None:
    @torch.library.register_fake("fusionserve::gelu_tanh_and_mul")
    def _(x):
        return x.new_empty(x.shape[0], x.shape[1] // 2)


def load_op():
    """``torch.ops.fusionserve.gelu_tanh_and_mul``, built and loaded once per process; None when it cannot be."""
    return cpu_kernel.load_library(SOURCE, STEM, "gelu_tanh_and_mul", _register_fake, "CPU GELU-and-multiply op",
                                   "torch's gelu and mul")


class GatedActivation(torch.nn.Module):
    """``act(gate) * up`` of ``x = [gate | up]`` (last dim split in halves); ``name`` is a config's
    ``hidden_act`` / ``hidden_activation``, one of ``ACTIVATIONS``; ``device``: where it will run (None: not
    known yet, a model built on the meta device; its loader calls ``prepare``)."""

    def __init__(self, name: str, device: torch.device | str | None = "cpu"):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
        self.name, self.act, self.op = name, ACTIVATIONS[name], None
        if device is not None:
            self.prepare(device)

    def prepare(self, device: torch.device | str) -> None:
        """The one-pass op for tanh GELU on CPU (built on first use, so never on a GPU machine); torch's else."""
        self.op = load_op() if self.name in TANH_GELU and torch.device(device).type == "cpu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.op is not None and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32
                and x.stride(1) == 1):
            return self.op(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up

    def extra_repr(self) -> str:
        return f"{self.name}, fused op: {self.op is not None}"
