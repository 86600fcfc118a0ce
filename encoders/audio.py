"""Decode the audio stream of an upload with PyAV, resampled to mono float32 at the family's rate.

Only containers from an allow-list are opened, recognised by their first bytes and opened with that
demuxer named explicitly, so FFmpeg never probes for (or follows) playlists, ``concat`` lists or image
patterns that name other files: WAV, MP3, FLAC, Ogg, MP4/M4A, Matroska/WebM, ADTS AAC. A video file's
audio track works too. Limits (``AudioLimits``) are checked on the size, on the header duration before
decoding, and on the decoded length while decoding. Downmix and resampling are FFmpeg's (libswresample).

PyAV is imported on the first audio, not with the package.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np

from encoders.limits import MediaError, MediaSource, human_size, read_source

FORMATS = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "Ogg", "mp4": "MP4/M4A", "matroska": "Matroska/WebM",
           "aac": "ADTS AAC"}


@dataclass
class AudioLimits:
    max_audio_bytes: int = 64 * 1024 * 1024
    max_audio_duration_s: float = 300.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AudioLimits.{f.name} must be a positive number, got {value!r}")


def sniff_format(data: bytes) -> str:
    """The allow-listed demuxer for ``data`` from its first bytes, or ``MediaError``."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3":
        return "mp3"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 3
        if layer == 0 and head[1] & 0xF0 == 0xF0:
            return "aac"
        if layer == 1:
            return "mp3"
    raise MediaError("not a supported audio file: expected " + ", ".join(FORMATS.values()))


def _mono(frame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1)  # flt, mono: [1, n] packed


def load_audio(src: MediaSource, sampling_rate: int = 16_000, limits: AudioLimits | None = None) -> np.ndarray:
    """Decode ``src`` (path, bytes or binary file object) -> float32 mono [samples] at ``sampling_rate``."""
    import av

    limits = limits if isinstance(limits, AudioLimits) else AudioLimits()
    data = read_source(src, limits.max_audio_bytes, "audio")
    fmt = sniff_format(data)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt,
                            container_options={"protocol_whitelist": "none"})  # no nested file or URL, as video
    except av.FFmpegError as e:
        raise MediaError(f"not a readable {FORMATS[fmt]} file: the data is truncated or corrupt") from e
    try:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise MediaError(f"the file has no audio stream ({', '.join(kinds)} streams only)")
        stream = container.streams.audio[0]
        header_s = (float(stream.duration * stream.time_base) if stream.duration else
                    container.duration / av.time_base if container.duration else 0.0)
        max_s = limits.max_audio_duration_s
        if header_s > max_s:
            raise MediaError(f"audio is {header_s:.1f} s long; the limit is {max_s:g} s")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks, num_samples = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(_mono(out))
                num_samples += chunks[-1].size
            if num_samples > max_s * sampling_rate:
                raise MediaError(f"audio is longer than the limit of {max_s:g} s")
        chunks += [_mono(out) for out in resampler.resample(None)]
    except av.FFmpegError as e:
        raise MediaError(f"audio is corrupt or truncated and cannot be decoded ({e.strerror or e})") from e
    finally:
        container.close()
    wave = np.concatenate(chunks) if chunks else np.empty(0, np.float32)
    if wave.size == 0:
        raise MediaError(f"audio has no samples ({human_size(len(data))} of {FORMATS[fmt]} decoded to nothing)")
    return wave.astype(np.float32, copy=False)
