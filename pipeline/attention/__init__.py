"""Attention backends behind one interface; chosen by device and what is installed, overridable.

``torch`` (reference, any device), ``flash`` (flash-attn, CUDA), ``triton`` (CUDA; CPU under
TRITON_INTERPRET=1). Imported lazily, so a backend's package is only needed when it is chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

from pipeline.attention.base import AttentionBackend, AttentionMetadata, PagedAttention, StepContext

logger = logging.getLogger(__name__)

BACKENDS = {
    "torch": ("pipeline.attention.torch_ref", "TorchBackend"),
    "flash": ("pipeline.attention.flash", "FlashBackend"),
    "triton": ("pipeline.attention.triton_backend", "TritonBackend"),
}

__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "PagedAttention", "StepContext", "get_backend",
           "resolve_backend_name"]


def resolve_backend_name(name: str | None, device: torch.device | str) -> str:
    """'auto' (or None): flash-attn on CUDA when installed, else triton on CUDA, else torch."""
    if name not in (None, "auto"):
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        return name
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash"
        if importlib.util.find_spec("triton") is not None and "triton" in BACKENDS:
            return "triton"
    return "torch"


def get_backend(name: str | None, device: torch.device | str) -> AttentionBackend:
    resolved = resolve_backend_name(name, device)
    module_name, class_name = BACKENDS[resolved]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name in (None, "auto") and resolved == "flash":  # installed but broken (e.g. built for another torch)
            logger.warning("flash-attn is installed but does not import (%s); using triton", exc)
            return get_backend("triton", device)
        raise ValueError(f"attention backend {resolved!r} is not available here: {exc}") from exc
    logger.info("attention backend: %s (asked: %s, device: %s)", resolved, name or "auto", device)
    return getattr(module, class_name)()
