"""Writes the demo's one-click examples to ``samples/media/``: three stills and one clip from the seeded
shape scenes, and one sound of beeps (``samples.beeps``), each with its question in ``NAME.txt`` (read by
serve/demo.py; the sound is shown where the served model takes audio).

    python -m samples.make_media [--out samples/media] [--seed 2026]
"""
from __future__ import annotations

import argparse
import io
import wave
from pathlib import Path

import numpy as np

from samples.beeps import BEEP_PROMPTS, SAMPLING_RATE, BeepMaker
from samples.shapes import SceneGenerator

MEDIA_DIR = Path(__file__).resolve().parent / "media"
TASKS = ("color", "count", "describe", "motion")  # one file each: stills, then the clip
SOUND_TASK = "beeps"


def wav_bytes(samples: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> bytes:
    """Float mono samples in [-1, 1] -> a 16-bit PCM WAV file."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sampling_rate)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def make_media(out: Path = MEDIA_DIR, seed: int = 2026) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(seed)
    written = []
    for i, task in enumerate(TASKS, 1):
        example = generator.example(task)
        path = out / f"{i}_{task}.{'mp4' if example.video else 'png'}"
        if example.video:
            path.write_bytes(example.video)
        else:
            example.image.save(path)
        path.with_suffix(".txt").write_text(example.question + "\n")
        written.append(path)
        print(f"{path.name}: {example.question} -> {example.answer}")
    sound = BeepMaker(seed).annotated()
    path = out / f"{len(TASKS) + 1}_{SOUND_TASK}.wav"
    path.write_bytes(wav_bytes(sound.audio))
    path.with_suffix(".txt").write_text(BEEP_PROMPTS[SOUND_TASK] + "\n")
    written.append(path)
    print(f"{path.name}: {BEEP_PROMPTS[SOUND_TASK]} -> {sound.answers[SOUND_TASK]} ({sound.answers['pitch']})")
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MEDIA_DIR)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    make_media(args.out, args.seed)


if __name__ == "__main__":
    main()
