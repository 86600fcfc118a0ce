"""encoders/image.py against Pillow / transformers' loaders on files made here (and scikit-image photos)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import MediaError, MediaLimits, load_image

skdata = pytest.importorskip("skimage.data")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skdata.astronaut()  # 512x512 RGB photograph


def _pil_rgb(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}),
                                    ("PNG", {}), ("WEBP", {"quality": 80}), ("BMP", {}), ("TIFF", {}),
                                    ("GIF", {})])
def test_formats_match_pillow(photo, fmt, kw):
    data = _save(Image.fromarray(photo), fmt, **kw)
    out = load_image(data)
    assert out.dtype == torch.uint8 and out.shape == (512, 512, 3)
    assert np.array_equal(out.numpy(), _pil_rgb(data))


def test_sources_agree(photo, tmp_path):
    data = _save(Image.fromarray(photo), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    outs = [load_image(path), load_image(str(path)), load_image(data), load_image(io.BytesIO(data)),
            load_image(Image.open(io.BytesIO(data))), load_image(photo), load_image(torch.from_numpy(photo)),
            load_image(torch.from_numpy(photo).permute(2, 0, 1))]
    for out in outs:
        assert torch.equal(out, torch.from_numpy(photo))


def test_cmyk_jpeg(photo):
    data = _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    assert np.array_equal(load_image(data).numpy(), _pil_rgb(data))


def test_gray_palette_and_bilevel(photo):
    for mode in ("L", "P", "1"):
        data = _save(Image.fromarray(photo).convert(mode), "PNG")
        out = load_image(data)
        assert out.shape == (512, 512, 3)
        assert np.array_equal(out.numpy(), _pil_rgb(data))


def test_sixteen_bit_png_is_shifted_not_clipped():
    gray = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    out = load_image(_save(Image.fromarray(gray), "PNG"))
    assert torch.equal(out[..., 0], torch.from_numpy((gray >> 8).astype(np.uint8)))
    assert torch.equal(out[..., 0], out[..., 2])


def test_transparency_matches_transformers_path_loading(tmp_path):
    """RGBA PNG: alpha dropped, stored colours kept — what FuyuProcessor gets from the same file."""
    from transformers.image_utils import load_image as hf_load_image

    rgba = np.random.default_rng(0).integers(0, 256, (40, 30, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 0
    path = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image(path)
    assert np.array_equal(out.numpy(), rgba[..., :3])
    assert np.array_equal(out.numpy(), np.array(hf_load_image(str(path))))


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = load_image(_save(im, "PNG", exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[2, -3].tolist() == [255, 0, 0]  # top-left moved to top-right


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue())[0, 0].tolist() == [255, 0, 0]


def _png_header(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header():
    with pytest.raises(MediaError, match="30000x30000 pixels; the limit is 25 megapixels"):
        load_image(_png_header(30000, 30000))


def test_limits(photo):
    data = _save(Image.fromarray(photo), "PNG")
    with pytest.raises(MediaError, match="the limit is"):
        load_image(data, MediaLimits(max_image_bytes=1000))
    with pytest.raises(MediaError, match="0.1 megapixels"):
        load_image(data, MediaLimits(max_image_pixels=100_000))
    with pytest.raises(MediaError, match="aspect ratio of 100.0:1"):
        load_image(np.zeros((5, 500, 3), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        MediaLimits(max_image_pixels=0)


def test_bad_inputs_raise_media_error(photo, tmp_path):
    jpeg = _save(Image.fromarray(photo), "JPEG")
    with pytest.raises(MediaError, match="truncated"):
        load_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(MediaError, match="truncated"):
        load_image(_save(Image.fromarray(photo), "PNG")[:5000])
    with pytest.raises(MediaError, match="not a supported image"):
        load_image(b"definitely not an image")
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(12345)
    assert issubclass(MediaError, ValueError)
