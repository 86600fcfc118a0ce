"""flash-attn backend (CUDA, flash-attn installed): varlen prefill and paged decode over block tables.

flash-attn 2.x reads a paged cache only when its block size is a multiple of 256.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from pipeline.attention.base import AttentionBackend, AttentionMetadata, write_kv


class FlashBackend(AttentionBackend):
    name = "flash"

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.block_size % 256:
            raise ValueError(f"the flash backend needs block_size a multiple of 256, got {meta.block_size}")
        meta.extra["flash"] = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
        if sliding_window is not None or meta.query_run_start is not None:
            raise ValueError("the flash attention backend has no sliding windows or bidirectional media runs; "
                             "use attention_backend 'triton' (CUDA) or 'torch'")
        if q.shape[-1] > 256:
            raise ValueError(f"flash-attn supports head dims up to 256, this layer has {q.shape[-1]}; "
                             "use attention_backend 'triton' (CUDA) or 'torch'")
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            out = flash_attn_with_kvcache(
                q[:, None], k_cache, v_cache, cache_seqlens=meta.seq_lens,
                block_table=meta.block_tables, softmax_scale=scale, causal=True,
            )
            return out[:, 0]
        return flash_attn_varlen_func(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.extra["flash"], meta.max_query_len,
            meta.max_seq_len, softmax_scale=scale, causal=True, block_table=meta.block_tables,
        )
