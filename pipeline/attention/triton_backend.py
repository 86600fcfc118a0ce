"""Triton backend: paged split-KV decode and causal chunked prefill over the block tables.

Routing. A decode-only step (``max_query_len == 1``) launches the decode kernel and, with more
than one KV split, the combine kernel. Any other step launches both kernels over every sequence:
the prefill kernel's programs return at once for ``query_len == 1`` rows and the decode kernel's for
the rest, so in a mixed batch the decodes keep their split-KV parallelism and nothing is sorted or
synchronised on the host.

Host syncs: none. Grids come from host ints only (batch size, head counts, ``max_query_len``,
the block table's width). The decode grid ``(B, Hkv, num_splits)`` is fixed for a batch size and
a block-table width, and each program derives its split's range from the sequence's length on the
device, so the decode path can be captured in a CUDA graph and replayed with other lengths.

Masks (the torch reference's): sliding windows and bidirectional media runs. Every program starts
its KV loop at the first key one of its rows can see, so a sliding layer's reads stay within the
window (plus a run reaching back past it) however long the context. A layer with ``k = v = None``
reads the cache it is given (another layer's) and writes nothing. Each layer may bring its own
``Hkv`` and ``D`` (up to 512); tiles are chosen per head dim and pool dtype (``_HALF_TILES``).

New K/V go into the pool with ``write_kv`` (one ``index_copy_`` each) before the kernels read it.
On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from pipeline.attention.base import AttentionBackend, AttentionMetadata, write_kv
from pipeline.attention.triton_kernels import combine_splits_kernel, paged_decode_kernel, paged_prefill_kernel

_LOG2_E = 1.4426950408889634
_MAX_KV_SPLITS = 32
_MIN_DOT = 16  # tl.dot wants every dim >= 16 on GPU
MAX_HEAD_DIM = 512


@dataclass(frozen=True)
class _Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def block_d(self) -> int:
        return max(_MIN_DOT, triton.next_power_of_2(self.head_dim))


@dataclass(frozen=True)
class _Tiles:
    block_m: int  # prefill rows: query tokens x group heads
    block_n: int  # prefill keys per tile
    num_warps: int
    decode_block_n: int
    decode_num_warps: int


# by BLOCK_D, checked for sm_90 (H100/H200: 227 KB shared memory, 255 registers a thread) by compiling every
# entry (GQA groups 1, 2, 8; window and runs on) with Triton's ptxas: none spills registers, none needs 100 KB
# of shared memory. Registers bind first: the K/V gathers and the fp32 accumulator [BLOCK_M, BLOCK_D] live
# there, so wide heads get fewer rows and keys per tile and more warps (64 x 64 / 4 warps, the old default for
# every D, spills ~1 KB a thread at D = 128 and 18 KB in fp32 at D = 64).
_HALF_TILES = {  # bf16 / fp16 pools (tensor-core dots)
    64: _Tiles(64, 64, 4, 64, 4),
    128: _Tiles(64, 32, 8, 64, 8),
    256: _Tiles(32, 16, 8, 32, 8),
    512: _Tiles(32, 16, 8, 16, 8),
}
_FP32_TILES = {  # fp32 pools (exact fp32 FMA dots: parity checks)
    64: _Tiles(32, 32, 4, 64, 4),
    128: _Tiles(32, 16, 4, 16, 4),
    256: _Tiles(32, 16, 8, 16, 4),
    512: _Tiles(16, 16, 8, 16, 8),
}


class TritonBackend(AttentionBackend):
    """``num_kv_splits`` fixes the decode splits (None: chosen from the batch size and the device);
    ``block_m`` / ``block_n`` / ``num_warps`` override the per-head-dim tiles (None: the tables above)."""

    name = "triton"

    def __init__(self, num_kv_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None) -> None:
        for label, value in (("block_m", block_m), ("block_n", block_n)):
            if value is not None and (value < _MIN_DOT or value & (value - 1)):
                raise ValueError(f"{label} must be a power of two >= {_MIN_DOT}, got {value}")
        if num_kv_splits is not None and not 1 <= num_kv_splits <= _MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits must be in 1..{_MAX_KV_SPLITS}, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits
        self.block_m = block_m
        self.block_n = block_n
        self.num_warps = num_warps

    def tiles(self, head_dim: int, dtype: torch.dtype) -> _Tiles:
        table = _FP32_TILES if dtype == torch.float32 else _HALF_TILES
        tiles = table[max(64, triton.next_power_of_2(head_dim))]
        return _Tiles(
            self.block_m or tiles.block_m, self.block_n or tiles.block_n, self.num_warps or tiles.num_warps,
            self.block_n or tiles.decode_block_n, self.num_warps or tiles.decode_num_warps,
        )

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.seq_lens.device
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 set "
                             "before import, for tests); use attention backend 'torch' on CPU")
        meta.extra["triton"] = {}  # decode partial buffers, made by the first layer, shared by the rest

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        shapes = _Shapes(q.shape[1], num_kv_heads, q.shape[2])
        if head_dim != shapes.head_dim:
            raise ValueError(f"q has head dim {shapes.head_dim} but the KV cache {head_dim}")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the triton attention backend supports head dims up to {MAX_HEAD_DIM}, got {head_dim}")
        if shapes.num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({shapes.num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of positions, got {sliding_window}")
        assert k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride() and q.stride(-1) == 1
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D], contiguous
        qk_scale = scale * _LOG2_E
        tiles = self.tiles(head_dim, k_cache.dtype)
        self._decode(q, k_cache, v_cache, out, meta, qk_scale, shapes, tiles, sliding_window)
        if not meta.is_decode_only:
            self._prefill(q, k_cache, v_cache, out, meta, qk_scale, shapes, tiles, sliding_window)
        return out

    def kv_splits(self, meta: AttentionMetadata, num_kv_heads: int, block_n: int,
                  sliding_window: int | None = None) -> int:
        """Decode splits from static sizes only: enough programs to fill the device, at most one per tile
        (of the table's width, or of the window). Rounded down to a power of two, so eager steps reuse the
        kernels compiled for the captured graphs."""
        span = meta.block_tables.shape[1] * meta.block_size
        if sliding_window is not None:
            span = min(span, sliding_window)
        max_tiles = triton.cdiv(span, block_n)
        if self.num_kv_splits is not None:
            return min(self.num_kv_splits, max_tiles)
        wanted = triton.cdiv(2 * _num_sms(meta.seq_lens.device), meta.num_seqs * num_kv_heads)
        return 1 << (max(1, min(wanted, max_tiles, _MAX_KV_SPLITS)).bit_length() - 1)

    def _decode(self, q, k_cache, v_cache, out, meta, qk_scale, shapes: _Shapes, tiles: _Tiles, window) -> None:
        num_splits = self.kv_splits(meta, shapes.num_kv_heads, tiles.decode_block_n, window)
        num_seqs = meta.num_seqs
        if num_splits > 1:
            buffers = meta.extra.setdefault("triton", {})
            key = (num_splits, shapes)
            if key not in buffers:
                buffers[key] = (
                    torch.empty(num_seqs, shapes.num_heads, num_splits, shapes.head_dim,
                                dtype=torch.float32, device=q.device),
                    torch.empty(num_seqs, shapes.num_heads, num_splits, dtype=torch.float32, device=q.device),
                )
            part_out, part_lse = buffers[key]
        else:
            part_out = part_lse = out  # unused: the kernel writes the output directly
        # a one-token chunk closing a run reaches back to the run's start, past a sliding window
        has_runs = meta.query_run_start is not None and window is not None
        run_start = meta.query_run_start if has_runs else meta.slot_mapping  # unused without runs
        paged_decode_kernel[(num_seqs, shapes.num_kv_heads, num_splits)](
            q, k_cache, v_cache, out, part_out, part_lse,
            meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, run_start,
            qk_scale, shapes.num_heads, window or 0,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            BLOCK_SIZE=meta.block_size, GROUP=shapes.group,
            BLOCK_H=max(_MIN_DOT, triton.next_power_of_2(shapes.group)),
            HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, BLOCK_N=tiles.decode_block_n,
            NUM_SPLITS=num_splits, PRECISION=_precision(k_cache),
            HAS_WINDOW=window is not None, HAS_RUNS=has_runs, num_warps=tiles.decode_num_warps,
        )
        if num_splits > 1:
            combine_splits_kernel[(num_seqs, shapes.num_heads)](
                part_out, part_lse, out, meta.cu_seqlens_q, shapes.num_heads, out.stride(0), out.stride(1),
                HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, NUM_SPLITS=num_splits,
                BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1 if shapes.block_d <= 128 else 4,
            )

    def _prefill(self, q, k_cache, v_cache, out, meta, qk_scale, shapes: _Shapes, tiles: _Tiles, window) -> None:
        group_p = triton.next_power_of_2(shapes.group)
        block_m = max(tiles.block_m, group_p)
        block_q = block_m // group_p
        grid = (triton.cdiv(meta.max_query_len, block_q), meta.num_seqs, shapes.num_kv_heads)
        has_runs = meta.query_run_start is not None
        run_start = meta.query_run_start if has_runs else meta.slot_mapping  # unused without runs
        run_end = meta.query_run_end if has_runs else meta.slot_mapping
        paged_prefill_kernel[grid](
            q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, run_start, run_end,
            qk_scale, window or 0,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            BLOCK_SIZE=meta.block_size, GROUP=shapes.group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_M=block_m,
            HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, BLOCK_N=tiles.block_n,
            PRECISION=_precision(k_cache), HAS_WINDOW=window is not None, HAS_RUNS=has_runs,
            num_warps=tiles.num_warps,
        )


def _precision(cache: torch.Tensor) -> str:
    """fp32 pools get exact fp32 dots (tf32 would cost them ~1e-3); half types use tensor cores anyway."""
    return "ieee" if cache.dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (CPU interpreter: a small stand-in, so tests see several splits)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
