"""Shared by the Gemma 4 Unified tests: a random checkpoint folder, transformers' processor loaded from it (the
reference), our layout loaded from it, and clips written with PyAV.

    from gemma4_fixtures import gemma4_folder, gemma4_processor, gemma4_layout  # noqa: F401 (fixtures)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samples.random_gemma4_unified import make_checkpoint
from tokenization.gemma4_unified import Gemma4UnifiedLayout


@pytest.fixture(scope="session")
def gemma4_folder(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-gemma4"), seed=0)


@pytest.fixture(scope="session")
def gemma4_processor(gemma4_folder):
    from transformers import Gemma4UnifiedProcessor

    return Gemma4UnifiedProcessor.from_pretrained(gemma4_folder)


@pytest.fixture(scope="session")
def gemma4_layout(gemma4_folder) -> Gemma4UnifiedLayout:
    return Gemma4UnifiedLayout.from_pretrained(gemma4_folder)


def sample_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: noise with a horizontal ramp in green."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 1] = (np.arange(w) * 255 // max(w - 1, 1)).astype(np.uint8)[None, :]
    return img



def write_clip(path: Path, num_frames: int, fps: int, width: int = 200, height: int = 120,
               audio_rate: int | None = None, codec: str = "libx264") -> Path:
    """A clip (H.264 by default; the container from the suffix) whose frame i is recognisable (its red level and
    a moving green block); with ``audio_rate``, an AAC stereo sine track too."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=audio_rate, layout="stereo") if audio_rate else None
        rng = np.random.default_rng(1)
        for i in range(num_frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (i * 3) % 256
            img[(i * 3) % height:, : (i * 7) % width, 1] = 200
            img[::7, ::5, 2] = rng.integers(0, 256)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if audio is not None:
            t = np.arange(int(audio_rate * num_frames / fps)) / audio_rate
            wave = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)])).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="stereo")
            frame.rate = audio_rate
            for packet in list(audio.encode(frame)) + list(audio.encode(None)):
                container.mux(packet)
    return path


def all_frames(path: Path):
    """Every frame of the clip (what the reference samples from) and transformers' ``VideoMetadata`` for it,
    read as transformers' PyAV reader reads it (frame count and average rate of the stream; the decoded count
    where the header has none, as in WebM)."""
    import av
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        meta = VideoMetadata(total_num_frames=stream.frames or len(frames), fps=float(stream.average_rate))
    return frames, meta
