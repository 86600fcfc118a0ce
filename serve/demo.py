"""The Gradio demo, mounted at ``/demo`` on the API's own Starlette app.

It submits to the same ``AsyncEngine`` as ``/v1/generate`` (``app.state.front``): one model, one KV
pool, and demo requests batch with API requests. The answer streams as the engine steps; the stats
line shows tokens/s, time to first token and the prompt-token count (cached tokens included). The audio
input (upload or microphone), its example questions and the sample sounds are shown on page load when the
served family takes audio (``AsyncEngine.modalities``); a sound sent to a model that takes none (through the
page's API) is answered with a message saying so.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outbound connection

import gradio as gr  # noqa: E402
from starlette.applications import Starlette  # noqa: E402

from pipeline.sampling import SamplingParams  # noqa: E402
from serve.chat import ChatTemplate, user_turn  # noqa: E402
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError, QueueFullError  # noqa: E402

DEMO_PATH = "/demo"
MEDIA_DIR = Path(__file__).resolve().parent.parent / "samples" / "media"
IMAGE_QUESTIONS = ("What color is the shape?", "What shape is this?", "How many shapes are there?",
                   "Describe the image.")
VIDEO_QUESTION = "Which way is the shape moving?"
QUESTIONS = IMAGE_QUESTIONS + (VIDEO_QUESTION,)
AUDIO_QUESTIONS = ("How many beeps are there?", "Is the tone low, middle or high?")  # the bundled model's
AUDIO_QUESTION = AUDIO_QUESTIONS[0]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a")
READY_WAIT_S = 120.0  # a page opened while the model loads waits this long to learn what it takes


@dataclass
class DemoExample:
    """One click: a sample image, clip or sound with its question (a ``NAME.txt`` beside the file overrides it)."""

    image: str | None
    video: str | None
    question: str
    audio: str | None = None

    def row(self) -> list:
        return [self.image, self.video, self.audio, self.question]


def find_examples(media_dir: Path = MEDIA_DIR, with_audio: bool = False) -> list[DemoExample]:
    """Images, clips, then (``with_audio``) sounds from ``media_dir`` in name order; none when it is missing."""
    media_dir = Path(media_dir)
    files = sorted(media_dir.iterdir()) if media_dir.is_dir() else []
    kinds = (("image", IMAGE_SUFFIXES, "Describe the image."), ("video", VIDEO_SUFFIXES, VIDEO_QUESTION),
             ("audio", AUDIO_SUFFIXES, AUDIO_QUESTION))[:3 if with_audio else 2]
    examples = []
    for kind, suffixes, default in kinds:
        for path in files:
            if path.suffix.lower() not in suffixes:
                continue
            sidecar = path.with_suffix(".txt")
            question = sidecar.read_text().strip().splitlines()[0] if sidecar.is_file() else ""
            media = {k: str(path) if k == kind else None for k in ("image", "video", "audio")}
            examples.append(DemoExample(question=question or default, **media))
    return examples


@dataclass
class GenerationStats:
    """What the stats line shows for one answer."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None  # since submit (preprocessing included)
    elapsed_s: float = 0.0
    finish_reason: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate: tokens after the first over the time since the first."""
        if self.first_token_s is None or self.completion_tokens < 2 or self.elapsed_s <= self.first_token_s:
            return None
        return (self.completion_tokens - 1) / (self.elapsed_s - self.first_token_s)

    def markdown(self) -> str:
        rate = f"**{self.tokens_per_s:.1f} tokens/s**" if self.tokens_per_s is not None else "**- tokens/s**"
        first = f"{self.first_token_s:.2f} s" if self.first_token_s is not None else "-"
        state = f"finished: {self.finish_reason}" if self.finish_reason else "generating"
        return (f"{rate} · {self.completion_tokens} tokens in {self.elapsed_s:.2f} s · first token after {first}"
                f" · prompt: {self.prompt_tokens} tokens ({self.cached_tokens} cached) · {state}")


class Demo:
    """The handler behind the page: one streamed answer per click, on the shared engine."""

    def __init__(self, front: AsyncEngine, template: ChatTemplate | None = None):
        self.front, self.template = front, template or ChatTemplate(None)

    async def takes_audio(self) -> bool:
        """Whether the served family takes audio (waits for the engine to load)."""
        await self.front.wait_ready(READY_WAIT_S)
        return "audio" in self.front.modalities

    async def show_audio(self) -> tuple[dict, dict, dict]:
        """On page load: the audio input, its example questions and sample sounds, shown when the model takes
        audio."""
        visible = await self.takes_audio()
        return gr.update(visible=visible), gr.update(visible=visible), gr.update(visible=visible)

    async def answer(self, image: str | None, video: str | None, audio: str | None, question: str,
                     max_tokens: float, temperature: float, top_p: float, top_k: float, seed: float | None
                     ) -> AsyncIterator[tuple[str, str]]:
        """Yields (answer so far, stats markdown) after every engine step that adds text."""
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question, or pick one of the example questions.")
        if not image and not video and not audio:
            raise gr.Error("Upload an image or a video (or a sound, where the model takes audio), or click one of "
                           "the sample media.")
        try:
            params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                                    top_k=int(top_k), seed=None if seed is None or seed < 0 else int(seed))
        except (TypeError, ValueError) as exc:
            raise gr.Error(f"Bad sampling setting: {exc}") from exc
        if audio and not await self.takes_audio():
            raise gr.Error("The served model takes images and videos, not audio: ask about an image or a video "
                           "(a Gemma 4 Unified checkpoint listens).")
        start = time.perf_counter()
        try:
            kinds = ["image"] * bool(image) + ["video"] * bool(video) + ["audio"] * bool(audio)
            prompt = user_turn(self.template, question, kinds)  # the checkpoint's chat template, as the chat API
            stream = await self.front.submit(prompt, [image] if image else [], [video] if video else [], params,
                                             audios=[audio] if audio else [])
        except (ValueError, QueueFullError, NotReadyError) as exc:  # bad media / prompt too long, busy, loading
            raise gr.Error(str(exc)) from exc
        stats = GenerationStats()
        text = ""
        try:
            async for out in stream:
                now = time.perf_counter() - start
                if out.delta_token_ids and stats.first_token_s is None:
                    stats.first_token_s = now
                stats.prompt_tokens, stats.cached_tokens = out.usage.prompt_tokens, out.usage.cached_tokens
                stats.completion_tokens, stats.elapsed_s = out.usage.completion_tokens, now
                stats.finish_reason = out.finish_reason
                text += out.delta_text  # outputs are deltas; the final one also has the whole text
                if out.finished and out.text:
                    text = out.text
                if out.delta_text or out.finished:
                    yield text, stats.markdown()
        except EngineDeadError as exc:
            raise gr.Error(str(exc)) from exc
        finally:
            stream.close()  # aborts it when the page stopped or left mid-answer


def build_demo(front: AsyncEngine, examples: list[DemoExample] | None = None, max_tokens_limit: int = 512,
               template: ChatTemplate | None = None) -> gr.Blocks:
    demo = Demo(front, template)
    with gr.Blocks(title="fusionserve demo", analytics_enabled=False) as blocks:
        gr.Markdown("## fusionserve\nAsk about an image, a short video or (where the model takes audio) a sound. "
                    "The answer streams from the same engine as the HTTP API.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload"],
                                 elem_id="image")
                video = gr.Video(label="Video", sources=["upload"], include_audio=True, format=None,
                                 elem_id="video")
                audio = gr.Audio(label="Audio", type="filepath", sources=["upload", "microphone"], format=None,
                                 visible=False, elem_id="audio")  # format=None: the upload as sent
            with gr.Column():
                question = gr.Textbox(label="Question", value=QUESTIONS[0], lines=2, elem_id="question")
                gr.Examples([[q] for q in QUESTIONS], inputs=[question], label="Example questions")
                with gr.Column(visible=False) as audio_questions:
                    gr.Examples([[q] for q in AUDIO_QUESTIONS], inputs=[question], label="Example audio questions")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", elem_id="stop")
                answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
                stats = gr.Markdown(elem_id="stats")
                with gr.Accordion("Sampling", open=False):
                    max_tokens = gr.Slider(1, max_tokens_limit, value=32, step=1, label="Max tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0: all)")
                    seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed (-1: random)")
        pictures = [e.row() for e in examples or () if not e.audio]
        sounds = [e.row() for e in examples or () if e.audio]
        if pictures:
            gr.Examples(pictures, inputs=[image, video, audio, question], label="Sample media", examples_per_page=12)
        with gr.Column(visible=False) as audio_samples:
            if sounds:
                gr.Examples(sounds, inputs=[image, video, audio, question], label="Sample sounds",
                            examples_per_page=12)
        blocks.load(demo.show_audio, None, [audio, audio_questions, audio_samples], api_name=False)
        inputs = [image, video, audio, question, max_tokens, temperature, top_p, top_k, seed]
        event = gr.on([ask.click, question.submit], demo.answer, inputs, [answer, stats], api_name="answer",
                      concurrency_limit=None)  # the engine batches; its queue limit answers overload
        stop.click(None, cancels=[event])
    return blocks


def mount_demo(app: Starlette, path: str = DEMO_PATH, media_dir: Path = MEDIA_DIR) -> gr.Blocks:
    """Mounts the demo on ``app`` (from ``create_app``) at ``path``, over ``app.state.front``."""
    front, config = app.state.front, app.state.config
    allowed = [str(Path(media_dir).resolve())] if Path(media_dir).is_dir() else []

    def build_and_mount() -> gr.Blocks:
        blocks = build_demo(front, find_examples(media_dir, with_audio=True), template=app.state.template)
        gr.mount_gradio_app(app, blocks, path, allowed_paths=allowed, max_file_size=config.max_upload_bytes,
                            footer_links=[], run_history=False, ssr_mode=False, mcp_server=False)
        return blocks

    async def in_a_loop() -> gr.Blocks:
        return build_and_mount()

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # gradio would open (and leak) a new event loop for each lock it makes
        return asyncio.run(in_a_loop())
    return build_and_mount()
