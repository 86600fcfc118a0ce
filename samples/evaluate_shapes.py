"""Exact-match accuracy of a model on freshly generated shape scenes, through ``Pipeline``.

    .venv/bin/python -m samples.evaluate_shapes                     # the bundled model, 200 per task
    .venv/bin/python -m samples.evaluate_shapes --model DIR --num 50 --seed 7
    .venv/bin/python -m samples.evaluate_shapes --tasks where       # the training-only question

The scenes come from ``samples.shapes.SceneGenerator`` with a seed the training never used
(training draws from seed 0 and its neighbours). An answer counts when the generated text, stripped
of surrounding whitespace, equals the expected answer exactly.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from samples.shapes import TASKS, Example, SceneGenerator

EXTRA_TASKS = ("where",)  # asked in training only; no target, not in the default run

EVAL_SEED = 20261117
TARGETS = {"color": 0.95, "shape": 0.95, "count": 0.90, "motion": 0.90}  # the targets; describe: none


@dataclass
class TaskResult:
    task: str
    num_correct: int = 0
    num_total: int = 0
    num_stopped: int = 0  # ended with EOS (finish_reason "stop")
    mistakes: list[tuple[str, str]] = field(default_factory=list)  # (expected, got), the first few

    @property
    def accuracy(self) -> float:
        return self.num_correct / max(1, self.num_total)


def examples_for(task: str, num: int, seed: int) -> list[Example]:
    gen = SceneGenerator(seed + (TASKS + EXTRA_TASKS).index(task))  # one stream per task: --tasks changes no scene
    return [gen.example(task) for _ in range(num)]


def request_for(example: Example) -> dict:
    return {"prompt": example.question, "images": [example.image] if example.image is not None else [],
            "videos": [example.video] if example.video is not None else []}


def evaluate(pipe, num_per_task: int, seed: int = EVAL_SEED, tasks=TASKS, max_tokens: int = 24,
             batch_size: int = 32) -> dict[str, TaskResult]:
    """Greedy answers for ``num_per_task`` new examples of each task, ``batch_size`` requests at a time."""
    from pipeline import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    results = {}
    for task in tasks:
        result = results[task] = TaskResult(task)
        examples = examples_for(task, num_per_task, seed)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            for ex, out in zip(chunk, pipe.generate([request_for(ex) for ex in chunk], params)):
                got = out.text.strip()
                result.num_total += 1
                result.num_stopped += out.finish_reason == "stop"
                if got == ex.answer:
                    result.num_correct += 1
                elif len(result.mistakes) < 5:
                    result.mistakes.append((ex.answer, got))
    return results


def report(results: dict[str, TaskResult]) -> str:
    lines = [f"{'task':<10}{'accuracy':>10}{'n':>6}{'target':>8}{'EOS':>6}  first mistakes (expected -> got)"]
    for r in results.values():
        target = f"{TARGETS[r.task]:.0%}" if r.task in TARGETS else "-"
        mistakes = "; ".join(f"{e!r} -> {g!r}" for e, g in r.mistakes[:3])
        lines.append(f"{r.task:<10}{r.accuracy:>10.1%}{r.num_total:>6}{target:>8}{r.num_stopped:>6}  {mistakes}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled samples/fuyu-shapes)")
    parser.add_argument("--num", type=int, default=200, help="examples per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS + EXTRA_TASKS)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model)
    start = time.time()
    results = evaluate(pipe, args.num, args.seed, args.tasks)
    print(report(results))
    print(f"{sum(r.num_total for r in results.values())} answers in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
