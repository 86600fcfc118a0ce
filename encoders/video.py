"""Sample frames from a user video with PyAV: seek to the keyframe before each sample, decode to it.

A sample at time t takes the frame shown at t: the last frame with pts <= t (the first frame if t
comes before it). Times come from pts, so variable frame rate is handled. For each sample the
decoder seeks back to the keyframe before t when that keyframe lies past the current position
(from the container's index; without an index, when t is over 2 s ahead), so a long clip sampled
sparsely decodes a few GOPs, not every frame. Display-matrix rotation is applied to the pixels.

PyAV is imported on the first video, not with the package: text and image serving never load FFmpeg,
and a machine without PyAV (the GPU check's bare image) can still import ``pipeline``.
"""
from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from encoders.limits import MediaError, MediaLimits, MediaSource, human_size, read_source

_NO_INDEX_SEEK_S = 2.0


@dataclass
class VideoSampling:
    num_frames: int | None = 8  # spread uniformly (segment centres); ignored when fps is set
    fps: float | None = None  # frames at 0, 1/fps, 2/fps, ... capped by max_frames (then spread uniformly)
    max_frames: int = 32

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"VideoSampling.max_frames must be >= 1, got {self.max_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"VideoSampling.fps must be > 0, got {self.fps}")
        if self.fps is None and (self.num_frames is None or not 1 <= self.num_frames <= self.max_frames):
            raise ValueError(f"VideoSampling.num_frames must be in 1..max_frames ({self.max_frames}) "
                             f"when fps is not set, got {self.num_frames}")

    def times(self, duration_s: float) -> list[float]:
        """Sample times in seconds from the start of the clip."""
        if self.fps is not None:
            count = max(1, int(np.ceil(duration_s * self.fps - 1e-9)))
            if count <= self.max_frames:
                return [k / self.fps for k in range(count)]
            num = self.max_frames
        else:
            num = self.num_frames
        return [(i + 0.5) * duration_s / num for i in range(num)]


@dataclass
class DecodedVideo:
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    timestamps_s: list[float]  # presentation time of each frame, from the start of the clip
    num_decoded: int  # frames the decoder produced to get these (cost)
    duration_s: float = 0.0


def _open(src: MediaSource, limits: MediaLimits):
    import av

    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"video file not found: {str(path)!r}")
        if path.stat().st_size > limits.max_video_bytes:
            raise MediaError(f"video is {human_size(path.stat().st_size)}; the limit is "
                             f"{human_size(limits.max_video_bytes)}")
        target = str(path)
    else:
        target = io.BytesIO(read_source(src, limits.max_video_bytes, "video"))
    try:
        container = av.open(target, mode="r")
    except av.FFmpegError as e:
        raise MediaError("not a readable video: the data is truncated, corrupt or in an unknown format") from e
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        container.close()
        raise MediaError("this is an image, not a video; send it as an image")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise MediaError(f"the file has no video stream ({', '.join(kinds)} streams only)")
    return container


def _duration_s(container, stream) -> float:
    if stream.duration is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        import av  # loaded already by _open

        return container.duration / av.time_base
    last = 0.0  # no header duration (some webm/ts): demux the packets, no decoding
    for packet in container.demux(stream):
        if packet.pts is not None:
            last = max(last, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    container.seek(0)
    return last - float((stream.start_time or 0) * stream.time_base)


def _check(container, stream, duration_s: float, limits: MediaLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_video_pixels:
        raise MediaError(f"video frames are {width}x{height} pixels; the limit is "
                         f"{limits.max_video_pixels / 1e6:g} megapixels per frame")
    if duration_s > limits.max_video_duration_s:
        raise MediaError(f"video is {duration_s:.1f} s long; the limit is {limits.max_video_duration_s:g} s")
    if duration_s <= 0:
        raise MediaError("video has no frames (zero duration)")


def _to_rgb(frame) -> torch.Tensor:
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
    quarter_turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise display rotation
    return torch.rot90(rgb, quarter_turns, dims=(0, 1)).contiguous() if quarter_turns else rgb


class _Sampler:
    """Walks the stream forward, seeking when a keyframe past the current position is nearer."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.keyframes = sorted(e.timestamp for e in stream.index_entries if e.is_keyframe)
        self.no_index_gap = int(_NO_INDEX_SEEK_S / stream.time_base)
        self.frames = container.decode(stream)
        self.cur = self.ahead = None  # last frame with pts <= target, first frame after it
        self.position = stream.start_time or 0
        self.num_decoded = 0

    def _should_seek(self, target: int) -> bool:
        if self.keyframes:
            i = bisect.bisect_right(self.keyframes, target) - 1
            return i >= 0 and self.keyframes[i] > self.position
        return target - self.position > self.no_index_gap

    def frame_at(self, target: int):
        if self._should_seek(target):
            self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
            self.frames = self.container.decode(self.stream)
            self.cur = self.ahead = None
        while self.ahead is None or self.ahead.pts <= target:
            if self.ahead is not None:
                self.cur = self.ahead
            self.ahead = next(self.frames, None)
            if self.ahead is None:
                break
            if self.ahead.pts is None:  # no timestamp: place it one frame after the previous
                self.ahead.pts = (self.cur.pts + 1) if self.cur is not None else self.position
            self.num_decoded += 1
            self.position = self.ahead.pts
        frame = self.cur if self.cur is not None else self.ahead
        if frame is None:
            raise MediaError(f"video is truncated: no frame could be decoded near "
                             f"{float(target * self.stream.time_base):.2f} s")
        return frame


def load_video(src: MediaSource, sampling: VideoSampling | None = None,
               limits: MediaLimits | None = None) -> DecodedVideo:
    """Decode the sampled frames of ``src`` (path, bytes or binary file object)."""
    import av

    sampling, limits = sampling or VideoSampling(), limits or MediaLimits()
    container = _open(src, limits)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration_s = _duration_s(container, stream)
        _check(container, stream, duration_s, limits)
        times_s = sampling.times(duration_s)
        if len(times_s) > limits.max_video_frames:
            raise MediaError(f"asked for {len(times_s)} frames of a video; the limit is {limits.max_video_frames}")
        start, tb = stream.start_time or 0, stream.time_base
        sampler = _Sampler(container, stream)
        chosen = [sampler.frame_at(start + int(Fraction(t) / tb)) for t in times_s]
        rgb = {}
        for frame in chosen:
            if id(frame) not in rgb:
                rgb[id(frame)] = _to_rgb(frame)
        if len({tuple(t.shape) for t in rgb.values()}) > 1:
            raise MediaError("video changes resolution mid-stream; re-encode it at one size")
        frames = torch.stack([rgb[id(f)] for f in chosen])
        stamps = [round(float((f.pts - start) * tb), 6) for f in chosen]
        return DecodedVideo(frames=frames, timestamps_s=stamps, num_decoded=sampler.num_decoded,
                            duration_s=duration_s)
    except av.FFmpegError as e:
        raise MediaError(f"video is corrupt or truncated and cannot be decoded ({e.strerror or e})") from e
    finally:
        container.close()
