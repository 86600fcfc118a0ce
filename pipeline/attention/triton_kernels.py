"""Triton kernels for attention over the paged KV pool: split-KV decode, its combine, chunked prefill.

Pool layout ``[num_blocks, block_size, Hkv, D]`` (last dim contiguous): key position ``p`` of
sequence ``b`` lives in block ``block_tables[b, p // block_size]`` at offset ``p % block_size``, so
any block size works and a tile of ``BLOCK_N`` keys may span several blocks. Scores are kept in the
log2 domain (``qk_scale`` already holds ``scale * log2(e)``) and every kernel accumulates in fp32.
Grouped-query heads share one program per KV head: its query heads are the rows of one ``tl.dot``,
so each key/value tile is read once for the whole group.

Masks. The keys a query at position ``i`` sees form one interval ``[lo, hi)``: causal ``lo = 0``,
``hi = i + 1``; on a sliding layer ``lo = i - window + 1``; inside a bidirectional run ``[s, e)``
(``s <= i < e``) ``lo = min(lo, s)`` and ``hi = e`` (clamped to ``[0, seq_len)``). A program walks
only the union of its rows' intervals, so keys before the window are never loaded.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_row, kv_pos, kv_mask, kv_head,
                  BLOCK_SIZE: tl.constexpr, stride_block, stride_slot, stride_kvh, offs_d, d_mask):
    # -> k, v: [BLOCK_N, BLOCK_D] gathered through the block table
    block = tl.load(block_tables_ptr + bt_row + kv_pos // BLOCK_SIZE, mask=kv_mask, other=0).to(tl.int64)
    offs = block * stride_block + (kv_pos % BLOCK_SIZE) * stride_slot + kv_head * stride_kvh
    ptrs = offs[:, None] + offs_d[None, :]
    mask = kv_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + ptrs, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + ptrs, mask=mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, valid, acc, m_i, l_i, qk_scale, PRECISION: tl.constexpr):
    # q [M, D], k/v [N, D], valid [M, N]; a row may see nothing in early tiles (window, run): m_i stays -inf
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # the block table's width varies per step
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr, run_start_ptr,
    qk_scale, num_heads, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_slot, stride_kvh, stride_bt,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RUNS: tl.constexpr,
):
    """Grid (B, Hkv, NUM_SPLITS): one KV head's query group over one split of a query_len == 1 row.

    The row sees ``[lo, seq_len)``: ``lo = 0``, or on a sliding layer the window's first key (or its
    run's start, for a one-token chunk that closes a run). The split length follows that span (a
    multiple of BLOCK_N), so the grid depends only on the batch size and NUM_SPLITS; splits past the
    end write an empty partial (lse = -inf).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) - q_start != 1:
        return  # chunk rows belong to the prefill kernel
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = seq_len * 0
    if HAS_WINDOW:
        kv_lo = seq_len - window  # query at seq_len - 1
        if HAS_RUNS:
            kv_lo = tl.minimum(kv_lo, tl.load(run_start_ptr + q_start).to(tl.int32))
        kv_lo = tl.maximum(kv_lo, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_begin = kv_lo + split * split_len
    kv_end = tl.minimum(kv_begin + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q_ptrs = q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    q = q.to(k_cache_ptr.dtype.element_ty)

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    bt_row = seq.to(tl.int64) * stride_bt
    for start in range(kv_begin, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_mask = kv_pos < kv_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_row, kv_pos, kv_mask, kv_head,
                             BLOCK_SIZE, stride_block, stride_slot, stride_kvh, offs_d, d_mask)
        acc, m_i, l_i = _online_softmax_step(q, k, v, kv_mask[None, :], acc, m_i, l_i, qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [B, H, S] partials
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_safe), mask=h_mask)  # empty split: -inf


@triton.jit
def combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, cu_seqlens_q_ptr, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B, H): merge a decode row's split partials, weighting each by its log-sum-exp."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) - q_start != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    row = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))  # [S]; split 0 is never empty
    weight = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S, D]
    out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=["stride_bt"])
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr,
    run_start_ptr, run_end_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_slot, stride_kvh, stride_bt,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RUNS: tl.constexpr,
):
    """Grid (cdiv(max_query_len, BLOCK_Q), B, Hkv): BLOCK_Q new tokens x GROUP_P heads as BLOCK_M rows.

    The chunk's tokens sit at positions ctx_len.. of the sequence; the loop walks the cached prefix
    and the chunk itself (already written to the pool) from the lowest ``lo`` of the tile's rows to
    their highest ``hi`` (a run may reach past the tile's last token, never past the chunk).
    """
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if (q_len == 1) | (tile * BLOCK_Q >= q_len):
        return  # decode rows belong to the decode kernel
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = tile * BLOCK_Q + offs_m // GROUP_P
    heads = kv_head * GROUP + offs_m % GROUP_P
    row_mask = (tok < q_len) & (offs_m % GROUP_P < GROUP)
    d_mask = offs_d < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask[None, :]
    tok_idx = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + tok_idx[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0).to(k_cache_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D]
    q_pos = ctx_len + tok

    lo = q_pos * 0  # [BLOCK_M] first key each row sees
    hi = q_pos + 1  # [BLOCK_M] one past its last
    if HAS_RUNS:
        run_start = tl.load(run_start_ptr + tok_idx, mask=row_mask, other=0).to(tl.int32)
        hi = tl.maximum(hi, tl.load(run_end_ptr + tok_idx, mask=row_mask, other=0).to(tl.int32))
    if HAS_WINDOW:
        lo = q_pos - window + 1
        if HAS_RUNS:
            lo = tl.minimum(lo, run_start)
        lo = tl.maximum(lo, 0)
    kv_begin = tl.min(tl.where(row_mask, lo, seq_len), 0)
    kv_end = tl.minimum(tl.max(tl.where(row_mask, hi, 0), 0), seq_len)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = seq.to(tl.int64) * stride_bt
    for start in range(kv_begin, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_mask = kv_pos < kv_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_row, kv_pos, kv_mask, kv_head,
                             BLOCK_SIZE, stride_block, stride_slot, stride_kvh, offs_d, d_mask)
        valid = (kv_pos[None, :] >= lo[:, None]) & (kv_pos[None, :] < hi[:, None]) & kv_mask[None, :]
        acc, m_i, l_i = _online_softmax_step(q, k, v, valid, acc, m_i, l_i, qk_scale, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows: l = 0
    o_ptrs = out_ptr + tok_idx[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
