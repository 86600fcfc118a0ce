"""Our Gemma 4 Unified decoder over the paged KV cache vs transformers' Gemma4UnifiedForConditionalGeneration.

Random checkpoints are written by transformers itself (``samples/random_gemma4_unified.py``) and the inputs
come from its ``Gemma4UnifiedProcessor``; our model is driven step by step over a hand-bound KV pool with
the torch backend, the image / video runs given to the attention as bidirectional runs.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Gemma4UnifiedForConditionalGeneration

from pipeline.attention import AttentionMetadata, StepContext, get_backend
from pipeline.models.base import StepMedia
from pipeline.models.gemma4_unified import load_model
from pipeline.models.gemma4_unified_config import Gemma4Args
from samples.random_gemma4_unified import make_checkpoint

S, F = "sliding_attention", "full_attention"
# tiny_text_kwargs: 4 layers S F S F, window 16, head dim 16 (sliding) / 32 (full), 4 heads over 2 KV heads
VARIANTS = {
    "plain": {},
    "kv_shared": dict(num_hidden_layers=5, layer_types=[S, F, S, S, F], num_kv_shared_layers=2,
                      use_double_wide_mlp=True, hidden_size=48),  # sqrt(48) rounds in bf16 / fp16
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1, sliding_window=8),
    "k_eq_v_shared": dict(num_hidden_layers=5, layer_types=[S, S, F, S, F], num_kv_shared_layers=2,
                          attention_k_eq_v=True, num_global_key_value_heads=1, final_logit_softcapping=None,
                          sliding_window=8),
}
TEXT = "Tell me what is in this picture, and what colour it is, in a few words."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """variant name -> (folder, processor, transformers model), built once."""
    from transformers import AutoProcessor

    made = {}

    def get(name: str):
        if name not in made:
            folder = make_checkpoint(tmp_path_factory.mktemp(name), seed=list(VARIANTS).index(name), max_soft_tokens=70,
                                     video_max_soft_tokens=70, video_num_frames=3, **VARIANTS[name])
            hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
            hf.generation_config.eos_token_id = None  # generate the full count (None in generate() means "unset")
            made[name] = folder, AutoProcessor.from_pretrained(folder), hf
        return made[name]

    return get


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@dataclass
class Prompt:
    hf: dict  # the processor's output, for transformers
    ids: torch.Tensor  # [T]
    rows: torch.Tensor | None  # [P, row_dim] uint8 pixels of the image / video soft tokens, in token order
    row_pos: torch.Tensor  # [P] their token positions
    position_ids: torch.Tensor | None  # [P, 2]
    runs: list[tuple[int, int]]  # bidirectional [start, end)
    audio_rows: torch.Tensor | None = None  # [A, samples] float32 frames of the audio soft tokens
    audio_pos: torch.Tensor | None = None  # [A]


def _prompt(processor, args: Gemma4Args, text: str, **media) -> Prompt:
    out = processor(text=text, return_tensors="pt", **media)
    hf = {k: v for k, v in out.items() if k != "attention_mask"}
    ids = out["input_ids"][0]
    rows, pos, xy = [], [], []
    for pixels, xy_key, token in (("pixel_values", "image_position_ids", args.image_token_id),
                                  ("pixel_values_videos", "video_position_ids", args.video_token_id)):
        if pixels in out:
            valid = (out[xy_key] != -1).all(-1)
            px = out[pixels][valid]
            uint8 = torch.round(px * 255).to(torch.uint8)
            assert (uint8 - px * 255).abs().max() < 1e-3  # the processor's pixels are uint8 values, scaled
            rows.append(uint8), xy.append(out[xy_key][valid]), pos.append((ids == token).nonzero()[:, 0])
    runs, start = [], None
    for i, token in enumerate(ids.tolist() + [-1]):
        inside = token in args.bidirectional_token_ids
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            runs.append((start, i))
            start = None
    row_pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
    order = row_pos.argsort()
    prompt = Prompt(hf, ids, torch.cat(rows)[order] if rows else None, row_pos[order],
                    torch.cat(xy)[order] if xy else None, runs)
    if "input_features" in out:
        prompt.audio_rows = out["input_features"][out["input_features_mask"]]
        prompt.audio_pos = (ids == args.audio_token_id).nonzero()[:, 0]
    return prompt


class Paged:
    """Our model over a KV pool bound by hand, one sequence, run chunk by chunk."""

    def __init__(self, folder, dtype=torch.float32, num_blocks=80, block_size=4, seed=0):
        self.ctx = StepContext(get_backend("torch", "cpu"))
        self.model = load_model(folder, self.ctx, "cpu", dtype)
        self.block_size = block_size
        layers = self.model.attention_layers()
        for layer in layers:
            if layer.kv_source is None:
                layer.k_cache = torch.zeros(num_blocks, block_size, layer.num_kv_heads, layer.head_dim, dtype=dtype)
                layer.v_cache = torch.zeros_like(layer.k_cache)
        for layer in layers:
            if layer.kv_source is not None:  # reads its producer's cache
                assert layers[layer.kv_source].kv_source is None
                layer.k_cache, layer.v_cache = layers[layer.kv_source].k_cache, layers[layer.kv_source].v_cache
        self.table = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.table)

    @torch.inference_mode()
    def hidden(self, prompt: Prompt, ids: list[int], start: int, end: int) -> torch.Tensor:
        """[end - start, hidden] for tokens start..end-1 of ``ids``, all before them cached."""
        media = None
        seen = (prompt.row_pos >= start) & (prompt.row_pos < end)
        heard = None if prompt.audio_pos is None else (prompt.audio_pos >= start) & (prompt.audio_pos < end)
        if bool(seen.any()) or (heard is not None and bool(heard.any())):
            media = StepMedia(torch.zeros(0, 0, dtype=torch.uint8), prompt.row_pos[seen] - start)
            if bool(seen.any()):
                media.rows, media.position_ids = prompt.rows[seen], prompt.position_ids[seen]
            if heard is not None and bool(heard.any()):
                media.audio_rows, media.audio_indices = prompt.audio_rows[heard], prompt.audio_pos[heard] - start
        runs = [(s, e) for s, e in prompt.runs if e > start and s < end]
        table = self.table[:-(-end // self.block_size)]
        meta = AttentionMetadata.build([end - start], [end], [table], self.block_size, runs=[runs])
        with self.ctx.step(meta):
            return self.model(torch.tensor(ids[start:end]), torch.arange(start, end), media)

    def prefill_logits(self, prompt: Prompt, cuts=()) -> torch.Tensor:
        ids, bounds = prompt.ids.tolist(), [0, *cuts, len(prompt.ids)]
        for cut in cuts:
            assert not any(s < cut < e for s, e in prompt.runs), "chunks never split a media run"
        return torch.cat([self.model.compute_logits(self.hidden(prompt, ids, a, b))
                          for a, b in zip(bounds, bounds[1:])])

    def greedy(self, prompt: Prompt, num_tokens: int, cuts=()) -> list[int]:
        ids = prompt.ids.tolist()
        ids.append(int(self.prefill_logits(prompt, cuts)[-1].argmax()))
        while len(ids) < len(prompt.ids) + num_tokens:
            ids.append(int(self.model.compute_logits(self.hidden(prompt, ids, len(ids) - 1, len(ids)))[-1].argmax()))
        return ids[len(prompt.ids):]


def _reference_logits(hf, prompt: Prompt) -> torch.Tensor:
    with torch.no_grad():
        return hf(**prompt.hf).logits[0]


def _cuts(prompt: Prompt) -> list[int]:
    """Chunk boundaries: a short first chunk, each run opening a chunk, a one-token chunk after each run."""
    cuts = {2} | {s for s, _ in prompt.runs} | {e + 1 for _, e in prompt.runs} | {e + 2 for _, e in prompt.runs}
    return sorted(c for c in cuts if 0 < c < len(prompt.ids))


def _check_logits(name, checkpoint, text, **media):
    folder, processor, hf = checkpoint(name)
    ours = Paged(folder)
    # the stacked projections and, on CPU in float32, the one-pass GELU-and-multiply op run these logits
    assert all(layer.mlp.act_and_mul.op is not None for layer in ours.model.layers)
    prompt = _prompt(processor, ours.model.args, text, **media)
    cuts = _cuts(prompt) if prompt.runs else [5, 17, 18]
    assert len(prompt.ids) > 2 * max(s.sliding_window or 0 for s in ours.model.args.layers)
    torch.testing.assert_close(ours.prefill_logits(prompt, cuts), _reference_logits(hf, prompt),
                               atol=1e-4, rtol=0)
    return prompt


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_text_only(name, checkpoint):
    _check_logits(name, checkpoint, TEXT)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_one_image(name, checkpoint):
    prompt = _check_logits(name, checkpoint, "What is <|image|> this? " + TEXT, images=[_image(0, 60, 90)])
    assert prompt.runs == [(5, 65)]  # 60 soft tokens after <bos> What is <|image>: longer than the window


@pytest.mark.parametrize("name", ["plain", "k_eq_v_shared"])
def test_logits_two_images_with_text_between(name, checkpoint):
    prompt = _check_logits(name, checkpoint, "First <|image|> and then the second one <|image|> - which?",
                           images=[[_image(1, 96, 40), _image(2, 50, 120)]])
    assert len(prompt.runs) == 2


def test_logits_video(checkpoint):
    frames = np.random.default_rng(3).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
    prompt = _check_logits("plain", checkpoint, "Watch <|video|> and say.", videos=[frames])
    assert len(prompt.runs) == 3  # one run per frame


def test_logits_audio_and_image(checkpoint):
    wave = np.random.default_rng(4).standard_normal(16_000 // 4).astype(np.float32)
    prompt = _check_logits("kv_shared", checkpoint, "Listen to <|audio|> this, look at <|image|> that, " + TEXT,
                           audio=[wave], images=[_image(9, 40, 60)])
    assert len(prompt.runs) == 1 and len(prompt.audio_pos) == 7  # audio attends causally


def test_placeholder_ids_without_media_embed_as_pad(checkpoint):
    """transformers embeds every <|image|> / <|video|> / <|audio|> id as <pad> before writing media rows, so a
    placeholder id in the text (or one the model generates) must too."""
    folder, processor, hf = checkpoint("k_eq_v")
    ours = Paged(folder)
    a = ours.model.args
    ids = _prompt(processor, a, TEXT).ids.tolist()
    ids[7], ids[20], ids[33] = a.audio_token_id, a.image_token_id, a.video_token_id
    prompt = Prompt({"input_ids": torch.tensor([ids])}, torch.tensor(ids), None, torch.zeros(0, dtype=torch.long),
                    None, [])  # no media rows
    torch.testing.assert_close(ours.prefill_logits(prompt, (10,)), _reference_logits(hf, prompt), atol=1e-4, rtol=0)


def test_prefix_hit_ending_inside_an_image_run(checkpoint):
    """The cache holds the whole prompt (as after an earlier identical request); recomputing from inside the
    run must still see the run both ways and give transformers' logits."""
    folder, processor, hf = checkpoint("k_eq_v")
    ours = Paged(folder)
    prompt = _prompt(processor, ours.model.args, "Look: <|image|> and tell.", images=[_image(5, 80, 80)])
    ids, (start, end) = prompt.ids.tolist(), prompt.runs[0]
    ours.hidden(prompt, ids, 0, len(ids))
    cut = start + 30
    logits = ours.model.compute_logits(ours.hidden(prompt, ids, cut, len(ids)))
    torch.testing.assert_close(logits, _reference_logits(hf, prompt)[cut:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, with_image", [("plain", True), ("kv_shared", False), ("k_eq_v_shared", True)])
def test_32_greedy_tokens_identical(name, with_image, checkpoint):
    folder, processor, hf = checkpoint(name)
    ours = Paged(folder)
    media = {"images": [_image(6, 70, 50)]} if with_image else {}
    prompt = _prompt(processor, ours.model.args, ("Describe <|image|> briefly." if with_image else TEXT), **media)
    with torch.no_grad():
        ref = hf.generate(**prompt.hf, max_new_tokens=32, do_sample=False)[0, len(prompt.ids):].tolist()
    assert len(ref) == 32 and ours.greedy(prompt, 32, cuts=(2,)) == ref


def test_image_run_is_bidirectional(checkpoint):
    """Changing the last patch row changes the first image position's output (it would not if the run were
    attended causally), leaves the text before the image alone, and still matches transformers."""
    folder, processor, hf = checkpoint("plain")
    ours = Paged(folder)
    prompt = _prompt(processor, ours.model.args, "See <|image|> now.", images=[_image(7, 64, 64)])
    start, end = prompt.runs[0]
    before = ours.prefill_logits(prompt)
    flipped = prompt.rows.clone()
    flipped[-1] = 255 - flipped[-1]
    prompt.rows = flipped
    prompt.hf["pixel_values"][0, end - start - 1] = flipped[-1] / 255
    after = ours.prefill_logits(prompt)
    assert (after[start] - before[start]).abs().max() > 1e-3
    torch.testing.assert_close(after[:start], before[:start], atol=0, rtol=0)
    torch.testing.assert_close(after, _reference_logits(hf, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_checkpoint(dtype, checkpoint, tmp_path):
    folder, processor, _ = checkpoint("kv_shared")
    half = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    half.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = Paged(tmp_path, dtype=dtype)
    prompt = _prompt(processor, ours.model.args, "What is <|image|> this?", images=[_image(8, 50, 50)])
    ref = _reference_logits(Gemma4UnifiedForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval(), prompt)
    got = ours.prefill_logits(prompt)
    assert ours.model.embed_tokens.weight.dtype == dtype and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), atol=1e-3, rtol=0)  # bitwise equal on this CPU


def test_config_shapes_and_rope_match_transformers(checkpoint):
    """Per-layer head dim, KV heads, window and KV source as transformers resolves them, from a config saved by
    5.24 (``per_layer_config``), from the published form (``global_head_dim``), and with the default layer
    pattern and RoPE; each layer type's inverse frequencies equal transformers' rotary buffers."""
    from transformers import Gemma4UnifiedConfig

    for name in VARIANTS:
        folder, _, hf = checkpoint(name)
        config = json.loads((folder / "config.json").read_text())
        published = json.loads(json.dumps(config))
        del published["text_config"]["per_layer_config"]
        published["text_config"].update(global_head_dim=32, num_global_key_value_heads=VARIANTS[name].get(
            "num_global_key_value_heads"))
        forms = [config, published]
        if not VARIANTS[name].get("num_kv_shared_layers"):
            default = json.loads(json.dumps(published))
            default["text_config"].update(num_hidden_layers=7, layer_types=None, rope_parameters=None)
            forms.append(default)
        for form in forms:
            text = Gemma4UnifiedConfig(**form).text_config
            ours = Gemma4Args.from_hf_config(form)
            modes = text.kv_sharing_modes
            assert [s.layer_type for s in ours.layers] == text.layer_types
            for i, spec in enumerate(ours.layers):
                layer = text.per_layer_config[i]
                assert (spec.head_dim, spec.num_kv_heads) == (layer.head_dim, layer.num_key_value_heads)
                assert spec.sliding_window == (text.sliding_window if text.layer_types[i] == S else None)
                assert (spec.kv_source is not None) == (modes[i] == "reuse")
                if spec.kv_source is not None:
                    assert modes[spec.kv_source] == "store" and text.layer_types[spec.kv_source] == spec.layer_type
        rotary = hf.model.language_model.rotary_emb
        for kind, inv_freq in Paged(folder).model.inv_freq.items():
            assert torch.equal(inv_freq, getattr(rotary, f"{kind}_inv_freq"))


def test_unknown_and_missing_tensors_are_errors(checkpoint, tmp_path):
    folder = checkpoint("plain")[0]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.language_model.layers.0.self_attn.extra.weight": torch.zeros(2)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.0.self_attn.extra.weight"):
        load_model(tmp_path, StepContext(get_backend("torch", "cpu")))
    del tensors["model.language_model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.1.self_attn.k_norm.weight"):
        load_model(tmp_path, StepContext(get_backend("torch", "cpu")))
    # q, k and v (and gate and up) load into one stacked weight: a missing part is named, and so are all of them
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.language_model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj.weight.*k_proj.weight.*stack to shape.*missing"):
        load_model(tmp_path, StepContext(get_backend("torch", "cpu")))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.language_model.layers.2.mlp.gate_proj.weight"]
    del tensors["model.language_model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*layers.2.mlp.gate_up_proj.weight \(stacked from gate_proj/up_proj"):
        load_model(tmp_path, StepContext(get_backend("torch", "cpu")))


@pytest.mark.parametrize("change, message", [
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"rope_parameters": {S: {"rope_type": "yarn", "rope_theta": 1.0}, F: {"rope_theta": 1.0}}}, "rope"),
    ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),
    ({"hidden_activation": "swish2"}, "hidden_activation"),
])
def test_unsupported_configs_are_value_errors(change, message, checkpoint):
    config = json.loads((checkpoint("plain")[0] / "config.json").read_text())
    config["text_config"].update(change)
    with pytest.raises(ValueError, match=message):
        Gemma4Args.from_hf_config(config)


def test_pipeline_mixed_batch_matches_transformers(checkpoint):
    """Through the engine (registry, per-layer KV pools, scheduler with a small token budget, so image runs are
    scheduled whole and the rest is chunked): a batch of text, image, two-image and audio requests each give
    transformers' greedy tokens (videos: at the model level above; the engine takes video files)."""
    from pipeline import Pipeline, SamplingParams

    folder, processor, hf = checkpoint("kv_shared")
    wave = np.random.default_rng(10).standard_normal(3000).astype(np.float32)
    requests = [
        dict(prompt=TEXT),
        dict(prompt="What is <|image|> this?", images=[_image(11, 60, 60)]),
        dict(prompt="First <|image|> then <|image|>, which one?", images=[_image(12, 40, 90), _image(13, 90, 40)]),
        dict(prompt="Hear <|audio|> and see <|image|>.", audios=[wave], images=[_image(14, 50, 50)]),
    ]
    pipe = Pipeline.from_pretrained(str(folder), block_size=4, num_blocks=400, max_num_batched_tokens=48)
    outs = pipe.generate(requests, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    args = pipe.engine.runner.model.args
    for request, out in zip(requests, outs):
        media = {"audio" if k == "audios" else k: [v] if k == "images" else v
                 for k, v in request.items() if k != "prompt"}
        prompt = _prompt(processor, args, request["prompt"], **media)
        with torch.no_grad():
            ref = hf.generate(**prompt.hf, max_new_tokens=16, do_sample=False)[0, len(prompt.ids):].tolist()
        assert out.usage.prompt_tokens == len(prompt.ids)
        assert out.token_ids == ref, request["prompt"]
