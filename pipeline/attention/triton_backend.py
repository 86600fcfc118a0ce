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


class TritonBackend(AttentionBackend):
    """``num_kv_splits`` fixes the decode splits (None: chosen from the batch size and the device)."""

    name = "triton"

    def __init__(self, num_kv_splits: int | None = None, block_m: int = 64, block_n: int = 64,
                 num_warps: int = 4) -> None:
        for label, value in (("block_m", block_m), ("block_n", block_n)):
            if value < _MIN_DOT or value & (value - 1):
                raise ValueError(f"{label} must be a power of two >= {_MIN_DOT}, got {value}")
        if num_kv_splits is not None and not 1 <= num_kv_splits <= _MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits must be in 1..{_MAX_KV_SPLITS}, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits
        self.block_m = block_m
        self.block_n = block_n
        self.num_warps = num_warps

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.seq_lens.device
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 set "
                             "before import, for tests); use attention backend 'torch' on CPU")
        meta.extra["triton"] = {}  # decode partial buffers, made by the first layer, shared by the rest

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
        if sliding_window is not None or meta.query_run_start is not None:
            raise ValueError("the triton attention backend has no sliding windows or bidirectional media runs yet; "
                             "use attention_backend='torch'")
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        num_kv_heads = k_cache.shape[2]
        shapes = _Shapes(q.shape[1], num_kv_heads, q.shape[2])
        if shapes.num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({shapes.num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        assert k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride() and q.stride(-1) == 1
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D], contiguous
        qk_scale = scale * _LOG2_E
        self._decode(q, k_cache, v_cache, out, meta, qk_scale, shapes)
        if not meta.is_decode_only:
            self._prefill(q, k_cache, v_cache, out, meta, qk_scale, shapes)
        return out

    def kv_splits(self, meta: AttentionMetadata, num_kv_heads: int) -> int:
        """Decode splits from static sizes only: enough programs to fill the device, at most one per tile.
        Rounded down to a power of two, so eager steps reuse the kernels compiled for the captured graphs."""
        max_tiles = triton.cdiv(meta.block_tables.shape[1] * meta.block_size, self.block_n)
        if self.num_kv_splits is not None:
            return min(self.num_kv_splits, max_tiles)
        wanted = triton.cdiv(2 * _num_sms(meta.seq_lens.device), meta.num_seqs * num_kv_heads)
        return 1 << (max(1, min(wanted, max_tiles, _MAX_KV_SPLITS)).bit_length() - 1)

    def _decode(self, q, k_cache, v_cache, out, meta, qk_scale, shapes: _Shapes) -> None:
        num_splits = self.kv_splits(meta, shapes.num_kv_heads)
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
        paged_decode_kernel[(num_seqs, shapes.num_kv_heads, num_splits)](
            q, k_cache, v_cache, out, part_out, part_lse,
            meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
            qk_scale, shapes.num_heads,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            BLOCK_SIZE=meta.block_size, GROUP=shapes.group,
            BLOCK_H=max(_MIN_DOT, triton.next_power_of_2(shapes.group)),
            HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, BLOCK_N=self.block_n,
            NUM_SPLITS=num_splits, PRECISION=_precision(k_cache), num_warps=self.num_warps,
        )
        if num_splits > 1:
            combine_splits_kernel[(num_seqs, shapes.num_heads)](
                part_out, part_lse, out, meta.cu_seqlens_q, shapes.num_heads, out.stride(0), out.stride(1),
                HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, NUM_SPLITS=num_splits,
                BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1,
            )

    def _prefill(self, q, k_cache, v_cache, out, meta, qk_scale, shapes: _Shapes) -> None:
        group_p = triton.next_power_of_2(shapes.group)
        block_m = max(self.block_m, group_p)
        block_q = block_m // group_p
        grid = (triton.cdiv(meta.max_query_len, block_q), meta.num_seqs, shapes.num_kv_heads)
        paged_prefill_kernel[grid](
            q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
            qk_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            BLOCK_SIZE=meta.block_size, GROUP=shapes.group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_M=block_m,
            HEAD_DIM=shapes.head_dim, BLOCK_D=shapes.block_d, BLOCK_N=self.block_n,
            PRECISION=_precision(k_cache), num_warps=self.num_warps,
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
