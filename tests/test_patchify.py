"""encoders/patchify.py against transformers' FuyuImageProcessor (what FuyuProcessor.from_pretrained loads)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import FuyuImageProcessor
from transformers.image_utils import SizeDict

from encoders import MediaError, PatchConfig, load_image, normalize_patches, patchify

skdata = pytest.importorskip("skimage.data")


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    rand = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    modes = [load_image(Image.fromarray(skdata.camera())).numpy(),  # grayscale photo
             load_image(Image.fromarray(skdata.astronaut()).convert("P")).numpy()]  # palette
    return photos + modes + [rand(5, 7), rand(64, 64), rand(100, 30), rand(1081, 50), rand(37, 1500),
                             rand(1080, 1920), rand(1500, 2600)]


IMAGES = _images()


def _reference_patches(ref: FuyuImageProcessor, image: np.ndarray) -> torch.Tensor:
    """FuyuProcessor._process_images, step by step: process, crop to the patch grid, patchify."""
    out = ref(image, return_tensors="pt")
    p = ref.patch_size.height
    h, w = out["image_unpadded_heights"][0][0], out["image_unpadded_widths"][0][0]
    img = out["images"][0]
    nh, nw = min(img.shape[-2], math.ceil(h / p) * p), min(img.shape[-1], math.ceil(w / p) * p)
    return ref.patchify_image(img[..., :nh, :nw], SizeDict(height=p, width=p))[0]


@pytest.mark.parametrize("target,patch,padding", [((64, 64), 8, 1.0), ((1080, 1920), 30, 1.0),
                                                  ((100, 70), 10, 0.5)])
def test_patches_equal_fuyu_image_processor(target, patch, padding):
    ref = FuyuImageProcessor(size={"height": target[0], "width": target[1]},
                             patch_size={"height": patch, "width": patch}, padding_value=padding)
    cfg = PatchConfig.from_dict(ref.to_dict())
    assert (cfg.target_height, cfg.target_width, cfg.patch_size) == (*target, patch)
    for image in IMAGES:
        expected = _reference_patches(ref, image)
        got = patchify(torch.from_numpy(image), cfg)
        assert got.data.dtype == torch.uint8 and got.rows * got.cols == expected.shape[0]
        assert (normalize_patches(got.data, cfg) - expected).abs().max().item() <= 1e-6, image.shape


def test_larger_than_target_is_shrunk_keeping_aspect():
    cfg = PatchConfig(target_height=64, target_width=64, patch_size=8)
    got = patchify(torch.zeros(300, 150, 3, dtype=torch.uint8), cfg)
    assert (got.rows, got.cols) == (8, 4)  # 64x32
    small = patchify(torch.zeros(10, 10, 3, dtype=torch.uint8), cfg)
    assert (small.rows, small.cols) == (2, 2)  # never upscaled
    # padding value 1 in uint8, normalized like the reference: (1 - 127.5) / 127.5
    assert small.data[-1, -3:].tolist() == [1, 1, 1]
    assert normalize_patches(small.data, cfg)[-1, -1].item() == pytest.approx((1 - 127.5) / 127.5)


def test_from_pretrained_both_file_names(tiny_checkpoint, tmp_path):
    cfg = PatchConfig.from_pretrained(tiny_checkpoint)
    assert (cfg.target_height, cfg.target_width, cfg.patch_size) == (64, 64, 8)
    nested = json.loads((tiny_checkpoint / "processor_config.json").read_text())["image_processor"]
    nested.update(size={"height": 1080, "width": 1920}, patch_size={"height": 30, "width": 30})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(nested))
    old = PatchConfig.from_pretrained(tmp_path)
    assert (old.target_height, old.target_width, old.patch_size) == (1080, 1920, 30)
    with pytest.raises(ValueError, match="no processor_config.json"):
        PatchConfig.from_pretrained(tmp_path / "nowhere")


def test_bad_configs_and_images():
    with pytest.raises(ValueError, match="0..255"):
        PatchConfig(padding_value=300.0)
    with pytest.raises(ValueError, match="square"):
        PatchConfig.from_dict({"patch_size": {"height": 30, "width": 20}})
    with pytest.raises(MediaError, match="too thin"):
        patchify(torch.zeros(2, 2000, 3, dtype=torch.uint8), PatchConfig(target_height=64, target_width=64,
                                                                          patch_size=8))


def test_one_patch_image_is_copied_out_of_a_read_only_array():
    cfg = PatchConfig(target_height=8, target_width=8, patch_size=8)
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    pixels.flags.writeable = False  # as np.asarray(PIL image) gives
    out = patchify(pixels, cfg)  # no "non-writable array" warning (warnings are errors here)
    assert out.data.tolist() == [pixels.reshape(-1).tolist()]
    writable = pixels.copy()
    out = patchify(writable, cfg)
    writable[:] = 0
    assert out.data.tolist() == [pixels.reshape(-1).tolist()]  # not a view of the caller's array
