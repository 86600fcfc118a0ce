"""A Dynamo token request -> what ``fusionserve serve`` would hand the engine: prompt segments, media, SamplingParams.

Dynamo's frontend renders the chat template and tokenizes the text itself, so ``token_ids`` hold text only
(what the KV router hashes). Its media arrive apart: ``multi_modal_data = {"image_url": [{"Url": ...}], ...}``,
with the messages (media URLs blanked) in ``extra_args``. The prompt is rebuilt the way ``/v1/chat/completions``
builds it, with the same functions:
- with ``extra_args.messages``: the URLs are put back into their parts, in order per kind, and the body goes
  through ``serve.chat.parse_chat`` (our template, structural media slots), then ``Engine.build_prompt`` lays
  the media out (our interleaver);
- text only (the frontend sends no messages then): the token ids are decoded back to the rendered text (a
  leading BOS dropped: the family's layout places its own) and laid out as one text segment.

A checkpoint without a chat template gets our plain format through the frontend too: the worker registers
``plain_chat.jinja`` (the same text as ``serve/chat.py``'s plain format) as the model's template.

A request the frontend migrates off a dead worker (``--migration-limit``) comes back with the answer so far
appended to ``token_ids``. With the messages, the ids past the formatted prompt's are that answer and follow
our prompt as they did on the first worker (``continuation``), and the worker's text deltas go on from
that answer's decode (stop strings are matched in the new part only); a text-only request carries no such boundary,
so it is taken as a new prompt (the answer goes on, but not token-identical to an unbroken run).

Sampling comes from Dynamo's ``sampling_options`` / ``stop_conditions`` / ``output_options``; a field this
engine cannot honour through Dynamo (beam search, guided decoding, logprobs, n > 1) is a ``ValueError``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sampling import SamplingParams
from serve.chat import ChatTemplate, parse_chat
from serve.protocol import ServerConfig, make_params
from tokenization import Segment, TextTokenizer

PLAIN_TEMPLATE = Path(__file__).with_name("plain_chat.jinja")  # what the frontend renders for template-less models
MEDIA_PARTS = {"image_url": "image", "video_url": "video", "audio_url": "audio"}  # part type -> kind
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "include_stop_str_in_output")
_REFUSED = {  # (group, field) -> why; refused when set to anything but its neutral value
    ("sampling_options", "use_beam_search"): "beam search",
    ("sampling_options", "length_penalty"): "length_penalty (beam search)",
    ("sampling_options", "guided_decoding"): "guided decoding through Dynamo",
    ("output_options", "logprobs"): "logprobs through Dynamo",
    ("output_options", "prompt_logprobs"): "prompt_logprobs",
    ("output_options", "return_tokens_as_token_ids"): "return_tokens_as_token_ids",
    ("stop_conditions", "max_thinking_tokens"): "max_thinking_tokens",
}


@dataclass
class EngineInput:
    prompt: list[Segment]
    images: list[bytes] = field(default_factory=list)
    videos: list[bytes] = field(default_factory=list)
    audios: list[bytes] = field(default_factory=list)
    media_options: dict = field(default_factory=dict)
    params: SamplingParams = field(default_factory=SamplingParams)
    continuation: list[int] = field(default_factory=list)  # ids already generated elsewhere (a migrated request)


class InputBuilder:
    """Thread-safe (no state after construction)."""

    def __init__(self, template: ChatTemplate, tokenizer: TextTokenizer, eos_token_ids: frozenset[int],
                 config: ServerConfig | None = None):
        self.template, self.tokenizer, self.eos_token_ids = template, tokenizer, eos_token_ids
        self.config = config or ServerConfig()

    def build(self, request: dict) -> EngineInput:
        token_ids = request.get("token_ids") or []
        messages = (request.get("extra_args") or {}).get("messages")
        media_data = request.get("multi_modal_data") or {}
        if messages is not None:
            body = {"messages": _with_media_urls(messages, media_data)}
            req, refs = parse_chat(json.dumps(body).encode(), self.template, self.config)
            prompt = req.prompt
            media = {kind: [ref.data for ref in refs if ref.kind == kind] for kind in ("image", "video", "audio")}
            continuation = self._continuation(token_ids, request["extra_args"].get("formatted_prompt"))
        elif any(media_data.values()):
            raise ValueError("media came without the chat messages that place them (extra_args.messages)")
        else:
            if not token_ids:
                raise ValueError("the request has no token_ids")
            ids = token_ids[1:] if token_ids[0] == self.tokenizer.bos_token_id else token_ids
            prompt = [self.tokenizer.decode(ids, skip_special_tokens=False)]
            media, continuation = {"image": [], "video": [], "audio": []}, []
        options = request.get("mm_processor_kwargs") or {}
        return EngineInput(prompt, media["image"], media["video"], media["audio"], dict(options),
                           self.params(request), continuation)

    def _continuation(self, token_ids: list[int], formatted_prompt: str | None) -> list[int]:
        """A request the frontend migrated from a dead worker has the answer so far after the prompt's ids."""
        if not formatted_prompt:
            return []
        ids = self.tokenizer.encode(formatted_prompt)
        for head in (ids, [self.tokenizer.bos_token_id] + ids):
            if len(token_ids) > len(head) and token_ids[:len(head)] == head:
                return list(token_ids[len(head):])
        return []

    def params(self, request: dict) -> SamplingParams:
        for (group, name), what in _REFUSED.items():
            value = (request.get(group) or {}).get(name)
            if value not in (None, False):
                raise ValueError(f"{what} is not supported by the fusionserve Dynamo worker ({group}.{name})")
        sampling = request.get("sampling_options") or {}
        stop = request.get("stop_conditions") or {}
        output = request.get("output_options") or {}
        for name in ("n", "best_of"):
            if sampling.get(name) not in (None, 1):
                raise ValueError(f"{name} must be 1 through the fusionserve Dynamo worker, got {sampling[name]!r}")
        stop_ids = list(stop.get("stop_token_ids") or []) + list(stop.get("stop_token_ids_visible") or [])
        stop_ids += [t for t in stop.get("stop_token_ids_hidden") or [] if t not in self.eos_token_ids]
        max_tokens = stop.get("max_tokens")
        values = {name: sampling.get(name) for name in _SAMPLING}
        return make_params(max_tokens=self.config.default_max_tokens if max_tokens is None else max_tokens,
                           stop=stop.get("stop"), stop_token_ids=stop_ids or None, min_tokens=stop.get("min_tokens"),
                           ignore_eos=stop.get("ignore_eos"), skip_special_tokens=output.get("skip_special_tokens"),
                           **values)


def _with_media_urls(messages: list, media_data: dict) -> list:
    """The messages with each media part's URL taken, in order, from ``multi_modal_data`` (the frontend blanks
    them in ``extra_args``)."""
    queues = {name: iter(media_data.get(name) or []) for name in MEDIA_PARTS}
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                name = part.get("type") if isinstance(part, dict) else None
                if name in MEDIA_PARTS:
                    item = next(queues[name], None)
                    if item is None:
                        raise ValueError(f"a {name} part has no media in multi_modal_data.{name}")
                    url = item.get("Url") if isinstance(item, dict) else item
                    part = {"type": name, name: {"url": url}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    left = [name for name, q in queues.items() if next(q, None) is not None]
    if left:
        raise ValueError(f"multi_modal_data.{left[0]} has more items than the messages have {left[0]} parts")
    return out
