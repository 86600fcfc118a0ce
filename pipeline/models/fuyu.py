"""The Fuyu early-fusion decoder: a Persimmon transformer whose image-placeholder embeddings are
replaced by ``Linear(patch pixels)`` — no vision tower.

Inputs are flat (all scheduled tokens of a step concatenated, no padding); attention reads and
writes the paged KV pool through the runner's ``StepContext``. Loads Hugging Face ``config.json`` +
``*.safetensors`` without importing transformers' modeling code.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders import MediaLimits, PatchConfig, VideoSampling, normalize_patches
from pipeline.attention import PagedAttention, StepContext
from pipeline.models.base import CausalLM, StepMedia, rotate, signed_sin
from pipeline.models.loading import load_weights, read_config
from tokenization import Interleaver

SUPPORTED_MODEL_TYPES = ("fuyu", "persimmon")
ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square_(),  # squared in place: one tensor written, not two
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
# checkpoint prefixes: transformers 5.x saves the legacy layout, in memory it is model.language_model.*
_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rotary_dim: int
    rope_theta: float
    rope_scaling_factor: float
    layer_norm_eps: float
    qk_layernorm: bool
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    patch_size: int
    num_channels: int
    image_token_id: int | None  # None: a text-only Persimmon checkpoint
    bos_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # Persimmon: fused QKV, no grouped-query heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """From a config.json dict: transformers 5.x (nested ``text_config``) or the flat legacy layout."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; fusionserve runs {SUPPORTED_MODEL_TYPES}")
        text = {**config, **config.get("text_config", {})} if model_type == "fuyu" else dict(config)
        rope = dict(text.get("rope_parameters") or {})
        legacy_scaling = text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or legacy_scaling.get("rope_type") or legacy_scaling.get("type") or "default"
        if rope_type not in ("default", "linear"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'linear'")
        theta = rope.get("rope_theta", text.get("rope_theta", 25000.0))
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        act = text.get("hidden_act", "relu2")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
        return cls(
            vocab_size=text["vocab_size"], hidden_size=hidden, intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"], num_heads=heads,
            rotary_dim=int(hidden // heads * partial), rope_theta=float(theta),
            rope_scaling_factor=float(rope.get("factor", legacy_scaling.get("factor", 1.0)))
            if rope_type == "linear" else 1.0,
            layer_norm_eps=text.get("layer_norm_eps", 1e-5), qk_layernorm=text.get("qk_layernorm", True),
            hidden_act=act,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position_embeddings=text.get("max_position_embeddings", 16384),
            patch_size=config.get("patch_size", 30), num_channels=config.get("num_channels", 3),
            image_token_id=config.get("image_token_id") if model_type == "fuyu" else None,
            bos_token_id=text.get("bos_token_id"),
        )


class RotaryEmbedding(nn.Module):
    """Partial rotary (rotate-half) on the first ``rotary_dim`` channels; cos / signed sin cached per position."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.rotary_dim
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float) / args.rope_scaling_factor
        freqs = positions[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, rotary_dim]
        self.cos_cache = nn.Buffer(emb.cos(), persistent=False)
        self.sin_cache = nn.Buffer(signed_sin(emb.sin()), persistent=False)
        self.rotary_dim = dim

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per step for every layer: [T, 1, 1, R] cos and signed sin."""
        return self.cos_cache[positions, None, None].to(dtype), self.sin_cache[positions, None, None].to(dtype)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """In place on the first ``rotary_dim`` channels of x [T, H, 2, D] (queries and keys together)."""
    x_rot = x[..., :rotary_dim]
    x_rot.copy_(rotate(x_rot, cos, sin))
    return x


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, ctx: StepContext):
        super().__init__()
        self.num_heads, self.head_dim, self.rotary_dim = args.num_heads, args.head_dim, args.rotary_dim
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        if args.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(args.head_dim, eps=args.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(args.head_dim, eps=args.layer_norm_eps)
        self.qk_layernorm = args.qk_layernorm
        self.attn = PagedAttention(ctx, args.num_heads, args.num_kv_heads, args.head_dim, args.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.query_key_value(x).view(x.shape[0], self.num_heads, 3, self.head_dim)  # [T, H, 3, D]
        if self.qk_layernorm:
            q, k, v = qkv.unbind(2)
            qk = torch.stack((self.q_layernorm(q), self.k_layernorm(k)), dim=2)  # [T, H, 2, D]
        else:
            qk, v = qkv[:, :, :2], qkv[:, :, 2]  # qkv is this call's own: rotated in place
        q, k = apply_rotary_(qk, cos, sin, self.rotary_dim).unbind(2)  # one rotation for both
        out = self.attn(q, k, v)
        return self.dense(out.reshape(x.shape[0], -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, ctx: StepContext):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = Attention(args, ctx)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(args.hidden_size, args.intermediate_size)
        self.mlp.dense_4h_to_h = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.mlp.dense_h_to_4h(self.post_attention_layernorm(x))
        return x + self.mlp.dense_4h_to_h(self.act(h))


class FuyuModel(CausalLM):
    def __init__(self, args: ModelArgs, ctx: StepContext, normalize=None):
        super().__init__()
        self.args = args
        self.vocab_size, self.max_position_embeddings = args.vocab_size, args.max_position_embeddings
        self.normalize = normalize  # uint8 patch rows -> the processor's normalized floats
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        if args.image_token_id is not None:
            self.vision_embed_tokens = nn.Linear(args.patch_dim, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, ctx) for _ in range(args.num_layers))
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)

    def embed(self, input_ids: torch.Tensor, media: StepMedia | None = None) -> torch.Tensor:
        """Token embeddings with ``Linear(patches)`` written at the media rows' indices (rows in order)."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        if media is not None and media.rows.shape[0]:
            patches = self.normalize(media.rows) if media.rows.dtype == torch.uint8 else media.rows
            x = x.index_copy(0, media.indices, self.vision_embed_tokens(patches.to(x.dtype)))
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, media: StepMedia | None = None
                ) -> torch.Tensor:
        """[T] ids and positions (+ patch rows at their token indices) -> [T, hidden]."""
        x = self.embed(input_ids, media)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_layernorm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _canonical_name(name: str) -> str | None:
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def load_model(path: str | Path, ctx: StepContext, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> FuyuModel:
    """Build a FuyuModel from a Hugging Face folder, weights cast to ``dtype`` on ``device``."""
    args = ModelArgs.from_hf_config(read_config(path))
    normalize = partial(normalize_patches, cfg=PatchConfig.from_pretrained(path)) if args.image_token_id else None
    with torch.device("meta"):
        model = FuyuModel(args, ctx, normalize)
    load_weights(model, path, _canonical_name, f"a {args.num_layers}-layer Fuyu model", device, dtype,
                 skip={"lm_head.weight"} if args.tie_word_embeddings else set())
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(args).to(device)
    return model.eval().requires_grad_(False)


def make_front_end(path: str | Path, limits: MediaLimits, video_sampling: VideoSampling,
                   max_prompt_tokens: int | None = None) -> Interleaver:
    """Text + media -> Fuyu's token stream (media, ``<s>``, text, ``<0x04>``)."""
    return Interleaver.from_pretrained(path, limits=limits, video_sampling=video_sampling,
                                       max_prompt_tokens=max_prompt_tokens)
