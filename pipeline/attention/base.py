"""Attention metadata for one step and the backend interface.

A step is flat and unpadded (the varlen layout of vLLM / nano-vllm): the new tokens of all scheduled
sequences are concatenated, ``cu_seqlens_q`` marks where each sequence's tokens start, and each
sequence's keys/values live in the paged pool at the blocks its row of ``block_tables`` names.
A sequence's new tokens are always the *last* ``query_len`` of its ``seq_len`` tokens, so prefill
from scratch, a prefill chunk that continues a cached prefix, and decode are one case.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: pool slot (block * block_size + offset) per new token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries 0
    max_query_len: int
    max_seq_len: int
    block_size: int
    # bidirectional media runs: query token t at position i inside a run [s, e) has run_start[t] = s,
    # run_end[t] = e; elsewhere run_start = run_end = i + 1. None: no run in this step (all causal)
    query_run_start: torch.Tensor | None = None  # [T] int64
    query_run_end: torch.Tensor | None = None  # [T] int64
    extra: dict[str, Any] = field(default_factory=dict)  # per-step precompute owned by the backend

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        runs: list[list[tuple[int, int]]] | None = None,
    ) -> "AttentionMetadata":
        """Metadata from host lists: the new tokens of sequence i are its last query_lens[i]; ``runs[i]``: the
        [start, end) position ranges of sequence i's bidirectional media runs that hold new tokens."""
        assert len(query_lens) == len(seq_lens) == len(block_tables)
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            assert 0 < q_len <= s_len <= len(table) * block_size, (q_len, s_len, len(table))
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q_len in query_lens:
            cu.append(cu[-1] + q_len)
        run_start = run_end = None
        if runs is not None and any(runs):
            starts: list[int] = []
            ends: list[int] = []
            for q_len, s_len, seq_runs in zip(query_lens, seq_lens, runs):
                first = s_len - q_len
                begin = len(starts)
                starts += range(first + 1, s_len + 1)
                ends += range(first + 1, s_len + 1)
                for start, end in seq_runs:
                    assert start < s_len and end > first and end <= s_len, "a run must end inside its chunk"
                    lo, hi = begin + max(start, first) - first, begin + end - first
                    starts[lo:hi] = [start] * (hi - lo)
                    ends[lo:hi] = [end] * (hi - lo)
            run_start = torch.tensor(starts, dtype=torch.int64, device=device)
            run_end = torch.tensor(ends, dtype=torch.int64, device=device)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
            query_run_start=run_start,
            query_run_end=run_end,
        )


class AttentionBackend(ABC):
    """Writes a layer's new K/V into the paged pool, then attends over the whole cached sequence."""

    name: str = ""

    def prepare(self, meta: AttentionMetadata) -> None:
        """Once per step, before the first layer: precompute what every layer shares."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,  # keys older than this many positions are masked (media runs aside)
    ) -> torch.Tensor:  # [T, H, D]
        """``k`` / ``v`` are None for a layer that reads another layer's cache and stores none."""


def write_kv(k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their pool slots (nothing for a layer that shares another's KV)."""
    if k is None:
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class StepContext:
    """The step being run, owned by one model runner: set around each forward (mini-sglang's
    Context.forward_batch), so two engines in one process never see each other's metadata."""

    def __init__(self, backend: AttentionBackend):
        self.backend = backend
        self._meta: AttentionMetadata | None = None

    @property
    def meta(self) -> AttentionMetadata:
        assert self._meta is not None, "attention metadata is only available inside StepContext.step()"
        return self._meta

    @contextlib.contextmanager
    def step(self, meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
        self.backend.prepare(meta)
        self._meta = meta
        try:
            yield meta
        finally:
            self._meta = None


class PagedAttention(nn.Module):
    """One layer's attention over the paged pool. The model runner binds ``k_cache`` / ``v_cache``
    ([num_blocks, block_size, Hkv, D]); a layer with ``kv_source = j`` is bound to layer j's cache, stores
    nothing, and is called with ``k = v = None``."""

    def __init__(self, ctx: StepContext, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, kv_source: int | None = None):
        super().__init__()
        self.ctx, self.scale, self.sliding_window, self.kv_source = ctx, scale, sliding_window, kv_source
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        ctx = self.ctx
        return ctx.backend.forward(q, k, v, self.k_cache, self.v_cache, ctx.meta, self.scale, self.sliding_window)
