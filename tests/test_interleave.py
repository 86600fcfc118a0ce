"""tokenization/interleave.py: ids and patches against FuyuProcessor; markers, videos, hashes, threads."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import FuyuImageProcessor, FuyuProcessor

from encoders import PatchConfig, normalize_patches
from tests.test_video import make_clip
from tokenization import Interleaver, TextTokenizer

skdata = pytest.importorskip("skimage.data")
RNG = np.random.default_rng(1)
PAIRS = [("What is in this picture?", skdata.astronaut()), ("", skdata.coffee()),
         ("Describe it.", skdata.chelsea()), ("émoji 😀 中文", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
         ("  spaces around  ", RNG.integers(0, 256, (100, 30, 3), dtype=np.uint8)),
         ("multi\nline\nprompt", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
         ("<box>1, 2, 3, 4</box>", RNG.integers(0, 256, (9, 200, 3), dtype=np.uint8)),
         ("Numbers 0123456789", skdata.camera()), ("x" * 120, RNG.integers(0, 256, (65, 65, 3), dtype=np.uint8)),
         ("Caption:", RNG.integers(0, 256, (300, 17, 3), dtype=np.uint8)),
         ("Last one", RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def interleaver(tiny_checkpoint):
    return Interleaver.from_pretrained(tiny_checkpoint)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _check_against(ref: FuyuProcessor, prompt, text: str, image) -> None:
    out = ref(images=image, text=text, return_legacy_image_output=False)
    ids = out["input_ids"][0]
    assert prompt.token_ids == ids.tolist()
    assert prompt.image_positions == (ids == ref.image_token_id).nonzero()[:, 0].tolist()
    got = normalize_patches(prompt.patches, PatchConfig.from_dict(ref.image_processor.to_dict()))
    assert got.shape == out["pixel_values"].shape
    assert (got - out["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("text,image", PAIRS[:-1])
def test_one_image_no_marker_matches_fuyu_processor(interleaver, hf_processor, text, image):
    image = _rgb(image)
    _check_against(hf_processor, interleaver.build(text, images=[image]), text, image)


def test_fuyu_default_config_1080x1920_patch30(hf_processor):
    ref = FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=hf_processor.tokenizer)
    il = Interleaver(TextTokenizer(hf_processor.tokenizer.backend_tokenizer), PatchConfig())
    for image in (RNG.integers(0, 256, (1500, 2600, 3), dtype=np.uint8), skdata.astronaut()):
        _check_against(ref, il.build("What is this?", images=image), "What is this?", image)


# the reference loads paths with torchvision.io, which warns it is deprecated (transformers' choice, not ours)
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_files_as_fuyu_processor_loads_them(interleaver, hf_processor, tmp_path):
    """Same path to both: decode (EXIF, alpha) + patchify + ids agree with FuyuProcessor's own loading."""
    rgba = RNG.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    rgba[:25, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(skdata.coffee()).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        path = str(tmp_path / name)
        _check_against(hf_processor, interleaver.build("hi", images=[path]), "hi", path)


def test_markers_place_media(interleaver):
    tok, img = interleaver.tokenizer, RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    image_ids = ([tok.image_token_id] * 3 + [tok.newline_token_id]) * 2
    p = interleaver.build("Compare <image> with <image>", images=[img, img[:8]])
    assert p.token_ids == ([tok.bos_token_id] + tok.encode("Compare ") + image_ids + tok.encode(" with ")
                           + image_ids[:4] + [tok.boa_token_id])
    assert [(s.start, s.end, s.kind) for s in p.media] == [(len(tok.encode("Compare ")) + 1,
                                                            len(tok.encode("Compare ")) + 9, "image"),
                                                           (p.token_ids.index(tok.boa_token_id) - 4,
                                                            p.token_ids.index(tok.boa_token_id), "image")]
    assert p.patches.shape == (9, 8 * 8 * 3)
    assert interleaver.build("<image>\nWhat?", images=[img]).token_ids == \
        interleaver.build("What?", images=[img]).token_ids
    assert interleaver.build("text only").token_ids == [tok.bos_token_id] + tok.encode("text only<0x04>")


def test_marker_count_mismatch_and_reserved_tokens(interleaver):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="2 <image> marker"):
        interleaver.build("<image> and <image>", images=[img])
    with pytest.raises(ValueError, match="0 <image> marker"):
        interleaver.build("<video>", images=[img])
    with pytest.raises(ValueError, match="1 <video> marker"):
        interleaver.build("<video>")
    with pytest.raises(ValueError, match="must not contain"):
        interleaver.build("sneaky |SPEAKER|", images=[img])


def test_video_frames_with_timestamps(interleaver):
    tok = interleaver.tokenizer
    p = interleaver.build("What happens? <video>", videos=make_clip(seconds=1.0))
    (span,) = p.media
    assert span.kind == "video" and p.token_ids[span.end] == tok.boa_token_id
    frame_ids = ([tok.image_token_id] * 8 + [tok.newline_token_id]) * 4  # 64x128 -> 32x64 -> 4x8 patches
    expected = []
    for i in range(8):  # the frame shown at each of 8 segment centres of 1 s at 30 fps
        t = int((i + 0.5) / 8 * 30) / 30
        expected += tok.encode(f"<t={t:.1f}s>") + frame_ids
    assert p.token_ids[span.start:span.end] == expected
    assert p.patches.shape[0] == 8 * 32 == len(p.image_positions)


def test_content_hash_is_of_pixels(interleaver, tmp_path):
    photo = skdata.astronaut()
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    hashes = {interleaver.build("", images=[src]).media[0].content_hash
              for src in (photo, buf.getvalue(), tmp_path / "p.png", Image.fromarray(photo))}
    assert len(hashes) == 1
    other = photo.copy()
    other[300, 300, 0] ^= 0xFF
    assert interleaver.build("", images=[other]).media[0].content_hash not in hashes


def test_build_is_thread_safe(interleaver):
    jobs = [(text, _rgb(image)) for text, image in PAIRS]
    serial = [interleaver.build(t, images=[i]) for t, i in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: interleaver.build(job[0], images=[job[1]]), jobs * 3))
    for a, b in zip(serial * 3, parallel):
        assert a.token_ids == b.token_ids and torch.equal(a.patches, b.patches) and a.media == b.media
