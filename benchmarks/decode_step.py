"""Decode-step time at batch 1 and 32: our paged engine step vs transformers' FuyuForCausalLM forward with
its own KV cache (DynamicCache), same model, same context length, measured in the same run.

    .venv/bin/python -m benchmarks.decode_step [--context 256] [--steps 20]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_checkpoint, time_it
from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk


def ours(folder, batch: int, context: int, steps: int) -> float:
    runner = ModelRunner(EngineConfig(model=str(folder), block_size=16, max_num_seqs=batch,
                                      num_blocks=batch * (-(-(context + steps + 8) // 16))))
    g = torch.Generator().manual_seed(0)
    blocks_per_seq = runner.num_blocks // batch
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    prompts = [torch.randint(3, runner.args.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]
    logits = runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    state = {"next": logits.argmax(-1).tolist(), "pos": context}

    def step():
        logits = runner.forward([SeqChunk([tok], state["pos"], t) for tok, t in zip(state["next"], tables)])
        state["next"] = logits.argmax(-1).tolist()
        state["pos"] += 1

    return time_it(step, repeat=steps)


def reference(folder, batch: int, context: int, steps: int) -> float:
    from transformers import DynamicCache, FuyuForCausalLM

    model = FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.text_config.vocab_size, (batch, context), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True)
    state = {"next": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context}

    @torch.inference_mode()
    def step():
        pos = torch.full((batch, 1), state["pos"])
        out = model(input_ids=state["next"], cache=cache, use_cache=True, position_ids=pos)
        state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["pos"] += 1

    return time_it(step, repeat=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    folder = bench_checkpoint()
    print(f"decode step, context {args.context}, float32, CPU threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours ms':>9} {'transformers ms':>16} {'speed-up':>9}")
    for batch in (1, 32):
        t_ours = ours(folder, batch, args.context, args.steps)
        t_ref = reference(folder, batch, args.context, args.steps)
        print(f"{batch:>5} {t_ours * 1e3:>9.2f} {t_ref * 1e3:>16.2f} {t_ref / t_ours:>8.2f}x")


if __name__ == "__main__":
    main()
