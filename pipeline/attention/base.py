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


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: pool slot (block * block_size + offset) per new token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries 0
    max_query_len: int
    max_seq_len: int
    block_size: int
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
    ) -> "AttentionMetadata":
        """Metadata from host lists: the new tokens of sequence i are its last query_lens[i]."""
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
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
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
    ) -> torch.Tensor:  # [T, H, D]
        ...


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their pool slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# per-step context: set before the forward, reset after (mini-sglang's Context.forward_batch)
_current: AttentionMetadata | None = None


def get_metadata() -> AttentionMetadata:
    assert _current is not None, "attention metadata is only available inside forward_context()"
    return _current


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata, backend: AttentionBackend) -> Iterator[AttentionMetadata]:
    global _current
    backend.prepare(meta)
    _current = meta
    try:
        yield meta
    finally:
        _current = None
