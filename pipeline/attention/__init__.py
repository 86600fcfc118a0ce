"""Attention backends behind one interface; chosen by device, what is installed and what the model needs.

``torch`` (reference, any device), ``cpu`` (a C++ paged kernel reading the pool in place; CPU, when the op
builds), ``flash`` (flash-attn, CUDA), ``triton`` (CUDA; CPU under TRITON_INTERPRET=1). Imported lazily, so a
backend's package is only needed when it is chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterable

import torch

from pipeline.attention.base import AttentionBackend, AttentionMetadata, PagedAttention, StepContext

logger = logging.getLogger(__name__)

BACKENDS = {
    "torch": ("pipeline.attention.torch_ref", "TorchBackend"),
    "cpu": ("pipeline.attention.cpu", "CpuBackend"),
    "flash": ("pipeline.attention.flash", "FlashBackend"),
    "triton": ("pipeline.attention.triton_backend", "TritonBackend"),
}
# widest head dim each backend serves (None: any); flash-attn 2/3 kernels stop at 256
MAX_HEAD_DIMS: dict[str, int | None] = {"torch": None, "cpu": None, "flash": 256, "triton": 512}
# backends without sliding windows / bidirectional media runs
NO_WINDOWS_OR_RUNS = ("flash",)

__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "MAX_HEAD_DIMS", "PagedAttention", "StepContext",
           "get_backend", "resolve_backend_name"]


def _unsupported(name: str, head_dims: tuple[int, ...], windows_or_runs: bool) -> str | None:
    """Why backend ``name`` cannot serve this model, or None."""
    limit = MAX_HEAD_DIMS[name]
    widest = max(head_dims, default=0)
    if limit is not None and widest > limit:
        return f"head dim {widest} is over its limit of {limit}"
    if windows_or_runs and name in NO_WINDOWS_OR_RUNS:
        return "it has no sliding windows or bidirectional media runs"
    return None


def resolve_backend_name(name: str | None, device: torch.device | str, head_dims: Iterable[int] = (),
                         windows_or_runs: bool = False) -> str:
    """'auto' (or None): flash-attn on CUDA when installed, else triton on CUDA; on CPU the cpu backend when its
    C++ op builds (else torch, one warning saying why); elsewhere torch. A backend that cannot serve the model
    (``head_dims``: every layer's head dim; ``windows_or_runs``: it has sliding-window layers or bidirectional
    media runs) is passed over, with the reason logged. Asked by name, it is a ValueError."""
    head_dims = tuple(head_dims)
    if name not in (None, "auto"):
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        reason = _unsupported(name, head_dims, windows_or_runs)
        if reason is not None:
            raise ValueError(f"attention backend {name!r} cannot serve this model: {reason}; "
                             f"use attention_backend 'auto' or another of {sorted(BACKENDS)}")
        if name == "cpu" and torch.device(device).type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on CPU only, not {device}; use 'auto'")
        return name
    if torch.device(device).type == "cpu":
        from pipeline.attention.cpu_kernel import available

        return "cpu" if available() else "torch"
    if torch.device(device).type == "cuda":
        for candidate, package in (("flash", "flash_attn"), ("triton", "triton")):
            if importlib.util.find_spec(package) is None:
                continue
            reason = _unsupported(candidate, head_dims, windows_or_runs)
            if reason is None:
                return candidate
            logger.info("attention backend: not %s: %s", candidate, reason)
    return "torch"


def get_backend(name: str | None, device: torch.device | str, head_dims: Iterable[int] = (),
                windows_or_runs: bool = False) -> AttentionBackend:
    head_dims = tuple(head_dims)
    resolved = resolve_backend_name(name, device, head_dims, windows_or_runs)
    module_name, class_name = BACKENDS[resolved]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name in (None, "auto") and resolved == "flash":  # installed but broken (e.g. built for another torch)
            logger.warning("flash-attn is installed but does not import (%s); using triton", exc)
            return get_backend("triton", device, head_dims, windows_or_runs)
        raise ValueError(f"attention backend {resolved!r} is not available here: {exc}") from exc
    logger.info("attention backend: %s (asked: %s, device: %s)", resolved, name or "auto", device)
    return getattr(module, class_name)()
