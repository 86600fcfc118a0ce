"""OpenAI chat completions: messages -> prompt segments (text and ``MediaSlot``s) + media.

Media positions are structural: each image/video/audio part becomes a per-request random sentinel while the
messages are rendered, and the rendered text is cut at the sentinels into ``MediaSlot``s, so text a user
types (``<image>`` included) is only ever text. Parts: ``text``, ``image_url``, ``video_url``, ``audio_url``
(data: URLs or allowed hosts) and OpenAI's ``input_audio`` (``{"data": base64, "format": "wav"}``).
``mm_processor_kwargs`` (vLLM's extension) carries the family's media options.

Prompt format. When the checkpoint has a chat template (``chat_template`` in tokenizer_config.json,
or a ``chat_template.jinja`` file) it is rendered as transformers renders it, with
``add_generation_prompt=True``. A template that loops over ``message['content']`` gets the parts as a list
(a media part as a text part holding its sentinel, so the template's own text handling applies to the
text parts alone); any other gets the parts joined into one string (vLLM's "string" content format).
Without a template,
the plain format:
- a single user message is its content as is (Fuyu's own prompt: media, ``<s>``, text, ``<0x04>``);
- otherwise one line per message, ``System: ...`` / ``User: ...`` / ``Assistant: ...``, joined by
  newlines; the engine appends ``<0x04>`` (beginning of answer) after the last one.

Tools (``serve/tools.py``) go to the template as ``tools``; an assistant message's ``tool_calls`` (their
``arguments`` parsed to objects, as vLLM does) and ``role: "tool"`` messages with ``tool_call_id`` go in the
messages, as transformers' templates take them. The request's fields are checked against
``serve/openai_fields.py``'s table first.

Any JSON body is either a request or an ``APIError`` (400/404/415): too deep, non-finite or out-of-range
numbers, wrong types and lone surrogates are refused here, and messages never echo a whole value.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from serve.openai_fields import CHAT, ServedModel, check_fields, check_model, load_json, openai_params, stream_options, \
    structured_field, typed
from serve.protocol import MEDIA_OPTIONS_FIELD, APIError, GenerateRequest, ServerConfig, bad_request, \
    check_media_counts, check_media_type, parse_media_options
from serve.protocol import short as _short
from serve.tools import tool_request
from tokenization import MediaSlot, Segment

ROLES = ("system", "user", "assistant", "developer", "tool")
_PART_KINDS = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "mp4", "aac", "webm", "mka")  # encoders/audio.py sniffs
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content\b)")


@dataclass
class MediaRef:
    kind: str  # "image" | "video" | "audio"
    data: bytes | None = None  # decoded data: URL
    url: str | None = None  # an allowed http(s) URL, fetched by the app


class ChatTemplate:
    """Renders messages to prompt text; ``None`` template: the plain format above."""

    def __init__(self, template: str | None, eos_token: str = "</s>"):
        self.source, self.eos_token = template, eos_token
        self.takes_parts = template is not None and bool(_LOOPS_OVER_CONTENT.search(template))
        self._compiled = None
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._compiled = env.from_string(template)

    @classmethod
    def from_pretrained(cls, folder) -> ChatTemplate:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        eos = config.get("eos_token", "</s>")
        return cls(template, eos.get("content", "</s>") if isinstance(eos, dict) else (eos or "</s>"))

    def render(self, messages: list[tuple[str, str | list[str]] | dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> str:
        """``messages``: (role, content) or message dicts (``role``, ``content``, and ``tool_calls`` /
        ``tool_call_id`` / ``name`` as transformers' templates take them); content a string or its parts' texts
        (sentinels for media). ``tools``: OpenAI tool specs, given to the template as ``tools``."""
        messages = [dict(m) if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
        for m in messages:
            if self._compiled is None or not self.takes_parts:
                m["content"] = m["content"] if isinstance(m["content"], str) else "".join(m["content"])
            else:
                m["content"] = _parts(m["content"])
        if self._compiled is None:
            if not add_generation_prompt:
                raise bad_request("without a chat template the prompt always ends where the answer begins (the "
                                  "family's layout places it)", param="add_generation_prompt")
            if tools or any("tool_calls" in m for m in messages):
                raise bad_request("this checkpoint has no chat template, so tools and tool calls cannot be rendered",
                                  "template_error", param="tools" if tools else "messages")
            if len(messages) == 1 and messages[0]["role"] == "user":
                return messages[0]["content"]
            return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        # bos is placed by the interleaver, so the template's {{ bos_token }} renders empty
        extra = {"tools": tools} if tools else {}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="",
                                     eos_token=self.eos_token, **extra)


def _parts(content: str | list[str]) -> str | list[dict]:
    return content if isinstance(content, str) else [{"type": "text", "text": t} for t in content]


def _raise_template_error(message: str):
    raise bad_request(f"chat template refused the messages: {message}", "template_error")


def _decode_data_url(url: str, kind: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"malformed data: URL for an {kind} (no comma)", "bad_media")
    parts = header.split(";")
    check_media_type(parts[0], kind)
    if "base64" not in parts[1:]:
        raise bad_request(f"{kind} data: URLs must be base64 (data:{kind}/...;base64,...)", "bad_media")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"the {kind} data: URL is not valid base64", "bad_media") from None


def _input_audio(part: dict) -> MediaRef:
    value = part.get("input_audio")
    data, fmt = (value.get("data"), value.get("format")) if isinstance(value, dict) else (None, None)
    if not isinstance(data, str) or not data:
        raise bad_request('an input_audio part needs {"input_audio": {"data": "<base64>", "format": "wav"}}')
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise bad_request(f"input_audio.format must be one of {list(AUDIO_FORMATS)}, got {_short(fmt)}", "bad_media")
    try:
        return MediaRef("audio", data=base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        raise bad_request("input_audio.data is not valid base64", "bad_media") from None


def _media_ref(part: dict, kind: str, config: ServerConfig) -> MediaRef:
    name = part["type"]
    if name == "input_audio":
        return _input_audio(part)
    value = part.get(name)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"a {name} part needs {{\"{name}\": {{\"url\": \"data:...\"}}}}")
    if url.startswith("data:"):
        return MediaRef(kind, data=_decode_data_url(url, kind))
    try:
        scheme, host = urlsplit(url).scheme.lower(), (urlsplit(url).hostname or "").lower()
    except ValueError:
        raise bad_request(f"the {kind} URL {_short(url)} is malformed", "bad_media") from None
    if scheme in ("http", "https"):
        if host and host in config.allowed_media_hosts:
            return MediaRef(kind, url=url)
        raise bad_request(f"this server does not fetch remote media ({_short(host or url)} is not allowed); send "
                          f"the {kind} inline as a data: URL", "remote_media_refused")
    raise bad_request(f"unsupported {kind} URL scheme {_short(scheme)}; use a data: URL", "bad_media")


def _content(content, role: str, media: list[MediaRef], sentinel: str, config: ServerConfig) -> str | list[str]:
    """The message's text, or its parts' texts with a sentinel ``<sentinel-i>`` for the i-th media item of the
    request."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise bad_request(f"a {role} message's content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string 'text'")
            pieces.append(part["text"])
        elif isinstance(kind, str) and kind in _PART_KINDS:
            pieces.append(f"<{sentinel}-{len(media)}>")
            media.append(_media_ref(part, _PART_KINDS[kind], config))
        else:
            raise bad_request(f"unsupported content part {_short(kind)}; use text, image_url, video_url, "
                              "input_audio or audio_url")
    return pieces


def user_turn(template: ChatTemplate, question: str, kinds: list[str]) -> list[Segment]:
    """One user message — its media (``kinds``: "image" / "video" / "audio", in order), then ``question`` — as
    the checkpoint's template renders it, cut into segments (the question is text, never parsed for markers)."""
    sentinel = secrets.token_hex(16)
    content = [f"<{sentinel}-{i}>" for i in range(len(kinds))] + [question]
    segments, _ = _segments(template.render([("user", content)]), sentinel, [MediaRef(k) for k in kinds])
    return segments


def _segments(text: str, sentinel: str, media: list[MediaRef]) -> tuple[list[Segment], list[MediaRef]]:
    """Rendered text -> segments, and the media in the order their slots came out of the template."""
    pieces = re.split(f"<{sentinel}-([0-9]+)>", text)  # text, index, text, ..., text
    order = [int(i) for i in pieces[1::2]]
    if sorted(order) != list(range(len(media))):
        raise bad_request("the chat template dropped or repeated image/video/audio parts of these messages",
                          "template_error")
    segments = [MediaSlot(media[int(p)].kind) if i % 2 else p for i, p in enumerate(pieces) if p]
    return segments, [media[i] for i in order]


def _history_tool_calls(value) -> list[dict]:
    """An assistant message's ``tool_calls``, as transformers' templates take them: ``arguments`` as an object
    (vLLM parses the JSON text the same way)."""
    if not isinstance(value, list):
        raise bad_request("an assistant message's tool_calls must be a list", param="messages")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments"), (str, dict)):
            raise bad_request('each tool call needs {"id", "type": "function", "function": {"name", "arguments"}}',
                              param="messages")
        arguments = function["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise bad_request(f"tool call arguments {_short(arguments)} are not JSON", param="messages") from None
        calls.append({"id": call.get("id"), "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return calls


_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def _message(message, media: list[MediaRef], sentinel: str, config: ServerConfig) -> dict:
    role = message.get("role") if isinstance(message, dict) else None
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(f"each message needs a role in {list(ROLES)}, got {_short(role)}", param="messages")
    extra = sorted(k for k, v in message.items() if k not in _MESSAGE_KEYS and v is not None)
    if extra:
        raise bad_request(f"message fields {_short(extra)} are not supported; a message has {list(_MESSAGE_KEYS)}",
                          param="messages")
    has_calls = role == "assistant" and message.get("tool_calls") is not None
    content = "" if has_calls and message.get("content") is None else message.get("content")
    out = {"role": "system" if role == "developer" else role,
           "content": _content(content, role, media, sentinel, config)}
    if has_calls:
        out["tool_calls"] = _history_tool_calls(message["tool_calls"])
    if role == "tool":
        out["tool_call_id"] = typed(message, "tool_call_id", "a string", "messages.tool_call_id")
    if message.get("name") is not None:
        out["name"] = typed(message, "name", "a string", "messages.name")
    return out


def chat_prompt(body: dict, template: ChatTemplate, config: ServerConfig, tools: list[dict] | None = None
                ) -> tuple[list[Segment], list[MediaRef]]:
    """``messages`` (and ``add_generation_prompt``) rendered through the template and cut into segments, with the
    media in slot order (shared by the chat endpoint and ``/tokenize``). Its errors name ``messages``."""
    try:
        return _chat_prompt(body, template, config, tools)
    except APIError as exc:
        exc.param = exc.param or "messages"
        raise


def _chat_prompt(body: dict, template: ChatTemplate, config: ServerConfig, tools: list[dict] | None
                 ) -> tuple[list[Segment], list[MediaRef]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "missing_messages", param="messages")
    sentinel = secrets.token_hex(16)  # unguessable: no user text can contain it
    media: list[MediaRef] = []
    rendered = [_message(message, media, sentinel, config) for message in messages]
    num = {kind: sum(m.kind == kind for m in media) for kind in ("image", "video", "audio")}
    check_media_counts(num["image"], num["video"], config, num["audio"])
    add_generation_prompt = typed(body, "add_generation_prompt", "true or false")
    try:
        text = template.render(rendered, tools, add_generation_prompt is not False)
    except APIError:
        raise
    except Exception as exc:  # a template error is about these messages, not the server
        raise bad_request(f"the chat template failed on these messages: {str(exc)[:200]}", "template_error") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the messages contain a lone surrogate (such as \\ud800), which is not text") from None
    return _segments(text, sentinel, media)


def parse_chat(raw: bytes, template: ChatTemplate, config: ServerConfig, served: ServedModel | None = None
               ) -> tuple[GenerateRequest, list[MediaRef]]:
    """The JSON body of ``/v1/chat/completions``; media stay ``MediaRef`` until the app resolves URLs.

    ``GenerateRequest.prompt`` is a list of segments (``str`` and ``MediaSlot``), the media in slot order."""
    served = served or ServedModel(config.model_name)
    body = load_json(raw)
    check_fields(body, CHAT)
    check_model(body, served)
    tools, tool_call, forced = tool_request(body)
    segments, media = chat_prompt(body, template, config, tools)
    media_options = body.get(MEDIA_OPTIONS_FIELD)
    media_options = {} if media_options is None else parse_media_options(media_options)
    stream = typed(body, "stream", "true or false") or False
    include_usage = stream_options(body, stream)
    params = openai_params(body, CHAT, served, forced)
    return GenerateRequest(segments, media_options=media_options, params=params, stream=stream,
                           include_usage=include_usage, tool_call=tool_call,
                           structured_field=structured_field(body, forced)), media
