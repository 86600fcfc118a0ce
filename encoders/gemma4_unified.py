"""Gemma 4 Unified media rows, exactly as transformers' ``Gemma4UnifiedImageProcessor`` / ``VideoProcessor``.

An image (or video frame) is resized, keeping its aspect ratio, to the largest size whose sides are
multiples of ``patch_size * pooling_kernel_size`` (48 px) and which holds at most ``max_soft_tokens``
such cells (``target_size``: the reference's float formula and its thin-image fallbacks, op for op), with
torchvision's bicubic *with antialias* on the uint8 ``[C, H, W]`` (``[T, C, H, W]`` for a video) tensor;
not resized when already that size. The reference then cuts 16-px patches and merges each 3x3 group
(``patches_merge``): that is exactly the 48x48 cell, flattened (row, column, channel), cells in raster
order, position id (x, y) = (cell column, cell row). Rows stay uint8 here; ``normalize_rows`` is the
reference's rescale (and identity normalize) op for op. The reference pads rows to ``max_soft_tokens``
with position (-1, -1), which the model drops: we never make padding rows.

Video frames are picked as ``BaseVideoProcessor.sample_frames`` picks them (``default_sample_indices_fn``):
``num_frames`` indices ``i * total // num_frames`` (or ``fps`` per second), timestamps ``index / fps`` where
``total`` and ``fps`` are the stream's frame count and average rate (transformers' PyAV reader).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as tvF

from encoders.image import check_image_size, decode_array
from encoders.limits import MediaError, MediaLimits, MediaSource
from encoders.patchify import PatchConfig, normalize_patches
from encoders.video import VideoReader, VideoSampling

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
_BICUBIC = 3  # PILImageResampling.BICUBIC


def check_soft_tokens(max_soft_tokens: int) -> int:
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")
    return max_soft_tokens


@dataclass(frozen=True)
class Gemma4MediaConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280  # per image
    video_max_soft_tokens: int = 70  # per video frame
    video_num_frames: int | None = 32
    video_fps: float | None = None  # frames per second to sample; the reference forbids both
    sampling_rate: int = 16_000  # audio
    audio_samples_per_token: int = 640
    image_norm: PatchConfig = PatchConfig(48, 48, 48, mean=0.0, std=1.0, do_normalize=False)
    video_norm: PatchConfig = PatchConfig(48, 48, 48, mean=0.0, std=1.0, do_normalize=True)

    def __post_init__(self):
        check_soft_tokens(self.max_soft_tokens)
        check_soft_tokens(self.video_max_soft_tokens)
        if self.patch_size < 1 or self.pooling_kernel_size < 1:
            raise ValueError(f"patch_size and pooling_kernel_size must be >= 1, got {self.patch_size}, "
                             f"{self.pooling_kernel_size}")
        if (self.video_num_frames is None) == (self.video_fps is None):
            raise ValueError("set exactly one of video_num_frames and video_fps")
        if self.audio_samples_per_token < 1 or self.sampling_rate < 1:
            raise ValueError("audio_samples_per_token and sampling_rate must be >= 1")

    @property
    def cell_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def row_dim(self) -> int:
        return self.cell_size * self.cell_size * 3

    @classmethod
    def from_dict(cls, d: dict) -> Gemma4MediaConfig:
        image, video, audio = d.get("image_processor", {}), d.get("video_processor", {}), d.get("feature_extractor", {})
        for name, sub in (("image", image), ("video", video)):
            if sub.get("resample", _BICUBIC) != _BICUBIC or not sub.get("do_resize", True):
                raise ValueError(f"the {name} processor must resize with bicubic (3); got resample="
                                 f"{sub.get('resample')}, do_resize={sub.get('do_resize')}")
        fps = video.get("fps")
        norm = {name: PatchConfig(48, 48, 48, mean=sub.get("image_mean", 0.0), std=sub.get("image_std", 1.0),
                                  rescale_factor=sub.get("rescale_factor", 1 / 255),
                                  do_rescale=sub.get("do_rescale", True), do_normalize=sub.get("do_normalize", dflt))
                for name, sub, dflt in (("image", image, False), ("video", video, True))}
        return cls(patch_size=image.get("patch_size", 16), pooling_kernel_size=image.get("pooling_kernel_size", 3),
                   max_soft_tokens=image.get("max_soft_tokens", d.get("image_seq_length", 280)),
                   video_max_soft_tokens=video.get("max_soft_tokens", 70),
                   video_num_frames=None if fps is not None else video.get("num_frames", 32), video_fps=fps,
                   sampling_rate=audio.get("sampling_rate", 16_000),
                   audio_samples_per_token=audio.get("audio_samples_per_token", 640),
                   image_norm=norm["image"], video_norm=norm["video"])

    @classmethod
    def from_pretrained(cls, folder) -> Gemma4MediaConfig:
        """Read ``processor_config.json`` (transformers 5.x: sub-processors nested) or the older split files."""
        folder = Path(folder)
        path = folder / "processor_config.json"
        d = json.loads(path.read_text()) if path.is_file() else {}
        for key, name in (("image_processor", "preprocessor_config.json"),
                          ("video_processor", "video_preprocessor_config.json")):
            if key not in d and (folder / name).is_file():
                d[key] = json.loads((folder / name).read_text())
        if "image_processor" not in d:
            raise ValueError(f"{folder} has no processor_config.json or preprocessor_config.json")
        return cls.from_dict(d)


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
                ) -> tuple[int, int]:
    """The reference's ``get_aspect_ratio_preserving_size``: sides multiples of ``patch * kernel``."""
    target_px = max_patches * (patch_size ** 2)
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    if target_h == 0 and target_w == 0:
        raise MediaError(f"image {width}x{height} cannot be resized to a {side}-px grid")
    max_side = (max_patches // pooling_kernel_size ** 2) * side
    if target_h == 0:
        target_h, target_w = side, min(int(math.floor(width / height)) * side, max_side)
    elif target_w == 0:
        target_w, target_h = side, min(int(math.floor(height / width)) * side, max_side)
    if target_h * target_w > target_px:
        raise MediaError(f"image {width}x{height} would take more than {max_patches} patches")
    return target_h, target_w


@dataclass
class SoftTokenRows:
    data: torch.Tensor  # uint8 [rows*cols, cell*cell*3]
    position_ids: torch.Tensor  # int64 [rows*cols, 2]: (x, y) = (cell column, cell row)
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols


def _cells(frames_chw: torch.Tensor, cell: int) -> list[SoftTokenRows]:
    """uint8 [T, 3, h, w] -> per frame rows [h/cell * w/cell, cell*cell*3], raster order of cells."""
    t, _, h, w = frames_chw.shape
    rows, cols = h // cell, w // cell
    data = frames_chw.permute(0, 2, 3, 1).reshape(t, rows, cell, cols, cell, 3).permute(0, 1, 3, 2, 4, 5)
    data = data.reshape(t, rows * cols, cell * cell * 3).contiguous()
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [rows*cols, 2]
    return [SoftTokenRows(data[i], pos, rows, cols) for i in range(t)]


def _resized(chw: torch.Tensor, cfg: Gemma4MediaConfig, max_soft_tokens: int) -> torch.Tensor:
    height, width = chw.shape[-2:]
    h, w = target_size(height, width, cfg.patch_size, max_soft_tokens * cfg.pooling_kernel_size ** 2,
                       cfg.pooling_kernel_size)
    if (h, w) == (height, width):
        return chw
    return tvF.resize(chw, size=[h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _bicubic(image_u8: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3], the processors' resize (one frame equals the batched resize)."""
    chw = torch.from_numpy(np.ascontiguousarray(image_u8.transpose(2, 0, 1)))
    out = tvF.resize(chw, size=[height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return out.permute(1, 2, 0).numpy()


def decode_image(src, limits: MediaLimits | None = None) -> np.ndarray | torch.Tensor:
    """``encoders.decode_array``, except that an in-memory image with transparency (a PIL image with alpha, a
    [H, W, 4] array) is composited onto white, as the processor's ``do_convert_rgb`` does; files keep the stored
    colours, as transformers' ``load_image`` (``convert("RGB")``) does."""
    limits = limits or MediaLimits()
    if isinstance(src, Image.Image) and ("A" in src.getbands() or src.info.get("transparency") is not None):
        check_image_size(src.width, src.height, limits)
        rgba = ImageOps.exif_transpose(src).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    if isinstance(src, (np.ndarray, torch.Tensor)) and src.ndim == 3 and src.shape[-1] == 4 and src.dtype in (
            np.uint8, torch.uint8):
        check_image_size(src.shape[1], src.shape[0], limits)
        x = tvF.to_dtype(torch.as_tensor(np.asarray(src)), torch.float32, scale=True)  # [H, W, 4]
        return tvF.to_dtype(x[..., :3] * x[..., 3:] + (1 - x[..., 3:]), torch.uint8, scale=True)
    return decode_array(src, limits)


def _channels_first(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> a new contiguous uint8 [..., 3, H, W] tensor (as the reference lays it out)."""
    if frames.dtype not in (torch.uint8, np.uint8) or frames.shape[-1] != 3 or frames.ndim < 3:
        raise ValueError(f"expected uint8 RGB [..., H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if isinstance(frames, np.ndarray):  # a copy: Pillow's arrays are read-only
        return torch.from_numpy(np.array(np.moveaxis(frames, -1, -3), order="C"))
    return frames.movedim(-1, -3).contiguous()


def image_rows(image: torch.Tensor | np.ndarray, cfg: Gemma4MediaConfig,
               max_soft_tokens: int | None = None) -> SoftTokenRows:
    """uint8 [H, W, 3] (``encoders.decode_array``) -> the image's soft-token rows."""
    budget = check_soft_tokens(max_soft_tokens or cfg.max_soft_tokens)
    if image.ndim != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {tuple(image.shape)}")
    return _cells(_resized(_channels_first(image), cfg, budget)[None], cfg.cell_size)[0]


def video_rows(frames: torch.Tensor | np.ndarray, cfg: Gemma4MediaConfig,
               max_soft_tokens: int | None = None) -> list[SoftTokenRows]:
    """uint8 [T, H, W, 3] sampled frames -> soft-token rows per frame (all frames resized together)."""
    budget = check_soft_tokens(max_soft_tokens or cfg.video_max_soft_tokens)
    if frames.ndim != 4:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {tuple(frames.shape)}")
    return _cells(_resized(_channels_first(frames), cfg, budget), cfg.cell_size)


def frame_tokens(height: int, width: int, cfg: Gemma4MediaConfig, max_soft_tokens: int | None = None,
                 video: bool = True) -> int:
    """Soft tokens of one image / video frame of this size (no pixels needed)."""
    budget = check_soft_tokens(max_soft_tokens or (cfg.video_max_soft_tokens if video else cfg.max_soft_tokens))
    h, w = target_size(height, width, cfg.patch_size, budget * cfg.pooling_kernel_size ** 2, cfg.pooling_kernel_size)
    return (h // cfg.cell_size) * (w // cfg.cell_size)


def normalize_rows(rows_u8: torch.Tensor, norm: PatchConfig, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, D] -> float [N, D], the processor's ``pixel_values`` (``cfg.image_norm`` / ``cfg.video_norm``)."""
    return normalize_patches(rows_u8, norm, dtype)


def sample_frame_indices(total_num_frames: int, video_fps: float, num_frames: int | None = None,
                         fps: float | None = None) -> list[int]:
    """``default_sample_indices_fn``; where the reference raises (more frames asked than the clip has) we
    take every frame."""
    if total_num_frames < 1:
        raise MediaError("video has no frames")
    if num_frames is None and fps is not None:
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None:
        return list(range(total_num_frames))
    num_frames = min(num_frames, total_num_frames)
    return [int(i) for i in np.arange(num_frames, dtype=int) * total_num_frames // num_frames]


@dataclass
class SampledVideo:
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    timestamps_s: list[float]  # index / fps, the reference's timestamps
    frame_indices: list[int]
    fps: float


def _stream_rate(reader: VideoReader) -> tuple[int, float]:
    """(frame count, average fps) of the video stream, as transformers' PyAV reader reads them."""
    stream = reader.stream
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise MediaError("video has no frame rate; re-encode it with a constant frame rate")
    total = stream.frames or round(reader.duration_s * float(rate))  # webm: no frame count in the header
    return int(total), float(rate)


def load_video_frames(src: MediaSource, cfg: Gemma4MediaConfig, limits: MediaLimits | None = None,
                      decoder_threads: int = 1, before_decode: Callable[[int, int, int], None] | None = None,
                      max_soft_tokens: int | None = None) -> SampledVideo:
    """Decode the frames ``Gemma4UnifiedVideoProcessor`` samples, through ``encoders.video.VideoReader``, each
    resized to the processor's size for the frame budget as it is decoded (no full-size stack is built).

    ``before_decode(num_frames, height, width)`` runs on the header (stored size, before rotation)."""
    limits = limits or MediaLimits()
    with VideoReader(src, VideoSampling(num_frames=1, max_frames=1, decoder_threads=decoder_threads),
                     limits) as reader:
        total, rate = _stream_rate(reader)
        indices = sample_frame_indices(total, rate, cfg.video_num_frames, cfg.video_fps)
        if len(indices) > limits.max_video_frames:
            raise MediaError(f"asked for {len(indices)} frames of a video; the limit is {limits.max_video_frames}")
        if before_decode is not None:
            before_decode(len(indices), reader.height, reader.width)
        budget = check_soft_tokens(max_soft_tokens or cfg.video_max_soft_tokens)

        def frame_size(height: int, width: int) -> tuple[int, int]:  # the processor's size, reached while decoding
            return target_size(height, width, cfg.patch_size, budget * cfg.pooling_kernel_size ** 2,
                               cfg.pooling_kernel_size)

        video = reader.decode(frame_size, times_s=[(i + 0.5) / rate for i in indices],  # mid-frame: frame i
                              resizer=_bicubic)
    return SampledVideo(video.frames, [i / rate for i in indices], indices, rate)


def audio_rows(waveform: torch.Tensor | np.ndarray, cfg: Gemma4MediaConfig) -> torch.Tensor:
    """float mono [S] at ``cfg.sampling_rate`` -> float32 [ceil(S / n), n] frames, the last zero-padded
    (``Gemma4UnifiedAudioFeatureExtractor``; n = ``audio_samples_per_token``)."""
    wave = np.asarray(waveform, dtype=np.float32) if not isinstance(waveform, torch.Tensor) else waveform.numpy()
    if wave.ndim != 1 or wave.size == 0:
        raise MediaError(f"audio must be a non-empty mono waveform [samples], got shape {tuple(wave.shape)}")
    n = cfg.audio_samples_per_token
    padded = np.pad(wave, (0, (-wave.size) % n))
    return torch.from_numpy(padded.reshape(-1, n).astype(np.float32))
