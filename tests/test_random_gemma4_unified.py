"""``samples/random_gemma4_unified.py``: the folders load in transformers, the config knobs reach the model, and a
``Gemma4Prompt`` from our layout drives transformers' model exactly as its own processor's output does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.gemma4_unified import normalize_rows
from gemma4_fixtures import (all_frames, gemma4_folder, gemma4_layout, gemma4_processor,  # noqa: F401
                             sample_image, write_clip)
from samples.random_gemma4_unified import BENCH_TEXT, make_checkpoint


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_k_eq_v": True, "num_global_key_value_heads": 1},
    {"num_kv_shared_layers": 2, "use_double_wide_mlp": True},
    {"final_logit_softcapping": None, "sliding_window": 8, "global_head_dim": 16, "with_audio": False},
    {"layer_types": ["sliding_attention"] * 5 + ["full_attention"], "num_hidden_layers": 6, "vocab_size": 600},
], ids=["default", "k_eq_v", "kv_shared", "plain", "5to1"])
def test_checkpoint_loads_and_runs(tmp_path, overrides):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = make_checkpoint(tmp_path, seed=3, **overrides)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = model.config.text_config
    for key in ("attention_k_eq_v", "num_kv_shared_layers", "final_logit_softcapping", "sliding_window"):
        if key in overrides:
            assert getattr(text, key) == overrides[key]
    full = text.layer_types.index("full_attention")
    assert text.per_layer_config[full].head_dim == overrides.get("global_head_dim", 32)
    assert (model.model.embed_audio is None) == (overrides.get("with_audio") is False)
    for name in ("image", "boi", "eoi", "audio", "boa"):
        assert getattr(model.config, f"{name}_token_id") == processor.tokenizer.convert_tokens_to_ids(
            getattr(processor.tokenizer, f"{name}_token"))
    assert model.config.video_token_id == processor.video_token_id
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(not torch.all(p == 1) for p in norms)  # perturbed away from their init
    inputs = processor(text="What is <|image|>?", images=[sample_image(60, 80)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], text.vocab_size) and torch.isfinite(logits).all()


def test_bench_preset():
    assert BENCH_TEXT["hidden_size"] == 512 and BENCH_TEXT["num_hidden_layers"] == 8
    assert BENCH_TEXT["layer_types"][-1] == "full_attention" and len(BENCH_TEXT["layer_types"]) == 8


def _our_model_inputs(prompt, layout) -> dict:
    """transformers' model inputs from a ``Gemma4Prompt``: rows split by token type, normalized as the
    processor normalizes them, one "image" and one "frame" holding all rows (the embedder is per row)."""
    types = torch.tensor(prompt.token_types)
    is_image = types[prompt.image_positions] == 1
    cfg = layout.media_config
    inputs = {"input_ids": torch.tensor([prompt.token_ids]), "mm_token_type_ids": types[None],
              "attention_mask": torch.ones(1, len(prompt.token_ids), dtype=torch.long)}
    if is_image.any():
        inputs["pixel_values"] = normalize_rows(prompt.patches[is_image], cfg.image_norm)[None]
        inputs["image_position_ids"] = prompt.row_position_ids[is_image][None]
    if (~is_image).any():
        inputs["pixel_values_videos"] = normalize_rows(prompt.patches[~is_image], cfg.video_norm)[None]
        inputs["video_position_ids"] = prompt.row_position_ids[~is_image][None]
        inputs["num_frames_per_video"] = torch.tensor([1])
    if prompt.num_audio_tokens:
        inputs["input_features"] = prompt.audio_rows[None]
        inputs["input_features_mask"] = torch.ones(1, prompt.num_audio_tokens, dtype=torch.bool)
    return inputs


def test_prompt_drives_transformers_model(tmp_path, gemma4_folder, gemma4_processor, gemma4_layout):
    from transformers import Gemma4UnifiedForConditionalGeneration

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(gemma4_folder, dtype=torch.float32).eval()
    clip = write_clip(tmp_path / "clip.mp4", 40, 8, width=96, height=64)
    frames, meta = all_frames(clip)
    img, wave = sample_image(70, 130, 9), np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    ref = gemma4_processor(text="A <|image|> B <|video|> C <|audio|> D", images=[img], videos=[frames], audio=[wave],
                           images_kwargs={"input_data_format": "channels_last"},
                           videos_kwargs={"video_metadata": [meta], "num_frames": 4}, return_tensors="pt")
    layout = type(gemma4_layout)(gemma4_layout.tokenizer, gemma4_layout.media_config.__class__(
        video_num_frames=4), gemma4_layout.special)
    prompt = layout.build("A <image> B <video> C <audio> D", images=[img], videos=[clip], audios=[wave])
    ours = _our_model_inputs(prompt, layout)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"])
    with torch.no_grad():
        expected, got = model(**ref).logits, model(**ours).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
