"""A prompt (text with ``<image>`` / ``<video>`` markers, or segments) + media -> one Fuyu token stream.

Layout (Fuyu's: media, ``<s>``, text, ``<0x04>``):
- A prompt is a sequence of segments: text (``str``, never parsed for markers) and a ``MediaSlot``
  per media item, in order (the OpenAI API builds these from content parts). A plain ``str`` prompt
  is cut into segments at its ``<image>`` / ``<video>`` markers; with no marker, all images then all
  videos come first and the text is kept as is: for one image exactly the ids ``FuyuProcessor`` gives.
- Slots before any text form the leading media run (then ``<s>``, then the text with its leading
  whitespace stripped, so ``"<image>\\nWhat is it?"`` == no marker + ``"What is it?"``); later slots
  split the text, each text piece is encoded on its own and the last one carries ``<0x04>``.
- An image is ``rows`` x (``cols`` image ids + one newline id). A video is its sampled frames in
  order, each preceded by its timestamp as text, ``<t=1.5s>`` (one decimal, seconds from the start);
  frames are resized to the patch grid's size as they are decoded.
- With ``max_prompt_tokens``, the text is counted first, then each item as it comes (a video from its
  header, before any frame is decoded): a prompt over the limit is a ``ValueError`` as soon as known.
- ``MediaSpan.content_hash`` is SHA-256 over the item's uint8 patches, grids (and timestamps): the
  pixels the model sees, so one picture as a path, bytes or PNG/PIL hashes the same and two pictures
  never share a prefix-cache entry.
"""
from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from encoders import (DecodedVideo, MediaLimits, PatchConfig, Patches, VideoReader, VideoSampling, decode_array,
                      patchify)
from tokenization.text import BOA_TOKEN, IMAGE_TOKEN, NEWLINE_TOKEN, TextTokenizer

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
_MARKERS = re.compile(f"({IMAGE_MARKER}|{VIDEO_MARKER})")
_KINDS = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}
_SINGLE = (str, bytes, bytearray, Path, Image.Image, np.ndarray, torch.Tensor, DecodedVideo)


@dataclass(frozen=True)
class MediaSlot:
    """Where the next image, video or audio goes in a segmented prompt."""

    kind: str  # "image" | "video" | "audio"

    def __post_init__(self):
        if self.kind not in ("image", "video", "audio"):
            raise ValueError(f"MediaSlot.kind must be 'image', 'video' or 'audio', got {self.kind!r}")


Segment = Union[str, MediaSlot]


@dataclass
class MediaSpan:
    start: int  # token range [start, end) in Prompt.token_ids, timestamps of a video included
    end: int
    content_hash: str
    kind: str  # "image" | "video"


@dataclass
class Prompt:
    """One token stream and the raw rows its media placeholders stand for (the family's model embeds them)."""

    token_ids: list[int]
    patches: torch.Tensor  # uint8 [num_image_tokens, row_dim]: row i for the i-th vision-placeholder id
    media: list[MediaSpan]
    image_positions: list[int]  # indices of the vision-placeholder ids in token_ids
    row_position_ids: torch.Tensor | None = None  # int64 [num_image_tokens, 2]: (x, y) of each row, if used
    bidirectional_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) runs seen both ways
    audio_rows: torch.Tensor | None = None  # float32 [num_audio_tokens, samples_per_token]
    audio_positions: list[int] = field(default_factory=list)  # indices of the audio-placeholder ids

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_positions)

    @property
    def num_audio_tokens(self) -> int:
        return len(self.audio_positions)


@dataclass
class _Item:
    kind: str
    token_ids: list[int]
    patches: list[torch.Tensor]
    content_hash: str


def _as_list(media) -> list:
    if media is None:
        return []
    return [media] if isinstance(media, _SINGLE) or hasattr(media, "read") else list(media)


def _hash(kind: str, grids: list[Patches], extra: str = "") -> str:
    h = hashlib.sha256(f"{kind}|{extra}".encode())
    for p in grids:
        h.update(struct.pack("<qq", p.rows, p.cols))
        h.update(p.data.contiguous().numpy())
    return h.hexdigest()


def check_max_prompt_tokens(max_prompt_tokens: int | None) -> None:
    if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or
                                          not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}")


def check_prompt_len(num_tokens: int, max_prompt_tokens: int | None, media: str) -> None:
    """A layout counts as it builds: refuse the prompt as soon as it passes the context, before more decoding."""
    if max_prompt_tokens is not None and num_tokens > max_prompt_tokens:
        raise ValueError(f"the prompt would be at least {num_tokens} tokens; the model's context "
                         f"(max_model_len) is {max_prompt_tokens}: shorten the text or send fewer or smaller {media}")


def to_segments(prompt: str | Sequence[Segment], num_images: int, num_videos: int) -> tuple[list[Segment], bool]:
    """(segments without empty text, whether media were placed explicitly)."""
    if isinstance(prompt, str):
        pieces = _MARKERS.split(prompt)  # text, marker, text, ..., text
        if len(pieces) == 1:
            return [MediaSlot("image")] * num_images + [MediaSlot("video")] * num_videos + [prompt], False
        segments = [MediaSlot(_KINDS[p]) if i % 2 else p for i, p in enumerate(pieces) if p]
        what = {"image": f"{IMAGE_MARKER} marker", "video": f"{VIDEO_MARKER} marker"}
    else:
        bad = [s for s in prompt if not isinstance(s, (str, MediaSlot))]
        if bad:
            raise ValueError(f"a prompt is text or a sequence of str and MediaSlot segments, "
                             f"got a {type(bad[0]).__name__}")
        segments = [s for s in prompt if s != ""]
        what = {"image": "image slot", "video": "video slot"}
        if any(isinstance(s, MediaSlot) and s.kind == "audio" for s in segments):
            raise ValueError("this model takes images and videos, not audio")
    for kind, count in (("image", num_images), ("video", num_videos)):
        num_slots = sum(isinstance(s, MediaSlot) and s.kind == kind for s in segments)
        if num_slots != count:
            raise ValueError(f"the prompt has {num_slots} {what[kind]}(s) but {count} {kind}(s) were given; "
                             f"use one {what[kind]} per {kind}" + (", or no markers at all" if isinstance(prompt, str)
                                                                    else ""))
    return segments or [""], any(isinstance(s, MediaSlot) for s in segments)


class Interleaver:
    """Thread-safe: no state changes after construction (the tokenizer is reentrant)."""

    modalities = ("image", "video")

    def __init__(self, tokenizer: TextTokenizer, patch_config: PatchConfig, limits: MediaLimits | None = None,
                 video_sampling: VideoSampling | None = None, max_prompt_tokens: int | None = None):
        check_max_prompt_tokens(max_prompt_tokens)
        self.tokenizer, self.patch_config = tokenizer, patch_config
        self.limits = limits or MediaLimits()
        self.video_sampling = video_sampling or VideoSampling()
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_pretrained(cls, folder, **kw) -> Interleaver:
        return cls(TextTokenizer.from_pretrained(folder), PatchConfig.from_pretrained(folder), **kw)

    def _check_len(self, num_tokens: int) -> None:
        check_prompt_len(num_tokens, self.max_prompt_tokens, "images/videos")

    def _image_ids(self, p: Patches) -> list[int]:
        return ([self.tokenizer.image_token_id] * p.cols + [self.tokenizer.newline_token_id]) * p.rows

    def _frame_tokens(self, height: int, width: int) -> int:
        rows, cols = self.patch_config.grid(height, width)
        return rows * (cols + 1)

    def image_item(self, src) -> _Item:
        p = patchify(decode_array(src, self.limits), self.patch_config)
        return _Item("image", self._image_ids(p), [p.data], _hash("image", [p]))

    def video_item(self, src, num_tokens_before: int = 0) -> _Item:
        """A video's tokens; with a limit, checked from its header (both orientations) before decoding."""
        if isinstance(src, DecodedVideo):
            video = src
        else:
            with VideoReader(src, self.video_sampling, self.limits) as reader:
                h, w = reader.height, reader.width
                per_frame = 1 + min(self._frame_tokens(h, w), self._frame_tokens(w, h))  # >= 1 timestamp id
                self._check_len(num_tokens_before + reader.num_frames * per_frame)
                video = reader.decode(frame_size=self.patch_config.resized_size)
        ids, grids = [], []
        for frame, t in zip(video.frames, video.timestamps_s):
            p = patchify(frame, self.patch_config)
            ids += self.tokenizer.encode(f"<t={t:.1f}s>") + self._image_ids(p)
            grids.append(p)
        stamps = ",".join(f"{t:.6f}" for t in video.timestamps_s)
        return _Item("video", ids, [p.data for p in grids], _hash("video", grids, stamps))

    def build(self, prompt: str | Sequence[Segment], images=(), videos=(), audios=(), **options) -> Prompt:
        """Decode, patchify and interleave; media are paths, bytes, file objects, PIL images, arrays, tensors."""
        if _as_list(audios):
            raise ValueError("this model takes images and videos, not audio")
        if options:
            raise ValueError(f"{', '.join(sorted(options))}: not a media option of this model family")
        images, videos = _as_list(images), _as_list(videos)
        segments, marked = to_segments(prompt, len(images), len(videos))
        if any(isinstance(s, str) and (IMAGE_TOKEN in s or NEWLINE_TOKEN in s) for s in segments):
            raise ValueError(f"the prompt text must not contain {IMAGE_TOKEN} or {NEWLINE_TOKEN}; "
                             "mark media with <image> / <video>")
        tok = self.tokenizer
        parts: list[list[int] | MediaSlot] = []  # text first: it bounds the prompt before any media is decoded
        leading, last = True, len(segments) - 1
        for i, seg in enumerate(segments):
            if isinstance(seg, MediaSlot):
                parts.append(seg)
                continue
            ids = []
            if leading:
                ids.append(tok.bos_token_id)
                seg = seg.lstrip() if marked else seg
                leading = False
            parts.append(ids + (tok.encode(seg + BOA_TOKEN) if i == last else tok.encode(seg)))
        if isinstance(segments[last], MediaSlot):  # the prompt ends with media
            parts.append(([tok.bos_token_id] if leading else []) + [tok.boa_token_id])
        num_tokens = sum(len(p) for p in parts if isinstance(p, list))
        self._check_len(num_tokens)
        queues = {"image": iter(images), "video": iter(videos)}
        ids: list[int] = []
        patches: list[torch.Tensor] = []
        spans: list[MediaSpan] = []
        for part in parts:
            if isinstance(part, list):
                ids += part
                continue
            src = next(queues[part.kind])
            item = self.image_item(src) if part.kind == "image" else self.video_item(src, num_tokens)
            num_tokens += len(item.token_ids)
            self._check_len(num_tokens)
            spans.append(MediaSpan(len(ids), len(ids) + len(item.token_ids), item.content_hash, item.kind))
            ids += item.token_ids
            patches += item.patches
        positions = [i for i, t in enumerate(ids) if t == tok.image_token_id]
        if len(patches) == 1:
            data = patches[0]
        else:  # numpy: a plain single-threaded copy
            data = torch.from_numpy(np.concatenate([p.numpy() for p in patches]) if patches
                                    else np.empty((0, self.patch_config.patch_dim), np.uint8))
        assert len(positions) == data.shape[0], (len(positions), data.shape)
        return Prompt(token_ids=ids, patches=data, media=spans, image_positions=positions)
