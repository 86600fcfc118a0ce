"""Where the milliseconds of one engine step go: decode at batch 1 and 32, and a prefill step, per op and per
part of the model (embedding, norms, QKV / output projections, rotary, attention: KV write, gather, math,
masks; MLP, LM head, sampler, step packing), on the benchmark checkpoint.

Each part is a ``record_function`` scope (forward hooks on the model's modules, wrappers around the runner's
methods); torch.profiler records the aten ops inside. "ops" is the time inside the part's top-level aten ops,
"scope" the part's whole time (ops + the Python between them); "Python/dispatch" is the step's wall time
under the profiler minus every op's. Wall times without the profiler are printed beside, for scale.

    .venv/bin/python -m benchmarks.profile_step [--family fuyu|gemma4_unified] [--context 256] [--steps 20]
                                                [--prefill 8x256] [--threads N] [--top 12] [--busy N]
                                                [--backend auto|cpu|torch]

``--busy N``: N competing processes spin on a core each while the steps run (see benchmarks.decode_step).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import bench_checkpoint
from benchmarks.decode_step import Ours, busy_processes
from pipeline.model_runner import SeqChunk
from pipeline.sampling import SamplingParams

_TAG = "fs::"
# module attribute name -> part
_PARTS_BY_NAME = {
    "query_key_value": "qkv proj", "qkv_proj": "qkv proj", "q_proj": "qkv proj",
    "dense": "o proj", "o_proj": "o proj",
    "dense_h_to_4h": "MLP", "dense_4h_to_h": "MLP", "gate_up_proj": "MLP", "act_and_mul": "MLP", "down_proj": "MLP",
}
# inside attention: op -> sub-part
_ATTENTION_OPS = {"aten::index_copy_": "KV write", "aten::index_select": "gather",
                  "aten::scaled_dot_product_attention": "math", "aten::_scaled_dot_product_flash_attention_for_cpu":
                  "math", "aten::index_put_": "scatter q/out", "aten::index": "scatter q/out",
                  "fusionserve::paged_attention": "paged kernel (cpu backend)"}


def _scoped(name: str, fn):
    def wrapped(*args, **kwargs):
        with record_function(_TAG + name):
            return fn(*args, **kwargs)
    wrapped.scoped = True
    return wrapped


def _label_module(module: nn.Module, part: str) -> None:
    stack: list[contextlib.AbstractContextManager] = []

    def enter(_module, _args):
        scope = record_function(_TAG + part)
        scope.__enter__()
        stack.append(scope)

    def leave(_module, _args, _out):
        stack.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def label(runner) -> None:
    """Scopes around every part of one runner's step (benchmark-only: hooks and instance wrappers)."""
    from pipeline.attention import PagedAttention
    from pipeline.models import fuyu, gemma4_unified

    model = runner.model
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, PagedAttention):
            _label_module(module, "attention")
        elif isinstance(module, (nn.LayerNorm, gemma4_unified.RMSNorm)):
            _label_module(module, "norm")
        elif isinstance(module, nn.Linear) and leaf in _PARTS_BY_NAME:
            _label_module(module, _PARTS_BY_NAME[leaf])
        elif leaf in ("layers",) or name.startswith("layers.") and leaf.isdigit():
            _label_module(module, "layer glue (residuals, activation)")
        elif leaf == "rotary":
            _label_module(module, "rotary")
    for module, fn in ((fuyu, "apply_rotary_"), (gemma4_unified, "rotate")):
        if not hasattr(getattr(module, fn), "scoped"):
            setattr(module, fn, _scoped("rotary", getattr(module, fn)))
    model.embed = _scoped("embedding", model.embed)
    model.compute_logits = _scoped("LM head", model.compute_logits)
    runner.prepare = _scoped("step packing (host lists -> tensors)", runner.prepare)
    runner.sampler = _scoped("sampler", runner.sampler)
    runner.backend.prepare = _scoped("attention metadata (per step)", runner.backend.prepare)


class Scene:
    """A step to profile: ``step()`` runs it once through ModelRunner.run (forward + sampler)."""

    def __init__(self, name: str, runner, make_chunks, after=None):
        self.name, self.runner, self.make_chunks, self.after = name, runner, make_chunks, after
        self.params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        self.new_state = runner.sampler.new_state  # before label() wraps the sampler

    def step(self):
        chunks = self.make_chunks()
        params = [self.params] * len(chunks)
        states = [self.new_state(self.params) for _ in chunks]
        out = self.runner.run(chunks, params, states)
        if self.after is not None:
            self.after(out.token_ids)


def decode_scene(folder, batch: int, context: int, steps: int, backend: str = "auto") -> Scene:
    ours = Ours(folder, batch, context, steps, backend)

    def chunks():
        num_blocks = -(-(ours.pos + 1) // 16)
        return [SeqChunk([tok], ours.pos, t[:num_blocks]) for tok, t in zip(ours.next, ours.tables)]

    def after(token_ids):
        ours.next, ours.pos = token_ids, ours.pos + 1

    return Scene(f"decode, batch {batch}, context {context}", ours.runner, chunks, after)


def prefill_scene(folder, num_seqs: int, chunk_len: int, backend: str = "auto") -> Scene:
    """``num_seqs`` prompts of ``chunk_len`` tokens from scratch in one step (the same blocks every run)."""
    ours = Ours(folder, num_seqs, 16, chunk_len, backend)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, ours.runner.args.vocab_size, (chunk_len,), generator=g).tolist()
               for _ in range(num_seqs)]
    return Scene(f"prefill, {num_seqs} x {chunk_len} tokens", ours.runner,
                 lambda: [SeqChunk(p, 0, t) for p, t in zip(prompts, ours.tables)])


def wall_ms(scene: Scene, steps: int) -> float:
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        scene.step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _part_of(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(_TAG):
        parent = parent.cpu_parent
    return None if parent is None else parent.name[len(_TAG):]


def profile_scene(scene: Scene, steps: int, top: int) -> None:
    scene.step()  # warm-up (buffers, first-touch pages)
    plain = wall_ms(scene, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with record_function(_TAG + "step"):
                scene.step()
        profiled = (time.perf_counter() - start) * 1e3 / steps
    ops: dict[str, float] = collections.defaultdict(float)  # part -> us of top-level ops
    scope: dict[str, float] = collections.defaultdict(float)  # part -> us inside the part, nested parts excluded
    by_op: dict[str, float] = collections.defaultdict(float)
    num_ops = 0
    for event in prof.events():
        if event.name.startswith(_TAG):
            part = event.name[len(_TAG):]
            nested = sum(c.cpu_time_total for c in event.cpu_children if c.name.startswith(_TAG))
            scope[part] += event.cpu_time_total - nested
            continue
        by_op[event.name] += event.self_cpu_time_total
        if event.cpu_parent is not None and not event.cpu_parent.name.startswith(_TAG):
            continue  # inside another op: counted in its parent
        num_ops += 1
        part = _part_of(event) or "step"
        if part == "attention":
            part = "attention: " + _ATTENTION_OPS.get(event.name, "masks, copies")
            scope.setdefault(part, 0.0)
        ops[part] += event.cpu_time_total
    op_total = sum(ops.values()) / steps / 1e3
    print(f"\n## {scene.name}: {plain:.2f} ms per step without the profiler, {profiled:.2f} ms under it, "
          f"{num_ops / steps:.0f} top-level ops per step")
    print(f"| part | ops ms | scope ms | share of step |\n| --- | ---: | ---: | ---: |")
    attention_scope = scope.pop("attention", 0.0)
    rows = []
    for part in set(ops) | set(scope):
        part_ops = ops.get(part, 0.0) / steps / 1e3
        part_scope = scope.get(part, 0.0) / steps / 1e3
        if part.startswith("attention: "):
            part_scope = part_ops
        rows.append((part_ops, part, part_scope))
    rows.append((0.0, "attention: Python between its ops",
                 attention_scope / steps / 1e3 - sum(r[0] for r in rows if r[1].startswith("attention: "))))
    for part_ops, part, part_scope in sorted(rows, key=lambda r: -max(r[0], r[2])):
        if part == "step":
            part, part_scope = "runner glue outside the parts", part_ops
        share = max(part_ops, part_scope) / profiled
        print(f"| {part} | {part_ops:.2f} | {part_scope:.2f} | {100 * share:.1f}% |")
    print(f"| **Python/dispatch (step wall - all ops)** | | {profiled - op_total:.2f} | "
          f"{100 * (profiled - op_total) / profiled:.1f}% |")
    print(f"top ops by self time (ms per step): " + ", ".join(
        f"{name} {us / steps / 1e3:.2f}" for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]))


def make_folder(family: str):
    if family == "fuyu":
        return bench_checkpoint()
    from samples.random_gemma4_unified import make_bench_checkpoint

    return make_bench_checkpoint(tempfile.mkdtemp(prefix="fusionserve-bench-gemma4-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("fuyu", "gemma4_unified"), default="fuyu")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill", default="8x256", help="SEQSxLEN: one prefill step of SEQS prompts of LEN")
    parser.add_argument("--batches", default="1,32", help="decode batch sizes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=12, help="how many ops to list by self time")
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes while profiling")
    parser.add_argument("--backend", default="auto", help="attention backend (auto: cpu when its op builds)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = make_folder(args.family)
    print(f"{args.family} benchmark checkpoint, float32, CPU threads {torch.get_num_threads()}, "
          f"{args.steps} steps per scene, {args.busy} competing busy processes, torch {torch.__version__}, "
          f"attention backend {args.backend}")
    num_seqs, chunk_len = (int(x) for x in args.prefill.split("x"))
    scenes = [lambda b=b: decode_scene(folder, b, args.context, 2 * args.steps + 4, args.backend)
              for b in map(int, args.batches.split(","))]
    scenes.append(lambda: prefill_scene(folder, num_seqs, chunk_len, args.backend))
    for make in scenes:
        scene = make()
        label(scene.runner)
        with busy_processes(args.busy):
            profile_scene(scene, args.steps, args.top)


if __name__ == "__main__":
    main()
