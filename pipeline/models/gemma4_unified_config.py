"""Gemma 4 Unified's configuration, resolved as transformers resolves it: defaults, per-layer types, head dims
and KV heads (``per_layer_config`` in configs saved by transformers 5.24, ``global_head_dim`` in published
ones), KV sharing, RoPE per layer type, the special ids and the pixel scaling of the image / video processors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.gated_activation import ACTIVATIONS

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
