"""Seeded scenes for the bundled model: 1-3 colored shapes on a light background, and short clips of one
moving shape (encoded to mp4 with PyAV, so they go through the same video path as a user's file).

Each ``Example`` is one question with its exact answer (lower case, one line):

    "What color is the shape?"       red | green | blue | yellow | purple | orange   (one shape)
    "What shape is this?"            circle | square | triangle                      (one shape)
    "How many shapes are there?"     one | two | three
    "Describe the image."            "a red circle, a blue square and a green triangle" (left to right)
    "Which way is the shape moving?" left | right | up | down                        (a video)

Training also asks where the shape is ("Where is the shape?" -> "top left", and for a clip where it starts
and ends): questions the issue does not list, which give the tiny model a direct signal for the skill that
motion, counting and left-to-right order need and that the Fuyu architecture leaves it to learn, namely where
a patch lies in its image (Fuyu has no 2-D position embedding, only 1-D RoPE over the token stream).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 80, 225),
    "yellow": (235, 210, 25), "purple": (135, 55, 180), "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows downwards
PROMPTS = {
    "color": "What color is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "describe": "Describe the image.",
    "motion": "Which way is the shape moving?",
}
TASKS = tuple(PROMPTS)
WHERE_PROMPTS = {  # training only: the answer is "top left", "bottom right", ...
    "where": "Where is the shape?",
    "start": "Where does the shape start?",
    "end": "Where does the shape end?",
}
ALL_PROMPTS = {**PROMPTS, **WHERE_PROMPTS}
PLACES = ("top", "bottom", "left", "right")
_WHERE_MARGIN = 0.1  # a centre within 10% of a midline is not asked about: its half would be a guess
_SUPERSAMPLE = 2  # draw at 2x, then downsample: antialiased edges
_COLOR_JITTER = 18
_CLIP_SIZES = (32, 40, 48)  # even sides (yuv420p)
SHADE = 48  # the light background is lit from the top left: red falls left to right, blue top to bottom


@dataclass
class Shape:
    kind: str  # circle | square | triangle
    color: str
    rgb: tuple[int, int, int]
    cx: float  # centre, pixels
    cy: float
    size: float  # bounding-box side, pixels

    def box(self, margin: float = 0.0) -> tuple[float, float, float, float]:
        half = self.size / 2 + margin
        return self.cx - half, self.cy - half, self.cx + half, self.cy + half

    def draw(self, draw: ImageDraw.ImageDraw, scale: int) -> None:
        x0, y0, x1, y1 = (v * scale for v in self.box())
        if self.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=self.rgb)
        elif self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=self.rgb)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=self.rgb)


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape]
    shade: int = 0  # red falls by this much left to right, blue top to bottom (a lit stage)

    def _canvas(self, s: int) -> Image.Image:
        if not self.shade:
            return Image.new("RGB", (self.width * s, self.height * s), self.background)
        pixels = np.empty((self.height * s, self.width * s, 3), dtype=np.float32)
        pixels[:] = self.background
        pixels[..., 0] -= self.shade * np.linspace(0, 1, self.width * s)[None, :]
        pixels[..., 2] -= self.shade * np.linspace(0, 1, self.height * s)[:, None]
        return Image.fromarray(pixels.round().astype(np.uint8))

    def render(self) -> Image.Image:
        s = _SUPERSAMPLE
        image = self._canvas(s)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            shape.draw(draw, s)
        return image.resize((self.width, self.height), Image.Resampling.BOX)

    def description(self) -> str:
        names = [f"{'an' if s.color == 'orange' else 'a'} {s.color} {s.kind}"
                 for s in sorted(self.shapes, key=lambda s: s.cx)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass
class Clip:
    width: int
    height: int
    background: tuple[int, int, int]
    shape: Shape  # at the first frame
    direction: str  # left | right | up | down
    distance: float  # pixels travelled from the first frame to the last
    num_frames: int
    fps: int
    shade: int = 0

    def frames(self) -> list[Image.Image]:
        dx, dy = _STEP[self.direction]
        out = []
        for i in range(self.num_frames):
            t = self.distance * i / (self.num_frames - 1)
            moved = Shape(self.shape.kind, self.shape.color, self.shape.rgb, self.shape.cx + dx * t,
                          self.shape.cy + dy * t, self.shape.size)
            out.append(Scene(self.width, self.height, self.background, [moved], self.shade).render())
        return out

    def to_mp4(self) -> bytes:
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "20"}
            for frame in self.frames():
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buf.getvalue()


@dataclass
class Example:
    task: str
    question: str
    answer: str
    image: Image.Image | None = None
    video: bytes | None = None  # mp4


@dataclass
class Annotated:
    """One still or clip with the answer to every question that applies to it (training asks them all)."""
    answers: dict[str, str]  # task -> exact answer
    image: Image.Image | None = None
    video: bytes | None = None  # mp4


def where_answer(cx: float, cy: float, width: int, height: int) -> str | None:
    """"top left" ... "bottom right" for a centre, or None when it lies near a midline."""
    if min(abs(cx / width - 0.5), abs(cy / height - 0.5)) < _WHERE_MARGIN:
        return None
    return f"{'top' if cy < height / 2 else 'bottom'} {'left' if cx < width / 2 else 'right'}"


class SceneGenerator:
    """All randomness comes from one ``random.Random(seed)``: the same seed gives the same examples."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _color(self) -> tuple[str, tuple[int, int, int]]:
        name = self.rng.choice(list(COLORS))
        rgb = tuple(min(255, max(0, c + self.rng.randint(-_COLOR_JITTER, _COLOR_JITTER))) for c in COLORS[name])
        return name, rgb

    def _background(self) -> tuple[int, int, int]:
        base = self.rng.randint(218, 250)
        return tuple(min(255, base + self.rng.randint(-6, 6)) for _ in range(3))

    def _shape(self, size: float, cx: float, cy: float) -> Shape:
        color, rgb = self._color()
        return Shape(self.rng.choice(SHAPES), color, rgb, cx, cy, size)

    def scene(self, num_shapes: int | None = None) -> Scene:
        """Images of 48..224 pixels a side, aspect 1:2..2:1; shapes apart, left-to-right order unambiguous."""
        num_shapes = num_shapes or self.rng.randint(1, 3)
        while True:
            short = self.rng.randint(48, 160)
            ratio = self.rng.uniform(1.0, 2.0)
            long_side = min(224, int(short * ratio))
            width, height = (long_side, short) if self.rng.random() < 0.5 else (short, long_side)
            shapes = self._place(width, height, num_shapes)
            if shapes is not None:
                return Scene(width, height, self._background(), shapes, SHADE)

    def _place(self, width: int, height: int, num_shapes: int) -> list[Shape] | None:
        short = min(width, height)
        lo, hi = {1: (0.3, 0.55), 2: (0.22, 0.42), 3: (0.22, 0.34)}[num_shapes]
        shapes: list[Shape] = []
        for _ in range(200):
            if len(shapes) == num_shapes:
                return shapes
            size = self.rng.uniform(lo, hi) * short
            cx = self.rng.uniform(size / 2 + 2, width - size / 2 - 2)
            cy = self.rng.uniform(size / 2 + 2, height - size / 2 - 2)
            apart = all(abs(cx - s.cx) >= (size + s.size) / 2 + 2 or abs(cy - s.cy) >= (size + s.size) / 2 + 2
                        for s in shapes)
            ordered = all(abs(cx - s.cx) >= 0.4 * max(size, s.size) for s in shapes)
            if apart and ordered:
                shapes.append(self._shape(size, cx, cy))
        return None

    def clip(self) -> Clip:
        """One shape crossing 50-90% of its free range along one axis, 4..16 frames at 4..12 fps."""
        width, height = self.rng.choice(_CLIP_SIZES), self.rng.choice(_CLIP_SIZES)
        direction = self.rng.choice(DIRECTIONS)
        size = self.rng.uniform(0.25, 0.38) * min(width, height)
        along = width if direction in ("left", "right") else height
        distance = self.rng.uniform(0.5, 0.9) * (along - size - 4)
        start = self.rng.uniform(size / 2 + 2, along - size / 2 - 2 - distance)
        if direction in ("left", "up"):
            start = along - start
        across = self.rng.uniform(size / 2 + 2, (height if direction in ("left", "right") else width) - size / 2 - 2)
        cx, cy = (start, across) if direction in ("left", "right") else (across, start)
        return Clip(width, height, self._background(), self._shape(size, cx, cy), direction, distance,
                    num_frames=self.rng.randint(4, 16), fps=self.rng.choice((4, 6, 8, 10, 12)), shade=SHADE)

    def annotated_scene(self, num_shapes: int | None = None) -> Annotated:
        scene = self.scene(num_shapes)
        answers = {"count": COUNT_WORDS[len(scene.shapes) - 1], "describe": scene.description()}
        if len(scene.shapes) == 1:
            shape = scene.shapes[0]
            answers.update(color=shape.color, shape=shape.kind)
            if (where := where_answer(shape.cx, shape.cy, scene.width, scene.height)) is not None:
                answers["where"] = where
        return Annotated(answers, image=scene.render())

    def annotated_clip(self, tasks=("motion", "color", "shape", "start", "end")) -> Annotated:
        clip = self.clip()
        answers = {"motion": clip.direction, "color": clip.shape.color, "shape": clip.shape.kind}
        dx, dy = _STEP[clip.direction]
        ends = {"start": (clip.shape.cx, clip.shape.cy),
                "end": (clip.shape.cx + dx * clip.distance, clip.shape.cy + dy * clip.distance)}
        for task, (x, y) in ends.items():
            if (where := where_answer(x, y, clip.width, clip.height)) is not None:
                answers[task] = where
        return Annotated({t: a for t, a in answers.items() if t in tasks}, video=clip.to_mp4())

    def example(self, task: str, video: bool = False) -> Example:
        """``video``: ask ``color`` / ``shape`` about a clip of one moving shape instead of a still. ``where``
        (training only, no target) asks about a one-shape still whose centre is clear of the midlines."""
        if task == "where":
            while True:
                scene = self.scene(1)
                shape = scene.shapes[0]
                if (where := where_answer(shape.cx, shape.cy, scene.width, scene.height)) is not None:
                    return Example(task, WHERE_PROMPTS["where"], where, image=scene.render())
        if task not in PROMPTS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        question = PROMPTS[task]
        if task == "motion" or video:
            if task not in ("motion", "color", "shape"):
                raise ValueError(f"a clip has one shape: ask motion, color or shape about it, not {task!r}")
            clip = self.clip()
            answer = {"motion": clip.direction, "color": clip.shape.color, "shape": clip.shape.kind}[task]
            return Example(task, question, answer, video=clip.to_mp4())
        scene = self.scene(1 if task in ("color", "shape") else None)
        answer = {"color": lambda: scene.shapes[0].color, "shape": lambda: scene.shapes[0].kind,
                  "count": lambda: COUNT_WORDS[len(scene.shapes) - 1], "describe": scene.description}[task]()
        return Example(task, question, answer, image=scene.render())
