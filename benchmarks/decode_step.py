"""Decode-step time at batch 1 and 32: our paged engine step vs transformers' FuyuForCausalLM forward with
its own KV cache (DynamicCache), same model, same context length. The two are timed in alternation, step by
step, in the same process, so machine noise hits both alike; medians are printed.

    .venv/bin/python -m benchmarks.decode_step [--context 256] [--steps 30] [--threads N] [--busy N]

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
    def __init__(self, folder, batch: int, context: int, steps: int):
        self.runner = ModelRunner(EngineConfig(model=str(folder), block_size=16, max_num_seqs=batch,
                                               num_blocks=batch * (-(-(context + steps + 8) // 16)),
                                               keep_freed_memory=True))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes while timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = bench_checkpoint()
    print(f"decode step, context {args.context}, float32, CPU threads {torch.get_num_threads()}, "
          f"median of {args.steps} alternating steps, {args.busy} competing busy processes")
    print(f"{'batch':>5} {'ours ms':>9} {'transformers ms':>16} {'speed-up':>9}")
    for batch in (1, 32):
        ours, ref = Ours(folder, batch, args.context, args.steps + 2), Reference(folder, batch, args.context)
        ours.step(), ref.step()  # warm-up
        t_ours, t_ref = [], []
        with busy_processes(args.busy):
            for _ in range(args.steps):
                t_ours.append(_timed(ours.step))
                t_ref.append(_timed(ref.step))
        a, b = statistics.median(t_ours), statistics.median(t_ref)
        print(f"{batch:>5} {a * 1e3:>9.2f} {b * 1e3:>16.2f} {b / a:>8.2f}x")


if __name__ == "__main__":
    main()
