"""Train the bundled model ``samples/fuyu-shapes`` on generated shape scenes and clips (CPU, float32).

    .venv/bin/python -m samples.train_shapes                 # the bundled model (seed 0)
    .venv/bin/python -m samples.train_shapes --steps 300 --out /tmp/fuyu-try

A tiny Fuyu (transformers' ``FuyuForCausalLM``) learns the five questions of ``samples.shapes``.
Inputs are built by our ``Interleaver`` (images as PIL, clips as mp4 bytes through ``load_video``), so
the token layout is exactly what ``Pipeline`` sees: ``[media] <s> question <0x04>`` then the answer
and ``</s>``; the loss covers only the answer tokens and ``</s>``. Seeded: the same arguments give the
same weights (one data worker, fixed thread count).
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
from samples.random_checkpoint import IMAGE_TOKEN, build_tokenizer, tiny_config_kwargs
from samples.shapes import COLORS, COUNT_WORDS, DIRECTIONS, PROMPTS, SHAPES, SceneGenerator
from tokenization import Interleaver, TextTokenizer

BUNDLED_DIR = Path(__file__).resolve().parent / "fuyu-shapes"
# every prompt and answer word is one token; "<t=" starts each video frame's timestamp
WORDS = tuple(dict.fromkeys(
    w for text in (*PROMPTS.values(), *COLORS, *SHAPES, *COUNT_WORDS, *DIRECTIONS, "a an and")
    for w in text.replace("?", " ").replace(".", " ").split()))
EXTRA_WORDS = tuple("▁" + w for w in WORDS) + ("▁<t=",)
IMAGE_TASKS = ("color", "shape", "count", "describe")
IMAGE_TASK_WEIGHTS = (0.2, 0.2, 0.25, 0.35)


@dataclass
class TrainConfig:
    steps: int = 4000
    seed: int = 0
    image_batch_size: int = 24
    video_batch_size: int = 6
    video_every: int = 2  # every second step is a batch of clips
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 16
    image_side: int = 96  # images and frames fit into image_side x image_side
    motion_weight: int = 4  # clip batches: motion : color : shape = motion_weight : 1 : 1
    threads: int = 1  # on a shared 2-core CPU one thread ran 5x faster than two
    max_minutes: float | None = None  # stop early (and say so) past this wall-clock time
    save_every: int = 500


def patch_config(cfg: TrainConfig) -> PatchConfig:
    return PatchConfig(target_height=cfg.image_side, target_width=cfg.image_side, patch_size=cfg.patch_size)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]: the next token where the loss applies, else -100
    patches: torch.Tensor  # uint8 [num_image_tokens, p*p*3], in token order
    num_answer_tokens: int


def model_config_kwargs(cfg: TrainConfig, vocab_size: int) -> dict:
    return tiny_config_kwargs(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=2048,
        patch_size=cfg.patch_size, image_size=cfg.image_side)


def make_interleaver(cfg: TrainConfig):
    tok = build_tokenizer(EXTRA_WORDS)
    return tok, Interleaver(TextTokenizer(tok), patch_config(cfg))


def collate(interleaver: Interleaver, examples) -> Batch:
    tok = interleaver.tokenizer
    rows, patches, num_answer = [], [], 0
    for ex in examples:
        prompt = interleaver.build(ex.question, images=[ex.image] if ex.image is not None else [],
                                   videos=[ex.video] if ex.video is not None else [])
        answer = tok.encode(ex.answer) + [tok.eos_token_id]
        rows.append((prompt.token_ids + answer, len(prompt.token_ids)))
        patches.append(prompt.patches)
        num_answer += len(answer)
    seq_len = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for b, (ids, prompt_len) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        labels[b, prompt_len - 1:len(ids) - 1] = torch.tensor(ids[prompt_len:])  # position i predicts i+1
    return Batch(input_ids, mask, labels, torch.cat(patches), num_answer)


class BatchStream(torch.utils.data.IterableDataset):
    """Image batches with a clip batch every ``video_every`` steps; deterministic for one worker."""

    def __init__(self, cfg: TrainConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __iter__(self):
        torch.set_num_threads(1)
        import random
        gen, rng = SceneGenerator(self.seed), random.Random(self.seed + 1)
        _, interleaver = make_interleaver(self.cfg)
        for step in range(self.cfg.steps):
            if step % self.cfg.video_every == self.cfg.video_every - 1:  # a third of the clips: color or shape
                tasks = rng.choices(("motion", "color", "shape"), (self.cfg.motion_weight, 1, 1), k=self.cfg.video_batch_size)
                examples = [gen.example(t, video=True) for t in tasks]
            else:
                tasks = rng.choices(IMAGE_TASKS, IMAGE_TASK_WEIGHTS, k=self.cfg.image_batch_size)
                examples = [gen.example(t) for t in tasks]
            yield collate(interleaver, examples)


def answer_loss(model, batch: Batch, patches: PatchConfig) -> torch.Tensor:
    pixel_values = normalize_patches(batch.patches, patches)
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=pixel_values).last_hidden_state  # [B, S, H]
    where = batch.labels != -100
    return F.cross_entropy(model.lm_head(hidden[where]), batch.labels[where])  # answer positions only


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, tok, out_dir: Path, patches: PatchConfig) -> None:
    from transformers import FuyuImageProcessor, FuyuProcessor, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    p = patches.patch_size
    image_processor = FuyuImageProcessor(size={"height": patches.target_height, "width": patches.target_width},
                                         patch_size={"height": p, "width": p})
    FuyuProcessor(image_processor=image_processor, tokenizer=fast).save_pretrained(out_dir)


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
    start, recent = time.time(), {"image": [], "video": []}
    for step, batch in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = answer_loss(model, batch, patch_config(cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        kind = "video" if step % cfg.video_every == cfg.video_every - 1 else "image"
        recent[kind].append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            means = {k: sum(v) / len(v) for k, v in recent.items() if v}
            print(f"step {step + 1}/{cfg.steps}  loss image {means.get('image', float('nan')):.4f} "
                  f"video {means.get('video', float('nan')):.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)
            recent = {"image": [], "video": []}
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
    parser.add_argument("--video-every", type=int, default=TrainConfig.video_every,
                        help="every n-th step is a batch of clips")
    parser.add_argument("--motion-weight", type=int, default=TrainConfig.motion_weight,
                        help="clip batches ask motion : color : shape in this ratio to 1 : 1")
    args = parser.parse_args(argv)
    train(TrainConfig(steps=args.steps, seed=args.seed, threads=args.threads, max_minutes=args.max_minutes,
                      patch_size=args.patch_size, image_side=args.image_side, video_every=args.video_every,
                      motion_weight=args.motion_weight), args.out)


if __name__ == "__main__":
    main()
