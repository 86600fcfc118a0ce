"""Decode any user image into an RGB uint8 tensor [H, W, 3], checking limits from the header first.

Decoding is Pillow's (libjpeg-turbo, libpng, libwebp, libtiff); only the formats below are opened,
through their Pillow plugins directly, so Pillow's own decompression-bomb check is replaced by ours
(``MediaLimits.max_image_pixels``), which runs on the header, before a single pixel is decoded.

Conversions, chosen to give the pixels transformers' Fuyu stack gives for the same file
(``FuyuProcessor`` on a path decodes with ``torchvision.io.decode_image(mode=RGB,
apply_exif_orientation=True)``; ``transformers.image_utils.load_image`` does ``convert("RGB")``):
- EXIF orientation is applied (also for PIL images passed in).
- Transparency (RGBA, LA, palette with tRNS) is dropped: the stored colour of each pixel is kept and
  alpha discarded, exactly as both loaders above do. (``convert_to_rgb``'s white compositing only runs
  with ``do_convert_rgb=True``, which Fuyu's processor config does not set.)
- 16-bit PNG/TIFF is reduced to 8 bits by ``value >> 8`` (Pillow's ``convert`` would clip at 255).
- CMYK (Adobe-inverted too), grayscale, palette and bilevel images go through Pillow's ``convert``.
- GIF and other multi-frame files: the first frame.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps

from encoders.limits import MediaError, MediaLimits, MediaSource, read_source

FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_OPEN_ERRORS = (SyntaxError, IndexError, TypeError, ValueError, struct.error, OSError, EOFError)


def check_image_size(width: int, height: int, limits: MediaLimits) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"image is {width}x{height} pixels; it must be at least 1x1")
    if width * height > limits.max_image_pixels:
        raise MediaError(f"image is {width}x{height} pixels; the limit is "
                         f"{limits.max_image_pixels / 1e6:g} megapixels")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise MediaError(f"image is {width}x{height} pixels, an aspect ratio of {ratio:.1f}:1; "
                         f"the limit is {limits.max_aspect_ratio:g}:1")


def open_header(data: bytes) -> Image.Image:
    """Open ``data`` with the first supported Pillow plugin that accepts it; reads the header only."""
    Image.init()
    prefix, matched = data[:16], None
    for fmt in FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(prefix)):
            continue
        try:
            return factory(io.BytesIO(data), None)
        except _OPEN_ERRORS:
            matched = matched or fmt
    if matched:
        raise MediaError(f"image is truncated or corrupt: its {matched} header cannot be read")
    raise MediaError("not a supported image: expected JPEG, PNG, WebP, GIF, BMP or TIFF data")


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        gray = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)  # [H, W]
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _describe(err: Exception) -> str:
    text = str(err)
    if "truncated" in text or isinstance(err, EOFError) or "broken data stream" in text:
        return "image is truncated; upload the complete file"
    return f"image data is corrupt and cannot be decoded ({text or type(err).__name__})"


def decode_pil(im: Image.Image, limits: MediaLimits, owned: bool = False) -> np.ndarray:
    """An opened (possibly lazy) PIL image -> uint8 [H, W, 3] (maybe read-only), limits checked first.

    ``owned``: the image is ours to change (EXIF rotation in place, no copy); else it is left as is.
    """
    check_image_size(im.width, im.height, limits)
    try:
        im.load()
        if owned:
            ImageOps.exif_transpose(im, in_place=True)
        else:
            im = ImageOps.exif_transpose(im)
        return _to_rgb_array(im)
    except MediaError:
        raise
    except _OPEN_ERRORS as e:
        raise MediaError(_describe(e)) from e


def _from_array(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(arr) if isinstance(arr, np.ndarray) else arr
    if t.dtype != torch.uint8:
        raise MediaError(f"image arrays must be uint8 with values 0..255, got {t.dtype}")
    if t.ndim == 2:
        t = t[:, :, None].expand(-1, -1, 3)
    elif t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if t.ndim != 3 or t.shape[2] not in (1, 3, 4):
        raise MediaError(f"image arrays must be [H, W], [H, W, 3], [H, W, 4] or [3, H, W]; got {tuple(t.shape)}")
    if t.shape[2] == 1:
        t = t.expand(-1, -1, 3)
    return t[:, :, :3].cpu().contiguous()  # alpha dropped, as for files


def decode_array(src: MediaSource | Image.Image | np.ndarray | torch.Tensor,
                 limits: MediaLimits | None = None) -> np.ndarray:
    """Like ``load_image`` but a numpy array that may be read-only (Pillow's buffer, one copy fewer)."""
    limits = limits or MediaLimits()
    if isinstance(src, Image.Image):
        return decode_pil(src, limits)
    if isinstance(src, (np.ndarray, torch.Tensor)):
        t = _from_array(src)
        check_image_size(t.shape[1], t.shape[0], limits)
        return t.numpy()
    data = read_source(src, limits.max_image_bytes, "image")
    with open_header(data) as im:
        return decode_pil(im, limits, owned=True)


def load_image(src: MediaSource | Image.Image | np.ndarray | torch.Tensor,
               limits: MediaLimits | None = None) -> torch.Tensor:
    """Decode ``src`` (path, bytes, binary file object, PIL image, uint8 array or tensor) -> uint8 [H, W, 3]."""
    arr = decode_array(src, limits)
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr)  # Pillow's array view is read-only
    return torch.from_numpy(arr)
