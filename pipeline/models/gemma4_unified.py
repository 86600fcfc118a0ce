"""The Gemma 4 Unified decoder (transformers' ``Gemma4UnifiedForConditionalGeneration``) over the paged KV pool.

Encoder-free: image / video rows (raw merged patches) go through a small embedder (LayerNorm -> Linear ->
LayerNorm -> + factorized 2-D position embedding -> LayerNorm -> RMSNorm -> Linear) and audio frames
through RMSNorm -> Linear, written at their placeholder positions at embedding time. The decoder mixes
sliding-window and full-attention layers whose head dim, KV heads and RoPE differ per layer type; the last
``num_kv_shared_layers`` layers read the KV of the last earlier layer of their type and store none.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders import MediaLimits, VideoSampling
from pipeline.attention import PagedAttention, StepContext
from pipeline.models.base import CausalLM, StepMedia, rotate, signed_sin
from pipeline.models.gated_activation import GatedActivation
from pipeline.models.gemma4_unified_config import Gemma4Args, LayerSpec, VisionArgs
from pipeline.models.loading import load_weights, read_config
from tokenization.gemma4_unified import Gemma4UnifiedLayout

class RMSNorm(nn.Module):
    """Gemma 4's: computed in float32, ``x * (mean(x^2) + eps)^-0.5 * weight`` (no weight: ``with_scale=False``)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).type_as(x)  # one op for six


class Attention(nn.Module):
    def __init__(self, args: Gemma4Args, spec: LayerSpec, ctx: StepContext):
        super().__init__()
        hidden, heads, dim, kv_heads = args.hidden_size, args.num_heads, spec.head_dim, spec.num_kv_heads
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.q_norm = RMSNorm(dim, args.rms_norm_eps)
        self.reads_shared_kv = spec.kv_source is not None
        self.k_eq_v = spec.k_eq_v
        if self.reads_shared_kv:
            self.q_proj = nn.Linear(hidden, heads * dim, bias=args.attention_bias)
        else:  # one GEMM: q_proj, k_proj (and v_proj unless values are the keys) stacked at load
            self.sizes = [heads * dim] + [kv_heads * dim] * (1 if spec.k_eq_v else 2)
            self.qkv_proj = nn.Linear(hidden, sum(self.sizes), bias=args.attention_bias)
            self.k_norm = RMSNorm(dim, args.rms_norm_eps)
            self.v_norm = RMSNorm(dim, args.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=args.attention_bias)
        self.attn = PagedAttention(ctx, heads, kv_heads, dim, scale=1.0, sliding_window=spec.sliding_window,
                                   kv_source=spec.kv_source)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        k = v = None
        if self.reads_shared_kv:
            q = self.q_proj(x)
        else:
            q, k, *rest = self.qkv_proj(x).split(self.sizes, dim=-1)
            k = k.view(num_tokens, self.kv_heads, self.dim)  # [T, Hkv, D]
            v = k if self.k_eq_v else rest[0].view(num_tokens, self.kv_heads, self.dim)
            k, v = rotate(self.k_norm(k), cos, sin), self.v_norm(v)  # values: no RoPE, unscaled norm
        q = rotate(self.q_norm(q.view(num_tokens, self.heads, self.dim)), cos, sin)  # [T, H, D]
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
        self.mlp = nn.Module()  # gate_proj and up_proj stacked at load: one GEMM, then act(gate) * up
        self.mlp.gate_up_proj = nn.Linear(hidden, 2 * spec.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(spec.intermediate_size, hidden, bias=False)
        self.mlp.act_and_mul = GatedActivation(args.hidden_act, device=None)  # prepared by load_model
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        h = self.pre_feedforward_layernorm(x)
        h = self.mlp.down_proj(self.mlp.act_and_mul(self.mlp.gate_up_proj(h)))
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
            rope[kind] = (emb.cos().to(x.dtype), signed_sin(emb.sin()).to(x.dtype))
        for layer in self.layers:
            x = layer(x, *rope[layer.layer_type])
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if (cap := self.args.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


# fused modules: the checkpoint's projections stacked into one weight each (a shared-KV layer keeps its q_proj)
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
    load_weights(model, folder, _rename, f"a {len(args.layers)}-layer Gemma 4 Unified model", device, dtype, skip,
                 stacked=STACKED)
    model.init_constants(device)
    for module in model.modules():
        if isinstance(module, GatedActivation):
            module.prepare(device)
    return model.eval().requires_grad_(False)


def make_front_end(path: str | Path, limits: MediaLimits, video_sampling: VideoSampling,
                   max_prompt_tokens: int | None = None) -> Gemma4UnifiedLayout:
    """Text + media -> the token stream ``Gemma4UnifiedProcessor`` lays out."""
    return Gemma4UnifiedLayout.from_pretrained(path, limits=limits, video_sampling=video_sampling,
                                               max_prompt_tokens=max_prompt_tokens)
