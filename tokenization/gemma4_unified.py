"""A prompt + media -> one Gemma 4 Unified token stream, as ``Gemma4UnifiedProcessor`` lays it out.

Layout (the processor's text expansion, then its tokenizer on the whole string):
- An image is ``<|image>`` + one ``<|image|>`` per soft-token row + ``<image|>``.
- A video is its sampled frames joined by a space, each ``"mm:ss "`` + ``<|image>`` + one ``<|video|>``
  per row + ``<image|>`` (a frame's soft tokens are ``<|video|>``, not ``<|image|>``; ``mm:ss`` is
  ``int(t // 60):02d:int(t % 60):02d`` of ``frame_index / fps``).
- Audio is ``<|audio>`` + one ``<|audio|>`` per ``audio_samples_per_token`` samples + ``<audio|>``.
- A ``str`` prompt: our markers (``<image>`` / ``<video>`` / ``<audio>``) and the family's placeholders
  that its chat template writes (``<|image|>`` / ``<|video|>`` / ``<|audio|>``) both mark where each item
  goes, in order. With no marker at all, images then videos go first, joined by a space (the processor's
  rule for a prompt without text), the text follows directly (the chat template's inline ``<|image|>``),
  and audio follows the text (the model card's order); the processor itself raises for text without
  placeholders. A segmented prompt (``str`` pieces never parsed, ``MediaSlot``s) places
  media explicitly; its text may not contain the placeholders.
- ``<bos>`` (the tokenizer's post-processor prefix) comes first unless the text already starts with it, as
  ``Gemma4UnifiedProcessor.apply_chat_template`` does.
Text between special tokens is encoded as one piece (timestamps merge with the text around them), so the
ids equal the tokenizer's on the expanded string.

``token_types`` (``mm_token_type_ids``): 1 ``<|image|>``, 2 ``<|video|>``, 3 ``<|audio|>``, else 0. With
``use_bidirectional_attention="vision"`` (``config.json``'s text config; also when it is absent, as in
transformers) each maximal run of types 1/2 attends both ways (``bidirectional_spans``): one image, or one
video frame (split by ``<image|>`` timestamp ``<|image>``); audio never does. With ``null`` there are no
runs: media are attended causally, as transformers' ``get_block_sequence_ids_for_mask`` is then not used.
``MediaSpan.content_hash``: SHA-256 over the item's uint8 rows, grids and (x, y) ids (timestamps of a
video, float32 samples of audio).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from encoders import DecodedVideo, MediaLimits, VideoSampling
from encoders.audio import AudioLimits, load_audio
from encoders.gemma4_unified import (Gemma4MediaConfig, SampledVideo, SoftTokenRows, audio_rows, decode_image,
                                     frame_tokens, image_rows, load_video_frames, video_rows)
from tokenization.interleave import MediaSlot, MediaSpan, Prompt, check_max_prompt_tokens, check_prompt_len

_NAMED = {"bos": "<bos>", "image": "<|image|>", "boi": "<|image>", "eoi": "<image|>", "video": "<|video|>",
          "audio": "<|audio|>", "boa": "<|audio>", "eoa": "<audio|>"}
MARKERS = {"image": ("<image>", "<|image|>"), "video": ("<video>", "<|video|>"), "audio": ("<audio>", "<|audio|>")}
_KIND_OF = {m: kind for kind, ms in MARKERS.items() for m in ms}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in _KIND_OF) + ")")
_TYPES = {"image": 1, "video": 2, "audio": 3}
_SINGLE = (str, bytes, bytearray, Path, Image.Image, np.ndarray, torch.Tensor, DecodedVideo, SampledVideo)


def timestamp_text(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


@dataclass
class Gemma4Prompt(Prompt):
    """``Prompt`` (``patches``: uint8 rows of images and video frames, one per soft token; ``row_position_ids``,
    ``bidirectional_spans``, ``audio_rows`` filled) plus the processor's ``mm_token_type_ids``."""

    token_types: list[int] = field(default_factory=list)  # mm_token_type_ids of token_ids


@dataclass
class Gemma4Item:
    kind: str  # "image" | "video" | "audio"
    parts: list  # str (text) | list[int] (special and soft-token ids)
    vision: list[SoftTokenRows]
    audio: torch.Tensor | None
    content_hash: str

    @property
    def num_ids(self) -> int:
        return sum(len(p) for p in self.parts if isinstance(p, list))


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
            value = value.get("content") if isinstance(value, dict) else value
            if value:
                names[key] = value
        return cls(tokenizer, names)


def _as_list(media) -> list:
    if media is None:
        return []
    return [media] if isinstance(media, _SINGLE) or hasattr(media, "read") else list(media)


def to_segments(prompt: str | Sequence, counts: dict[str, int]) -> list:
    """``str`` and slot (``.kind``) segments without empty text; the number of slots per kind checked."""
    if isinstance(prompt, str):
        pieces = _MARKER_RE.split(prompt)  # text, marker, text, ..., text
        if len(pieces) == 1:
            pieces = _MARKER_RE.split(" ".join([MARKERS["image"][0]] * counts["image"] + [MARKERS["video"][0]]
                                               * counts["video"]) + prompt + " ".join([MARKERS["audio"][0]] * counts["audio"]))
        segments = [MediaSlot(_KIND_OF[p]) if i % 2 else p
                    for i, p in enumerate(pieces) if p]
    else:
        segments = [s for s in prompt if s != ""]
        bad = [s for s in segments if not isinstance(s, str) and getattr(s, "kind", None) not in _TYPES]
        if bad:
            raise ValueError(f"a prompt is text or a sequence of str and MediaSlot segments, "
                             f"got a {type(bad[0]).__name__}")
    for kind, count in counts.items():
        num_slots = sum(not isinstance(s, str) and s.kind == kind for s in segments)
        if num_slots != count:
            raise ValueError(f"the prompt has {num_slots} {kind} marker(s) or slot(s) but {count} {kind}(s) were "
                             f"given; use one {MARKERS[kind][0]} per {kind}, or no markers at all")
    return segments


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

    modalities = ("image", "video", "audio")

    def __init__(self, tokenizer: Tokenizer, media_config: Gemma4MediaConfig, special: SpecialTokens | None = None,
                 limits: MediaLimits | None = None, video_sampling: VideoSampling | None = None,
                 max_prompt_tokens: int | None = None, audio_limits: AudioLimits | None = None,
                 bidirectional_vision: bool = True):
        """``video_sampling``: only its ``decoder_threads`` is used; which frames comes from the checkpoint.
        ``bidirectional_vision``: image / video-frame runs attend both ways (``use_bidirectional_attention``
        ``"vision"``); False: no ``bidirectional_spans`` (``None``, causal media)."""
        check_max_prompt_tokens(max_prompt_tokens)
        self.tokenizer, self.media_config = tokenizer, media_config
        self.special = special or SpecialTokens(tokenizer)
        self.limits, self.audio_limits = limits or MediaLimits(), audio_limits or AudioLimits()
        self.decoder_threads = (video_sampling or VideoSampling()).decoder_threads
        self.max_prompt_tokens = max_prompt_tokens
        self.bidirectional_vision = bidirectional_vision
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        full = tokenizer.encode("a", add_special_tokens=True).ids
        self.prefix_ids = full[: len(full) - len(plain)]  # [<bos>] for Gemma's post-processor
        assert full[len(self.prefix_ids):] == plain, "post-processor suffixes are not supported"
        self.soft_types = {self.special.ids[kind]: t for kind, t in _TYPES.items()}

    @classmethod
    def from_pretrained(cls, folder, **kw) -> Gemma4UnifiedLayout:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (folder / "config.json").is_file():
            text_config = json.loads((folder / "config.json").read_text()).get("text_config") or {}
            kw.setdefault("bidirectional_vision", text_config.get("use_bidirectional_attention", "vision") == "vision")
        return cls(tokenizer, Gemma4MediaConfig.from_pretrained(folder), SpecialTokens.from_config(tokenizer, config),
                   **kw)

    def _check_len(self, num_tokens: int) -> None:
        check_prompt_len(num_tokens, self.max_prompt_tokens, "images/videos/audio")

    def _wrapped(self, rows: SoftTokenRows, kind: str) -> list[int]:
        ids = self.special.ids
        return [ids["boi"]] + [ids[kind]] * rows.num_tokens + [ids["eoi"]]

    def image_item(self, src, max_soft_tokens: int | None = None) -> Gemma4Item:
        """``src``: path, bytes, file object, PIL image, uint8 array or tensor."""
        rows = image_rows(decode_image(src, self.limits), self.media_config, max_soft_tokens)
        return Gemma4Item("image", [self._wrapped(rows, "image")], [rows], None, _hash("image", [rows], None))

    def video_item(self, src, max_soft_tokens: int | None = None, num_tokens_before: int = 0) -> Gemma4Item:
        """``src``: path, bytes, file object, or frames already sampled (``SampledVideo`` / ``DecodedVideo``).
        With a limit, the prompt is checked from the header (both orientations) before decoding."""
        if not isinstance(src, (SampledVideo, DecodedVideo)):
            def check(num_frames: int, height: int, width: int) -> None:
                per_frame = min(frame_tokens(height, width, self.media_config, max_soft_tokens),
                                frame_tokens(width, height, self.media_config, max_soft_tokens))
                self._check_len(num_tokens_before + num_frames * (per_frame + 3))  # + boi, eoi, a timestamp id
            src = load_video_frames(src, self.media_config, self.limits, self.decoder_threads, check, max_soft_tokens)
        frames = video_rows(src.frames, self.media_config, max_soft_tokens)
        stamps = [timestamp_text(t) for t in src.timestamps_s]
        parts: list = []
        for i, (rows, stamp) in enumerate(zip(frames, stamps)):
            parts += [f"{' ' if i else ''}{stamp} ", self._wrapped(rows, "video")]
        return Gemma4Item("video", parts, frames, None, _hash("video", frames, None, ",".join(stamps)))

    def audio_item(self, src) -> Gemma4Item:
        """``src``: path, bytes or file object (decoded, resampled), or a mono float waveform at the model's rate."""
        wave = src if isinstance(src, (np.ndarray, torch.Tensor)) else load_audio(
            src, self.media_config.sampling_rate, self.audio_limits)
        rows = audio_rows(wave, self.media_config)
        ids = self.special.ids
        part = [ids["boa"]] + [ids["audio"]] * rows.shape[0] + [ids["eoa"]]
        return Gemma4Item("audio", [part], [], rows, _hash("audio", [], rows))

    def build(self, prompt: str | Sequence, images=(), videos=(), audios=(), *, max_soft_tokens: int | None = None,
              video_max_soft_tokens: int | None = None) -> Gemma4Prompt:
        """Decode, cut and lay out; ``max_soft_tokens`` is the per-image budget (70/140/280/560/1120)."""
        audios = [audios] if isinstance(audios, np.ndarray) and audios.ndim == 1 else audios
        queues = {"image": _as_list(images), "video": _as_list(videos), "audio": _as_list(audios)}
        segments = to_segments(prompt, {k: len(v) for k, v in queues.items()})
        texts = [s for s in segments if isinstance(s, str)]
        if not isinstance(prompt, str) and any(m in t for t in texts for m in _KIND_OF if m.startswith("<|")):
            raise ValueError("text segments must not contain <|image|>, <|video|> or <|audio|>; place media "
                             "with slots")
        num_tokens = len(self.prefix_ids) + sum(len(self.tokenizer.encode(t, add_special_tokens=False).ids)
                                                for t in texts)
        self._check_len(num_tokens)  # text first: it bounds the prompt before any media is decoded
        iters = {k: iter(v) for k, v in queues.items()}
        parts: list = []  # str | (item index, list[int])
        items: list[Gemma4Item] = []
        for seg in segments:
            if isinstance(seg, str):
                parts.append(seg)
                continue
            src = next(iters[seg.kind])
            item = (self.image_item(src, max_soft_tokens) if seg.kind == "image" else
                    self.video_item(src, video_max_soft_tokens, num_tokens) if seg.kind == "video" else
                    self.audio_item(src))
            num_tokens += item.num_ids
            self._check_len(num_tokens)
            items.append(item)
            parts += [(len(items) - 1, p) if isinstance(p, list) else p for p in item.parts]
        bos = isinstance(segments[0], str) and segments[0].startswith(self.special.text["bos"]) if segments else False
        return self._assemble(parts, items, with_prefix=not bos)

    def _assemble(self, parts: list, items: list[Gemma4Item], with_prefix: bool) -> Gemma4Prompt:
        ids: list[int] = list(self.prefix_ids) if with_prefix else []
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
            types[start:end] = [self.soft_types.get(t, 0) for t in ids[start:end]]
        vision_pos = [i for i, t in enumerate(types) if t in (1, 2)]
        runs: list[tuple[int, int]] = []
        for i in vision_pos if self.bidirectional_vision else ():
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        vision = [r for item in items for r in item.vision]
        cfg = self.media_config
        data = torch.cat([r.data for r in vision]) if vision else torch.empty((0, cfg.row_dim), dtype=torch.uint8)
        pos = torch.cat([r.position_ids for r in vision]) if vision else torch.empty((0, 2), dtype=torch.int64)
        audio = [item.audio for item in items if item.audio is not None]
        audio_data = torch.cat(audio) if audio else torch.empty((0, cfg.audio_samples_per_token))
        assert len(vision_pos) == data.shape[0], (len(vision_pos), data.shape)
        return Gemma4Prompt(token_ids=ids, patches=data,
                            media=[MediaSpan(*spans[i], item.content_hash, item.kind) for i, item in enumerate(items)],
                            image_positions=vision_pos, row_position_ids=pos, bidirectional_spans=runs,
                            audio_rows=audio_data, audio_positions=[i for i, t in enumerate(types) if t == 3],
                            token_types=types)
