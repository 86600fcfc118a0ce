"""CPU backend: the C++ paged attention op (``cpu_kernel.py``) reads each sequence's K/V in place in the pool.

One op call per layer serves the whole step: decodes and prefill chunks alike, with sliding windows,
bidirectional media runs and KV-sharing layers as in the torch reference (each query token sees one
interval of its sequence's keys, and only that interval is read). Nothing is gathered, padded or masked:
the torch reference's grouped SDPA over gathered blocks is what this replaces (measured on the benchmark
Fuyu: faster for decode and for prefill chunks; README, "CPU paged attention"). 'auto' picks this backend on
CPU when the op builds; ``torch`` stays selectable as the oracle.
"""
from __future__ import annotations

import torch

from pipeline.attention.base import AttentionBackend, AttentionMetadata, write_kv
from pipeline.attention.cpu_kernel import load_op



class CpuBackend(AttentionBackend):
    name = "cpu"

    def __init__(self):
        self.op = load_op()
        if self.op is None:
            raise ValueError("the cpu attention backend's C++ op did not build here (the log says why); "
                             "use attention backend 'torch'")

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.seq_lens.device.type != "cpu":
            raise ValueError("the cpu attention backend runs on CPU tensors only; use 'auto' on other devices")

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        dtype = q.dtype
        if dtype != k_cache.dtype or q.stride(-1) != 1:
            q = q.to(k_cache.dtype).contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)
        self.op(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.query_run_start,
                meta.query_run_end, scale, sliding_window or 0, out)
        return out.to(dtype)
