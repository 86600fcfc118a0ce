"""CUDA graphs of the decode step at fixed batch sizes (as gpt-fast and vLLM do).

A decode-only step of B sequences is padded to the nearest captured size: its inputs are copied into
static buffers and the graph replays the whole forward (embedding, layers, lm head). Padding rows
write their K/V into a scratch block past the pool's usable blocks and attend only to it. The
attention metadata of a graph is static too: the block table is as wide as ``max_model_len`` needs,
and ``prepare`` runs inside the capture, so what it computes is recomputed on every replay.
Only backends without host syncs in ``prepare``/``forward`` can be captured (flash, triton).
"""
from __future__ import annotations

import bisect
import logging

import torch

from pipeline.attention import AttentionMetadata, StepContext
from pipeline.models import CausalLM

logger = logging.getLogger(__name__)
CAPTURABLE_BACKENDS = ("flash", "triton")


class DecodeGraphs:
    def __init__(self, model: CausalLM, ctx: StepContext, batch_sizes: tuple[int, ...],
                 block_size: int, max_model_len: int, scratch_block: int, device: torch.device):
        self.model, self.ctx = model, ctx
        self.batch_sizes = sorted(batch_sizes)
        self.block_size, self.scratch_block = block_size, scratch_block
        max_bs = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), scratch_block * block_size, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_bs, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture(device)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size, block_size=self.block_size)

    def _forward(self, bs: int) -> torch.Tensor:
        with self.ctx.step(self._meta(bs)):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, device: torch.device) -> None:
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its memory pool
                self._forward(bs)  # warm-up: autotuning and lazy allocations happen outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (meta.is_decode_only and meta.num_seqs <= self.batch_sizes[-1]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] of a decode-only step."""
        num_seqs = meta.num_seqs
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]
        width = meta.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(positions)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping)
        self.slot_mapping[num_seqs:bs].fill_(self.scratch_block * self.block_size)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        self.seq_lens[num_seqs:bs].fill_(1)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        self.block_tables[num_seqs:bs].fill_(self.scratch_block)
        self.graphs[bs].replay()
        return self.logits[bs][:num_seqs]
