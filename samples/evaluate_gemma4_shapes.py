"""Exact-match accuracy of the bundled Gemma 4 Unified model, through ``Pipeline``, on the held-out renderer.

    .venv/bin/python -m samples.evaluate_gemma4_shapes                      # samples/gemma4-shapes, 200 per task
    .venv/bin/python -m samples.evaluate_gemma4_shapes --model DIR --num 50 --tasks color beeps
    .venv/bin/python -m samples.evaluate_gemma4_shapes --layout plain       # Pipeline(question, images=...)

Each task's examples come from ``samples.scenes_heldout`` (a renderer the training never used) and, for the
column beside it, from the training generators (``samples.scenes``, ``samples.beeps``) with seeds the
training never drew. A question is asked as the demo and ``/v1/chat/completions`` ask it: one user turn of
the checkpoint's chat template holding the medium then the question (``serve.chat.user_turn``); ``--layout
plain`` asks it as ``Pipeline(question, images=...)`` does (sounds have no plain layout in training). An
answer counts when the generated text, stripped of surrounding whitespace, equals the expected one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from samples.beeps import BEEP_PROMPTS, BeepMaker
from samples.evaluate_shapes import TaskResult
from samples.scenes import Medium, SceneMaker
from samples.scenes_heldout import TASKS, HeldoutScenes
from samples.train_gemma4_shapes import ALL_PROMPTS

DEFAULT_MODEL = Path(__file__).resolve().parent / "gemma4-shapes"
EVAL_SEED = 20261201
TARGETS = {"color": 0.95, "shape": 0.90, "count": 0.85, "motion": 0.85, "describe": 0.60, "beeps": 0.90,
           "pitch": 0.90}  # issue 16
RENDERERS = ("heldout", "training")
_MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}


def training_examples(task: str, num: int, seed: int) -> list[Medium]:
    """``num`` media for ``task`` from the training generators (seeded apart from training's 0, 1, 2)."""
    if task in BEEP_PROMPTS:
        beeps = BeepMaker(seed)
        return [beeps.annotated() for _ in range(num)]
    scenes = SceneMaker(seed)
    if task == "motion":
        return [scenes.annotated_clip() for _ in range(num)]
    return [scenes.annotated_scene(1 if task in ("color", "shape") else scenes.rng.randint(1, 3)) for _ in range(num)]


def examples_for(task: str, num: int, seed: int = EVAL_SEED, renderer: str = "heldout") -> list[Medium]:
    """Media whose ``answers`` hold ``task``; one stream per (task, renderer): other tasks change no example."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    task_seed = seed + 1000 * TASKS.index(task)
    if renderer == "training":
        return training_examples(task, num, task_seed)
    gen = HeldoutScenes(task_seed)
    return [gen.example(task) for _ in range(num)]


def request_for(medium: Medium, task: str, template=None) -> dict:
    """A Pipeline request asking ``task`` about ``medium``: the chat turn of ``template`` (a
    ``serve.chat.ChatTemplate``), or the plain layout (the question, the medium before it)."""
    from serve.chat import user_turn

    question = ALL_PROMPTS[task]
    prompt = question if template is None else user_turn(template, question, [medium.kind])
    return {"prompt": prompt, _MEDIA_KEYS[medium.kind]: [getattr(medium, medium.kind)]}


def evaluate(pipe, num_per_task: int, seed: int = EVAL_SEED, tasks=TASKS, renderer: str = "heldout",
             template=None, max_tokens: int = 24, batch_size: int = 32, max_mistakes: int = 5
             ) -> dict[str, TaskResult]:
    """Greedy answers for ``num_per_task`` new examples of each task, ``batch_size`` requests at a time; the
    first ``max_mistakes`` wrong answers of each task are kept."""
    from pipeline import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    results = {}
    for task in tasks:
        media = examples_for(task, num_per_task, seed, renderer)
        outs = [out for i in range(0, len(media), batch_size)
                for out in pipe.generate([request_for(m, task, template) for m in media[i:i + batch_size]], params)]
        pairs = [(m.answers[task], out.text.strip()) for m, out in zip(media, outs)]
        results[task] = TaskResult(task, num_correct=sum(want == got for want, got in pairs), num_total=len(pairs),
                                   num_stopped=sum(out.finish_reason == "stop" for out in outs),
                                   mistakes=[(want, got) for want, got in pairs if want != got][:max_mistakes])
    return results


def report(heldout: dict[str, TaskResult], training: dict[str, TaskResult] | None = None) -> str:
    """The table: held-out accuracy, its target, whether met, the training renderer's accuracy beside it."""
    lines = [f"{'task':<10}{'held-out':>10}{'target':>8}{'met':>5}{'training':>10}{'n':>6}{'EOS':>6}"
             "  first held-out mistakes (expected -> got)"]
    for task, r in heldout.items():
        target = TARGETS.get(task)
        met = "-" if target is None else "yes" if r.accuracy >= target else "no"
        train = f"{training[task].accuracy:.1%}" if training and task in training else "-"
        mistakes = "; ".join(f"{e!r} -> {g!r}" for e, g in r.mistakes[:3])
        lines.append(f"{task:<10}{r.accuracy:>10.1%}{f'{target:.0%}' if target else '-':>8}{met:>5}{train:>10}"
                     f"{r.num_total:>6}{r.num_stopped:>6}  {mistakes}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from pipeline import Pipeline
    from serve.chat import ChatTemplate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: samples/gemma4-shapes)")
    parser.add_argument("--num", type=int, default=200, help="examples per task and renderer")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--layout", choices=("chat", "plain"), default="chat")
    parser.add_argument("--renderers", nargs="+", default=list(RENDERERS), choices=RENDERERS)
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks if args.layout == "chat" or t not in BEEP_PROMPTS]
    pipe = Pipeline.from_pretrained(args.model)
    template = ChatTemplate.from_pretrained(args.model) if args.layout == "chat" else None
    start = time.time()
    results = {r: evaluate(pipe, args.num, args.seed, tasks, r, template) for r in args.renderers}
    first = results[args.renderers[0]]
    print(report(first, results.get("training") if args.renderers[0] == "heldout" else None))
    print(f"{sum(r.num_total for rs in results.values() for r in rs.values())} answers in {time.time() - start:.1f} s "
          f"({args.layout} layout, {args.model})")


if __name__ == "__main__":
    main()
