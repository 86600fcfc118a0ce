"""Decode-step time at batch 1 and 32: our paged engine step, once per attention backend (``cpu``: the C++ paged
kernel; ``torch``: the reference's gathered SDPA), vs transformers' FuyuForCausalLM forward with its own KV
cache (DynamicCache), same model, same context length. All are timed in alternation, step by step, in the same
process, so machine noise hits them alike; medians are printed, with each backend's speed-up over transformers
and the first backend's over the others.

    .venv/bin/python -m benchmarks.decode_step [--context 256[,1024]] [--batches 1,32] [--backends cpu,torch]
                                               [--steps 30] [--threads N] [--busy N] [--workload 64 [--rounds 3]]

``--workload N`` then runs ``benchmarks.throughput``'s workload (N requests, one image each, greedy, EOS ignored)
through ``Pipeline.generate`` once per backend, alternating for ``--rounds`` rounds: output tokens/s (medians)
and the ratio, and whether every backend generated the same tokens.

``--busy N`` runs N competing processes that spin on a core each while both are timed: what a server's
media decoding or HTTP loop (or a neighbour) does to the engine's torch threads.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import bench_checkpoint
from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk


class Ours:
    def __init__(self, folder, batch: int, context: int, steps: int, attention_backend: str = "auto"):
        self.runner = ModelRunner(EngineConfig(model=str(folder), block_size=16, max_num_seqs=batch,
                                               num_blocks=batch * (-(-(context + steps + 8) // 16)),
                                               keep_freed_memory=True, attention_backend=attention_backend))
        g = torch.Generator().manual_seed(0)
        per_seq = self.runner.num_blocks // batch
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        prompts = [torch.randint(3, self.runner.args.vocab_size, (context,), generator=g).tolist()
                   for _ in range(batch)]
        logits = self.runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts, self.tables)])
        self.next, self.pos = logits.argmax(-1).tolist(), context

    def step(self):
        # the block table grows with the sequence, as the engine's does
        num_blocks = -(-(self.pos + 1) // 16)
        chunks = [SeqChunk([tok], self.pos, t[:num_blocks]) for tok, t in zip(self.next, self.tables)]
        self.next = self.runner.forward(chunks).argmax(-1).tolist()
        self.pos += 1


class Reference:
    def __init__(self, folder, batch: int, context: int):
        from transformers import DynamicCache, FuyuForCausalLM

        self.model = FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.model.config.text_config.vocab_size, (batch, context), generator=g)
        self.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True)
        self.next, self.pos, self.batch = out.logits[:, -1].argmax(-1, keepdim=True), context, batch

    @torch.inference_mode()
    def step(self):
        position_ids = torch.full((self.batch, 1), self.pos)
        out = self.model(input_ids=self.next, cache=self.cache, use_cache=True, position_ids=position_ids)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.pos += 1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes that each keep one core busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def workload(folder, backends: list[str], num_requests: int, rounds: int) -> None:
    """benchmarks.throughput's run 1 (prompts built before the clock starts, as there) once per backend per round."""
    from benchmarks.throughput import make_requests
    from pipeline import Pipeline, SamplingParams

    requests = make_requests(num_requests)
    rates: dict[str, list[float]] = {b: [] for b in backends}
    tokens: dict[str, dict[str, list[int]]] = {}
    for _ in range(rounds):
        for backend in backends:
            engine = Pipeline.from_pretrained(str(folder), max_num_seqs=64, max_num_batched_tokens=2048,
                                              keep_freed_memory=True, attention_backend=backend).engine
            prompts = [engine.build_prompt(text, [image]) for text, image, _ in requests]
            out: dict[str, list[int]] = {f"t{i}": [] for i in range(len(prompts))}
            start = time.perf_counter()
            for i, (prompt, (*_, n)) in enumerate(zip(prompts, requests)):
                engine.add_request(f"t{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            while engine.has_unfinished():
                for o in engine.step():
                    out[o.request_id] += o.delta_token_ids
            seconds = time.perf_counter() - start
            tokens[backend] = out
            rates[backend].append(sum(map(len, out.values())) / seconds)
            del engine
    med = {b: statistics.median(r) for b, r in rates.items()}
    print(f"\n{num_requests}-request workload (benchmarks.throughput), output tok/s, median of {rounds} alternating "
          f"rounds: " + ", ".join(f"{b} {m:.1f} (" + " ".join(f"{x:.0f}" for x in rates[b]) + ")"
                                  for b, m in med.items()))
    first = backends[0]
    print(" ".join(f"{first}/{b} {med[first] / med[b]:.2f}x" for b in backends[1:]),
          "| identical outputs:", all(tokens[b] == tokens[first] for b in backends))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", default="256", help="context lengths, comma-separated")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--backends", default="cpu,torch", help="our attention backends, comma-separated")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for all (default: torch's)")
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes while timing")
    parser.add_argument("--no-transformers", action="store_true", help="time our backends only")
    parser.add_argument("--workload", type=int, default=0, help="then the throughput workload of N requests")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = bench_checkpoint()
    backends = args.backends.split(",")
    print(f"decode step, float32, CPU threads {torch.get_num_threads()}, median of {args.steps} alternating steps, "
          f"{args.busy} competing busy processes")
    names = [f"{b} ms" for b in backends] + ([] if args.no_transformers else ["transformers ms"])
    ratios = [f"{backends[0]}/{b}" for b in backends[1:]] + (
        [] if args.no_transformers else [f"{b} vs tf" for b in backends])
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{n:>15}" for n in names + ratios))
    for context in map(int, args.context.split(",")):
        for batch in map(int, args.batches.split(",")):
            systems = [Ours(folder, batch, context, args.steps + 2, b) for b in backends]
            if not args.no_transformers:
                systems.append(Reference(folder, batch, context))
            for system in systems:
                system.step()  # warm-up
            times: list[list[float]] = [[] for _ in systems]
            with busy_processes(args.busy):
                for _ in range(args.steps):
                    for system, samples in zip(systems, times):
                        samples.append(_timed(system.step))
            med = [statistics.median(t) for t in times]
            cells = [f"{m * 1e3:.2f}" for m in med] + [f"{m / med[0]:.2f}x" for m in med[1:len(backends)]]
            if not args.no_transformers:
                cells += [f"{med[-1] / m:.2f}x" for m in med[:len(backends)]]
            print(f"{batch:>5} {context:>7} " + " ".join(f"{c:>15}" for c in cells), flush=True)
            del systems
    if args.workload:
        workload(folder, backends, args.workload, args.rounds)


if __name__ == "__main__":
    main()
