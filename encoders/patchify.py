"""Resize, pad and cut an image into Fuyu patches, exactly as transformers' ``FuyuImageProcessor``.

The reference is ``FuyuImageProcessor`` (the torchvision backend), the class
``FuyuProcessor.from_pretrained`` loads by default in transformers 5.x. It works on the uint8 image:
shrink to fit the target size keeping aspect (``int(side * scale)``, bilinear, antialias; never
upscale), pad bottom/right with ``padding_value`` cast to uint8 (``int(1.0) == 1``: the reference pads
the uint8 tensor, so a fractional padding value is truncated there too), then rescale + normalize to
float, then crop to ``ceil(h/p)*p x ceil(w/p)*p`` and unfold into patches flattened (row, col, channel).
Here patches stay uint8 (4x smaller) until ``normalize_patches``, run right before the patch
embedding; padding is only materialized up to the patch grid, never to the full target size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvF

from encoders.limits import MediaError

_BILINEAR = 2  # PILImageResampling.BILINEAR


def _triple(value, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"PatchConfig.{name} must be one number or three (RGB), got {value!r}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class PatchConfig:
    target_height: int = 1080
    target_width: int = 1920
    patch_size: int = 30
    padding_value: float = 1.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if self.patch_size < 1 or self.target_height < self.patch_size or self.target_width < self.patch_size:
            raise ValueError(f"PatchConfig needs 1 <= patch_size <= target size, got patch {self.patch_size}, "
                             f"target {self.target_height}x{self.target_width}")
        if not 0 <= self.padding_value <= 255:
            raise ValueError(f"PatchConfig.padding_value {self.padding_value} does not fit a uint8 image "
                             "(the reference pads the uint8 image too); use a value in 0..255")
        if any(s == 0 for s in self.std):
            raise ValueError("PatchConfig.std must not contain 0")

    @property
    def padding_u8(self) -> int:
        return int(self.padding_value)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @classmethod
    def from_dict(cls, d: dict) -> PatchConfig:
        d = d.get("image_processor", d)
        ph, pw = (d.get("patch_size") or {"height": 30, "width": 30}).values()
        if ph != pw:
            raise ValueError(f"only square patches are supported, got {ph}x{pw}")
        size = d.get("size") or {"height": 1080, "width": 1920}
        if d.get("resample", _BILINEAR) != _BILINEAR:
            raise ValueError(f"only bilinear resampling (2) is supported, got {d['resample']}")
        if not d.get("do_pad", True) or d.get("padding_mode", "constant") != "constant":
            raise ValueError("Fuyu patching needs do_pad=true with padding_mode 'constant'")
        return cls(target_height=size["height"], target_width=size["width"], patch_size=ph,
                   padding_value=d.get("padding_value", 1.0), mean=d.get("image_mean", 0.5),
                   std=d.get("image_std", 0.5), rescale_factor=d.get("rescale_factor", 1 / 255),
                   do_resize=d.get("do_resize", True), do_rescale=d.get("do_rescale", True),
                   do_normalize=d.get("do_normalize", True))

    @classmethod
    def from_pretrained(cls, folder) -> PatchConfig:
        """Read ``processor_config.json`` (transformers 5.x) or ``preprocessor_config.json`` (older)."""
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = Path(folder) / name
            if path.is_file():
                return cls.from_dict(json.loads(path.read_text()))
        raise ValueError(f"{folder} has no processor_config.json or preprocessor_config.json")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The image size after the reference's shrink-to-fit (never upscales)."""
        if not self.do_resize or (height <= self.target_height and width <= self.target_width):
            return height, width
        scale = min(self.target_height / height, self.target_width / width)
        return int(height * scale), int(width * scale)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches for an image of this original size."""
        h, w = self.resized_size(height, width)
        if h < 1 or w < 1:
            raise MediaError(f"image is {width}x{height} pixels, too thin: it would shrink to {w}x{h} to fit "
                             f"{self.target_width}x{self.target_height}")
        if h > self.target_height or w > self.target_width:
            raise ValueError(f"image {h}x{w} exceeds the target {self.target_height}x{self.target_width} "
                             "and do_resize is off")
        return math.ceil(h / self.patch_size), math.ceil(w / self.patch_size)


@dataclass
class Patches:
    data: torch.Tensor  # uint8 [rows*cols, p*p*3]
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + 1)  # a newline id after each row


def resize(image_u8: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], the reference's bilinear antialiased resize."""
    chw = torch.from_numpy(np.ascontiguousarray(image_u8.transpose(2, 0, 1)))[None]  # [1, 3, H, W] as the reference
    resized = tvF.resize(chw, [height, width], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    return resized[0].permute(1, 2, 0).numpy()  # [height, width, 3]


def patchify(image_u8: torch.Tensor | np.ndarray, cfg: PatchConfig) -> Patches:
    """uint8 [H, W, 3] (tensor or array) -> uint8 patches [rows*cols, p*p*3] in the reference's order."""
    assert image_u8.dtype in (torch.uint8, np.uint8) and image_u8.ndim == 3 and image_u8.shape[2] == 3
    height, width = image_u8.shape[:2]
    rows, cols = cfg.grid(height, width)
    h, w = cfg.resized_size(height, width)
    p = cfg.patch_size
    # numpy where possible: single-threaded copies, no intra-op thread pool wake-ups for small images
    image = image_u8.cpu().numpy() if isinstance(image_u8, torch.Tensor) else image_u8
    if (h, w) != (height, width):
        image = resize(image, h, w)
    if (rows * p, cols * p) != (h, w):
        canvas = np.full((rows * p, cols * p, 3), cfg.padding_u8, dtype=np.uint8)
        canvas[:h, :w] = image
        image = canvas
    data = np.ascontiguousarray(
        image.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3))
    if np.may_share_memory(data, image_u8 if isinstance(image_u8, np.ndarray) else image):
        data = data.copy()  # one patch row or one patch: still a view of the caller's (maybe read-only) pixels
    return Patches(data=torch.from_numpy(data), rows=rows, cols=cols)


def normalize_patches(patches_u8: torch.Tensor, cfg: PatchConfig, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, p*p*3] -> float [N, p*p*3], the reference's rescale + normalize op for op (float32 math)."""
    x = patches_u8.reshape(patches_u8.shape[0], -1, 3).to(torch.float32)  # [N, p*p, 3]
    if cfg.do_normalize:
        mean = torch.tensor(cfg.mean, device=x.device)
        std = torch.tensor(cfg.std, device=x.device)
        if cfg.do_rescale:  # fused as in the reference
            mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
        x = (x - mean) / std
    elif cfg.do_rescale:
        x = x * cfg.rescale_factor
    return x.reshape(patches_u8.shape[0], -1).to(dtype)
