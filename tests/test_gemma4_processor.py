"""Our Gemma 4 Unified front end against transformers' own ``Gemma4UnifiedProcessor`` (the reference), loaded
from a random checkpoint folder written by ``samples/random_gemma4_unified.py``."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import MediaError
from encoders.gemma4_unified import SUPPORTED_SOFT_TOKENS, Gemma4MediaConfig, image_rows, normalize_rows
from samples.random_gemma4_unified import make_checkpoint
from tokenization.gemma4_unified import Gemma4UnifiedLayout

SIZES = [(1, 1), (2, 1), (7, 5), (20, 200), (200, 20), (10, 500), (48, 48), (96, 144), (333, 517), (719, 1281),
         (1080, 1920), (1920, 1080)]  # (height, width): tiny, thin 1:10 and 1:50, exact grids, odd, huge


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-gemma4"), seed=0)


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import Gemma4UnifiedProcessor

    return Gemma4UnifiedProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def layout(folder):
    return Gemma4UnifiedLayout.from_pretrained(folder)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]  # smooth structure as well as noise
    base[..., 1] = ((xx * 255) // max(w - 1, 1)).astype(np.uint8)
    return base


def _hf(processor, text, images=None, **kw):
    kwargs = {"images_kwargs": {"input_data_format": "channels_last", **kw}} if images is not None else {}
    return processor(text=text, images=images, return_tensors="pt", **kwargs)


def _assert_vision_equal(prompt, pixel_values, position_ids, norm):
    """Our uint8 rows and (x, y) ids vs the processor's padded [B, max_soft_tokens, D] floats and ids."""
    valid = (position_ids != -1).all(-1)
    ref, ref_pos = pixel_values[valid], position_ids[valid]
    assert torch.equal(prompt.row_position_ids, ref_pos)
    assert prompt.patches.dtype == torch.uint8
    assert torch.equal(prompt.patches, (ref * 255).round().to(torch.uint8))
    assert (normalize_rows(prompt.patches, norm) - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("budget", SUPPORTED_SOFT_TOKENS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_matches_processor(processor, layout, size, budget):
    img = _image(*size, seed=size[0] * 7 + size[1])
    ref = _hf(processor, "Look: <|image|> ok", [img], max_soft_tokens=budget)
    ours = layout.build("Look: <image> ok", images=[img], max_soft_tokens=budget)
    assert ours.token_ids == ref["input_ids"][0].tolist()
    assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
    _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], layout.media_config.image_norm)
    (start, end), = ours.bidirectional_spans
    assert end - start == int((ref["image_position_ids"] != -1).all(-1).sum())
    assert ours.image_positions == list(range(start, end))


def test_default_budget_and_no_marker(processor, layout, folder):
    assert Gemma4MediaConfig.from_pretrained(folder).max_soft_tokens == 280
    img = _image(300, 451)
    ref = processor(images=[img], return_tensors="pt", images_kwargs={"input_data_format": "channels_last"})
    ours = layout.build("", images=[img])  # no text: the processor's own placement
    assert ours.token_ids == ref["input_ids"][0].tolist()
    _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], layout.media_config.image_norm)
    assert layout.build("<image>", images=[img]).token_ids == ours.token_ids


def test_two_images_with_text_and_family_placeholders(processor, layout):
    imgs = [_image(64, 99, 1), _image(500, 30, 2)]
    text = "What is <|image|> and what is <|image|> here?"
    ref = _hf(processor, text, imgs, max_soft_tokens=140)
    for prompt_text in (text, "What is <image> and what is <image> here?"):
        ours = layout.build(prompt_text, images=imgs, max_soft_tokens=140)
        assert ours.token_ids == ref["input_ids"][0].tolist()
        assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
        _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], layout.media_config.image_norm)
    assert len(ours.bidirectional_spans) == 2 and [m.kind for m in ours.media] == ["image", "image"]
    boi, eoi = layout.special.ids["boi"], layout.special.ids["eoi"]
    for span, run in zip(ours.media, ours.bidirectional_spans):
        assert ours.token_ids[span.start] == boi and ours.token_ids[span.end - 1] == eoi
        assert (span.start + 1, span.end - 1) == run


def test_chat_template_prompt(processor, layout):
    img = _image(120, 90, 3)
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is this image?"}]}]
    ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><|turn>user\n<|image|>What is this image?<turn|>\n<|turn>model\n")
    ours = layout.build(text, images=[img])  # <bos> in the text: not added again
    assert ours.token_ids == list(ref["input_ids"][0])


def test_image_sources_and_hash(layout):
    img = _image(77, 130, 4)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    items = [layout.image_item(src) for src in (img, png.getvalue(), Image.fromarray(img), torch.from_numpy(img))]
    assert len({item.content_hash for item in items}) == 1
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert layout.image_item(other).content_hash != items[0].content_hash
    assert layout.image_item(img, max_soft_tokens=70).content_hash != items[0].content_hash


def test_bad_input(layout):
    img = _image(50, 50)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        layout.build("<image>", images=[img], max_soft_tokens=100)
    with pytest.raises(ValueError, match="1 image marker"):
        layout.build("<image>", images=[img, img])
    with pytest.raises(MediaError):
        layout.build("<image>", images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(MediaError):
        layout.build("<image>", images=[b"not an image"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        image_rows(np.zeros((8, 8), np.uint8), layout.media_config)
