"""OpenAI chat completions: messages -> prompt text with ``<image>`` / ``<video>`` markers + media.

Prompt format. When the checkpoint has a chat template (``chat_template`` in tokenizer_config.json,
or a ``chat_template.jinja`` file) it is rendered as transformers renders it, with
``add_generation_prompt=True``; each message's content is its text parts joined with its media as
markers, in order (an image part is ``<image>``). Without a template, the plain format:
- a single user message is its content as is (Fuyu's own prompt: media, ``<s>``, text, ``<0x04>``);
- otherwise one line per message, ``System: ...`` / ``User: ...`` / ``Assistant: ...``, joined by
  newlines; the engine appends ``<0x04>`` (beginning of answer) after the last one.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from serve.protocol import APIError, GenerateRequest, ServerConfig, bad_request, check_media_counts, \
    check_media_type, make_params

ROLES = ("system", "user", "assistant", "developer")
_PART_KINDS = {"image_url": "image", "video_url": "video"}
_MARKERS = {"image": "<image>", "video": "<video>"}


@dataclass
class MediaRef:
    kind: str  # "image" | "video"
    data: bytes | None = None  # decoded data: URL
    url: str | None = None  # an allowed http(s) URL, fetched by the app


class ChatTemplate:
    """Renders messages to prompt text; ``None`` template: the plain format above."""

    def __init__(self, template: str | None, eos_token: str = "</s>"):
        self.source, self.eos_token = template, eos_token
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

    def render(self, messages: list[tuple[str, str]]) -> str:
        if self._compiled is None:
            if len(messages) == 1 and messages[0][0] == "user":
                return messages[0][1]
            return "\n".join(f"{role.capitalize()}: {content}" for role, content in messages)
        # bos is placed by the interleaver, so the template's {{ bos_token }} renders empty
        return self._compiled.render(messages=[{"role": r, "content": c} for r, c in messages],
                                     add_generation_prompt=True, bos_token="", eos_token=self.eos_token)


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


def _media_ref(part: dict, kind: str, config: ServerConfig) -> MediaRef:
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"a {part['type']} part needs {{\"{part['type']}\": {{\"url\": \"data:...\"}}}}")
    if url.startswith("data:"):
        return MediaRef(kind, data=_decode_data_url(url, kind))
    scheme = urlsplit(url).scheme.lower()
    host = (urlsplit(url).hostname or "").lower()
    if scheme in ("http", "https"):
        if host and host in config.allowed_media_hosts:
            return MediaRef(kind, url=url)
        raise bad_request(f"this server does not fetch remote media ({host or url!r} is not allowed); send the "
                          f"{kind} inline as a data: URL", "remote_media_refused")
    raise bad_request(f"unsupported {kind} URL scheme {scheme!r}; use a data: URL", "bad_media")


def _content(content, role: str, media: list[MediaRef], config: ServerConfig) -> str:
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
        elif kind in _PART_KINDS:
            media.append(_media_ref(part, _PART_KINDS[kind], config))
            pieces.append(_MARKERS[_PART_KINDS[kind]])
        else:
            raise bad_request(f"unsupported content part {kind!r}; use text, image_url or video_url")
    return "".join(pieces)


def _typed(body: dict, name: str, types: tuple, what: str):
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise bad_request(f"{name} must be {what}, got {value!r}")
    return value


def parse_chat(raw: bytes, template: ChatTemplate, config: ServerConfig) -> tuple[GenerateRequest, list[MediaRef]]:
    """The JSON body of ``/v1/chat/completions``; media stay ``MediaRef`` until the app resolves URLs."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "missing_messages")
    if _typed(body, "n", (int,), "1") not in (None, 1):
        raise bad_request("only n=1 is supported")
    media: list[MediaRef] = []
    rendered = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise bad_request(f"each message needs a role in {list(ROLES)}, got {role!r}")
        rendered.append(("system" if role == "developer" else role, _content(message.get("content"), role, media,
                                                                              config)))
    check_media_counts(sum(m.kind == "image" for m in media), sum(m.kind == "video" for m in media), config)
    stream = _typed(body, "stream", (bool,), "true or false") or False
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = make_params(
        max_tokens=config.default_max_tokens if max_tokens is None else max_tokens,
        temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
        min_p=body.get("min_p"), repetition_penalty=body.get("repetition_penalty"), seed=body.get("seed"),
        stop=body.get("stop"), ignore_eos=body.get("ignore_eos"),
    )
    try:
        prompt = template.render(rendered)
    except APIError:
        raise
    except Exception as exc:  # a template error is about these messages, not the server
        raise bad_request(f"the chat template failed on these messages: {exc}", "template_error") from None
    request = GenerateRequest(prompt, params=params, stream=stream,
                              include_usage=bool(options.get("include_usage", False)))
    return request, media
