"""Engine throughput, prefix-cache TTFT and KV waste on a benchmark model (float32, CPU).

1. 64 requests, one random-size image each (48-256 px a side) and a prompt, max_tokens uniform in 16..256,
   EOS ignored so every system generates the same number of tokens: output tokens/s of Pipeline.generate vs
   transformers' ``generate`` (a) one request at a time, (b) static batches of 8, left-padded. ``--family``:
   ``fuyu`` (hidden 512, 8 layers, vocab 1024, patch 16; FuyuForCausalLM) or ``gemma4_unified`` (hidden 512,
   8 layers: 6 sliding (window 512) / 2 full, head dims 64 / 128, 8 heads over 4 KV heads, vocab 1024, images
   at the default 280-soft-token budget; Gemma4UnifiedForConditionalGeneration fed by its own processor).
2. Shared prefix: 32 requests with the same image and a long shared text, then different questions, arriving
   one after another: mean time-to-first-token with the prefix cache on vs off.
3. KV waste: allocated-but-unfilled slots / allocated slots, averaged over the steps of run 1.

Run 1 also reports the time spent in the sampler per step. ``--vocab 262144`` runs everything on the same body
with a real vocabulary (``benchmarks.common.REAL_VOCAB_SIZE``: 262,144 logits per row).

    .venv/bin/python -m benchmarks.throughput [--family fuyu|gemma4_unified] [--requests 64] [--hf-requests 64]
                                              [--threads N] [--vocab 262144]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import REAL_VOCAB_SIZE, bench_checkpoint, hf_batch
from pipeline import Pipeline, SamplingParams
from tokenization import MediaSlot

WORDS = "what is in this picture describe the shape colour left right count how many objects".split()


def make_requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        h, w = rng.randint(48, 256), rng.randint(48, 256)
        pixels = np.random.default_rng(seed * 1000 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "?"
        out.append((text, Image.fromarray(pixels), rng.randint(16, 256)))
    return out


class SamplerTimer:
    """Stands in for the engine's sampler and adds up the seconds spent in its calls (one per step that samples)."""

    def __init__(self, sampler):
        self.sampler, self.seconds, self.num_calls = sampler, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.sampler(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.num_calls += 1

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def run_ours(pipe: Pipeline, prompts, max_tokens: list[int]) -> tuple[float, int, float, SamplerTimer]:
    """(seconds, output tokens, mean KV waste over steps, the sampler's time)."""
    engine = pipe.engine
    timer = engine.runner.sampler = SamplerTimer(engine.runner.sampler)
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"t{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    waste, tokens = [], 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.delta_token_ids)
        stats = engine.stats()
        allocated = stats.num_kv_blocks_used * engine.runner.block_size
        if stats.num_running and allocated:
            waste.append(1 - stats.num_kv_slots_filled / allocated)
    seconds = time.perf_counter() - start
    engine.runner.sampler = timer.sampler
    return seconds, tokens, float(np.mean(waste)), timer


class Baseline:
    """transformers' model for the family, and its inputs for a group of requests (one left-padded batch)."""

    def __init__(self, family: str, folder, pipe: Pipeline):
        self.family, self.pipe = family, pipe
        if family == "fuyu":
            from transformers import FuyuForCausalLM

            self.model = FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        else:
            from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

            self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
            self.processor = AutoProcessor.from_pretrained(folder)

    def inputs(self, requests, prompts) -> dict:
        if self.family == "fuyu":
            return hf_batch(self.pipe, prompts)
        texts = ["<|image|>" + text for text, _, _ in requests]  # the image first, as our unmarked layout
        return dict(self.processor(text=texts, images=[[image] for _, image, _ in requests], padding=True,
                                   padding_side="left", return_tensors="pt"))


@torch.inference_mode()
def run_hf_single(baseline: Baseline, requests, prompts, max_tokens) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for request, prompt, n in zip(requests, prompts, max_tokens):
        inputs = baseline.inputs([request], [prompt])
        out = baseline.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return time.perf_counter() - start, tokens


@torch.inference_mode()
def run_hf_static(baseline: Baseline, requests, prompts, max_tokens, batch: int = 8) -> tuple[float, int]:
    """Static batches, left-padded; a batch runs until its longest request is done. Counts requested tokens."""
    start, tokens = time.perf_counter(), 0
    for at in range(0, len(prompts), batch):
        lens = max_tokens[at:at + batch]
        baseline.model.generate(**baseline.inputs(requests[at:at + batch], prompts[at:at + batch]),
                                max_new_tokens=max(lens), min_new_tokens=max(lens), do_sample=False, pad_token_id=0)
        tokens += sum(lens)
    return time.perf_counter() - start, tokens


def make_folder(family: str, vocab_size: int | None = None):
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    if family == "fuyu":
        return bench_checkpoint(target_size=256, **overrides)
    from samples.random_gemma4_unified import make_bench_checkpoint

    return make_bench_checkpoint(tempfile.mkdtemp(prefix="fusionserve-bench-gemma4-"), **overrides)


def mean_ttft(pipe: Pipeline, prompts) -> float:
    engine, ttfts = pipe.engine, []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        first = None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and any(o.delta_token_ids for o in outs):
                first = time.perf_counter() - start
        ttfts.append(first)
    return float(np.mean(ttfts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("fuyu", "gemma4_unified"), default="fuyu")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=64, help="how many of them the baselines run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: torch's)")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"the model's vocabulary size (default: the benchmark's 1024; {REAL_VOCAB_SIZE}: real)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = make_folder(args.family, args.vocab)
    pipe = Pipeline.from_pretrained(str(folder), max_num_seqs=64, max_num_batched_tokens=2048, keep_freed_memory=True)
    requests = make_requests(args.requests)
    prompts = [pipe.engine.build_prompt(text, [image]) for text, image, _ in requests]
    max_tokens = [n for _, _, n in requests]
    num_params = sum(p.numel() for p in pipe.engine.runner.model.parameters())
    print(f"benchmark {args.family} ({num_params / 1e6:.1f} M parameters, vocabulary "
          f"{pipe.engine.runner.model.vocab_size}), float32, CPU threads "
          f"{torch.get_num_threads()}, {len(prompts)} requests, "
          f"mean prompt {np.mean([len(p.token_ids) for p in prompts]):.0f} tokens, "
          f"mean output {np.mean(max_tokens):.0f} tokens")
    seconds, tokens, waste, sampler = run_ours(pipe, prompts, max_tokens)
    ours = tokens / seconds
    print(f"fusionserve Pipeline.generate:     {ours:8.1f} tok/s ({tokens} tokens in {seconds:.1f} s)")
    print(f"  in the sampler: {1e3 * sampler.seconds / max(sampler.num_calls, 1):.2f} ms per step over "
          f"{sampler.num_calls} steps ({100 * sampler.seconds / seconds:.1f}% of the run)")
    baseline = Baseline(args.family, folder, pipe)
    k = args.hf_requests
    seconds, tokens = run_hf_single(baseline, requests[:k], prompts[:k], max_tokens[:k])
    single = tokens / seconds
    print(f"transformers, one at a time:       {single:8.1f} tok/s  -> ours {ours / single:.1f}x (target >= 5x)")
    seconds, tokens = run_hf_static(baseline, requests[:k], prompts[:k], max_tokens[:k])
    static = tokens / seconds
    print(f"transformers, static batches of 8: {static:8.1f} tok/s  -> ours {ours / static:.1f}x (target >= 2x)")
    print(f"KV waste (allocated but unfilled slots), mean over steps: {100 * waste:.2f}% (target < 5%)")

    shared_text = " ".join(WORDS * 12)
    image = make_requests(1, seed=7)[0][1]
    questions = [f"{shared_text} question {i}: " + " ".join(random.Random(i).choices(WORDS, k=6)) for i in range(32)]
    timings = {}
    for caching in (True, False):
        pipe = Pipeline.from_pretrained(str(folder), enable_prefix_caching=caching, keep_freed_memory=True)
        shared = [pipe.engine.build_prompt(["", MediaSlot("image"), f" {q}"], [image]) for q in questions]
        timings[caching] = mean_ttft(pipe, shared)
    print(f"shared prefix ({len(shared[0].token_ids)} prompt tokens): mean TTFT cache on "
          f"{timings[True] * 1e3:.1f} ms, off {timings[False] * 1e3:.1f} ms -> "
          f"{timings[False] / timings[True]:.1f}x lower (target >= 3x)")


if __name__ == "__main__":
    main()
