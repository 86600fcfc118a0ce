"""GPU check for issue 7, on a random Fuyu of about 1B parameters (run by benchmarks/gpu_check.sh):
greedy parity vs transformers, CUDA-graph decode vs eager, decode throughput at batch 1 / 16 / 64 vs
transformers' generate, and the memory bandwidth a batch-1 decode step reaches as a fraction of the device's
copy bandwidth. Exits 1 after the whole run if fp32 greedy parity or the graph check failed.
"""
from __future__ import annotations

import argparse
import bisect
import inspect
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import hf_batch
from pipeline import Pipeline, SamplingParams
from pipeline.attention import resolve_backend_name
from pipeline.model_runner import SeqChunk
from samples.random_checkpoint import make_checkpoint

FAILURES: list[str] = []
ONE_B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=8192,
             vocab_size=32000, patch_size=30, max_position_embeddings=4096)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(120, 480, size=2)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def hf_generate(model, pipe, prompts, max_tokens: list[int]) -> list[list[int]]:
    """Static batch, left-padded; runs to the longest request; returns each request's own tokens."""
    batch = {k: v.cuda() for k, v in hf_batch(pipe, prompts).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    if "pixel_values" not in inspect.signature(model.forward).parameters:  # transformers before the rename
        batch["image_patches"] = batch.pop("pixel_values")[None]  # one row holds every image's patches, in order
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=max(max_tokens),
                         min_new_tokens=max(max_tokens), do_sample=False, pad_token_id=0)
    return [out[row, width:width + n].tolist() for row, n in enumerate(max_tokens)]


def parity(folder, hf_model, dtype: str, backend: str) -> None:
    pipe = Pipeline.from_pretrained(str(folder), device="cuda", dtype=dtype, attention_backend=backend,
                                    num_blocks=512, block_size=256 if backend == "flash" else 16)
    prompts = [pipe.engine.build_prompt(f"Describe <image> in detail, part {i}.", [_image(i)]) for i in range(4)]
    ours = pipe.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    same = []
    for prompt, out in zip(prompts, ours):
        ref = hf_generate(hf_model, pipe, [prompt], [32])[0]
        same.append(next((i for i, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b), 32))
    print(f"greedy parity {dtype} ({pipe.engine.runner.backend.name}): identical leading tokens per prompt {same} "
          f"of 32")
    if dtype == "float32":
        if min(same) < 32:
            FAILURES.append(f"fp32 greedy parity {same}")
        graph_check(pipe)
    del pipe


def graph_check(pipe) -> None:
    """Decode logits of 3 sequences through the graph of 4 (one padding row) vs eager, eager first: a padding row
    writing into a real block would change them. The real blocks' K after both must agree too."""
    runner = pipe.engine.runner
    if runner.graphs is None:
        FAILURES.append(f"no CUDA graphs captured (backend {runner.backend.name})")
        print(FAILURES[-1])
        return
    lens = [40, 17, 90]
    per_seq = -(-(max(lens) + 1) // runner.block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    used = len(lens) * per_seq
    runner.forward([SeqChunk(list(range(3, 3 + n)), 0, t) for n, t in zip(lens, tables)])
    decode = [SeqChunk([5 + i], n, t) for i, (n, t) in enumerate(zip(lens, tables))]
    graphs, runner.graphs = runner.graphs, None
    eager = runner.forward(decode)
    k_eager = torch.stack([k[:used] for k in runner.k_caches])
    runner.graphs = graphs
    graphed = runner.forward(decode)
    logit_diff = (graphed - eager).abs().max().item()
    kv_diff = (torch.stack([k[:used] for k in runner.k_caches]) - k_eager).abs().max().item()
    ok = logit_diff < 1e-3 and kv_diff < 1e-3
    padded = graphs.batch_sizes[bisect.bisect_left(graphs.batch_sizes, len(lens))]
    print(f"cuda graph decode ({len(lens)} rows in the graph of {padded}) vs eager: max |logit diff| "
          f"{logit_diff:.2e}, max |K diff| in real blocks {kv_diff:.2e} {'ok' if ok else 'FAILED'}")
    if not ok:
        FAILURES.append("cuda graph decode vs eager")


def throughput(folder, hf_model, backend: str) -> None:
    pipe = Pipeline.from_pretrained(str(folder), device="cuda", attention_backend=backend, max_num_seqs=64,
                                    block_size=256 if backend == "flash" else 16)
    rng = random.Random(0)
    prompts = [pipe.engine.build_prompt(f"Question {i}: what is in <image>?", [_image(100 + i)]) for i in range(64)]
    lengths = [rng.randint(64, 256) for _ in prompts]
    pipe.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    rates = {}
    for batch in (1, 16, 64):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths[:batch]]
        seconds = _sync_time(lambda: pipe.generate(prompts[:batch], params))
        rates[batch] = sum(lengths[:batch]) / seconds
        print(f"fusionserve batch {batch:>2}: {rates[batch]:9.1f} tok/s")
    k = 4  # one at a time is slow: 4 requests give its rate
    seconds = _sync_time(lambda: [hf_generate(hf_model, pipe, [p], [n]) for p, n in zip(prompts[:k], lengths[:k])])
    single = sum(lengths[:k]) / seconds
    seconds = _sync_time(lambda: hf_generate(hf_model, pipe, prompts, lengths))
    static = sum(lengths) / seconds
    print(f"transformers one at a time: {single:9.1f} tok/s -> fusionserve batch 64 is {rates[64] / single:.1f}x "
          f"(target >= 20x)")
    print(f"transformers static batch 64 (varied lengths, left-padded): {static:9.1f} tok/s -> fusionserve "
          f"{rates[64] / static:.1f}x (target >= 2x)")
    bandwidth(pipe)


def bandwidth(pipe) -> None:
    runner = pipe.engine.runner
    context = 512
    table = list(range(-(-(context + 64) // runner.block_size)))
    runner.forward([SeqChunk(list(range(3, 3 + context)), 0, table)])
    state = {"pos": context}

    def step():
        runner.forward([SeqChunk([5], state["pos"], table)])
        state["pos"] += 1

    for _ in range(5):
        step()
    step_s = statistics.median(_sync_time(step) for _ in range(50))
    # a decode step reads every weight but the embedding tables (one row each; the patch projection not at all)
    read = {id(p): p for name, p in runner.model.named_parameters(remove_duplicate=False)
            if not name.startswith(("embed_tokens.", "vision_embed_tokens."))}
    weights = sum(p.numel() * p.element_size() for p in read.values())
    kv = context * runner.bytes_per_block // runner.block_size
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    copy_s = statistics.median(_sync_time(lambda: y.copy_(x)) for _ in range(10))
    copy_bw = 2 * x.numel() / copy_s
    achieved = (weights + kv) / step_s
    print(f"batch-1 decode step {step_s * 1e3:.2f} ms reads {(weights + kv) / 2**30:.2f} GiB -> "
          f"{achieved / 1e9:.0f} GB/s = {100 * achieved / copy_bw:.0f}% of copy bandwidth "
          f"({copy_bw / 1e9:.0f} GB/s) (target >= 50%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="attention backend for fusionserve (auto|flash|triton)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    import transformers
    import triton
    from transformers import FuyuForCausalLM

    backend = resolve_backend_name(args.backend, "cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "transformers",
          transformers.__version__, "backend", backend)
    folder = make_checkpoint(tempfile.mkdtemp(prefix="fuyu-1b-"), seed=0, target_height=480, target_width=480,
                             dtype="bfloat16", device="cuda", **ONE_B)
    for dtype in ("float32", "bfloat16"):
        hf_model = FuyuForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).cuda().eval()
        parity(folder, hf_model, dtype, "triton" if dtype == "float32" else backend)  # flash-attn has no fp32
        if dtype == "bfloat16":
            throughput(folder, hf_model, backend)
        del hf_model
        torch.cuda.empty_cache()
    if FAILURES:
        print("gpu_check FAILED:", "; ".join(FAILURES))
        sys.exit(1)


if __name__ == "__main__":
    main()
