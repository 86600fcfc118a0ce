"""Shared set-up for benchmarks: the benchmark model and timing helpers."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

# random Fuyu named by the issues: hidden 512, 8 layers, 8 heads, intermediate 2048, vocab 1024, patch 16
BENCH_MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                   vocab_size=1024, patch_size=16)
# Fuyu-8B's and Gemma 4's vocabulary: the same body with this many logits per row (embedding and LM head grow
# to 134 M parameters each). The tokenizer stays small: the ids past it decode to "", as a padded vocabulary's.
REAL_VOCAB_SIZE = 262144


def bench_checkpoint(target_size: int = 256, **overrides) -> Path:
    """The benchmark Fuyu in a new temporary folder; ``overrides`` change its config (``vocab_size=REAL_VOCAB_SIZE``:
    the real-vocabulary variant)."""
    from samples.random_checkpoint import make_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="fusionserve-bench-"))
    return make_checkpoint(folder, seed=0, target_height=target_size, target_width=target_size,
                           **{**BENCH_MODEL, **overrides})


# the benchmark Gemma 4 Unified for the vs-vLLM run: samples/random_gemma4_unified.py's BENCH_TEXT body (hidden
# 512, 8 layers, 8 heads over 4 KV heads, intermediate 2048) with the vocabulary cut to the power of two that
# holds its 400-token tokenizer; images at the family's default 280-soft-token budget
BENCH_GEMMA4_VOCAB_SIZE = 512


def bench_gemma4_checkpoint(**overrides) -> Path:
    """The benchmark Gemma 4 Unified (seed 0) in a new temporary folder; ``overrides`` change its text config."""
    from samples.random_gemma4_unified import make_bench_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="fusionserve-bench-gemma4-"))
    return make_bench_checkpoint(folder, **{"vocab_size": BENCH_GEMMA4_VOCAB_SIZE, **overrides})


def time_it(fn, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def hf_batch(pipe, prompts) -> dict:
    """transformers' inputs for our Prompts as one left-padded batch: input_ids, attention_mask, pixel_values."""
    import torch

    from encoders import normalize_patches

    width = max(len(p.token_ids) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p.token_ids):] = torch.tensor(p.token_ids)
        mask[row, width - len(p.token_ids):] = 1
    pixel_values = torch.cat([normalize_patches(p.patches, pipe.engine.front_end.patch_config) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
