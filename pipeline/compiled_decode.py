"""The decode step compiled by ``torch.compile`` on CPU: the CPU's answer to CUDA graphs (``cuda_graph.py``).

At batch 1 an eager decode step of the benchmark Fuyu spends about half its time in Python and op dispatch
(some 40 small ops a layer: norms, rotary, residuals, views; ``benchmarks/profile_step.py``). Inductor traces
the whole step (embedding, every layer, final norm, LM head) into one graph and fuses the elementwise work
around the linears into generated C++ loops; the paged attention stays one call of the ``cpu`` backend's
C++ op, which the trace sees through its fake (shape-only) implementation (``attention/cpu_kernel.py``).

Only decode-only steps without media run compiled (every sequence adds one token): prefill chunks, media
rows and ``all_logits`` steps run eager, as the CUDA graphs leave them. The linears inside are the packed
ones of ``models/packed_linear.py`` (the few-row C++ op, oneDNN through an op that takes the packed weight's
handle) or plain ``F.linear``. A graph has a symbolic batch size; inductor specializes size 1, so batch 1 has
its own, and each row count where the linears change kernel starts another (with packed linears: batch 1,
2-8, 9 and up). All are compiled at load time by ``warm_up`` on dummy decodes that write only into block 0
of the still-empty pool, so no request pays a compile; inductor's on-disk cache makes later starts cheaper.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.fx.experimental._config as shape_config

from pipeline.attention import AttentionMetadata, StepContext
from pipeline.models import CausalLM

logger = logging.getLogger(__name__)
COMPILABLE_BACKENDS = ("cpu",)  # its op has a fake implementation; the torch path's gathers are data-dependent


class CompiledDecode:
    def __init__(self, model: CausalLM, ctx: StepContext, block_size: int, max_batch: int,
                 thresholds: set[int] = frozenset()):
        """``max_batch``: the largest batch it runs; ``thresholds``: the batch sizes from which the model's
        linears take another kernel (``packed_linear.row_thresholds``)."""
        self.model, self.ctx, self.block_size, self.max_batch = model, ctx, block_size, max_batch
        # two sizes per graph: the first compiles it, the second checks the symbolic batch serves it
        self.warm_batches = sorted({1} | {b for t in {2, *thresholds} for b in (t, t + 1) if b <= max_batch})
        self.fn = torch.compile(self._step, dynamic=True, fullgraph=True)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions))

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.query_run_start is None and meta.num_seqs <= self.max_batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] of a decode-only step."""
        if meta.block_tables.shape[1] == 1:  # width 1 would be a graph of its own (inductor specializes size 1)
            meta.block_tables = torch.nn.functional.pad(meta.block_tables, (0, 1))
        with self.ctx.step(meta):
            return self.fn(input_ids, positions)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compiles the batch-1 graph and the symbolic-batch graphs (at each graph's first two sizes); call
        before the pool holds anything: the dummy tokens' K/V go to block 0, which no sequence has yet.
        Returns the seconds it took."""
        start = time.perf_counter()
        # no duck sizing: sizes that happen to be equal here (a batch + 1 and a block-table width) must not
        # become one symbol, or a later step where they differ would compile again
        with shape_config.patch(use_duck_shape=False):
            for batch in self.warm_batches:
                meta = AttentionMetadata.build([1] * batch, [1] * batch, [[0, 0]] * batch, self.block_size)
                ids = torch.zeros(batch, dtype=torch.long)
                self.run(ids, torch.zeros(batch, dtype=torch.long), meta)
        seconds = time.perf_counter() - start
        logger.info("decode step compiled in %.1f s (batches %s)", seconds, self.warm_batches)
        return seconds
