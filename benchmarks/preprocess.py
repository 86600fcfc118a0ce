"""Preprocessing throughput: decode + patchify + interleave vs FuyuProcessor and vs decoding alone.

    python benchmarks/preprocess.py [--repeat 3]

Inputs are made here: 1080x1920 JPEGs (scikit-image photographs scaled up, quality 90) at Fuyu's
default 1080x1920 / patch 30, small PNGs, and a 60 s 720p H.264 clip (keyframe every 2 s).
Rates are images/s on one thread; the best of ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import VideoSampling, load_image, load_video  # noqa: E402
from samples.random_checkpoint import make_checkpoint  # noqa: E402
from tokenization import Interleaver  # noqa: E402

PROMPT = "What is in this picture?"


def _jpegs(count: int) -> list[bytes]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(count):
        im = Image.fromarray(photos[i % len(photos)]).resize((1920, 1080), Image.BICUBIC)
        noise = np.random.default_rng(i).integers(-8, 9, (1080, 1920, 3))
        im = Image.fromarray((np.asarray(im) + noise).clip(0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _pngs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = 120 + 7 * i, 160 + 5 * i
        yy, xx = np.mgrid[:h, :w]
        a = np.stack([(xx * 3 + i) % 256, (yy * 2) % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
        a[rng.random((h, w)) < 0.05] = 255
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _rate(fn, items, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def _clip_720p(seconds: int = 60, fps: int = 30) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        base = np.asarray(Image.fromarray(_photo()).resize((1280, 720)))
        for i in range(seconds * fps):
            frame = np.roll(base, 4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--num-jpegs", type=int, default=12)
    args = parser.parse_args()
    from transformers import FuyuProcessor

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(tmp, target_height=1080, target_width=1920, patch_size=30)
        processor = FuyuProcessor.from_pretrained(folder)
        interleaver = Interleaver.from_pretrained(folder)
    cases = [("1080p JPEG", _jpegs(args.num_jpegs)), ("small PNG", _pngs(40))]
    print(f"{'input':<12} {'ours img/s':>11} {'Fuyu img/s':>11} {'decode img/s':>13} {'vs Fuyu':>8} {'vs decode':>10}")
    for name, items in cases:
        ours = _rate(lambda b: interleaver.build(PROMPT, images=[b]), items, args.repeat)
        fuyu = _rate(lambda b: processor(images=Image.open(io.BytesIO(b)), text=PROMPT,
                                         return_legacy_image_output=False), items, args.repeat)
        decode = _rate(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), items, args.repeat)
        ours_decode = _rate(load_image, items, args.repeat)
        print(f"{name:<12} {ours:>11.1f} {fuyu:>11.1f} {decode:>13.1f} {ours / fuyu:>7.2f}x "
              f"{decode / ours:>9.2f}x   (our decode alone {ours_decode:.1f} img/s)")
    clip = _clip_720p()
    start = time.perf_counter()
    video = load_video(clip, VideoSampling(num_frames=8))
    elapsed = time.perf_counter() - start
    container = av.open(io.BytesIO(clip))
    total = container.streams.video[0].frames
    container.close()
    print(f"video 60 s 720p, 8 frames: {len(video.timestamps_s) / elapsed:.1f} sampled frames/s "
          f"({elapsed * 1000:.0f} ms), decoded {video.num_decoded} of {total} frames "
          f"({100 * video.num_decoded / total:.1f}%)")
    start = time.perf_counter()
    interleaver.build("<video>", videos=[video])
    print(f"video patchify + interleave of the 8 frames: {(time.perf_counter() - start) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
