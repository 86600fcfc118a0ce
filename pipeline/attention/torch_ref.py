"""Reference backend: plain torch SDPA over the paged cache, on any device.

Every sequence's key blocks are gathered from the pool through its block table into a padded
``[B, num_table_blocks * block_size]`` view, queries are scattered into ``[B, max_query_len]``, and one masked SDPA call
serves the whole batch (prefill chunks and decodes alike; no Python loop over sequences).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attention.base import AttentionBackend, AttentionMetadata, write_kv


class TorchBackend(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.seq_lens.device
        num_seqs = meta.num_seqs
        seq_lens = meta.seq_lens.long()
        query_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
        # whole blocks are gathered (one row per block, not per token), only as many as the longest sequence needs
        num_table_blocks = -(-meta.max_seq_len // meta.block_size)
        num_keys = num_table_blocks * meta.block_size
        key_pos = torch.arange(num_keys, device=device)
        # new token t belongs to sequence seq_idx[t], row q_row[t] of its padded query block
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
        q_row = torch.arange(seq_idx.numel(), device=device) - meta.cu_seqlens_q[:-1].long()[seq_idx]
        # causal over the cached prefix: query row i of a sequence sits at position seq_len - q_len + i
        q_pos = (seq_lens - query_lens)[:, None] + torch.arange(meta.max_query_len, device=device)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, S]
        mask &= key_pos[None, None, :] < seq_lens[:, None, None]
        blocks = meta.block_tables[:, :num_table_blocks].reshape(-1).long()
        meta.extra["torch"] = (blocks, seq_idx, q_row, mask[:, None])

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        blocks, seq_idx, q_row, mask = meta.extra["torch"]
        num_seqs = meta.num_seqs
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_cache.shape[2]
        keys = k_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
        if meta.is_decode_only:
            queries = q[:, None]  # [B, 1, H, D]
        else:
            queries = q.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
            queries[seq_idx, q_row] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask, scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # [B, H, Q, D]
        out = out.transpose(1, 2)
        if meta.is_decode_only:
            return out[:, 0].to(q.dtype)
        return out[seq_idx, q_row].to(q.dtype)
