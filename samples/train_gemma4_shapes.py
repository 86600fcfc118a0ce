"""Train the bundled model ``samples/gemma4-shapes``: a tiny Gemma 4 Unified that sees, watches and listens (CPU).

    .venv/bin/python -m samples.train_gemma4_shapes                       # the bundled model (seed 0)
    .venv/bin/python -m samples.train_gemma4_shapes --steps 200 --out /tmp/g4-try

A tiny transformers ``Gemma4UnifiedForConditionalGeneration`` (hidden 128, 4 layers, MLP 256) learns the five shape
questions of ``samples.shapes`` on stills and clips drawn by ``samples.scenes`` (many drawing styles), and
the two beep questions of ``samples.beeps`` on sounds. Inputs are laid out by our ``Gemma4UnifiedLayout``
loaded from the checkpoint folder being written (images and mp4 clips decoded as a user's are), inside the
checkpoint's chat template exactly as the demo and ``/v1/chat/completions`` render a question
(``serve.chat.user_turn``); a quarter of the still and clip rows use the plain layout (media, then the
question, the answer ending with ``<eos>``), as ``Pipeline(prompt, images=...)`` builds it. The loss covers the
answer tokens and the end of the turn.

The processor: 12-pixel cells (patch 4, pooling kernel 3) at the smallest budget the family allows (70 soft
tokens per image and per video frame, so an image is seen at about 100x100 pixels), 4 frames per clip,
640-sample (40 ms) audio tokens. Sliding layers get a window longer than any prompt, so every layer sees
the whole prompt.

What made it learn on a 2-core CPU: packing, as for the Fuyu model (``samples.train_shapes``: a medium's tokens
once per row, then each of its questions masked to see the medium and itself, positioned as if alone; image and
frame runs attend both ways, as the family's mask has them); a peak learning rate of 1e-3; a curriculum
(stills and sounds first, clips from ``stills_steps`` on; the share of media drawn with the whole variety of
``samples.scenes`` / ``samples.beeps`` rising from a quarter to all over ``easy_steps``); the training-only
"where" questions; and two changes that made shape learnable at all (``start_weights`` and ``task_weights``).

Shape was the task that would not move: with the defaults of transformers' initialization the shape loss sat at
chance for 900 image-only steps of plain scenes (``where`` questions or not), while colour was learned in 300.
A probe on the family's vision embedder (its LayerNorm -> Dense -> LayerNorm + 2-D position, then a small
MLP per cell) learned shape from the same scenes in 100 steps when its cells were max-pooled, in about 200
when pooled by one learned attention query, and not at all in 200 when averaged: shape lives in a few edge
cells, and the decoder has to learn to attend to them. Two things stood in the way, both fixed here:
``start_weights`` (attention logits not saturated at the start; each layer adds a fraction of the residual
stream) made colour, count and describe learn about twice as fast but left shape at chance by itself; with
the shape question weighted 4 in the loss as well, shape left chance at step 150 and reached 0.135 (about
90% right) by step 350 of image-only training. ``motion`` and ``beeps``, also slow, are weighted 2.

Seeded: the same arguments give the same weights (one data worker, fixed thread count).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from encoders.gemma4_unified import normalize_rows
from samples.beeps import BEEP_PROMPTS, PITCHES, BeepMaker
from samples.random_gemma4_unified import build_tokenizer, make_processor, tiny_text_kwargs, token_ids
from samples.scenes import Medium, SceneMaker
from samples.shapes import COLORS, COUNT_WORDS, DIRECTIONS, PLACES, PROMPTS, SHAPES, WHERE_PROMPTS
from samples import train_shapes
from samples.train_shapes import lr_at
from samples.training import fit, question_losses
from serve.chat import ChatTemplate, user_turn
from tokenization.gemma4_unified import Gemma4UnifiedLayout
from tokenization.interleave import MediaSlot

BUNDLED_DIR = Path(__file__).resolve().parent / "gemma4-shapes"
ALL_PROMPTS = {**PROMPTS, **BEEP_PROMPTS, **WHERE_PROMPTS}  # the "where" questions: training only
# every prompt and answer word is one token, after a space (▁word) or at the start of a turn (word)
WORDS = tuple(dict.fromkeys(
    w for text in (*ALL_PROMPTS.values(), *COLORS, *SHAPES, *COUNT_WORDS, *DIRECTIONS, *PITCHES, *PLACES, "a an and")
    for w in text.replace("?", " ").replace(".", " ").replace(",", " ").split()))
EXTRA_WORDS = tuple("▁" + w for w in WORDS) + WORDS  # ▁word first: its merges must not be pre-empted
SCENE_SHAPES = (1, 2, 3)
SCENE_SHAPE_WEIGHTS = (0.5, 0.25, 0.25)  # one-shape scenes carry the color and shape questions too
PROCESSOR = dict(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70, video_max_soft_tokens=70,
                 video_num_frames=4, audio_samples_per_token=640)


@dataclass
class TrainConfig:
    steps: int = 4000
    seed: int = 0
    image_batch_size: int = 16  # stills per image step (each carries 2-4 questions)
    video_batch_size: int = 4  # clips per clip step (each carries 3 questions)
    audio_batch_size: int = 24  # sounds per audio step (each carries 2 questions)
    stills_steps: int = 300  # a curriculum: stills and sounds first, then clips too
    easy_steps: int = 1200  # and the share of fully varied media rises from a quarter to all over these steps
    plain_fraction: float = 0.25  # still and clip rows in the plain layout instead of the chat turn
    task_weights: str = "shape=4,motion=2,beeps=2"  # a question's weight in the loss (tasks not named: 1)
    branch_scale: float = 0.2  # initial weight of the norms after attention and MLP (see start_weights)
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    threads: int = 1  # on a shared 2-core CPU one thread ran faster than two (as for samples.train_shapes)
    max_minutes: float | None = None  # stop early (and say so) past this wall-clock time
    save_every: int = 500


def step_kind(step: int, cfg: TrainConfig) -> str:
    """image, audio, image, audio, ... then image, audio, image, clip, ... from ``stills_steps`` on."""
    cycle = ("image", "audio") if step < cfg.stills_steps else ("image", "audio", "image", "clip")
    return cycle[step % len(cycle)]


def hard_share(step: int, cfg: TrainConfig) -> float:
    """The chance that a medium of this step is drawn with the whole variety (else plainly): 1/4 -> 1."""
    return min(1.0, 0.25 + 0.75 * step / max(1, cfg.easy_steps))


def model_config(cfg: TrainConfig, tok):
    from transformers import (Gemma4UnifiedAudioConfig, Gemma4UnifiedConfig, Gemma4UnifiedTextConfig,
                              Gemma4UnifiedVisionConfig)

    h = cfg.hidden_size
    text = tiny_text_kwargs(
        vocab_size=64 * math.ceil(tok.get_vocab_size() / 64), hidden_size=h, intermediate_size=2 * h,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads // 2,
        head_dim=h // cfg.num_heads, global_head_dim=h // cfg.num_heads,
        layer_types=["sliding_attention", "full_attention"] * (cfg.num_layers // 2),
        sliding_window=2048, max_position_embeddings=2048, final_logit_softcapping=None)
    vision = Gemma4UnifiedVisionConfig(patch_size=PROCESSOR["patch_size"],
                                       pooling_kernel_size=PROCESSOR["pooling_kernel_size"], mm_embed_dim=h,
                                       output_proj_dims=h, mm_posemb_size=72)  # 70 cells: the longest side
    audio = Gemma4UnifiedAudioConfig(audio_embed_dim=PROCESSOR["audio_samples_per_token"])
    return Gemma4UnifiedConfig(text_config=Gemma4UnifiedTextConfig(**text), vision_config=vision,
                               audio_config=audio, **token_ids(tok))


def write_processor(out_dir: Path):
    """The tokenizer (with one token per prompt and answer word) and processor, written to ``out_dir``."""
    tok = build_tokenizer(EXTRA_WORDS)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_processor(tok, **PROCESSOR).save_pretrained(out_dir)
    return tok


@dataclass
class Batch(train_shapes.Batch):
    """``samples.train_shapes.Batch`` (rows of one medium followed by all its questions, each question seeing the
    medium and itself only), its ``patches`` the float pixel values of every image and frame row in token order,
    with their (x, y) positions and the audio rows."""
    vision_positions: torch.Tensor  # [P, 2]: (x, y) of each row
    audio_rows: torch.Tensor  # float [A, samples_per_token]


class Packer:
    """Media -> packed rows, laid out by the checkpoint's own layout and chat template."""

    def __init__(self, folder: Path):
        self.layout = Gemma4UnifiedLayout.from_pretrained(folder)
        self.template = ChatTemplate.from_pretrained(folder)
        self.tok = self.layout.tokenizer
        self.end_of_turn, self.eos = self.tok.token_to_id("<turn|>"), self.tok.token_to_id("<eos>")

    def prompt(self, medium: Medium, question: str, plain: bool) -> list:
        """The prompt as Pipeline / the chat API lay it out: a segmented chat turn, or plain text (media first)."""
        return [MediaSlot(medium.kind), question] if plain else user_turn(self.template, question, [medium.kind])

    def row(self, medium: Medium, plain: bool):
        kinds = {"image": "images", "video": "videos", "audio": "audios"}
        media = {kinds[medium.kind]: [getattr(medium, medium.kind)]}
        tasks = list(medium.answers)
        first = self.layout.build(self.prompt(medium, ALL_PROMPTS[tasks[0]], plain), **media)
        m = first.media[-1].end
        end_id = self.eos if plain else self.end_of_turn
        ids, pos, seg, labels, qids = first.token_ids[:m], list(range(m)), [0] * m, [-100] * m, [-1] * m
        for k, task in enumerate(tasks, 1):
            suffix = self.prompt(medium, ALL_PROMPTS[task], plain)[-1]
            text = self.tok.encode(suffix, add_special_tokens=False).ids
            if k == 1:
                assert ids + text == first.token_ids, "the packed layout differs from Pipeline's"
            answer = self.tok.encode(medium.answers[task], add_special_tokens=False).ids
            ids += text + answer
            pos += range(m, m + len(text) + len(answer))
            seg += [k] * (len(text) + len(answer))
            labels += [-100] * (len(text) - 1) + answer + [end_id]
            qids += [-1] * (len(text) - 1) + [k - 1] * (len(answer) + 1)
        block = [-1] * len(ids)  # bidirectional image / frame runs (mm_token_type_ids 1 and 2)
        for b, (start, end) in enumerate(first.bidirectional_spans):
            block[start:end] = [b] * (end - start)
        cfg = self.layout.media_config
        is_video = torch.tensor([first.token_types[i] == 2 for i in first.image_positions], dtype=torch.bool)
        rows = (normalize_rows(first.patches, cfg.image_norm) if len(first.patches)
                else torch.empty(first.patches.shape, dtype=torch.float32))
        if is_video.any():
            rows[is_video] = normalize_rows(first.patches[is_video], cfg.video_norm)
        return (ids, pos, seg, labels, qids, block), tasks, rows, first.row_position_ids, first.audio_rows

    def collate(self, items: list[tuple[Medium, bool]]) -> Batch:
        rows, tasks, vision, vision_pos, audio = [], [], [], [], []
        for medium, plain in items:
            row, row_tasks, v, vp, a = self.row(medium, plain)
            rows.append(row)
            row[4][:] = [q + len(tasks) if q >= 0 else -1 for q in row[4]]
            tasks += row_tasks
            vision.append(v)
            vision_pos.append(vp)
            audio.append(a)
        B, S = len(rows), max(len(r[0]) for r in rows)
        t = {name: torch.full((B, S), fill, dtype=torch.long) for name, fill in
             (("ids", 0), ("pos", 0), ("seg", -1), ("labels", -100), ("qids", -1), ("block", -1))}
        for b, row in enumerate(rows):
            for name, values in zip(t, row):
                t[name][b, :len(values)] = torch.tensor(values)
        key, query = t["seg"][:, None, :], t["seg"][:, :, None]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        same_block = (t["block"][:, :, None] == t["block"][:, None, :]) & (t["block"][:, :, None] >= 0)
        mask = (causal | same_block) & (key >= 0) & ((key == 0) | (key == query))
        mask |= torch.eye(S, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
        return Batch(t["ids"], t["pos"], mask[:, None], t["labels"], t["qids"], tasks, torch.cat(vision),
                     torch.cat(vision_pos), torch.cat(audio))


class BatchStream(torch.utils.data.IterableDataset):
    """Deterministic for one worker: stills, sounds and (after ``stills_steps``) clips, by ``step_kind``."""

    def __init__(self, cfg: TrainConfig, folder: Path):
        self.cfg, self.folder = cfg, folder

    def __iter__(self):
        import random

        torch.set_num_threads(1)
        cfg = self.cfg
        scenes, beeps, rng = SceneMaker(cfg.seed), BeepMaker(cfg.seed + 1), random.Random(cfg.seed + 2)
        packer = Packer(self.folder)
        for step in range(cfg.steps):
            kind = step_kind(step, cfg)
            scenes.hard = beeps.hard = hard_share(step, cfg)
            if kind == "image":
                counts = rng.choices(SCENE_SHAPES, SCENE_SHAPE_WEIGHTS, k=cfg.image_batch_size)
                items = [(scenes.annotated_scene(n), rng.random() < cfg.plain_fraction) for n in counts]
            elif kind == "clip":
                items = [(scenes.annotated_clip(), rng.random() < cfg.plain_fraction)
                         for _ in range(cfg.video_batch_size)]
            else:
                items = [(beeps.annotated(), False) for _ in range(cfg.audio_batch_size)]
            yield packer.collate(items)


def start_weights(model, cfg: TrainConfig) -> None:
    """An initialization that lets a small Gemma 4 decoder route what the image cells hold (the layout and the
    architecture are the family's; only the starting values change):

    - the query and key norms start at head_dim ** -0.25 each: the family scales attention logits by 1, not by
      head_dim ** -0.5, so with unit norms the logits start with a spread of about sqrt(head_dim) and the
      softmax is saturated from the first step;
    - the norms after attention and after the MLP start at ``branch_scale``: each layer then adds a fraction of
      the residual stream, so a cell's own features are not swamped by the first layer's mix of every cell;
    - the token embedding and the image / audio projections start at unit RMS in the residual stream (the
      usual 0.02 gives 0.23 there)."""
    h = model.config.text_config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(p.numel() ** -0.25)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.fill_(cfg.branch_scale)
            elif name.endswith("embedding_projection.weight"):
                p.normal_(0, p.shape[1] ** -0.5)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, h ** -0.5)  # scaled by sqrt(h) in the forward


def answer_loss(model, batch: Batch, task_weights: dict[str, float] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over questions of each question's mean answer-token loss; also the mean loss per task.

    The forward is transformers' own modules: its scaled token embedding, vision and audio embedders, and
    decoder (given our packed mask for both layer types)."""
    inner, config = model.model, model.config
    ids = batch.input_ids
    placeholders = torch.isin(ids, torch.tensor([config.image_token_id, config.video_token_id, config.audio_token_id]))
    x = inner.language_model.embed_tokens(ids.masked_fill(placeholders, config.text_config.pad_token_id))
    vision = (ids == config.image_token_id) | (ids == config.video_token_id)
    if batch.patches.numel():
        out = inner.embed_vision(batch.patches[None], batch.vision_positions[None]).pooler_output[0]
        x = x.masked_scatter(vision[..., None], out.to(x.dtype))
    if batch.audio_rows.numel():
        x = x.masked_scatter((ids == config.audio_token_id)[..., None], inner.embed_audio(batch.audio_rows).to(x.dtype))
    masks = {kind: batch.attention_mask for kind in ("full_attention", "sliding_attention")}
    hidden = inner.language_model(inputs_embeds=x, attention_mask=masks, position_ids=batch.position_ids,
                                  use_cache=False).last_hidden_state
    where = batch.labels != -100
    return question_losses(model.lm_head(hidden[where]), batch.labels[where], batch.question_ids[where],
                           batch.question_tasks, task_weights)


def train(cfg: TrainConfig, out_dir: Path) -> None:
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = write_processor(out_dir)
    config = model_config(cfg, tok)
    config.text_config._attn_implementation = "sdpa"
    model = Gemma4UnifiedForConditionalGeneration(config).train()
    start_weights(model, cfg)
    # as the published checkpoints: a chat answer ends at the end of its turn, a plain one at <eos>
    model.generation_config.eos_token_id = [tok.token_to_id("<eos>"), tok.token_to_id("<turn|>")]
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters, vocab {config.text_config.vocab_size}, {cfg}", flush=True)
    (out_dir / "training_args.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    loader = torch.utils.data.DataLoader(BatchStream(cfg, out_dir), batch_size=None, num_workers=1,
                                         prefetch_factor=4)
    weights = {task: float(w) for task, w in (item.split("=") for item in cfg.task_weights.split(",") if item)}
    fit(model, loader, lambda m, b: answer_loss(m, b, weights), steps=cfg.steps, lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_at=lambda step: lr_at(step, cfg), kind_at=lambda step: step_kind(step, cfg),
        save=lambda: model.save_pretrained(out_dir), save_every=cfg.save_every, max_minutes=cfg.max_minutes)
    print(f"saved to {out_dir}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    for name, value in asdict(TrainConfig()).items():
        kind = float if isinstance(value, float) or name == "max_minutes" else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(TrainConfig(**args), out)


if __name__ == "__main__":
    main()
