"""Our Gemma 4 Unified front end against transformers' own ``Gemma4UnifiedProcessor`` (the reference), loaded
from a random checkpoint gemma4_folder written by ``samples/random_gemma4_unified.py``."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import MediaError
from encoders.gemma4_unified import SUPPORTED_SOFT_TOKENS, Gemma4MediaConfig, image_rows, normalize_rows
from gemma4_fixtures import all_frames, gemma4_folder, gemma4_layout, gemma4_processor, sample_image, write_clip  # noqa: F401
from tokenization.gemma4_unified import Gemma4UnifiedLayout

SIZES = [(1, 1), (2, 1), (7, 5), (20, 200), (200, 20), (10, 500), (48, 48), (96, 144), (333, 517), (719, 1281),
         (1080, 1920), (1920, 1080)]  # (height, width): tiny, thin 1:10 and 1:50, exact grids, odd, huge


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
def test_image_matches_processor(gemma4_processor, gemma4_layout, size, budget):
    img = sample_image(*size, seed=size[0] * 7 + size[1])
    ref = _hf(gemma4_processor, "Look: <|image|> ok", [img], max_soft_tokens=budget)
    ours = gemma4_layout.build("Look: <image> ok", images=[img], max_soft_tokens=budget)
    assert ours.token_ids == ref["input_ids"][0].tolist()
    assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
    _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], gemma4_layout.media_config.image_norm)
    (start, end), = ours.bidirectional_spans
    assert end - start == int((ref["image_position_ids"] != -1).all(-1).sum())
    assert ours.image_positions == list(range(start, end))


def test_default_budget_and_no_marker(gemma4_processor, gemma4_layout, gemma4_folder):
    assert Gemma4MediaConfig.from_pretrained(gemma4_folder).max_soft_tokens == 280
    img = sample_image(300, 451)
    ref = gemma4_processor(images=[img], return_tensors="pt", images_kwargs={"input_data_format": "channels_last"})
    ours = gemma4_layout.build("", images=[img])  # no text: the processor's own placement
    assert ours.token_ids == ref["input_ids"][0].tolist()
    _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], gemma4_layout.media_config.image_norm)
    assert gemma4_layout.build("<image>", images=[img]).token_ids == ours.token_ids


def test_two_images_with_text_and_family_placeholders(gemma4_processor, gemma4_layout):
    imgs = [sample_image(64, 99, 1), sample_image(500, 30, 2)]
    text = "What is <|image|> and what is <|image|> here?"
    ref = _hf(gemma4_processor, text, imgs, max_soft_tokens=140)
    for prompt_text in (text, "What is <image> and what is <image> here?"):
        ours = gemma4_layout.build(prompt_text, images=imgs, max_soft_tokens=140)
        assert ours.token_ids == ref["input_ids"][0].tolist()
        assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
        _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], gemma4_layout.media_config.image_norm)
    assert len(ours.bidirectional_spans) == 2 and [m.kind for m in ours.media] == ["image", "image"]
    boi, eoi = gemma4_layout.special.ids["boi"], gemma4_layout.special.ids["eoi"]
    for span, run in zip(ours.media, ours.bidirectional_spans):
        assert ours.token_ids[span.start] == boi and ours.token_ids[span.end - 1] == eoi
        assert (span.start + 1, span.end - 1) == run


def test_chat_template_prompt(gemma4_processor, gemma4_layout):
    img = sample_image(120, 90, 3)
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is this image?"}]}]
    ref = gemma4_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = gemma4_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><|turn>user\n<|image|>What is this image?<turn|>\n<|turn>model\n")
    ours = gemma4_layout.build(text, images=[img])  # <bos> in the text: not added again
    assert ours.token_ids == list(ref["input_ids"][0])


def test_image_sources_and_hash(gemma4_layout):
    img = sample_image(77, 130, 4)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    items = [gemma4_layout.image_item(src) for src in (img, png.getvalue(), Image.fromarray(img), torch.from_numpy(img))]
    assert len({item.content_hash for item in items}) == 1
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert gemma4_layout.image_item(other).content_hash != items[0].content_hash
    assert gemma4_layout.image_item(img, max_soft_tokens=70).content_hash != items[0].content_hash


def test_bad_input(gemma4_layout):
    img = sample_image(50, 50)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        gemma4_layout.build("<image>", images=[img], max_soft_tokens=100)
    with pytest.raises(ValueError, match="1 image marker"):
        gemma4_layout.build("<image>", images=[img, img])
    with pytest.raises(MediaError):
        gemma4_layout.build("<image>", images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(MediaError):
        gemma4_layout.build("<image>", images=[b"not an image"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        image_rows(np.zeros((8, 8), np.uint8), gemma4_layout.media_config)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma4-clips")
    return {"75f@1fps": write_clip(d / "slow.mp4", 75, 1), "90f@12fps": write_clip(d / "fast.mp4", 90, 12),
            "10f@5fps": write_clip(d / "short.mp4", 10, 5, width=64, height=48),
            "webm": write_clip(d / "clip.webm", 50, 10, width=96, height=64, codec="libvpx-vp9")}


def _hf_video(processor, text, path, **kw):
    frames, meta = all_frames(path)
    return processor(text=text, videos=[frames], videos_kwargs={"video_metadata": [meta], **kw}, return_tensors="pt")


def _assert_video_equal(ours, ref, layout):
    assert ours.token_ids == ref["input_ids"][0].tolist()
    assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
    _assert_vision_equal(ours, ref["pixel_values_videos"], ref["video_position_ids"], layout.media_config.video_norm)


@pytest.mark.parametrize("clip", ["75f@1fps", "90f@12fps"])
def test_video_matches_processor(gemma4_processor, gemma4_layout, clips, clip):
    ref = _hf_video(gemma4_processor, "Watch <|video|> and say", clips[clip])
    ours = gemma4_layout.build("Watch <video> and say", videos=[clips[clip]])
    _assert_video_equal(ours, ref, gemma4_layout)
    assert len(ours.bidirectional_spans) == 32  # one run per frame, 32 frames by default
    (span,) = ours.media
    assert span.kind == "video" and ours.token_ids[span.start] == gemma4_layout.special.ids["boi"]
    assert ours.bidirectional_spans[0][0] == span.start + 1 and ours.bidirectional_spans[-1][1] == span.end - 1
    second = {"75f@1fps": "00:02", "90f@12fps": "00:00"}[clip]  # frame 2 at 1 fps; frame 2 at 12 fps
    head = gemma4_layout.tokenizer.decode(ours.token_ids[: ours.bidirectional_spans[1][0]], skip_special_tokens=False)
    assert head.startswith("<bos>Watch 00:00 <|image><|video|>") and head.endswith(f"<image|> {second} <|image>")


def test_webm_without_frame_count(gemma4_processor, gemma4_layout, clips):
    ref = _hf_video(gemma4_processor, "<|video|>", clips["webm"])  # the header has no frame count: from duration
    _assert_video_equal(gemma4_layout.build("<video>", videos=[clips["webm"]]), ref, gemma4_layout)


def test_video_budget_and_file_object(gemma4_processor, gemma4_layout, clips):
    ref = _hf_video(gemma4_processor, "<|video|>", clips["10f@5fps"], max_soft_tokens=280, num_frames=10)
    with open(clips["10f@5fps"], "rb") as f:
        ours = gemma4_layout.build("<video>", videos=[f], video_max_soft_tokens=280)
    _assert_video_equal(ours, ref, gemma4_layout)


def test_short_video_takes_every_frame(gemma4_processor, gemma4_layout, clips):
    """The reference raises when a clip has fewer frames than ``num_frames``; we take them all, which is what
    it gives when asked for exactly that many."""
    with pytest.raises(ValueError, match="exceeds total_num_frames"):
        _hf_video(gemma4_processor, "<|video|>", clips["10f@5fps"])
    ref = _hf_video(gemma4_processor, "<|video|>", clips["10f@5fps"], num_frames=10)
    _assert_video_equal(gemma4_layout.build("<video>", videos=[clips["10f@5fps"]]), ref, gemma4_layout)


def test_video_fps_sampling(gemma4_folder, gemma4_layout, clips):
    from dataclasses import replace

    from transformers import Gemma4UnifiedProcessor

    processor = Gemma4UnifiedProcessor.from_pretrained(gemma4_folder)
    processor.video_processor.num_frames = None  # the reference takes fps only without num_frames
    ref = _hf_video(processor, "<|video|>", clips["90f@12fps"], fps=1.5)
    layout = Gemma4UnifiedLayout(gemma4_layout.tokenizer, replace(gemma4_layout.media_config, video_num_frames=None,
                                                                  video_fps=1.5), gemma4_layout.special)
    ours = layout.build("<video>", videos=[clips["90f@12fps"]])
    _assert_video_equal(ours, ref, layout)
    assert len(ours.bidirectional_spans) == 11  # int(90 / 12 * 1.5)


def test_image_and_video_together(gemma4_processor, gemma4_layout, clips):
    img = sample_image(90, 160, 5)
    frames, meta = all_frames(clips["75f@1fps"])
    ref = gemma4_processor(text="<|image|> then <|video|>.", images=[img], videos=[frames], return_tensors="pt",
                           images_kwargs={"input_data_format": "channels_last"}, videos_kwargs={"video_metadata": [meta]})
    ours = gemma4_layout.build("<image> then <video>.", images=[img], videos=[clips["75f@1fps"]])
    assert ours.token_ids == ref["input_ids"][0].tolist() and ours.token_types == ref["mm_token_type_ids"][0].tolist()
    n = int((ref["image_position_ids"] != -1).all(-1).sum())
    assert torch.equal(ours.patches[:n], (ref["pixel_values"][0, :n] * 255).round().to(torch.uint8))
    assert len(ours.bidirectional_spans) == 33 and [m.kind for m in ours.media] == ["image", "video"]


def test_segments_and_prompt_limit(gemma4_folder, gemma4_layout, clips, monkeypatch):
    from encoders.video import VideoReader
    from tokenization import MediaSlot

    img, wave = sample_image(64, 64), np.zeros(1500, np.float32)
    segmented = gemma4_layout.build(["What is ", MediaSlot("image"), " and ", MediaSlot("audio"), "?"], images=[img],
                                    audios=[wave])
    assert segmented.token_ids == gemma4_layout.build("What is <image> and <audio>?", images=img, audios=wave).token_ids
    with pytest.raises(ValueError, match="must not contain"):
        gemma4_layout.build(["say <|image|>", MediaSlot("image")], images=[img])
    with pytest.raises(ValueError, match="1 image marker"):
        gemma4_layout.build(["two", MediaSlot("image")], images=[img, img])
    limited = Gemma4UnifiedLayout.from_pretrained(gemma4_folder, max_prompt_tokens=100)
    with pytest.raises(ValueError, match="max_model_len"):
        limited.build("<image>", images=[img])  # 256 soft tokens
    monkeypatch.setattr(VideoReader, "decode", lambda *a, **k: pytest.fail("decoded a video over the limit"))
    with pytest.raises(ValueError, match="max_model_len"):
        limited.build("<video>", videos=[clips["10f@5fps"]])  # 10 frames of >= 1 token + 3: checked from the header


def test_transparency_as_the_processor(gemma4_processor, gemma4_layout, tmp_path):
    """In-memory images with alpha are composited onto white (``do_convert_rgb``); a file keeps its stored
    colours, as transformers' ``load_image`` gives them to the processor."""
    from transformers.image_utils import load_image

    rgba = np.concatenate([sample_image(60, 90, 6), sample_image(60, 90, 7)[..., :1]], axis=-1)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    for ours_src, ref_src, kw in ((Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA"), {}),
                                  (rgba, rgba, {"input_data_format": "channels_last"}),
                                  (path, load_image(str(path)), {})):
        ref = gemma4_processor(text="<|image|>", images=[ref_src], images_kwargs=kw, return_tensors="pt")
        ours = gemma4_layout.build("<image>", images=[ours_src])
        _assert_vision_equal(ours, ref["pixel_values"], ref["image_position_ids"], gemma4_layout.media_config.image_norm)
