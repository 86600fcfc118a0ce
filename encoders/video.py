"""Sample frames from a user video with PyAV: seek to the keyframe before each sample, decode to it.

A sample at time t takes the frame shown at t: the last frame with pts <= t (the first frame if t
comes before it). Times come from pts, so variable frame rate is handled. For each sample the
decoder seeks back to the keyframe before t when that keyframe lies past the current position
(from the container's index; without an index, when t is over 2 s ahead), so a long clip sampled
sparsely decodes a few GOPs, not every frame. Display-matrix rotation is applied to the pixels, then
each frame is resized to ``frame_size`` as it is decoded, so no full-resolution stack is ever built.

Only self-contained containers are opened (``CONTAINERS``): FFmpeg refuses any other probed format
before reading its header (``format_whitelist``), and no demuxer may open a second file or URL
(``protocol_whitelist``), so a concat list, an HLS/DASH playlist or an image sequence naming server
files is a ``MediaError`` without touching them. Paths are opened by Python, never as FFmpeg URLs.

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
from typing import BinaryIO, Callable

import numpy as np
import torch

from encoders.limits import MediaError, MediaLimits, MediaSource, human_size, read_source
from encoders.patchify import resize

FrameSize = Callable[[int, int], tuple[int, int]]  # (height, width) after rotation -> size to resize to
_NO_INDEX_SEEK_S = 2.0
# demuxers that read only the upload (no playlists, lists or sequences of other files)
CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "ogg", "ivf", "gif")
_OPEN_OPTIONS = {"format_whitelist": ",".join(CONTAINERS),
                 "protocol_whitelist": "none"}  # no protocol has this name: every nested open fails


@dataclass
class VideoSampling:
    """Which frames to take, and how many decoder threads each video may use.

    ``decoder_threads`` is the FFmpeg decoding threads of one video (1: none beyond the caller's);
    a server decoding in N media workers next to torch's intra-op threads should keep
    N * decoder_threads + torch threads within the machine's cores.
    """

    num_frames: int | None = 8  # spread uniformly (segment centres); ignored when fps is set
    fps: float | None = None  # frames at 0, 1/fps, 2/fps, ... capped by max_frames (then spread uniformly)
    max_frames: int = 32
    decoder_threads: int = 1

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"VideoSampling.max_frames must be >= 1, got {self.max_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"VideoSampling.fps must be > 0, got {self.fps}")
        if self.fps is None and (self.num_frames is None or not 1 <= self.num_frames <= self.max_frames):
            raise ValueError(f"VideoSampling.num_frames must be in 1..max_frames ({self.max_frames}) "
                             f"when fps is not set, got {self.num_frames}")
        if isinstance(self.decoder_threads, bool) or not isinstance(self.decoder_threads, int) \
                or self.decoder_threads < 1:
            raise ValueError(f"VideoSampling.decoder_threads must be an integer >= 1, got {self.decoder_threads!r}")

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


def _source_file(src: MediaSource, limits: MediaLimits) -> BinaryIO:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"video file not found: {str(path)!r}")
        if path.stat().st_size > limits.max_video_bytes:
            raise MediaError(f"video is {human_size(path.stat().st_size)}; the limit is "
                             f"{human_size(limits.max_video_bytes)}")
        return open(path, "rb")
    return io.BytesIO(read_source(src, limits.max_video_bytes, "video"))


def _is_image(file: BinaryIO) -> bool:
    from PIL import Image

    file.seek(0)
    try:
        with Image.open(file):  # header only
            return True
    except Exception:  # not an image Pillow knows
        return False


def _open_container(file: BinaryIO):
    import av

    try:
        container = av.open(file, mode="r", container_options=_OPEN_OPTIONS)
    except av.FFmpegError as e:
        if _is_image(file):
            raise MediaError("this is an image, not a video; send it as an image") from e
        raise MediaError(f"not a readable video: the data is truncated, corrupt or not in an accepted container "
                         f"({', '.join(CONTAINERS)})") from e
    if not set(container.format.name.split(",")) & set(CONTAINERS):  # FFmpeg checked it already
        container.close()
        raise MediaError(f"video container {container.format.name!r} is not accepted; use one of "
                         f"{', '.join(CONTAINERS)}")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise MediaError(f"the file has no video stream ({', '.join(kinds)} streams only)")
    return container


def _duration_s(container, stream) -> float:
    if stream.duration is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        import av  # loaded already by _open_container

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


Resize = Callable[[np.ndarray, int, int], np.ndarray]  # uint8 [H, W, 3], height, width -> uint8 [height, width, 3]


def _to_rgb(frame, frame_size: FrameSize | None, threads: int, resizer: Resize = resize) -> torch.Tensor:
    rgb = frame.to_ndarray(format="rgb24", threads=threads)  # [H, W, 3]; swscale's threads (0 would be all cores)
    quarter_turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise display rotation
    if quarter_turns:
        rgb = np.rot90(rgb, quarter_turns, axes=(0, 1))  # a view
    height, width = rgb.shape[:2]
    h, w = frame_size(height, width) if frame_size else (height, width)
    if h < 1 or w < 1:
        raise MediaError(f"video frames are {width}x{height} pixels, too thin: they would shrink to {w}x{h}")
    if (h, w) != (height, width):
        rgb = resizer(rgb, h, w)
    return torch.from_numpy(np.ascontiguousarray(rgb))


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


class VideoReader:
    """An opened video whose header passed the limits; ``decode`` then samples its frames.

    ``width`` / ``height`` are the stored size: the display rotation is known only from decoded
    frames (PyAV exposes no stream display matrix), so a caller bounding the cost from the header
    considers both orientations.
    """

    def __init__(self, src: MediaSource, sampling: VideoSampling | None = None, limits: MediaLimits | None = None):
        import av

        self.sampling, self.limits = sampling or VideoSampling(), limits or MediaLimits()
        self._file = _source_file(src, self.limits)
        self.container = None
        try:
            self.container = _open_container(self._file)
            self.stream = self.container.streams.video[0]
            self.stream.codec_context.thread_type = "AUTO"  # frame threads where the codec has them, else slices
            self.stream.codec_context.thread_count = self.sampling.decoder_threads  # 1: no decoder threads
            self.duration_s = _duration_s(self.container, self.stream)
            _check(self.container, self.stream, self.duration_s, self.limits)
            self.times_s = self.sampling.times(self.duration_s)
            if len(self.times_s) > self.limits.max_video_frames:
                raise MediaError(f"asked for {len(self.times_s)} frames of a video; the limit is "
                                 f"{self.limits.max_video_frames}")
        except av.FFmpegError as e:
            self.close()
            raise MediaError(f"video is corrupt or truncated and cannot be read ({e.strerror or e})") from e
        except BaseException:
            self.close()
            raise

    @property
    def width(self) -> int:
        return self.stream.codec_context.width

    @property
    def height(self) -> int:
        return self.stream.codec_context.height

    @property
    def num_frames(self) -> int:
        return len(self.times_s)

    def decode(self, frame_size: FrameSize | None = None, times_s: list[float] | None = None,
               resizer: Resize = resize) -> DecodedVideo:
        """The frames shown at ``times_s`` (default: the sampling's), each resized by ``resizer`` to
        ``frame_size(height, width)`` (after rotation) as it is decoded."""
        import av

        start, tb = self.stream.start_time or 0, self.stream.time_base
        sampler = _Sampler(self.container, self.stream)
        frames, stamps, prev, rgb = [], [], None, None
        try:
            for t in self.times_s if times_s is None else times_s:
                frame = sampler.frame_at(start + int(Fraction(t) / tb))
                if frame is not prev:  # a frame shown at two sample times is converted once
                    prev, rgb = frame, _to_rgb(frame, frame_size, self.sampling.decoder_threads, resizer)
                frames.append(rgb)
                stamps.append(round(float((frame.pts - start) * tb), 6))
        except av.FFmpegError as e:
            raise MediaError(f"video is corrupt or truncated and cannot be decoded ({e.strerror or e})") from e
        if len({tuple(f.shape) for f in frames}) > 1:
            raise MediaError("video changes resolution mid-stream; re-encode it at one size")
        return DecodedVideo(frames=torch.stack(frames), timestamps_s=stamps, num_decoded=sampler.num_decoded,
                            duration_s=self.duration_s)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self._file.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_video(src: MediaSource, sampling: VideoSampling | None = None, limits: MediaLimits | None = None,
               frame_size: FrameSize | None = None) -> DecodedVideo:
    """Decode the sampled frames of ``src`` (path, bytes or binary file object); see ``VideoReader.decode``."""
    with VideoReader(src, sampling, limits) as reader:
        return reader.decode(frame_size)
