"""Writes the demo's one-click examples to ``samples/media/``: three stills and one clip from the seeded
shape scenes the bundled model is trained on, each with its question in ``NAME.txt`` (read by serve/demo.py).

    python -m samples.make_media [--out samples/media] [--seed 2026]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from samples.shapes import SceneGenerator

MEDIA_DIR = Path(__file__).resolve().parent / "media"
TASKS = ("color", "count", "describe", "motion")  # one file each: stills, then the clip


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
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MEDIA_DIR)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    make_media(args.out, args.seed)


if __name__ == "__main__":
    main()
