"""The Gemma 4 Unified decoder (transformers' ``Gemma4UnifiedForConditionalGeneration``) over the paged KV pool.

Encoder-free: image / video rows (raw merged patches) go through a small embedder (LayerNorm -> Linear ->
LayerNorm -> + factorized 2-D position embedding -> LayerNorm -> RMSNorm -> Linear) and audio frames
through RMSNorm -> Linear, written at their placeholder positions at embedding time. The decoder mixes
sliding-window and full-attention layers whose head dim, KV heads and RoPE differ per layer type; the last
``num_kv_shared_layers`` layers read the KV of the last earlier layer of their type and store none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders import MediaLimits, VideoSampling
from pipeline.attention import PagedAttention, StepContext
from pipeline.models.base import CausalLM, StepMedia
from pipeline.models.loading import load_weights, read_config
from tokenization.gemma4_unified import Gemma4UnifiedLayout

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "proportional")
# Gemma4UnifiedTextConfig's defaults (transformers 5.24)
TEXT_DEFAULTS = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=262_144,
    rms_norm_eps=1e-6, pad_token_id=0, rope_parameters=None, attention_bias=False,
    sliding_window=1024, layer_types=None, final_logit_softcapping=None, use_bidirectional_attention="vision",
    attention_k_eq_v=False, num_kv_shared_layers=0, use_double_wide_mlp=False,
)
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}
TOKEN_DEFAULTS = dict(image_token_id=258_880, video_token_id=258_884, audio_token_id=258_881)


@dataclass(frozen=True)
class LayerSpec:
    layer_type: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_kv_heads: int
    sliding_window: int | None
    kv_source: int | None  # the layer whose KV this one reads (KV sharing); None: its own
    k_eq_v: bool  # values are the key projection (before its norm and RoPE)
    intermediate_size: int


@dataclass(frozen=True)
class PixelScaling:
    """An image / video processor's rescale and normalize, done here on the uint8 rows as transformers does."""

    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def from_processor(cls, config: dict, do_normalize: bool) -> "PixelScaling":
        mean, std = config.get("image_mean", 0.0), config.get("image_std", 1.0)
        return cls(config.get("do_rescale", True), config.get("rescale_factor", 1 / 255),
                   config.get("do_normalize", do_normalize), tuple(mean if isinstance(mean, list) else [mean] * 3),
                   tuple(std if isinstance(std, list) else [std] * 3))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:  # [P, patch_dim] uint8 -> float32
        if not self.do_normalize:
            return rows * self.rescale_factor if self.do_rescale else rows.float()
        fuse = 1.0 / self.rescale_factor if self.do_rescale else 1.0  # transformers fuses the rescale in
        mean = torch.tensor(self.mean, device=rows.device) * fuse
        std = torch.tensor(self.std, device=rows.device) * fuse
        return ((rows.view(rows.shape[0], -1, 3).float() - mean) / std).view(rows.shape)


@dataclass(frozen=True)
class VisionArgs:
    patch_dim: int
    mm_embed_dim: int
    mm_posemb_size: int
    output_proj_dims: int
    rms_norm_eps: float
    image_scaling: PixelScaling
    video_scaling: PixelScaling


def _layer_specs(text: dict) -> tuple[LayerSpec, ...]:
    """Per-layer shapes as Gemma4UnifiedTextConfig resolves them: ``per_layer_config`` (configs saved by 5.24)
    or, without it, ``global_head_dim`` / ``num_global_key_value_heads`` on the full-attention layers."""
    n = text["num_hidden_layers"]
    types = list(text["layer_types"] or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(n)])
    if len(types) != n or set(types) - set(LAYER_TYPES):
        raise ValueError(f"layer_types must be {n} of {LAYER_TYPES}, got {types}")
    types[-1] = "full_attention"  # as transformers forces it
    if "per_layer_config" in text:
        overrides = {int(i): dict(o) for i, o in (text["per_layer_config"] or {}).items()}
    else:
        full = {"head_dim": text.get("global_head_dim", 512)}
        if text["attention_k_eq_v"] and text.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = text["num_global_key_value_heads"]
        overrides = {i: full for i, kind in enumerate(types) if kind == "full_attention"}
    for i, o in overrides.items():
        if not 0 <= i < n or set(o) - {"head_dim", "num_key_value_heads"}:
            raise ValueError(f"per_layer_config[{i}] = {o}: only head_dim / num_key_value_heads of layers 0..{n - 1}"
                             " are supported")
    num_shared = text["num_kv_shared_layers"]
    first_shared = n - num_shared
    producers = {kind: i for i, kind in enumerate(types[:first_shared])}  # the last layer of each type
    if not 0 <= num_shared < n or set(types) - set(producers):
        raise ValueError(f"num_kv_shared_layers={num_shared}: every layer type must have a layer before the "
                         f"{first_shared}th that stores its KV")
    specs = []
    for i, kind in enumerate(types):
        o = overrides.get(i, {})
        source = producers[kind] if i >= first_shared else None
        specs.append(LayerSpec(
            kind, o.get("head_dim", text["head_dim"]), o.get("num_key_value_heads", text["num_key_value_heads"]),
            text["sliding_window"] if kind == "sliding_attention" else None, source,
            bool(text["attention_k_eq_v"]) and kind == "full_attention",
            text["intermediate_size"] * (2 if text["use_double_wide_mlp"] and source is not None else 1)))
    for spec in specs:
        if spec.num_kv_heads <= 0 or text["num_attention_heads"] % spec.num_kv_heads:
            raise ValueError(f"{text['num_attention_heads']} attention heads over {spec.num_kv_heads} KV heads")
        same_type = [s for s in specs if s.layer_type == spec.layer_type]
        if any(s.head_dim != spec.head_dim for s in same_type) or (
                spec.kv_source is not None and specs[spec.kv_source].num_kv_heads != spec.num_kv_heads):
            raise ValueError(f"{spec.layer_type} layers differ in head_dim or KV heads from the layer they share")
    return tuple(specs)


@dataclass(frozen=True)
class Gemma4Args:
    vocab_size: int
    hidden_size: int
    num_heads: int
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    final_logit_softcapping: float | None
    pad_token_id: int
    image_token_id: int
    video_token_id: int
    audio_token_id: int
    bidirectional_token_ids: tuple[int, ...]  # runs of these ids attend each other both ways
    layers: tuple[LayerSpec, ...]
    rope: dict  # layer type -> rope_parameters
    vision: VisionArgs | None
    audio_dim: int | None
    audio_rms_norm_eps: float

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def head_dim_of(self, layer_type: str) -> int:
        return next(s.head_dim for s in self.layers if s.layer_type == layer_type)

    @classmethod
    def from_hf_config(cls, config: dict, processor: dict | None = None) -> "Gemma4Args":
        """From config.json (and the image processor's settings, for the pixel scaling)."""
        if config.get("model_type") != "gemma4_unified":
            raise ValueError(f"model_type {config.get('model_type')!r} is not 'gemma4_unified'")
        text = {**TEXT_DEFAULTS, **config.get("text_config", {})}
        if text["use_bidirectional_attention"] not in (None, "vision"):
            raise ValueError(f"use_bidirectional_attention={text['use_bidirectional_attention']!r}: only None "
                             "and 'vision' are causal decoders")
        if text["hidden_activation"] not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_activation {text['hidden_activation']!r}; "
                             f"supported: {sorted(ACTIVATIONS)}")
        layers = _layer_specs(text)
        rope = text["rope_parameters"] or DEFAULT_ROPE
        for kind in {s.layer_type for s in layers}:
            params = rope.get(kind) or {}
            if params.get("rope_type", "default") not in ROPE_TYPES or "rope_theta" not in params:
                raise ValueError(f"rope_parameters[{kind!r}] = {rope.get(kind)}: need rope_theta and a rope_type "
                                 f"of {ROPE_TYPES}")
        tokens = {**TOKEN_DEFAULTS, **{k: config[k] for k in TOKEN_DEFAULTS if config.get(k) is not None}}
        vision = None
        if (v := config.get("vision_config")) is not None:
            p = processor or {}
            side = v.get("patch_size", 16) * v.get("pooling_kernel_size", 3)
            vision = VisionArgs(  # the video processor normalizes by default, the image processor does not
                side * side * 3, v.get("mm_embed_dim", 3840), v.get("mm_posemb_size", 1120),
                v.get("output_proj_dims", 3840), v.get("rms_norm_eps", 1e-6),
                PixelScaling.from_processor(p.get("image_processor", {}), do_normalize=False),
                PixelScaling.from_processor(p.get("video_processor", {}), do_normalize=True))
        audio = config.get("audio_config")
        return cls(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_heads=text["num_attention_heads"],
            rms_norm_eps=text["rms_norm_eps"], hidden_act=text["hidden_activation"],
            attention_bias=bool(text["attention_bias"]), max_position_embeddings=text["max_position_embeddings"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),  # the top-level flag decides
            final_logit_softcapping=text["final_logit_softcapping"], pad_token_id=text["pad_token_id"] or 0,
            image_token_id=tokens["image_token_id"], video_token_id=tokens["video_token_id"],
            audio_token_id=tokens["audio_token_id"],
            bidirectional_token_ids=((tokens["image_token_id"], tokens["video_token_id"])
                                     if text["use_bidirectional_attention"] == "vision" else ()),
            layers=layers, rope={kind: dict(rope[kind]) for kind in {s.layer_type for s in layers}}, vision=vision,
            audio_dim=audio.get("audio_embed_dim", 640) if audio is not None else None,
            audio_rms_norm_eps=(audio or {}).get("rms_norm_eps", 1e-6),
        )


class RMSNorm(nn.Module):
    """Gemma 4's: computed in float32, ``x * (mean(x^2) + eps)^-0.5 * weight`` (no weight: ``with_scale=False``)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head; x [T, H, D], cos / sin [T, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: Gemma4Args, spec: LayerSpec, ctx: StepContext):
        super().__init__()
        hidden, heads, dim, kv_heads = args.hidden_size, args.num_heads, spec.head_dim, spec.num_kv_heads
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=args.attention_bias)
        self.q_norm = RMSNorm(dim, args.rms_norm_eps)
        self.reads_shared_kv = spec.kv_source is not None
        if not self.reads_shared_kv:
            self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=args.attention_bias)
            self.v_proj = None if spec.k_eq_v else nn.Linear(hidden, kv_heads * dim, bias=args.attention_bias)
            self.k_norm = RMSNorm(dim, args.rms_norm_eps)
            self.v_norm = RMSNorm(dim, args.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=args.attention_bias)
        self.attn = PagedAttention(ctx, heads, kv_heads, dim, scale=1.0, sliding_window=spec.sliding_window,
                                   kv_source=spec.kv_source)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = rotate(self.q_norm(self.q_proj(x).view(num_tokens, self.heads, self.dim)), cos, sin)  # [T, H, D]
        k = v = None
        if not self.reads_shared_kv:
            k = self.k_proj(x).view(num_tokens, self.kv_heads, self.dim)  # [T, Hkv, D]
            v = k if self.v_proj is None else self.v_proj(x).view(num_tokens, self.kv_heads, self.dim)
            k, v = rotate(self.k_norm(k), cos, sin), self.v_norm(v)  # values: no RoPE, unscaled norm
        return self.o_proj(self.attn(q, k, v).reshape(num_tokens, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: Gemma4Args, spec: LayerSpec, ctx: StepContext):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.layer_type = spec.layer_type
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(args, spec, ctx)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(hidden, spec.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(hidden, spec.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(spec.intermediate_size, hidden, bias=False)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        h = self.pre_feedforward_layernorm(x)
        h = self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))
        return (x + self.post_feedforward_layernorm(h)) * self.layer_scalar


class VisionEmbedder(nn.Module):
    """Raw merged patch rows [P, patch_dim] and their (x, y) [P, 2] -> decoder embeddings [P, hidden]."""

    def __init__(self, vision: VisionArgs, hidden: int):
        super().__init__()
        self.args = vision
        self.patch_ln1 = nn.LayerNorm(vision.patch_dim)
        self.patch_dense = nn.Linear(vision.patch_dim, vision.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(vision.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(vision.mm_posemb_size, 2, vision.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(vision.mm_embed_dim)
        self.pre_projection_norm = RMSNorm(vision.output_proj_dims, vision.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(vision.output_proj_dims, hidden, bias=False)

    def pixels(self, rows: torch.Tensor, is_video: torch.Tensor) -> torch.Tensor:
        """uint8 rows -> the processors' pixel values (float32); float rows are taken as already processed."""
        if rows.dtype != torch.uint8:
            return rows.float()
        pixels = self.args.image_scaling(rows)
        if bool(is_video.any()):
            pixels[is_video] = self.args.video_scaling(rows[is_video])
        return pixels

    def forward(self, rows: torch.Tensor, position_ids: torch.Tensor, is_video: torch.Tensor) -> torch.Tensor:
        """[P, patch_dim] rows, [P, 2] (x, y), [P] bool -> [P, hidden]."""
        pixels = self.pixels(rows, is_video).to(self.patch_dense.weight.dtype)
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixels)))
        valid = (position_ids != -1).to(h.dtype)[..., None]  # [P, 2, 1]
        axes = torch.arange(2, device=position_ids.device)
        h = self.pos_norm(h + (self.pos_embedding[position_ids.clamp(min=0).long(), axes] * valid).sum(-2))
        return self.embedding_projection(self.pre_projection_norm(h))


class AudioEmbedder(nn.Module):
    """Raw waveform frames [P, audio_dim] -> decoder embeddings [P, hidden]: RMSNorm (unscaled) -> Linear."""

    def __init__(self, audio_dim: int, eps: float, hidden: int):
        super().__init__()
        self.pre_projection_norm = RMSNorm(audio_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(audio_dim, hidden, bias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.pre_projection_norm(frames.to(self.embedding_projection.weight.dtype)))


def inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies of one layer type: "default" RoPE, or "proportional" (the first
    ``partial_rotary_factor`` of the angles rotate, the rest get frequency 0)."""
    theta = float(rope["rope_theta"])
    if rope.get("rope_type", "default") == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles)))
    return inv_freq / rope.get("factor", 1.0)


class Gemma4UnifiedModel(CausalLM):
    def __init__(self, args: Gemma4Args, ctx: StepContext):
        super().__init__()
        self.args = args
        self.vocab_size, self.max_position_embeddings = args.vocab_size, args.max_position_embeddings
        self.has_bidirectional_runs = bool(args.bidirectional_token_ids)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, spec, ctx) for spec in args.layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.vision = VisionEmbedder(args.vision, args.hidden_size) if args.vision else None
        self.audio = (AudioEmbedder(args.audio_dim, args.audio_rms_norm_eps, args.hidden_size)
                      if args.audio_dim else None)
        self.init_constants()

    def init_constants(self, device: torch.device | str = "cpu") -> None:
        """RoPE frequencies per layer type and the placeholder ids, on ``device`` (not weights: not loaded)."""
        a = self.args
        with torch.device(device):  # also inside a meta-device build
            self.inv_freq = {kind: inverse_frequencies(rope, a.head_dim_of(kind)) for kind, rope in a.rope.items()}
            self.placeholder_ids = torch.tensor([a.image_token_id, a.video_token_id, a.audio_token_id])

    def embed(self, input_ids: torch.Tensor, media: StepMedia | None) -> torch.Tensor:
        """Scaled token embeddings, with the embedders' outputs at the media rows' positions."""
        a = self.args
        # every placeholder id embeds as <pad> (as in transformers, also one the model generated), then rows
        placeholder = torch.isin(input_ids, self.placeholder_ids)
        x = self.embed_tokens(input_ids.masked_fill(placeholder, a.pad_token_id)) * self.embed_scale()
        if media is None:
            return x
        if media.indices.numel():
            if self.vision is None or media.position_ids is None:
                raise ValueError("image rows need a checkpoint with a vision_config and their (x, y) position ids")
            is_video = input_ids[media.indices] == a.video_token_id
            x = x.index_copy(0, media.indices, self.vision(media.rows, media.position_ids, is_video).to(x.dtype))
        if media.audio_indices is not None and media.audio_indices.numel():
            if self.audio is None:
                raise ValueError("audio rows in a step, but the checkpoint has no audio_config")
            x = x.index_copy(0, media.audio_indices, self.audio(media.audio_rows).to(x.dtype))
        return x

    def embed_scale(self) -> float:
        # sqrt(hidden) rounded to the weights' dtype, as transformers does (55.4256 -> 55.5 in bf16)
        return float(torch.tensor(self.args.hidden_size ** 0.5).to(self.embed_tokens.weight.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, media: StepMedia | None = None
                ) -> torch.Tensor:
        """[T] ids and positions (+ the step's media rows) -> [T, hidden]."""
        x = self.embed(input_ids, media)
        rope = {}
        for kind, inv_freq in self.inv_freq.items():
            freqs = positions[:, None].float() * inv_freq  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [T, 1, D]
            rope[kind] = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for layer in self.layers:
            x = layer(x, *rope[layer.layer_type])
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if (cap := self.args.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


def _rename(name: str) -> str:
    """Checkpoint names (as saved by transformers, or as in its modules) -> ours."""
    for old, new in (("model.language_model.", ""), ("model.vision_embedder.", "vision."),
                     ("model.embed_vision.multimodal_embedder.", "vision."), ("model.embed_vision.", "vision."),
                     ("model.embed_audio.", "audio.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _processor_config(folder: Path) -> dict:
    """processor_config.json ({"image_processor": ..., "video_processor": ...}), or a lone image processor's."""
    if (folder / "processor_config.json").exists():
        return json.loads((folder / "processor_config.json").read_text())
    if (folder / "preprocessor_config.json").exists():
        return {"image_processor": json.loads((folder / "preprocessor_config.json").read_text())}
    return {}


def load_model(path: str | Path, ctx: StepContext, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Gemma4UnifiedModel:
    """Build the model from a Hugging Face folder, weights cast to ``dtype`` on ``device``."""
    folder = Path(path)
    args = Gemma4Args.from_hf_config(read_config(folder), _processor_config(folder))
    with torch.device("meta"):
        model = Gemma4UnifiedModel(args, ctx)
    skip = {"lm_head.weight"} if args.tie_word_embeddings else set()
    load_weights(model, folder, _rename, f"a {len(args.layers)}-layer Gemma 4 Unified model", device, dtype, skip)
    model.init_constants(device)
    return model.eval().requires_grad_(False)


def make_front_end(path: str | Path, limits: MediaLimits, video_sampling: VideoSampling,
                   max_prompt_tokens: int | None = None) -> Gemma4UnifiedLayout:
    """Text + media -> the token stream ``Gemma4UnifiedProcessor`` lays out."""
    return Gemma4UnifiedLayout.from_pretrained(path, limits=limits, video_sampling=video_sampling,
                                               max_prompt_tokens=max_prompt_tokens)
