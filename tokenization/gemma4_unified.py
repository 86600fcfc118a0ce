"""Text with media markers + media -> one Gemma 4 Unified token stream, as ``Gemma4UnifiedProcessor`` lays it out.

Layout (the processor's text expansion, then its tokenizer on the whole string):
- An image is ``<|image>`` + one ``<|image|>`` per soft-token row + ``<image|>``.
- A video is its sampled frames joined by a space, each ``"mm:ss "`` + ``<|image>`` + one ``<|video|>``
  per row + ``<image|>`` (the soft tokens of a frame are ``<|video|>``, not ``<|image|>``; ``mm:ss`` is
  ``int(t // 60):02d`` / ``int(t % 60):02d`` of ``frame_index / fps``).
- Audio is ``<|audio>`` + one ``<|audio|>`` per ``audio_samples_per_token`` samples + ``<audio|>``.
- Markers: ours (``<image>`` / ``<video>`` / ``<audio>``) and the family's own placeholders that its chat
  template writes (``<|image|>`` / ``<|video|>`` / ``<|audio|>``) both mark where each item goes, in order.
  With no marker at all, images then videos go first, joined by a space (the processor's rule for a
  prompt with no text), the text follows directly (the chat template's inline ``<|image|>``), and
  audio goes after the text (the model card's order). The processor itself raises for text that has
  no placeholder; for an empty text ours equals it.
- ``<bos>`` (the tokenizer's post-processor prefix) comes first unless the text already starts with it,
  as ``Gemma4UnifiedProcessor.apply_chat_template`` does.
Text between special tokens is encoded as one piece (timestamps merge with the text around them), so
the ids equal the tokenizer's on the expanded string.

``mm_token_type_ids``: 1 for ``<|image|>``, 2 for ``<|video|>``, 3 for ``<|audio|>``, else 0. With
``use_bidirectional_attention="vision"`` each maximal run of types 1/2 attends both ways: one image, or one
video frame (frames are split by ``<image|>`` + timestamp + ``<|image>``); audio stays causal.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from encoders import DecodedVideo, MediaLimits, decode_array
from encoders.audio import AudioLimits, load_audio
from encoders.gemma4_unified import (Gemma4MediaConfig, SampledVideo, SoftTokenRows, audio_rows, image_rows,
                                     load_video_frames, video_rows)
from tokenization.interleave import MediaSpan, Prompt, _as_list

_NAMED = {"bos": "<bos>", "image": "<|image|>", "boi": "<|image>", "eoi": "<image|>", "video": "<|video|>",
          "audio": "<|audio|>", "boa": "<|audio>", "eoa": "<audio|>"}
MARKERS = {"image": ("<image>", "<|image|>"), "video": ("<video>", "<|video|>"), "audio": ("<audio>", "<|audio|>")}
_KIND_OF = {m: kind for kind, ms in MARKERS.items() for m in ms}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in _KIND_OF) + ")")
TOKEN_TYPES = {"image": 1, "video": 2, "audio": 3}


def timestamp_text(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


@dataclass
class Gemma4Prompt(Prompt):
    """``Prompt`` (``patches``: uint8 vision rows, images and video frames, one per soft token) plus what
    Gemma needs."""

    row_position_ids: torch.Tensor  # int64 [num_image_tokens, 2]: (x, y) of each row of ``patches``
    bidirectional_spans: list[tuple[int, int]]  # [start, end) token runs attending both ways
    audio_rows: torch.Tensor  # float32 [num_audio_tokens, audio_samples_per_token]
    audio_positions: list[int]  # indices of the <|audio|> ids in token_ids
    token_types: list[int] = field(default_factory=list)  # mm_token_type_ids of token_ids

    @property
    def num_audio_tokens(self) -> int:
        return len(self.audio_positions)


@dataclass
class Gemma4Item:
    kind: str  # "image" | "video" | "audio"
    parts: list  # str (text) | list[int] (special and soft-token ids)
    vision: list[SoftTokenRows]
    audio: torch.Tensor | None
    content_hash: str


class SpecialTokens:
    """The family's token strings (``tokenizer_config.json``'s ``*_token`` names) and their ids."""

    def __init__(self, tokenizer: Tokenizer, names: dict[str, str] | None = None):
        self.text = {**_NAMED, **(names or {})}
        self.ids = {}
        for key, token in self.text.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token!r} token; is this a Gemma 4 Unified checkpoint?")
            self.ids[key] = token_id

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, config: dict) -> SpecialTokens:
        names = {}
        for key in ("bos", "image", "boi", "eoi", "audio", "boa", "eoa"):
            value = config.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                names[key] = value
        return cls(tokenizer, names)


def _hash(kind: str, vision: list[SoftTokenRows], audio: torch.Tensor | None, extra: str = "") -> str:
    h = hashlib.sha256(f"gemma4|{kind}|{extra}".encode())
    for r in vision:
        h.update(struct.pack("<qq", r.rows, r.cols))
        h.update(r.data.numpy().tobytes())
        h.update(r.position_ids.numpy().tobytes())
    if audio is not None:
        h.update(struct.pack("<qq", *audio.shape))
        h.update(audio.numpy().tobytes())
    return h.hexdigest()


class Gemma4UnifiedLayout:
    """Thread-safe: no state changes after construction (the tokenizer is reentrant)."""

    def __init__(self, tokenizer: Tokenizer, media_config: Gemma4MediaConfig, special: SpecialTokens | None = None,
                 limits: MediaLimits | None = None, audio_limits: AudioLimits | None = None):
        self.tokenizer, self.media_config = tokenizer, media_config
        self.special = special or SpecialTokens(tokenizer)
        self.limits, self.audio_limits = limits or MediaLimits(), audio_limits or AudioLimits()
        ids = self.special.ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        full = tokenizer.encode("a", add_special_tokens=True).ids
        self.prefix_ids = full[: len(full) - len(plain)]  # [<bos>] for Gemma's post-processor
        assert full[len(self.prefix_ids):] == plain, "post-processor suffixes are not supported"
        self.vision_ids = {ids["image"]: "image", ids["video"]: "video"}
        self.soft_types = {ids["image"]: 1, ids["video"]: 2, ids["audio"]: 3}

    @classmethod
    def from_pretrained(cls, folder, **kw) -> Gemma4UnifiedLayout:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(tokenizer, Gemma4MediaConfig.from_pretrained(folder), SpecialTokens.from_config(tokenizer, config),
                   **kw)

    def _wrapped(self, rows: SoftTokenRows, kind: str) -> list[int]:
        ids = self.special.ids
        return [ids["boi"]] + [ids[kind]] * rows.num_tokens + [ids["eoi"]]

    def image_item(self, src, max_soft_tokens: int | None = None) -> Gemma4Item:
        """``src``: path, bytes, file object, PIL image, uint8 array or tensor."""
        rows = image_rows(decode_array(src, self.limits), self.media_config, max_soft_tokens)
        return Gemma4Item("image", [self._wrapped(rows, "image")], [rows], None, _hash("image", [rows], None))

    def video_item(self, src, max_soft_tokens: int | None = None) -> Gemma4Item:
        """``src``: path, bytes, file object, or frames already sampled (``SampledVideo`` / ``DecodedVideo``)."""
        if not isinstance(src, (SampledVideo, DecodedVideo)):
            src = load_video_frames(src, self.media_config, self.limits)
        frames = video_rows(src.frames, self.media_config, max_soft_tokens)
        stamps = [timestamp_text(t) for t in src.timestamps_s]
        parts: list = []
        for i, (rows, stamp) in enumerate(zip(frames, stamps)):
            parts += [f"{' ' if i else ''}{stamp} ", self._wrapped(rows, "video")]
        return Gemma4Item("video", parts, frames, None, _hash("video", frames, None, ",".join(stamps)))

    def audio_item(self, src) -> Gemma4Item:
        """``src``: path, bytes or file object (decoded and resampled), or a mono float waveform at the
        checkpoint's sampling rate."""
        if isinstance(src, (np.ndarray, torch.Tensor)):
            wave = src
        else:
            wave = load_audio(src, self.media_config.sampling_rate, self.audio_limits)
        rows = audio_rows(wave, self.media_config)
        ids = self.special.ids
        part = [ids["boa"]] + [ids["audio"]] * rows.shape[0] + [ids["eoa"]]
        return Gemma4Item("audio", [part], [], rows, _hash("audio", [], rows))

    def _pieces(self, text: str, counts: dict[str, int]) -> list[str]:
        pieces = [p for p in _MARKER_RE.split(text)]  # text, marker, text, ..., text
        markers = [_KIND_OF[m] for m in pieces[1::2]]
        if not markers:
            lead = " ".join([MARKERS["image"][0]] * counts["image"] + [MARKERS["video"][0]] * counts["video"])
            tail = " ".join([MARKERS["audio"][0]] * counts["audio"])
            return [p for p in _MARKER_RE.split(lead + text + tail) if p]
        for kind, count in counts.items():
            if markers.count(kind) != count:
                raise ValueError(f"the prompt has {markers.count(kind)} {kind} marker(s) but {count} {kind}(s) "
                                 f"were given; use one {MARKERS[kind][0]} per {kind}, or no markers at all")
        return [p for p in pieces if p]

    def build(self, text: str, images=(), videos=(), audios=(), *, max_soft_tokens: int | None = None,
              video_max_soft_tokens: int | None = None) -> Gemma4Prompt:
        """Decode, cut and lay out; ``max_soft_tokens`` is the per-image budget (70/140/280/560/1120)."""
        videos = [videos] if isinstance(videos, SampledVideo) else videos
        audios = [audios] if isinstance(audios, np.ndarray) and audios.ndim == 1 else audios
        queues = {"image": _as_list(images), "video": _as_list(videos), "audio": _as_list(audios)}
        pieces = self._pieces(text, {k: len(v) for k, v in queues.items()})
        iters = {k: iter(v) for k, v in queues.items()}
        parts: list = []  # str | list[int]
        items: list[Gemma4Item] = []
        for piece in pieces:
            kind = _KIND_OF.get(piece)
            if kind is None:
                parts.append(piece)
                continue
            src = next(iters[kind])
            item = (self.image_item(src, max_soft_tokens) if kind == "image" else
                    self.video_item(src, video_max_soft_tokens) if kind == "video" else self.audio_item(src))
            items.append(item)
            parts += [(len(items) - 1, p) if isinstance(p, list) else p for p in item.parts]
        return self._assemble(parts, items, starts_with_bos=text.startswith(self.special.text["bos"]))

    def _assemble(self, parts: list, items: list[Gemma4Item], starts_with_bos: bool) -> Gemma4Prompt:
        ids: list[int] = [] if starts_with_bos else list(self.prefix_ids)
        spans: dict[int, list[int]] = {}  # item -> [start, end)
        pending = ""
        for part in parts + [None]:
            if isinstance(part, str):
                pending += part
                continue
            if pending:
                ids += self.tokenizer.encode(pending, add_special_tokens=False).ids
                pending = ""
            if part is not None:
                index, media_ids = part
                spans.setdefault(index, [len(ids), 0])[1] = len(ids) + len(media_ids)
                ids += media_ids
        types = [0] * len(ids)
        for start, end in spans.values():
            for i in range(start, end):
                types[i] = self.soft_types.get(ids[i], 0)
        vision_pos = [i for i, t in enumerate(types) if t in (1, 2)]
        runs: list[tuple[int, int]] = []
        for i in vision_pos:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        vision = [r for item in items for r in item.vision]
        row_dim = self.media_config.row_dim
        data = torch.cat([r.data for r in vision]) if vision else torch.empty((0, row_dim), dtype=torch.uint8)
        pos = torch.cat([r.position_ids for r in vision]) if vision else torch.empty((0, 2), dtype=torch.int64)
        audio = [item.audio for item in items if item.audio is not None]
        n = self.media_config.audio_samples_per_token
        audio_data = torch.cat(audio) if audio else torch.empty((0, n), dtype=torch.float32)
        media = [MediaSpan(spans[i][0], spans[i][1], item.content_hash, item.kind) for i, item in enumerate(items)]
        assert len(vision_pos) == data.shape[0], (len(vision_pos), data.shape)
        return Gemma4Prompt(token_ids=ids, patches=data, media=media, image_positions=vision_pos,
                            row_position_ids=pos, bidirectional_spans=runs, audio_rows=audio_data,
                            audio_positions=[i for i, t in enumerate(types) if t == 3], token_types=types)
