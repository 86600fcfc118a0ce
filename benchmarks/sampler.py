"""Per-step sampler time: the batched sampler against the previous algorithm (kept below as the baseline),
measured in the same run on the same logits.

Baseline: exponential race over the whole vocabulary (argmax(probs / q), q ~ Exp(1) drawn per row) and a
sort of the whole vocabulary for top-p. Now: one uniform per row and an inverse CDF in two levels, top-k
before top-p with only the candidates sorted. Logits are LM-like (a Zipf law of exponent 1.5 over a random
permutation of the vocabulary, so the 0.9 nucleus holds a few dozen tokens) and, for top-p, also flat
(standard normal: the nucleus spans most of the vocabulary and the candidates fall back to a full sort).

    .venv/bin/python -m benchmarks.sampler [--vocab 262144 1024] [--batch 32 1] [--repeat 5] [--threads N]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import time_it
from pipeline.sampling import Sampler, SamplingParams

CASES = {  # name -> SamplingParams kwargs
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-p 0.9, flat": dict(temperature=0.8, top_p=0.9),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "penalties": dict(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
}
PROMPT_LEN, OUTPUT_LEN = 512, 128  # history of each row for the penalties


# the previous sampler, verbatim in what it computes


def old_repetition_penalty(logits, penalties, token_history):
    lengths = torch.tensor([len(h) for h in token_history], device=logits.device)
    rows = torch.repeat_interleave(torch.arange(len(token_history), device=logits.device), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_history)), device=logits.device, dtype=torch.long)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[rows, cols] = True
    p = penalties[:, None].expand_as(logits)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    logits.copy_(torch.where(seen, penalized, logits))


def old_top_k_top_p_min_p(logits, top_k_host, top_p_host, min_p_host):
    vocab_size = logits.shape[-1]
    top_k, top_p, min_p = (torch.tensor(x, device=logits.device) for x in (top_k_host, top_p_host, min_p_host))
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    if any(p < 1.0 for p in top_p_host):
        sorted_logits, _ = logits.sort(dim=-1, descending=True)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = (mass_above < top_p[:, None]) & (sorted_logits > float("-inf"))
        keep_sorted[:, 0] = True
        num_keep = keep_sorted.sum(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < sorted_logits.gather(1, num_keep - 1), float("-inf"))
    elif any(k_ > 0 for k_ in top_k_host):
        max_k = max(k_ if k_ > 0 else vocab_size for k_ in top_k_host)
        top_values = logits.topk(min(max_k, vocab_size), dim=-1).values
        logits = logits.masked_fill(logits < top_values.gather(1, (k - 1)[:, None]), float("-inf"))
    if any(p > 0.0 for p in min_p_host):
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(too_unlikely, float("-inf"))
    return logits


def old_sample(generator, logits, params, generators, histories):
    """The previous ``Sampler.__call__`` (it had no presence / frequency penalty)."""
    device = logits.device
    raw = logits = logits.float()
    token_history = [list(p) + list(o) for p, o in histories]
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = raw.clone()
        old_repetition_penalty(logits, torch.tensor([p.repetition_penalty for p in params]), token_history)
    greedy_ids = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        return greedy_ids.tolist()
    greedy = torch.tensor([p.is_greedy for p in params], device=device)
    temperature = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        logits = old_top_k_top_p_min_p(logits, [p.top_k for p in params], [p.top_p for p in params],
                                       [p.min_p for p in params])
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    for row, gen in enumerate(generators):
        if gen is not None:
            q[row].exponential_(generator=gen)
    return torch.where(greedy, greedy_ids, (probs / q.clamp_(min=1e-20)).argmax(dim=-1)).tolist()


def make_logits(batch: int, vocab: int, flat: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if flat:
        return torch.randn(batch, vocab, generator=gen)
    zipf = -1.5 * torch.arange(1, vocab + 1, dtype=torch.float32).log()  # log p of rank r: -1.5 log r
    return torch.stack([zipf[torch.randperm(vocab, generator=gen)] for _ in range(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[262144, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"sampler per step, float32 logits, CPU threads {torch.get_num_threads()}, median of {args.repeat}")
    print(f"{'vocab':>7} {'batch':>5}  {'case':22} {'before ms':>10} {'after ms':>9} {'speed-up':>8}")
    for vocab, batch in itertools.product(args.vocab, args.batch):
        sampler = Sampler(torch.Generator().manual_seed(0))
        histories = [(torch.randint(vocab, (PROMPT_LEN,)).tolist(), torch.randint(vocab, (OUTPUT_LEN,)).tolist())
                     for _ in range(batch)]
        logits = {flat: make_logits(batch, vocab, flat) for flat in (False, True)}
        for name, kwargs in CASES.items():
            params = [SamplingParams(seed=row if row % 2 else None, **kwargs) for row in range(batch)]  # half seeded
            x = logits["flat" in name]
            states = [sampler.new_state(p) for p in params]
            before = time_it(lambda: old_sample(sampler.generator, x, params, [s.generator for s in states],
                                                histories), args.repeat, warmup=1)
            after = time_it(lambda: sampler(x, params, states, histories), args.repeat, warmup=1)
            print(f"{vocab:7d} {batch:5d}  {name:22} {before * 1e3:10.2f} {after * 1e3:9.2f} {before / after:7.1f}x")


if __name__ == "__main__":
    main()
