"""Packs one step into flat tensors, owns the paged KV pool, runs the model (and the sampler)."""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from pipeline.attention import AttentionMetadata, forward_context, get_backend
from pipeline.config import EngineConfig
from pipeline.cuda_graph import CAPTURABLE_BACKENDS, DecodeGraphs
from pipeline.model import FuyuModel, ModelArgs, load_model
from pipeline.sampling import Sampler

logger = logging.getLogger(__name__)
_DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class SeqChunk:
    """The new tokens of one sequence in a step: they sit at positions start_pos .. start_pos + len - 1."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    patches: torch.Tensor | None = None  # [P, patch_dim] rows for the image tokens below, in order
    image_offsets: list[int] = field(default_factory=list)  # indices into token_ids of those image tokens

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    patches: torch.Tensor | None  # [P, patch_dim]
    image_indices: torch.Tensor | None  # [P]
    logits_indices: torch.Tensor  # [B]: last token of each sequence
    meta: AttentionMetadata


def keep_freed_memory() -> None:
    """glibc: serve large CPU tensors from the heap and keep freed memory, instead of an mmap (and its page
    faults) per allocation. A step allocates tens of MB per layer; fresh pages cost more than the copies into
    them (a 55 MB clone: 51 ms before, 11 ms after). The job jemalloc/tcmalloc do in PyTorch's CPU tuning guide."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


class ModelRunner:
    def __init__(self, config: EngineConfig, patch_normalizer=None):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = config.torch_dtype
        self.backend = get_backend(config.attention_backend, self.device)
        self.block_size = config.block_size or (256 if self.backend.name == "flash" else 16)
        if self.backend.name == "flash" and self.block_size % 256:
            raise ValueError(f"the flash attention backend needs block_size a multiple of 256 (flash-attn's paged "
                             f"KV rule), got {self.block_size}; leave block_size unset or pick another backend")
        self.model: FuyuModel = load_model(config.model, self.backend, self.device, self.dtype)
        self.args: ModelArgs = self.model.args
        self.max_model_len = min(config.max_model_len or self.args.max_position_embeddings,
                                 self.args.max_position_embeddings)
        self.patch_normalizer = patch_normalizer  # uint8 patches -> normalized float, as the processor does
        self.sampler = Sampler()
        self.num_blocks = self._num_kv_blocks()
        use_graphs = (self.device.type == "cuda" and bool(config.cuda_graph_batch_sizes)
                      and self.backend.name in CAPTURABLE_BACKENDS)
        # with CUDA graphs, one scratch block past the usable ones takes the padding rows' K/V
        shape = (self.args.num_layers, self.num_blocks + use_graphs, self.block_size, self.args.num_kv_heads,
                 self.args.head_dim)
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.k_pool[i], self.v_pool[i]
        self.graphs = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.backend, config.cuda_graph_batch_sizes, self.block_size,
                                       self.max_model_len, self.num_blocks, self.device)
        logger.info("KV pool: %d blocks of %d tokens (%.1f MiB), backend %s", self.num_blocks, self.block_size,
                    2 * self.k_pool.numel() * self.k_pool.element_size() / 2**20, self.backend.name)

    @property
    def bytes_per_block(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        useful = cfg.max_num_seqs * -(-self.max_model_len // self.block_size)
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        budget = cfg.kv_cache_memory
        if budget is None:
            budget = 0.5 if self.device.type == "cuda" else _DEFAULT_CPU_KV_BYTES
        if budget <= 1:
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = free * budget
        num_blocks = min(int(budget) // self.bytes_per_block, useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={cfg.kv_cache_memory} holds no KV block "
                             f"({self.bytes_per_block} bytes each)")
        return num_blocks

    def prepare(self, chunks: list[SeqChunk]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        image_indices: list[int] = []
        patches = []
        for chunk in chunks:
            base = len(ids)
            ids += chunk.token_ids
            positions += range(chunk.start_pos, chunk.seq_len)
            if chunk.image_offsets:
                image_indices += [base + i for i in chunk.image_offsets]
                patches.append(chunk.patches)
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks], [c.seq_len for c in chunks], [c.block_table for c in chunks],
            self.block_size, self.device)
        patch_rows = None
        if patches:
            patch_rows = torch.cat(patches).to(self.device, non_blocking=True)
            if patch_rows.dtype == torch.uint8:
                patch_rows = self.patch_normalizer(patch_rows)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            patches=patch_rows,
            image_indices=torch.tensor(image_indices, dtype=torch.long, device=self.device) if patches else None,
            logits_indices=(meta.cu_seqlens_q[1:] - 1).long(),
            meta=meta,
        )

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [B, V] of each sequence's last new token (or [T, V] for every new token)."""
        step = self.prepare(chunks)
        if self.graphs is not None and not all_logits and self.graphs.can_run(step.meta):
            return self.graphs.run(step.input_ids, step.positions, step.meta)
        with forward_context(step.meta, self.backend):
            hidden = self.model(step.input_ids, step.positions, step.patches, step.image_indices)
        if not all_logits:
            hidden = hidden.index_select(0, step.logits_indices)
        return self.model.compute_logits(hidden)

    def run(self, chunks: list[SeqChunk], params, generators, token_history=None):
        """Forward, then sample one token per sequence (callers drop those of unfinished prefill chunks)."""
        logits = self.forward(chunks)
        return self.sampler(logits, params, generators, token_history)
