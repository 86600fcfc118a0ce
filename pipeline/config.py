"""EngineConfig: every engine option in one dataclass, validated once, passed whole."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from encoders import MediaLimits, VideoSampling

_SAMPLES = Path(__file__).resolve().parent.parent / "samples"
BUNDLED_MODEL = _SAMPLES / "gemma4-shapes"  # a tiny Gemma 4 Unified: images, clips and sounds
FUYU_SHAPES_MODEL = _SAMPLES / "fuyu-shapes"  # the first bundled model, a tiny Fuyu: a second example
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None  # Hugging Face-format folder; None: the bundled model
    device: str = "cpu"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 elsewhere
    attention_backend: str = "auto"  # auto | cpu | torch | flash | triton
    block_size: int | None = None  # tokens per KV block; None: 256 with flash-attn (its paged-KV rule), else 16
    num_blocks: int | None = None  # KV pool size in blocks; overrides kv_cache_memory
    kv_cache_memory: float | None = None  # bytes (>1) or a fraction of free memory (0, 1]; None: 0.5 on CUDA, 1 GiB else
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # CUDA only; () disables
    pack_linears: bool = True  # CPU fp32: few-row C++ linear up to 8 rows, oneDNN packed GEMM above (2nd weight copy)
    compile_decode: bool = False  # CPU, cpu attention backend: torch.compile the decode step (at load, ~1 min)
    seed: int = 0  # the engine's own generator, for requests without a seed (the process's RNG is left alone)
    keep_freed_memory: bool = False  # CPU: glibc keeps freed memory in its heap (mallopt: the whole process)
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    video_sampling: VideoSampling = field(default_factory=VideoSampling)  # default frames per video

    def __post_init__(self):
        if self.model is None:
            self.model = str(BUNDLED_MODEL)
        if not Path(self.model).is_dir():
            raise ValueError(f"model folder {self.model!r} does not exist")
        try:
            self.device = str(torch.device(self.device))
        except RuntimeError as exc:
            raise ValueError(f"bad device {self.device!r}: {exc}") from exc
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here")
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be bytes (>1) or a fraction in (0, 1], got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        if self.compile_decode and self.device != "cpu":
            raise ValueError("compile_decode is for the CPU; on CUDA the decode step runs as CUDA graphs "
                             "(cuda_graph_batch_sizes)")
        sizes = tuple(self.cuda_graph_batch_sizes)
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive integers, got {self.cuda_graph_batch_sizes!r}")
        sizes = sorted(set(sizes))
        # no graph larger than needed: the smallest size that holds max_num_seqs is the last one captured
        enough = next((i for i, b in enumerate(sizes) if b >= self.max_num_seqs), len(sizes) - 1)
        self.cuda_graph_batch_sizes = tuple(sizes[:enough + 1])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)
