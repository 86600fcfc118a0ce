"""MediaError and the configurable limits every decoder checks before it spends time or memory."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Union

MediaSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class MediaError(ValueError):
    """Bad user media: unreadable, unsupported, truncated or over a limit. The message is for the user."""


@dataclass
class MediaLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_aspect_ratio: float = 50.0  # long side / short side
    max_video_bytes: int = 512 * 1024 * 1024
    max_video_duration_s: float = 600.0
    max_video_pixels: int = 4096 * 2160  # per frame
    max_video_frames: int = 64  # frames sampled from one video

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MediaLimits.{f.name} must be a positive number, got {value!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"MediaLimits.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")


def human_size(num_bytes: int) -> str:
    if num_bytes >= 1024 * 1024:
        return f"{num_bytes / (1024 * 1024):.1f} MiB"
    if num_bytes >= 1024:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes} bytes"


def read_source(src: MediaSource, max_bytes: int, kind: str) -> bytes:
    """Read a path, bytes-like or binary file object, refusing more than ``max_bytes``."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise MediaError(f"{kind} is {human_size(len(data))}; the limit is {human_size(max_bytes)}")
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{kind} file not found: {str(path)!r}")
        size = path.stat().st_size
        if size > max_bytes:
            raise MediaError(f"{kind} is {human_size(size)}; the limit is {human_size(max_bytes)}")
        data = path.read_bytes()
    elif hasattr(src, "read"):
        data = src.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise MediaError(f"{kind} file object must be opened in binary mode ('rb')")
        data = bytes(data)
    else:
        raise MediaError(f"unsupported {kind} source of type {type(src).__name__}; "
                         "pass a path, bytes or a binary file object")
    if len(data) > max_bytes:
        raise MediaError(f"{kind} is over {human_size(max_bytes)}; the limit is {human_size(max_bytes)}")
    if not data:
        raise MediaError(f"{kind} is empty (0 bytes)")
    return data
