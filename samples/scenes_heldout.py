"""The held-out renderer: scenes, clips and beeps drawn by a program the training never used.

Training (``samples.scenes``, ``samples.beeps``) never imports this file. What differs, on purpose:

- drawing: per-pixel coverage from exact distances to each shape's edges (numpy, a one-pixel linear edge
  ramp), not Pillow's polygon and ellipse fills; squares tilted by at most 20 degrees and triangles upright
  and equilateral (training: any angle, outlines too);
- parameters: images of 40-480 pixels a side at aspect ratios up to 5:2, plain light backgrounds (one
  colour, no gradient, noise or pattern), colours ``samples.shapes.COLORS`` jittered by up to 20 per channel
  (training: hue / saturation / value jitter around its own hues); shape sizes from their own ranges;
- clips: 48-200 pixels a side, 6-40 frames at 5-25 fps, the shape travelling 45-85% of its free range;
- sounds: 0.4-2.6 s, beeps 100-320 ms shaped by a Hann window (training: linear ramps) at tones of one
  octave-spaced set per class, over brown noise (training: white or pink).

The answers use the same vocabulary (``samples.shapes``, ``samples.beeps``' classes and questions) and the
same ``samples.scenes.Medium`` holder.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from samples.beeps import BEEP_PROMPTS, SAMPLING_RATE
from samples.scenes import Medium, encode_mp4
from samples.shapes import COLORS, COUNT_WORDS, DIRECTIONS, PROMPTS, SHAPES

TONES = {"low": (196.0, 262.0, 330.0), "middle": (523.0, 659.0, 784.0), "high": (1568.0, 1976.0, 2349.0)}  # Hz
TASKS = (*PROMPTS, *BEEP_PROMPTS)  # color shape count describe motion beeps pitch
_SIZES = {1: (0.3, 0.55), 2: (0.24, 0.4), 3: (0.2, 0.3)}  # shape size / short side
_MOVE = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class Thing:
    kind: str
    color: str
    rgb: np.ndarray  # float32 [3]
    x: float
    y: float
    radius: float  # half the size
    tilt: float = 0.0  # radians, squares only

    def distance(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Signed distance (pixels) of each pixel centre to the shape's edge: negative inside."""
        dx, dy = xs - self.x, ys - self.y
        if self.kind == "circle":
            return np.hypot(dx, dy) - self.radius
        if self.kind == "square":
            c, s = math.cos(self.tilt), math.sin(self.tilt)
            u, v = np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c)
            half = self.radius * 0.7
            return np.maximum(u, v) - half
        # an upright equilateral triangle inscribed in the circle of ``radius``: max over its three edge lines
        d = None
        for k in range(3):
            angle = math.pi / 2 + k * 2 * math.pi / 3  # outward normals: down, up-left, up-right (y down)
            nx, ny = math.cos(angle), math.sin(angle)
            edge = dx * nx + dy * ny - self.radius / 2
            d = edge if d is None else np.maximum(d, edge)
        return d


def paint(width: int, height: int, background: np.ndarray, things: list[Thing]) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    pixels = np.broadcast_to(background, (height, width, 3)).astype(np.float32)
    for t in things:
        cover = np.clip(0.5 - t.distance(xs, ys), 0.0, 1.0)[..., None]
        pixels = pixels * (1 - cover) + t.rgb * cover
    return pixels.round().clip(0, 255).astype(np.uint8)


def _phrase(thing: Thing) -> str:
    return f"{'an' if thing.color[0] in 'aeiou' else 'a'} {thing.color} {thing.kind}"


def describe(things: list[Thing]) -> str:
    names = [_phrase(t) for t in sorted(things, key=lambda t: t.x)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class HeldoutScenes:
    """Held-out examples of every task; the same seed gives the same examples."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

    def _thing(self, x: float, y: float, radius: float) -> Thing:
        color = self.rng.choice(list(COLORS))
        rgb = np.clip(np.array(COLORS[color], np.float32) + [self.rng.uniform(-20, 20) for _ in range(3)], 0, 255)
        kind = self.rng.choice(SHAPES)
        tilt = math.radians(self.rng.uniform(-20, 20)) if kind == "square" else 0.0
        return Thing(kind, color, rgb.astype(np.float32), x, y, radius, tilt)

    def _background(self) -> np.ndarray:
        return np.array([self.rng.randint(225, 250)] * 3, np.float32) + [self.rng.randint(-5, 5) for _ in range(3)]

    def _canvas(self) -> tuple[int, int]:
        short = self.rng.randint(40, 300)
        long_side = min(480, round(short * self.rng.uniform(1.0, 2.5)))
        return (long_side, short) if self.rng.random() < 0.5 else (short, long_side)

    def scene(self, num_shapes: int) -> tuple[Image.Image, list[Thing]]:
        while True:
            width, height = self._canvas()
            short = min(width, height)
            lo, hi = _SIZES[num_shapes]
            things: list[Thing] = []
            for _ in range(300):
                if len(things) == num_shapes:
                    break
                r = self.rng.uniform(lo, hi) * short / 2
                x, y = self.rng.uniform(r + 2, width - r - 2), self.rng.uniform(r + 2, height - r - 2)
                if all(math.hypot(x - t.x, y - t.y) > r + t.radius + 3 and abs(x - t.x) > 0.8 * max(r, t.radius)
                       for t in things):
                    things.append(self._thing(x, y, r))
            if len(things) == num_shapes:
                return Image.fromarray(paint(width, height, self._background(), things)), things

    def clip(self) -> tuple[bytes, Thing, str]:
        width, height = 2 * self.rng.randint(24, 100), 2 * self.rng.randint(24, 100)
        if max(width, height) > 2 * min(width, height):
            width = height = max(width, height) // 2 * 2
        direction = self.rng.choice(DIRECTIONS)
        short = min(width, height)
        r = self.rng.uniform(0.13, 0.19) * short
        along = width if direction in ("left", "right") else height
        across = height if direction in ("left", "right") else width
        travel = self.rng.uniform(0.45, 0.85) * (along - 2 * r - 4)
        start = self.rng.uniform(r + 2, along - r - 2 - travel)
        if direction in ("left", "up"):
            start = along - start
        side = self.rng.uniform(r + 2, across - r - 2)
        x, y = (start, side) if direction in ("left", "right") else (side, start)
        thing, background = self._thing(x, y, r), self._background()
        num_frames, fps = self.rng.randint(6, 40), self.rng.randint(5, 25)
        dx, dy = _MOVE[direction]
        frames = []
        for i in range(num_frames):
            moved = Thing(thing.kind, thing.color, thing.rgb, x + dx * travel * i / (num_frames - 1),
                          y + dy * travel * i / (num_frames - 1), r, thing.tilt)
            frames.append(paint(width, height, background, [moved]))
        return encode_mp4(frames, fps, crf=23), thing, direction

    def sound(self, num_beeps: int, pitch: str) -> np.ndarray:
        rng = self.rng
        total_s = rng.uniform(0.4, 2.6)
        lengths = [rng.uniform(0.1, 0.32) for _ in range(num_beeps)]
        while sum(lengths) + 0.12 * num_beeps > total_s:
            total_s += 0.2
        spare = total_s - sum(lengths) - 0.12 * num_beeps
        total = round(total_s * SAMPLING_RATE)
        wave = np.zeros(total)
        freq = rng.choice(TONES[pitch])
        t = rng.uniform(0, spare / 2)
        for length in lengths:
            n = round(length * SAMPLING_RATE)
            start = round(t * SAMPLING_RATE)
            stop = min(total, start + n)
            phase = rng.uniform(0, 2 * math.pi)
            beep = np.sin(2 * np.pi * freq * np.arange(n) / SAMPLING_RATE + phase) * np.hanning(n)
            wave[start:stop] += beep[: stop - start]
            t += length + 0.12 + rng.uniform(0, spare / (2 * num_beeps))
        brown = np.cumsum(self.np_rng.standard_normal(total))
        brown -= np.convolve(brown, np.ones(401) / 401, mode="same")  # no drift below ~40 Hz
        brown /= brown.std() + 1e-9
        level = 10 ** (rng.uniform(-20, -8) / 20)
        return (level * (wave + 10 ** (-rng.uniform(15, 30) / 20) * brown)).astype(np.float32)

    def example(self, task: str) -> Medium:
        """A medium with the answer to ``task`` (``Medium.answers`` has that one task)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        if task in BEEP_PROMPTS:
            num_beeps, pitch = self.rng.randint(1, 3), self.rng.choice(list(TONES))
            answer = COUNT_WORDS[num_beeps - 1] if task == "beeps" else pitch
            return Medium({task: answer}, audio=self.sound(num_beeps, pitch))
        if task == "motion":
            video, _, direction = self.clip()
            return Medium({task: direction}, video=video)
        image, things = self.scene(1 if task in ("color", "shape") else self.rng.randint(1, 3))
        answer = {"color": lambda: things[0].color, "shape": lambda: things[0].kind,
                  "count": lambda: COUNT_WORDS[len(things) - 1], "describe": lambda: describe(things)}[task]()
        return Medium({task: answer}, image=image)
