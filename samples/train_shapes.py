"""Train the bundled model ``samples/fuyu-shapes`` on generated shape scenes and clips (CPU, float32).

    .venv/bin/python -m samples.train_shapes                 # the bundled model (seed 0)
    .venv/bin/python -m samples.train_shapes --steps 300 --out /tmp/fuyu-try

A tiny Fuyu (transformers' ``FuyuForCausalLM``) learns the five questions of ``samples.shapes``, plus
"where is the shape" questions asked in training only. Inputs are built by our ``Interleaver`` (images as
PIL, clips as mp4 bytes through ``load_video``), so the token layout is exactly what ``Pipeline`` sees:
``[media] <s> question <0x04>`` then the answer and ``</s>``; the loss covers only the answer tokens and
``</s>``.

What made it learn on a 2-core CPU in under 45 minutes (each measured in short runs):
- packing: a medium's tokens appear once per row, followed by all the questions that apply to it, each
  masked to see the medium and itself and positioned as if it were alone (``collate``), so one forward
  pass over an image trains 2-5 questions; a test checks each question's loss equals transformers' own;
- a peak learning rate of 1e-3 (at 2e-3, shape and position questions sat at chance for thousands of steps);
- the "where" questions, and a curriculum: stills only for the first ``stills_steps``, then clips too.

Seeded: the same arguments give the same weights (one data worker, fixed thread count).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from encoders import PatchConfig, normalize_patches
from samples.random_checkpoint import IMAGE_TOKEN, build_tokenizer, make_processor, tiny_config_kwargs
from samples.shapes import (ALL_PROMPTS, COLORS, COUNT_WORDS, DIRECTIONS, PLACES, SHAPES, Annotated,
                            SceneGenerator)
from tokenization import Interleaver, TextTokenizer

BUNDLED_DIR = Path(__file__).resolve().parent / "fuyu-shapes"
# every prompt and answer word is one token; "<t=" starts each video frame's timestamp
WORDS = tuple(dict.fromkeys(
    w for text in (*ALL_PROMPTS.values(), *COLORS, *SHAPES, *COUNT_WORDS, *DIRECTIONS, *PLACES, "a an and")
    for w in text.replace("?", " ").replace(".", " ").split()))
EXTRA_WORDS = tuple("▁" + w for w in WORDS) + ("▁<t=",)
SCENE_SHAPES = (1, 2, 3)
SCENE_SHAPE_WEIGHTS = (0.5, 0.25, 0.25)  # one-shape scenes carry the color and shape questions too


@dataclass
class TrainConfig:
    steps: int = 6500
    seed: int = 0
    image_batch_size: int = 16  # scenes per image step (each carries 2-4 questions)
    video_batch_size: int = 6  # clips per video step (each carries 3 questions)
    stills_steps: int = 2000  # a curriculum: stills only at first (where things are, shapes), then clips too
    video_every: int = 2  # after that, every second step is a batch of clips
    clip_tasks: tuple[str, ...] = ("motion", "start", "end", "color")
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 8
    image_side: int = 64  # images and frames fit into image_side x image_side
    threads: int = 1  # on a shared 2-core CPU one thread ran 5x faster than two
    max_minutes: float | None = None  # stop early (and say so) past this wall-clock time
    save_every: int = 500


def is_clip_step(step: int, cfg: TrainConfig) -> bool:
    return step >= cfg.stills_steps and (step - cfg.stills_steps) % cfg.video_every == cfg.video_every - 1


def patch_config(cfg: TrainConfig) -> PatchConfig:
    return PatchConfig(target_height=cfg.image_side, target_width=cfg.image_side, patch_size=cfg.patch_size)


@dataclass
class Batch:
    """Rows of one medium followed by all its questions, each question seeing the medium and itself only."""
    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]: every question starts where the medium ends
    attention_mask: torch.Tensor  # bool [B, 1, S, S]
    labels: torch.Tensor  # [B, S]: the next token where the loss applies, else -100
    question_ids: torch.Tensor  # [B, S]: which question (0..Q-1) a label belongs to, else -1
    question_tasks: list[str]  # [Q]
    patches: torch.Tensor  # uint8 [num_image_tokens, p*p*3], in token order


def model_config_kwargs(cfg: TrainConfig, vocab_size: int) -> dict:
    return tiny_config_kwargs(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=2048,
        patch_size=cfg.patch_size, image_size=cfg.image_side)


def make_interleaver(cfg: TrainConfig):
    tok = build_tokenizer(EXTRA_WORDS)
    return tok, Interleaver(TextTokenizer(tok), patch_config(cfg))


def collate(interleaver: Interleaver, items: list[Annotated]) -> Batch:
    """Packs each medium with all its questions: the medium's tokens once, then per question
    ``<s> question <0x04> answer``, masked and positioned as if it were the only question. The model sees
    exactly the layout Pipeline gives it, at a fraction of the cost of one row per question."""
    tok = interleaver.tokenizer
    rows, patches, tasks = [], [], []
    for item in items:
        media = {"images": [item.image] if item.image is not None else [],
                 "videos": [item.video] if item.video is not None else []}
        first = next(iter(item.answers))
        prompt = interleaver.build(ALL_PROMPTS[first], **media)
        m = prompt.media[-1].end
        ids, pos, seg, labels, qids = prompt.token_ids[:m], list(range(m)), [0] * m, [-100] * m, [-1] * m
        for k, (task, answer) in enumerate(item.answers.items(), 1):
            text = interleaver.build(ALL_PROMPTS[task]).token_ids  # <s> question <0x04>
            if k == 1:
                assert ids + text == prompt.token_ids
            answer_ids = tok.encode(answer)
            ids += text + answer_ids
            pos += range(m, m + len(text) + len(answer_ids))
            seg += [k] * (len(text) + len(answer_ids))
            labels += [-100] * (len(text) - 1) + answer_ids + [tok.eos_token_id]
            qids += [-1] * (len(text) - 1) + [len(tasks)] * (len(answer_ids) + 1)
            tasks.append(task)
        rows.append((ids, pos, seg, labels, qids))
        patches.append(prompt.patches)
    B, S = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.zeros(B, S, dtype=torch.long)
    position_ids = torch.zeros(B, S, dtype=torch.long)
    segments = torch.full((B, S), -1, dtype=torch.long)  # padding: -1
    labels = torch.full((B, S), -100, dtype=torch.long)
    question_ids = torch.full((B, S), -1, dtype=torch.long)
    for b, (ids, pos, seg, lab, q) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n], position_ids[b, :n], segments[b, :n] = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)
        labels[b, :n], question_ids[b, :n] = torch.tensor(lab), torch.tensor(q)
    key, query = segments[:, None, :], segments[:, :, None]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal & (key >= 0) & ((key == 0) | (key == query))
    mask |= torch.eye(S, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    return Batch(input_ids, position_ids, mask[:, None], labels, question_ids, tasks, torch.cat(patches))


class BatchStream(torch.utils.data.IterableDataset):
    """Scene batches, then from ``stills_steps`` on a clip batch every ``video_every`` steps; deterministic for
    one worker."""

    def __init__(self, cfg: TrainConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __iter__(self):
        torch.set_num_threads(1)
        import random
        gen, rng = SceneGenerator(self.seed), random.Random(self.seed + 1)
        _, interleaver = make_interleaver(self.cfg)
        for step in range(self.cfg.steps):
            if is_clip_step(step, self.cfg):
                items = [gen.annotated_clip(self.cfg.clip_tasks) for _ in range(self.cfg.video_batch_size)]
            else:
                counts = rng.choices(SCENE_SHAPES, SCENE_SHAPE_WEIGHTS, k=self.cfg.image_batch_size)
                items = [gen.annotated_scene(n) for n in counts]
            yield collate(interleaver, items)


def answer_loss(model, batch: Batch, patches: PatchConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over questions of each question's mean answer-token loss; also the mean loss per task."""
    pixel_values = normalize_patches(batch.patches, patches)
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, pixel_values=pixel_values).last_hidden_state
    where = batch.labels != -100
    token_loss = F.cross_entropy(model.lm_head(hidden[where]), batch.labels[where], reduction="none")
    q = batch.question_ids[where]
    num_q = len(batch.question_tasks)
    per_question = torch.zeros(num_q).index_add_(0, q, token_loss) / torch.bincount(q, minlength=num_q)
    per_task: dict[str, list[float]] = {}
    for task, value in zip(batch.question_tasks, per_question.tolist()):
        per_task.setdefault(task, []).append(value)
    return per_question.mean(), {t: sum(v) / len(v) for t, v in per_task.items()}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, tok, out_dir: Path, patches: PatchConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    make_processor(tok, patches.patch_size, patches.target_height, patches.target_width).save_pretrained(out_dir)


def train(cfg: TrainConfig, out_dir: Path) -> None:
    from transformers import FuyuConfig, FuyuForCausalLM

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok, _ = make_interleaver(cfg)
    vocab_size = 64 * math.ceil(tok.get_vocab_size() / 64)
    config = FuyuConfig(image_token_id=tok.token_to_id(IMAGE_TOKEN), **model_config_kwargs(cfg, vocab_size))
    model = FuyuForCausalLM(config).train()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters, vocab {vocab_size}, {cfg.steps} steps, {cfg}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    loader = torch.utils.data.DataLoader(BatchStream(cfg, cfg.seed), batch_size=None, num_workers=1,
                                         prefetch_factor=4)
    start, recent = time.time(), {}
    for step, batch in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, per_task = answer_loss(model, batch, patch_config(cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        kind = "video" if is_clip_step(step, cfg) else "image"
        for task, value in per_task.items():
            recent.setdefault(f"{kind}:{task}", []).append(value)
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            losses = "  ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(recent.items()))
            print(f"step {step + 1}/{cfg.steps}  loss {losses}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)
            recent = {}
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(model, tok, out_dir, patch_config(cfg))
        if cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes:
            print(f"stopped early after {step + 1} of {cfg.steps} steps ({cfg.max_minutes} min)", flush=True)
            break
    model.eval()
    save(model, tok, out_dir, patch_config(cfg))
    print(f"trained in {time.time() - start:.0f} s; saved to {out_dir}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--patch-size", type=int, default=TrainConfig.patch_size)
    parser.add_argument("--image-side", type=int, default=TrainConfig.image_side,
                        help="images and video frames fit into this many pixels a side")
    parser.add_argument("--stills-steps", type=int, default=TrainConfig.stills_steps,
                        help="steps of stills only before clips join")
    parser.add_argument("--video-every", type=int, default=TrainConfig.video_every,
                        help="every n-th step is a batch of clips")
    parser.add_argument("--image-batch-size", type=int, default=TrainConfig.image_batch_size)
    parser.add_argument("--video-batch-size", type=int, default=TrainConfig.video_batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--hidden-size", type=int, default=TrainConfig.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TrainConfig.num_layers)
    args = parser.parse_args(argv)
    train(TrainConfig(steps=args.steps, seed=args.seed, threads=args.threads, max_minutes=args.max_minutes,
                      patch_size=args.patch_size, image_side=args.image_side, video_every=args.video_every,
                      stills_steps=args.stills_steps, image_batch_size=args.image_batch_size,
                      video_batch_size=args.video_batch_size, lr=args.lr,
                      hidden_size=args.hidden_size, num_layers=args.num_layers), args.out)


if __name__ == "__main__":
    main()
