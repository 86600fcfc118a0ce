"""Text with ``<image>`` / ``<video>`` markers + media -> one Fuyu token stream (a ``Prompt``).

Layout (Fuyu's: media, ``<s>``, text, ``<0x04>``):
- With no marker, all images then all videos come first, then ``<s>``, then ``encode(text + "<0x04>")``:
  for one image exactly the ids ``FuyuProcessor`` gives.
- With markers, each item goes where its marker is, in order. Markers before any text form the
  leading media run (then ``<s>``, then the text with its leading whitespace stripped, so
  ``"<image>\\nWhat is it?"`` == no marker + ``"What is it?"``); later markers split the text, each text
  piece is encoded on its own and the last one carries ``<0x04>``.
- An image is ``rows`` x (``cols`` image ids + one newline id). A video is its sampled frames in
  order, each preceded by its timestamp as text, ``<t=1.5s>`` (one decimal, seconds from the start).
- ``MediaSpan.content_hash`` is SHA-256 over the item's uint8 patches, grids (and timestamps): the
  pixels the model sees, so one picture as a path, bytes or PNG/PIL hashes the same and two pictures
  never share a prefix-cache entry.
"""
from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders import (DecodedVideo, MediaLimits, PatchConfig, Patches, VideoSampling, decode_array, load_video,
                      patchify)
from tokenization.text import BOA_TOKEN, IMAGE_TOKEN, NEWLINE_TOKEN, TextTokenizer

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
_MARKERS = re.compile(f"({IMAGE_MARKER}|{VIDEO_MARKER})")
_SINGLE = (str, bytes, bytearray, Path, Image.Image, np.ndarray, torch.Tensor, DecodedVideo)


@dataclass
class MediaSpan:
    start: int  # token range [start, end) in Prompt.token_ids, timestamps of a video included
    end: int
    content_hash: str
    kind: str  # "image" | "video"


@dataclass
class Prompt:
    token_ids: list[int]
    patches: torch.Tensor  # uint8 [num_image_tokens, p*p*3]: row i for the i-th image-placeholder id
    media: list[MediaSpan]
    image_positions: list[int]  # indices of the image-placeholder ids in token_ids

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_positions)


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


class Interleaver:
    """Thread-safe: no state changes after construction (the tokenizer is reentrant)."""

    def __init__(self, tokenizer: TextTokenizer, patch_config: PatchConfig, limits: MediaLimits | None = None,
                 video_sampling: VideoSampling | None = None):
        self.tokenizer, self.patch_config = tokenizer, patch_config
        self.limits = limits or MediaLimits()
        self.video_sampling = video_sampling or VideoSampling()

    @classmethod
    def from_pretrained(cls, folder, **kw) -> Interleaver:
        return cls(TextTokenizer.from_pretrained(folder), PatchConfig.from_pretrained(folder), **kw)

    def _image_ids(self, p: Patches) -> list[int]:
        return ([self.tokenizer.image_token_id] * p.cols + [self.tokenizer.newline_token_id]) * p.rows

    def image_item(self, src) -> _Item:
        p = patchify(decode_array(src, self.limits), self.patch_config)
        return _Item("image", self._image_ids(p), [p.data], _hash("image", [p]))

    def video_item(self, src) -> _Item:
        video = src if isinstance(src, DecodedVideo) else load_video(src, self.video_sampling, self.limits)
        ids, grids = [], []
        for frame, t in zip(video.frames, video.timestamps_s):
            p = patchify(frame, self.patch_config)
            ids += self.tokenizer.encode(f"<t={t:.1f}s>") + self._image_ids(p)
            grids.append(p)
        stamps = ",".join(f"{t:.6f}" for t in video.timestamps_s)
        return _Item("video", ids, [p.data for p in grids], _hash("video", grids, stamps))

    def _pieces(self, text: str, num_images: int, num_videos: int) -> tuple[list[str], bool]:
        pieces = _MARKERS.split(text)  # text, marker, text, ..., text
        markers = pieces[1::2]
        if not markers:
            return [IMAGE_MARKER] * num_images + [VIDEO_MARKER] * num_videos + [text], False
        for marker, count, kind in ((IMAGE_MARKER, num_images, "image"), (VIDEO_MARKER, num_videos, "video")):
            if markers.count(marker) != count:
                raise ValueError(f"the prompt has {markers.count(marker)} {marker} marker(s) but {count} {kind}(s) "
                                 f"were given; use one marker per {kind}, or no markers at all")
        return [p for p in pieces if p], True

    def build(self, text: str, images=(), videos=()) -> Prompt:
        """Decode, patchify and interleave; media are paths, bytes, file objects, PIL images, arrays, tensors."""
        if IMAGE_TOKEN in text or NEWLINE_TOKEN in text:
            raise ValueError(f"the prompt text must not contain {IMAGE_TOKEN} or {NEWLINE_TOKEN}; "
                             "mark media with <image> / <video>")
        images, videos = _as_list(images), _as_list(videos)
        pieces, marked = self._pieces(text, len(images), len(videos))
        queues = {IMAGE_MARKER: iter(images), VIDEO_MARKER: iter(videos)}
        tok = self.tokenizer
        ids: list[int] = []
        patches: list[torch.Tensor] = []
        spans: list[MediaSpan] = []
        leading, last = True, len(pieces) - 1
        for i, piece in enumerate(pieces):
            if piece in queues:
                src = next(queues[piece])
                item = self.image_item(src) if piece == IMAGE_MARKER else self.video_item(src)
                spans.append(MediaSpan(len(ids), len(ids) + len(item.token_ids), item.content_hash, item.kind))
                ids += item.token_ids
                patches += item.patches
                continue
            if leading:
                ids.append(tok.bos_token_id)
                piece = piece.lstrip() if marked else piece
                leading = False
            ids += tok.encode(piece + BOA_TOKEN) if i == last else tok.encode(piece)
        if pieces[last] in queues:  # the prompt ends with a marker
            ids += ([tok.bos_token_id] if leading else []) + [tok.boa_token_id]
        positions = [i for i, t in enumerate(ids) if t == tok.image_token_id]
        if len(patches) == 1:
            data = patches[0]
        else:  # numpy: a plain single-threaded copy
            data = torch.from_numpy(np.concatenate([p.numpy() for p in patches]) if patches
                                    else np.empty((0, self.patch_config.patch_dim), np.uint8))
        assert len(positions) == data.shape[0], (len(positions), data.shape)
        return Prompt(token_ids=ids, patches=data, media=spans, image_positions=positions)
