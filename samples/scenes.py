"""Training scenes for the bundled Gemma 4 Unified model: many independent ways of drawing the same concepts.

The questions and answers are those of ``samples.shapes`` (colour, shape, count, describe, motion); what
changes is how a scene is drawn, so that the model learns shapes rather than one renderer:

- shapes filled or outlined, drawn aliased or supersampled (anti-aliased), squares and triangles rotated by
  any angle, triangles equilateral or isosceles, sizes relative to the image;
- backgrounds plain, two-colour gradients, noise, stripes or checks, light or mid-grey;
- colours jittered in hue, saturation and value around each name's hue (``HUES``);
- images from 32 to 512 pixels a side at aspect ratios from 1:6 to 6:1 (the processor resizes any of them to
  its ~70-cell grid), some saved and reloaded as JPEG at low quality;
- clips of 4-32 frames at 4-30 fps, 32-160 pixels a side, one shape crossing 40-90% of its free range,
  encoded to mp4 (libx264) at a random quality, so they take the user's video path.

Training-only questions, as for the Fuyu model: "Where is the shape?" on one-shape stills and "Where does the
shape start / end?" on clips ("top left" ... "bottom right"; not asked when the centre is near a midline).
They make the model find the shape's cells, which shape, count and motion need. A curriculum: ``hard`` is
the chance that a medium is drawn with the whole variety above; otherwise it is a filled, upright shape on a
plain background, kept lossless (training raises ``hard`` from a quarter to one).

All randomness comes from one ``random.Random(seed)`` (and numpy generators seeded from it): the same seed
gives the same media. The held-out evaluation draws with ``samples.scenes_heldout``, which shares nothing with
this file but the answer vocabulary.
"""
from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw

from samples.shapes import COUNT_WORDS, DIRECTIONS, SHAPES, Scene, Shape, where_answer

HUES = {"red": 0.0, "orange": 28.0, "yellow": 54.0, "green": 125.0, "blue": 222.0, "purple": 280.0}  # degrees
HUE_JITTER = 7.0
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows downwards
_SIZES = {1: (0.35, 0.7), 2: (0.26, 0.46), 3: (0.22, 0.36)}  # shape size / short side, by shape count


@dataclass
class Medium:
    """One still, clip or sound with the answer to every question that applies to it (training asks them all)."""

    answers: dict[str, str]  # task -> exact answer
    image: Image.Image | None = None
    video: bytes | None = None  # mp4
    audio: np.ndarray | None = None  # float32 mono at 16 kHz

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "video" if self.video is not None else "audio"


@dataclass
class Drawn:
    """A shape as drawn: its class, colour name and RGB, centre and size (pixels), and how it is drawn."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float  # diameter of the circle the shape fits in
    angle: float = 0.0  # radians (squares and triangles)
    outline: float = 0.0  # 0: filled; else the stroke width in pixels
    isosceles: bool = False  # a triangle with its base as wide as its height (else equilateral)

    def moved(self, dx: float, dy: float) -> Drawn:
        return Drawn(self.kind, self.color, self.rgb, self.cx + dx, self.cy + dy, self.size, self.angle,
                     self.outline, self.isosceles)

    def polygon(self, scale: float) -> list[tuple[float, float]]:
        r = self.size / 2
        if self.kind == "square":
            corners = [(math.cos(a) * r, math.sin(a) * r) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        elif self.isosceles:
            corners = [(0.0, -r), (r * 0.9, r * 0.8), (-r * 0.9, r * 0.8)]
        else:
            angles = (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
            corners = [(math.cos(a) * r, math.sin(a) * r) for a in angles]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return [((self.cx + x * c - y * s) * scale, (self.cy + x * s + y * c) * scale) for x, y in corners]

    def draw(self, draw: ImageDraw.ImageDraw, scale: float) -> None:
        width = max(1, round(self.outline * scale)) if self.outline else 0
        if self.kind == "circle":
            r = self.size / 2 * scale
            box = (self.cx * scale - r, self.cy * scale - r, self.cx * scale + r, self.cy * scale + r)
            if width:
                draw.ellipse(box, outline=self.rgb, width=width)
            else:
                draw.ellipse(box, fill=self.rgb)
        elif width:
            draw.polygon(self.polygon(scale), outline=self.rgb, width=width)
        else:
            draw.polygon(self.polygon(scale), fill=self.rgb)


def description(shapes: list[Drawn]) -> str:
    """"a red circle, a blue square and a green triangle": left to right, as ``samples.shapes`` says it."""
    return Scene(0, 0, (0, 0, 0), [Shape(s.kind, s.color, s.rgb, s.cx, s.cy, s.size) for s in shapes]).description()


@dataclass
class Style:
    """How one image (or every frame of one clip) is drawn."""

    background: str  # plain | gradient | noise | stripes | checks
    base: tuple[int, int, int]
    other: tuple[int, int, int]  # the gradient's far colour, the pattern's second colour
    noise: float  # std of the added noise (background "noise"), 0 otherwise
    period: int  # pixels per stripe / check
    vertical: bool  # gradient / stripe direction
    supersample: int  # 1: aliased edges
    jpeg_quality: int | None  # None: kept lossless


class SceneMaker:
    """Training media; the same seed gives the same stream."""

    def __init__(self, seed: int, hard: float = 1.0):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(self.rng.getrandbits(32))
        self.hard = hard  # the chance a medium gets the whole variety of drawing (else the plain kind)
        self._plain = False  # the medium being drawn is of the plain kind

    # colours, styles, backgrounds
    def color(self) -> tuple[str, tuple[int, int, int]]:
        name = self.rng.choice(list(HUES))
        hue = (HUES[name] + self.rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360 / 360
        light = name in ("yellow", "orange")  # dark yellow is olive, dark orange brown
        sat = self.rng.uniform(0.7, 1.0)
        value = self.rng.uniform(0.85, 1.0) if light else self.rng.uniform(0.6, 0.95)
        return name, tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, value))

    def _light(self, lo: int = 205) -> tuple[int, int, int]:
        base = self.rng.randint(lo, 252)
        return tuple(min(255, base + self.rng.randint(-10, 10)) for _ in range(3))

    def style(self, max_side: int) -> Style:
        background = self.rng.choices(("plain", "gradient", "noise", "stripes", "checks"), (3, 2, 2, 1, 1))[0]
        base = self._light(150 if self.rng.random() < 0.15 else 205)
        other = self._light(175)
        if self._plain:
            background = "plain"
        return Style(background, base, other, self.rng.uniform(3, 14) if background == "noise" else 0.0,
                     self.rng.randint(3, 16), self.rng.random() < 0.5,
                     self.rng.choice((1, 2, 3)) if max_side <= 256 else self.rng.choice((1, 2)),
                     self.rng.randint(25, 90) if self.rng.random() < 0.3 and not self._plain else None)

    def canvas(self, style: Style, width: int, height: int) -> Image.Image:
        s = style.supersample
        w, h = width * s, height * s
        base = np.array(style.base, np.float32)
        if style.background == "plain":
            return Image.new("RGB", (w, h), style.base)
        if style.background == "gradient":
            t = np.linspace(0, 1, h if style.vertical else w, dtype=np.float32)
            t = t[:, None, None] if style.vertical else t[None, :, None]
            pixels = base + t * (np.array(style.other, np.float32) - base) + np.zeros((h, w, 1), np.float32)
        elif style.background == "noise":
            pixels = base + self.np_rng.normal(0, style.noise, (h, w, 3)).astype(np.float32)
        else:
            ys, xs = np.mgrid[0:h, 0:w] // (style.period * s)
            on = (ys if style.vertical else xs) % 2 if style.background == "stripes" else (xs + ys) % 2
            pixels = np.where(on[..., None] == 1, np.array(style.other, np.float32), base)
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))

    def render(self, style: Style, width: int, height: int, shapes: list[Drawn]) -> Image.Image:
        image = self.canvas(style, width, height)
        draw = ImageDraw.Draw(image)
        for shape in shapes:
            shape.draw(draw, style.supersample)
        if style.supersample > 1:
            image = image.resize((width, height), Image.Resampling.BOX)
        return image

    # shapes and their placement
    def shape(self, size: float, cx: float, cy: float) -> Drawn:
        color, rgb = self.color()
        kind = self.rng.choice(SHAPES)
        outline = self.rng.uniform(0.06, 0.15) * size if self.rng.random() < 0.25 and not self._plain else 0.0
        angle = self.rng.uniform(0, 2 * math.pi) if self.rng.random() < 0.6 and not self._plain else 0.0
        return Drawn(kind, color, rgb, cx, cy, size, angle, max(outline, 1.5) if outline else 0.0,
                     self.rng.random() < 0.3)

    def size(self) -> tuple[int, int]:
        """Sides 32..512 pixels, aspect ratios 1:6..6:1 (mostly within 1:3..3:1)."""
        short = round(math.exp(self.rng.uniform(math.log(32), math.log(320))))
        ratio = math.exp(self.rng.uniform(0, math.log(6 if self.rng.random() < 0.15 else 3)))
        long_side = min(512, round(short * ratio))
        return (long_side, short) if self.rng.random() < 0.5 else (short, long_side)

    def place(self, width: int, height: int, num_shapes: int) -> list[Drawn] | None:
        short = min(width, height)
        lo, hi = _SIZES[num_shapes]
        shapes: list[Drawn] = []
        for _ in range(200):
            if len(shapes) == num_shapes:
                return shapes
            size = self.rng.uniform(lo, hi) * short
            cx = self.rng.uniform(size / 2 + 1, width - size / 2 - 1)
            cy = self.rng.uniform(size / 2 + 1, height - size / 2 - 1)
            apart = all(math.hypot(cx - s.cx, cy - s.cy) >= (size + s.size) / 2 + 2 for s in shapes)
            ordered = all(abs(cx - s.cx) >= 0.4 * max(size, s.size) for s in shapes)  # left to right is clear
            if apart and ordered:
                shapes.append(self.shape(size, cx, cy))
        return None

    def scene(self, num_shapes: int) -> tuple[Image.Image, list[Drawn]]:
        self._plain = self.rng.random() >= self.hard
        while True:
            width, height = self.size()
            shapes = self.place(width, height, num_shapes)
            if shapes is not None:
                break
        style = self.style(max(width, height))
        image = self.render(style, width, height, shapes)
        if style.jpeg_quality is not None:
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=style.jpeg_quality)
            image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return image, shapes

    def annotated_scene(self, num_shapes: int) -> Medium:
        image, shapes = self.scene(num_shapes)
        answers = {"count": COUNT_WORDS[num_shapes - 1], "describe": description(shapes)}
        if num_shapes == 1:
            answers.update(color=shapes[0].color, shape=shapes[0].kind)
            where = where_answer(shapes[0].cx, shapes[0].cy, *image.size)
            if where is not None:  # training only
                answers["where"] = where
        return Medium(answers, image=image)

    # clips
    def clip(self) -> tuple[bytes, Drawn, str, dict[str, str]]:
        """(mp4, the shape at the first frame, direction, where it starts and ends): 4-32 frames at 4-30 fps,
        32-160 px (even sides)."""
        self._plain = self.rng.random() >= self.hard
        width, height = 2 * self.rng.randint(16, 80), 2 * self.rng.randint(16, 80)
        if max(width, height) > 2.5 * min(width, height):
            height = width = min(width, height)
        direction = self.rng.choice(DIRECTIONS)
        size = self.rng.uniform(0.22, 0.4) * min(width, height)
        along = width if direction in ("left", "right") else height
        across = height if direction in ("left", "right") else width
        distance = self.rng.uniform(0.4, 0.9) * (along - size - 2)
        start = self.rng.uniform(size / 2 + 1, along - size / 2 - 1 - distance)
        if direction in ("left", "up"):
            start = along - start
        side = self.rng.uniform(size / 2 + 1, across - size / 2 - 1)
        cx, cy = (start, side) if direction in ("left", "right") else (side, start)
        shape = self.shape(size, cx, cy)
        style = self.style(max(width, height))
        num_frames, fps = self.rng.randint(4, 32), self.rng.choice((4, 6, 8, 10, 12, 15, 24, 30))
        dx, dy = _STEP[direction]
        frames = [np.asarray(self.render(style, width, height, [shape.moved(dx * t, dy * t)]))
                  for t in (distance * i / (num_frames - 1) for i in range(num_frames))]
        last = shape.moved(dx * distance, dy * distance)
        places = {"start": where_answer(shape.cx, shape.cy, width, height),
                  "end": where_answer(last.cx, last.cy, width, height)}
        return (encode_mp4(frames, fps, crf=self.rng.randint(16, 32)), shape, direction,
                {k: v for k, v in places.items() if v is not None})

    def annotated_clip(self) -> Medium:
        video, shape, direction, places = self.clip()
        return Medium({"motion": direction, "color": shape.color, "shape": shape.kind, **places}, video=video)


def encode_mp4(frames: list[np.ndarray], fps: int, crf: int = 20, audio: np.ndarray | None = None,
               sampling_rate: int = 16_000) -> bytes:
    """uint8 RGB frames (even sides) -> H.264 mp4 bytes; ``audio``: a float mono track (AAC) beside them."""
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        track = container.add_stream("aac", rate=sampling_rate, layout="mono") if audio is not None else None
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if track is not None:
            sound = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None], format="fltp", layout="mono")
            sound.rate = sampling_rate
            for packet in list(track.encode(sound)) + list(track.encode(None)):
                container.mux(packet)
    return buf.getvalue()
