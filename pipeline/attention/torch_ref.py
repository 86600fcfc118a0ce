"""Reference backend: plain torch SDPA over the paged cache, on any device.

Each sequence's key blocks are gathered from the pool through its block table into a padded
``[B, num_blocks * block_size]`` view, and one masked SDPA call serves a group of sequences. A step's
decodes (one query each) are sorted by length and cut into groups of at least four sequences (at most
sixteen groups), so a short sequence is not padded to the longest; its prefill chunks are grouped the
same way by chunk length (queries padded within a group), and never share a group with decodes.
No Python loop over sequences. A group whose tokens are consecutive in the step reads and writes them as
a slice (no index copy); one group that is the whole step (batch-1 decode, equal lengths) returns its
output as it is.

Masks: key j is seen by the query at position i iff j < seq_len and either j <= i (and i - j < window on
a sliding layer) or j lies in the query's bidirectional media run [run_start, run_end). A sliding layer
gathers only the blocks from the lowest such j of the sequence's queries on, so its reads do not grow
with the context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.attention.base import AttentionBackend, AttentionMetadata, write_kv

_MIN_GROUP = 4
_MAX_GROUPS = 16


@dataclass
class _View:
    """What one kind of layer (full, or one sliding window) reads for a group."""

    blocks: torch.Tensor  # [Bg * n] pool blocks, row-major per sequence
    mask: torch.Tensor  # [Bg, 1, Q, n * block_size]


@dataclass
class _Group:
    tokens: torch.Tensor  # [Tg] indices of the group's tokens in the step
    token_range: tuple[int, int] | None  # (first, end) when those are consecutive in the step: a slice
    q_index: tuple[torch.Tensor, torch.Tensor] | None  # (sequence, row) of each token in the padded queries
    seq_lens: torch.Tensor  # [Bg]
    tables: torch.Tensor  # [Bg, max_blocks] int64
    q_pos: torch.Tensor  # [Bg, Q] position of each padded query row
    runs: tuple[torch.Tensor, torch.Tensor] | None  # ([Bg, Q] run_start, run_end), None: all causal
    num_seqs: int
    max_query_len: int
    views: dict[int | None, _View] = field(default_factory=dict)  # by sliding window (None: full attention)


def _group(meta: AttentionMetadata, part: list[int], cu_host: list[int]) -> _Group:
    """Precompute for the sequences ``part`` of the step (``cu_host``: cu_seqlens_q as a list)."""
    device = meta.seq_lens.device
    seqs = torch.tensor(part, device=device)
    consecutive = part == list(range(part[0], part[-1] + 1))
    token_range = (cu_host[part[0]], cu_host[part[-1] + 1]) if consecutive else None
    cu = meta.cu_seqlens_q.long()
    starts, query_lens = cu[:-1][seqs], (cu[1:] - cu[:-1])[seqs]
    seq_lens = meta.seq_lens.long()[seqs]
    num_seqs = seq_lens.numel()
    max_query_len = int(query_lens.max())
    # query row r of a sequence sits at position seq_len - q_len + r
    q_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_query_len, device=device)
    q_index, tokens = None, starts
    if max_query_len > 1:
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
        tokens = torch.repeat_interleave(starts, query_lens)
        row = torch.arange(tokens.numel(), device=device) - torch.repeat_interleave(
            query_lens.cumsum(0) - query_lens, query_lens)
        tokens = tokens + row
        q_index = (seq_of_token, row)
    runs = None
    if meta.query_run_start is not None:
        runs = (q_pos + 1, q_pos + 1)  # padding rows: no run
        if q_index is None:
            runs = (meta.query_run_start[tokens][:, None], meta.query_run_end[tokens][:, None])
        else:
            runs[0][q_index], runs[1][q_index] = meta.query_run_start[tokens], meta.query_run_end[tokens]
    return _Group(tokens, token_range, q_index, seq_lens, meta.block_tables[seqs].long(), q_pos,
                  runs, num_seqs, max_query_len)


def _view(group: _Group, window: int | None, block_size: int) -> _View:
    """The blocks a layer with this window reads for the group, and its mask."""
    seq_lens, q_pos = group.seq_lens, group.q_pos
    device = seq_lens.device
    end_blocks = -(-seq_lens // block_size)  # [Bg]
    first = torch.zeros_like(seq_lens)
    if window is not None:
        low = q_pos[:, 0] - window + 1  # the first query row reaches furthest back
        if group.runs is not None:
            low = torch.minimum(low, group.runs[0].min(dim=1).values)
        first = low.clamp(min=0) // block_size
    num_blocks = int((end_blocks - first).max())
    block_idx = (first[:, None] + torch.arange(num_blocks, device=device)).clamp(max=group.tables.shape[1] - 1)
    blocks = torch.gather(group.tables, 1, block_idx).reshape(-1)
    key_pos = (first * block_size)[:, None, None] + torch.arange(num_blocks * block_size, device=device)  # [Bg,1,S]
    qp = q_pos[:, :, None]  # [Bg, Q, 1]
    seen = key_pos <= qp
    if window is not None:
        seen &= qp - key_pos < window
    if group.runs is not None:
        seen |= (key_pos >= group.runs[0][:, :, None]) & (key_pos < group.runs[1][:, :, None])
    mask = seen & (key_pos < seq_lens[:, None, None])
    mask |= ~mask.any(dim=-1, keepdim=True)  # padding query rows: anything, never read back
    return _View(blocks, mask[:, None])


def _split_by_length(seqs: list[int], length: list[int]) -> list[list[int]]:
    """Sequences sorted by length -> runs of at least _MIN_GROUP; a new run starts when the next sequence is
    longer than the current run's shortest (at most _MAX_GROUPS runs): equal lengths stay in one run."""
    parts: list[list[int]] = []
    for placed, i in enumerate(seqs):
        current = parts[-1] if parts else None
        if (current is None or (len(current) >= _MIN_GROUP and len(parts) < _MAX_GROUPS
                                and length[i] > length[current[0]] and len(seqs) - placed >= _MIN_GROUP)):
            parts.append([i])
        else:
            current.append(i)
    return parts


class TorchBackend(AttentionBackend):
    name = "torch"

    def __init__(self):
        # gathered K/V land in reused buffers: a fresh tens-of-MB allocation every layer costs more in page
        # faults than the copy itself (seen on CPU: 98 ms vs 12 ms for a 55 MB gather)
        self._workspace: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._workspace[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def prepare(self, meta: AttentionMetadata) -> None:
        cu_host = meta.cu_seqlens_q.tolist()
        query_lens = [b - a for a, b in zip(cu_host, cu_host[1:])]
        seq_lens = meta.seq_lens.tolist()
        groups = []
        # decodes by length, prefill chunks by chunk length: sorted, and cut where padding to the group's
        # longest would waste much, so no sequence is padded to a much longer one
        for is_decode, key in ((True, seq_lens), (False, query_lens)):
            seqs = sorted((i for i, q in enumerate(query_lens) if (q == 1) == is_decode), key=key.__getitem__)
            groups += [_group(meta, part, cu_host) for part in _split_by_length(seqs, key)]
        meta.extra["torch"] = groups

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        groups = meta.extra["torch"]
        out = None
        for group in groups:
            view = group.views.get(sliding_window)
            if view is None:
                view = group.views[sliding_window] = _view(group, sliding_window, meta.block_size)
            tokens = group.tokens if group.token_range is None else slice(*group.token_range)
            part = self._attend(q[tokens], k_cache, v_cache, group, view, scale)
            if len(groups) == 1 and group.token_range == (0, q.shape[0]):
                return part
            if out is None:
                out = torch.empty_like(q)
            out[tokens] = part
        return out

    def _attend(self, q, k_cache, v_cache, group: _Group, view: _View, scale: float) -> torch.Tensor:
        """q [Tg, H, D] of one group -> [Tg, H, D]."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_cache.shape[2]
        gathered = (view.blocks.numel(), *k_cache.shape[1:])
        keys = torch.index_select(k_cache, 0, view.blocks, out=self._buffer("k", gathered, k_cache))
        values = torch.index_select(v_cache, 0, view.blocks, out=self._buffer("v", gathered, v_cache))
        shape = (group.num_seqs, -1, num_kv_heads, head_dim)
        keys, values = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)  # [Bg, Hkv, S, D]
        if group.q_index is None:
            queries = q[:, None]  # [Bg, 1, H, D]
        else:
            queries = q.new_zeros(group.num_seqs, group.max_query_len, num_heads, head_dim)
            queries[group.q_index] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=view.mask, scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        ).transpose(1, 2)  # [Bg, Q, H, D]
        out = out[:, 0] if group.q_index is None else out[group.q_index]
        return out.to(q.dtype)
