"""Packs one step into flat tensors, owns the paged KV pool, runs the model (and the sampler)."""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from pipeline.attention import AttentionMetadata, StepContext, get_backend
from pipeline.compiled_decode import COMPILABLE_BACKENDS, CompiledDecode
from pipeline.config import EngineConfig
from pipeline.cuda_graph import CAPTURABLE_BACKENDS, DecodeGraphs
from pipeline.models import CausalLM, StepMedia, get_family, packed_linear
from pipeline.sampling import Sampler, SamplerOutput

logger = logging.getLogger(__name__)
_DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class SeqChunk:
    """The new tokens of one sequence in a step: they sit at positions start_pos .. start_pos + len - 1."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    patches: torch.Tensor | None = None  # [P, row_dim] media rows for the placeholder tokens below, in order
    image_offsets: list[int] = field(default_factory=list)  # indices into token_ids of those placeholder tokens
    row_position_ids: torch.Tensor | None = None  # [P, 2] the rows' 2-D positions, for families that use them
    audio_rows: torch.Tensor | None = None  # [A, samples_per_token] audio frames for the tokens below
    audio_offsets: list[int] = field(default_factory=list)  # indices into token_ids of those audio tokens
    runs: list[tuple[int, int]] = field(default_factory=list)  # bidirectional media runs [start, end) in it
    needs_logits: bool = True  # False for a prefill chunk that does not end the prompt: nothing is sampled

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    media: StepMedia | None
    logits_indices: torch.Tensor  # [N]: last token of each sequence that samples
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
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        if self.device.type == "cpu" and config.keep_freed_memory:
            keep_freed_memory()
        self.dtype = config.torch_dtype
        self.ctx = StepContext(None)  # this runner's step: never shared with another engine
        self.model: CausalLM = get_family(config.model).load_model(config.model, self.ctx, self.device, self.dtype)
        self.args = getattr(self.model, "args", None)
        if config.pack_linears and self.device.type == "cpu" and packed_linear.available():
            packed_linear.pack_linears(self.model)
        self.layers = self.model.attention_layers()
        # the backend that can serve every layer (head dims, sliding windows, bidirectional runs)
        self.ctx.backend = self.backend = get_backend(
            config.attention_backend, self.device, {layer.head_dim for layer in self.layers},
            self.model.has_bidirectional_runs or any(layer.sliding_window for layer in self.layers))
        self.block_size = config.block_size or (256 if self.backend.name == "flash" else 16)
        if self.backend.name == "flash" and self.block_size % 256:
            raise ValueError(f"the flash attention backend needs block_size a multiple of 256 (flash-attn's paged "
                             f"KV rule), got {self.block_size}; leave block_size unset or pick another backend")
        self.max_model_len = min(config.max_model_len or self.model.max_position_embeddings,
                                 self.model.max_position_embeddings)
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self.num_blocks = self._num_kv_blocks()
        use_graphs = (self.device.type == "cuda" and bool(config.cuda_graph_batch_sizes)
                      and self.backend.name in CAPTURABLE_BACKENDS)
        # per layer [num_blocks (+1), block_size, Hkv, D] under one block table; with CUDA graphs one scratch
        # block past the usable ones takes the padding rows' K/V; a KV-sharing layer binds its source's
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        for layer in self.layers:
            if layer.kv_source is None:
                shape = (self.num_blocks + use_graphs, self.block_size, layer.num_kv_heads, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
                layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            else:
                source = self.layers[layer.kv_source]
                layer.k_cache, layer.v_cache = source.k_cache, source.v_cache
            self.k_caches.append(layer.k_cache)
            self.v_caches.append(layer.v_cache)
        # each distinct pool once (a KV-sharing layer's are its source's)
        self._kv_pools = list({id(t): t for t in self.k_caches + self.v_caches}.values())
        self.graphs = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.ctx, config.cuda_graph_batch_sizes, self.block_size,
                                       self.max_model_len, self.num_blocks, self.device)
        self.compiled = None
        if config.compile_decode:
            if self.backend.name not in COMPILABLE_BACKENDS:
                raise ValueError(f"compile_decode needs the cpu attention backend (its C++ op), not "
                                 f"{self.backend.name!r}")
            self.compiled = CompiledDecode(self.model, self.ctx, self.block_size, config.max_num_seqs,
                                           packed_linear.row_thresholds(self.model))
            self.compiled.warm_up()  # the pool is empty: its dummy K/V land in a block no sequence holds yet
        logger.info("KV pool: %d blocks of %d tokens (%.1f MiB), backend %s", self.num_blocks, self.block_size,
                    self.num_blocks * self.bytes_per_block / 2**20, self.backend.name)

    @property
    def bytes_per_block(self) -> int:
        per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in self.layers if layer.kv_source is None)
        return per_token * self.block_size * self.dtype.itemsize

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

    def prepare(self, chunks: list[SeqChunk], all_logits: bool = False) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        row_indices: list[int] = []
        audio_indices: list[int] = []
        rows, row_positions, audio_rows = [], [], []
        logits_indices: list[int] = []
        for chunk in chunks:
            base = len(ids)
            ids += chunk.token_ids
            positions += range(chunk.start_pos, chunk.seq_len)
            if chunk.needs_logits:
                logits_indices.append(len(ids) - 1)
            if chunk.image_offsets:
                row_indices += [base + i for i in chunk.image_offsets]
                rows.append(chunk.patches)
                if chunk.row_position_ids is not None:
                    row_positions.append(chunk.row_position_ids)
            if chunk.audio_offsets:
                audio_indices += [base + i for i in chunk.audio_offsets]
                audio_rows.append(chunk.audio_rows)
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks], [c.seq_len for c in chunks], [c.block_table for c in chunks],
            self.block_size, self.device, runs=[c.runs for c in chunks])
        media = None
        if rows or audio_rows:
            device = self.device
            media = StepMedia(
                rows=torch.cat(rows).to(device, non_blocking=True) if rows else torch.empty(0, 0, device=device),
                indices=torch.tensor(row_indices, dtype=torch.long, device=device),
                position_ids=torch.cat(row_positions).to(device) if row_positions else None,
                audio_rows=torch.cat(audio_rows).to(device) if audio_rows else None,
                audio_indices=torch.tensor(audio_indices, dtype=torch.long, device=device) if audio_rows else None)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            media=media,
            logits_indices=(torch.arange(len(ids)) if all_logits
                            else torch.tensor(logits_indices, dtype=torch.long)).to(self.device),
            meta=meta,
        )

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [N, V] of the last new token of each chunk that ``needs_logits`` (or [T, V] for every new
        token); [0, V] when no chunk samples (the LM head does not run)."""
        step = self.prepare(chunks, all_logits)
        # every chunk samples its one row and no media rows: a decode step the graphs or the compile may run
        plain = not all_logits and step.media is None and len(step.logits_indices) == len(chunks)
        for fast in (self.graphs, self.compiled):
            if plain and fast is not None and fast.can_run(step.meta):
                return fast.run(step.input_ids, step.positions, step.meta)
        with self.ctx.step(step.meta):
            hidden = self.model(step.input_ids, step.positions, step.media)
        return self.model.compute_logits(hidden.index_select(0, step.logits_indices))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies the K/V of blocks (source, destination) in every layer's pool: copy on write of a block that
        forked sequences share. A destination given twice takes its last source (the earlier one was freed)."""
        if not copies:
            return
        latest = dict((dst, src) for src, dst in copies)
        dst = torch.tensor(list(latest), dtype=torch.long, device=self.device)
        src = torch.tensor(list(latest.values()), dtype=torch.long, device=self.device)
        for pool in self._kv_pools:
            pool[dst] = pool[src]  # the sources are read before any destination is written

    def run(self, chunks: list[SeqChunk], params, states, histories=None, sample_rows: list[int] | None = None,
            block_copies: list[tuple[int, int]] = ()) -> SamplerOutput | None:
        """Copies ``block_copies``, forwards, then samples one token per entry of ``params`` / ``states`` /
        ``histories`` (see ``Sampler.__call__``): by default one for each chunk that ``needs_logits``, in order;
        with ``sample_rows``, entry i samples that chunk's logits row ``sample_rows[i]`` (a row given n times is
        sampled n times: parallel sampling). None when no chunk needs logits."""
        self.copy_blocks(block_copies)
        logits = self.forward(chunks)
        if not logits.shape[0]:
            return None
        if sample_rows is not None:
            logits = logits.index_select(0, torch.tensor(sample_rows, dtype=torch.long, device=logits.device))
        return self.sampler(logits, params, states, histories)
