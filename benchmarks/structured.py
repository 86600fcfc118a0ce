"""What a structured output costs: the sampler alone on [32, V] logits with k of the 32 rows held to a JSON
schema (V = 1,024 and 262,144), then the Pipeline's output tok/s on the bundled model with and without
constraints. Every figure is printed against the unconstrained baseline measured in the same run. Times are
this process's CPU seconds on one torch thread (by default), so that other processes on a shared machine
do not count.

The large vocabulary is synthetic (no download): byte-fallback BPE pieces, every 1- to 3-letter word with
and without ``▁``, and pairs of punctuation, up to V ids, so that xgrammar has a vocabulary of V real tokens
to sort into allowed and not at each grammar state.

    .venv/bin/python -m benchmarks.structured [--steps 64] [--repeat 3] [--requests 8] [--max-tokens 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import string
import time

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from pipeline import Pipeline, SamplingParams
from pipeline.sampling import Sampler, StructuredOutputs
from tokenization import TextTokenizer

ROWS = 32
_ITEM = {"type": "object", "required": ["id", "name", "tag", "ok"], "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "name": {"type": "string", "maxLength": 12},
    "tag": {"enum": ["alpha", "beta", "gamma"]}, "ok": {"type": "boolean"}}}
SCHEMA = {"type": "array", "items": _ITEM, "minItems": 16, "maxItems": 16}  # longer than the runs: never done


def synthetic_tokenizer(vocab_size: int) -> TextTokenizer:
    vocab: dict[str, int] = {}
    for piece in ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]:
        vocab[piece] = len(vocab)
    pairs = ("".join(p) for p in itertools.product(string.punctuation, repeat=2))
    words = ("".join(w) for n in (1, 2, 3) for w in itertools.product(string.ascii_letters, repeat=n))
    spaced = (prefix + w for w in words for prefix in ("", "▁"))
    for piece in itertools.chain(string.digits, string.punctuation, pairs, spaced):
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return TextTokenizer(tok)


def take_turns(keys, measure, rounds: int) -> dict[int, float]:
    """Median of ``measure(key, round)`` per key; the keys take turns within each round, so machine noise hits
    them alike."""
    samples: dict[int, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys:
            samples[k].append(measure(k, r))
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_sampler(vocab_size: int, steps: int) -> None:
    start = time.process_time()
    tokenizer = synthetic_tokenizer(vocab_size)
    sampler = Sampler(torch.Generator().manual_seed(0))
    sampler.bind(tokenizer, frozenset({tokenizer.eos_token_id}), vocab_size)
    sampler.new_state(SamplingParams(structured=StructuredOutputs(json_object=True)))  # builds the grammar cache
    setup_s = time.process_time() - start
    constrained = SamplingParams(structured=StructuredOutputs(json=SCHEMA), temperature=1.0, seed=1)
    start = time.process_time()
    sampler.new_state(constrained)
    compile_s = time.process_time() - start
    plain = SamplingParams(temperature=1.0, seed=2)
    configs = {k: [constrained] * k + [plain] * (ROWS - k) for k in (0, 1, 8, ROWS)}
    states = {k: [sampler.new_state(p) for p in params] for k, params in configs.items()}  # each its own rows
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(ROWS, vocab_size, generator=g) for _ in range(8)]

    def step_s(k: int, step: int) -> float:
        begin = time.process_time()
        sampler(pool[step % len(pool)], configs[k], states[k])
        return time.process_time() - begin

    per_step = take_turns(configs, step_s, steps)
    print(f"\nsampler, [{ROWS}, {vocab_size:,}] float32 logits, CPU ms, median of {steps} steps; vocabulary set-up "
          f"{setup_s:.2f} s, schema compile {compile_s * 1e3:.0f} ms (once, then cached)")
    print(f"{'constrained rows':>17} {'ms / step':>10} {'vs none':>8} {'+ms per constrained row':>24}")
    for k, t in per_step.items():
        extra = f"{(t - per_step[0]) * 1e3 / k:.3f}" if k else "-"
        print(f"{k:>17} {t * 1e3:>10.3f} {t / per_step[0]:>7.2f}x {extra:>24}")


def bench_pipeline(num_requests: int, max_tokens: int, repeat: int) -> None:
    pipe = Pipeline.from_pretrained(keep_freed_memory=True)  # the bundled model
    constrained = StructuredOutputs(json=SCHEMA)

    def tok_per_s(num_constrained: int, _round: int = 0) -> float:
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=True,
                                 structured=constrained if i < num_constrained else None) for i in range(num_requests)]
        start = time.process_time()
        outs = pipe.generate([f"request {i}" for i in range(num_requests)], params)
        return sum(len(o.token_ids) for o in outs) / (time.process_time() - start)

    tok_per_s(num_requests)  # warm-up; compiles the schema
    rates = take_turns((0, num_requests // 2, num_requests), tok_per_s, repeat)
    print(f"\nPipeline, the bundled model (vocab {pipe.engine.runner.model.vocab_size}), {num_requests} requests x "
          f"{max_tokens} tokens, torch threads {torch.get_num_threads()}, median of {repeat} rounds")
    print(f"{'constrained requests':>21} {'output tok / CPU s':>19} {'vs none':>8}")
    for k, rate in rates.items():
        print(f"{k:>21} {rate:>19.1f} {rate / rates[0]:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for vocab_size in (1024, 262144):
        bench_sampler(vocab_size, args.steps)
    bench_pipeline(args.requests, args.max_tokens, args.repeat)


if __name__ == "__main__":
    main()
