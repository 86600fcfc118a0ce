"""Parse and validate a request into prompt text, media and SamplingParams; errors as ``APIError``.

Form fields (multipart ``/v1/generate``) arrive as strings and are converted here; JSON fields
(``/v1/chat/completions``) keep their JSON types, so ``"temperature": "hot"`` is a 400, not a crash.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any

from encoders import MediaError
from pipeline.sampling import SamplingParams, StructuredOutputs

IMAGE_TYPES = ("image/",)
VIDEO_TYPES = ("video/", "application/mp4", "application/x-matroska")
AUDIO_TYPES = ("audio/", "application/ogg") + VIDEO_TYPES  # a video's audio track works too
MEDIA_TYPES = {"image": IMAGE_TYPES, "video": VIDEO_TYPES, "audio": AUDIO_TYPES}
MEDIA_OPTIONS_FIELD = "mm_processor_kwargs"  # vLLM's name
NEUTRAL_TYPES = ("", "application/octet-stream")  # no claim about the content: the decoder decides
INT64_LIMIT = 2**63  # integer fields must fit int64 (seeds, counts)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40


def short(value) -> str:
    """A value as an error message shows it: never the whole of a huge one."""
    return _SHORT.repr(value)


class APIError(Exception):
    """An error for the client: becomes ``{"error": {"message", "type", "code", "param"}}`` with ``status``;
    ``param`` names the request field at fault (None when none is)."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, code: str = "invalid_parameter", param: str | None = None) -> APIError:
    return APIError(400, message, code, param=param)


def from_value_error(exc: ValueError) -> APIError:
    """MediaError -> 400 bad_media; any other ValueError (sampling, markers, prompt too long) -> 400."""
    code = "bad_media" if isinstance(exc, MediaError) else "invalid_parameter"
    return APIError(400, str(exc), code)


@dataclass
class ServerConfig:
    """Limits and switches of the HTTP face (the engine has its own EngineConfig)."""

    api_key: str | None = None  # None: no key needed
    model_name: str = "fusionserve"
    max_upload_bytes: int = 64 * 1024 * 1024  # whole request body
    spool_threshold_bytes: int = 1024 * 1024  # uploaded files above this go to a temporary file
    max_field_bytes: int = 256 * 1024  # one non-file form field (the prompt)
    max_images: int = 16
    max_videos: int = 4
    max_audios: int = 4
    max_queue_len: int = 256  # requests waiting beyond the engine's max_num_seqs; more -> 429
    retry_after_s: int = 1
    default_max_tokens: int = 256
    max_prompt_bytes: int = 256 * 1024  # chat: the rendered prompt text
    allowed_media_hosts: tuple[str, ...] = ()  # hosts whose http(s) media URLs the server may fetch
    allowed_media_ports: tuple[int, ...] = (80, 443)
    allow_private_media_addresses: bool = False  # loopback, private, link-local ... (tests, trusted networks)
    media_fetch_timeout_s: float = 10.0  # all of one request's fetches together
    num_preprocess_workers: int = 4
    max_num_reading: int = 4  # requests reading their body, fetching or decoding media at once
    admission_wait_s: float = 5.0  # a request waits this long for a reading slot, then 429
    body_read_timeout_s: float = 60.0  # the whole body must arrive within this, else 408
    max_step_failures: int = 3  # consecutive failing engine steps before the engine is declared dead
    shutdown_grace_s: float = 10.0

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get("FUSIONSERVE_API_KEY") or None
        for name in ("max_upload_bytes", "spool_threshold_bytes", "max_field_bytes", "max_prompt_bytes",
                     "num_preprocess_workers", "max_num_reading", "max_step_failures", "default_max_tokens",
                     "retry_after_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_images", "max_videos", "max_audios", "max_queue_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("media_fetch_timeout_s", "admission_wait_s", "body_read_timeout_s", "shutdown_grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        self.allowed_media_hosts = tuple(h.lower() for h in self.allowed_media_hosts)
        self.allowed_media_ports = tuple(self.allowed_media_ports)
        if not all(isinstance(p, int) and 0 < p < 65536 for p in self.allowed_media_ports):
            raise ValueError(f"allowed_media_ports must be ports (1..65535), got {self.allowed_media_ports!r}")


@dataclass
class GenerateRequest:
    """One validated request: what ``Engine.build_prompt`` and ``add_request`` need, plus the reply mode."""

    prompt: str
    images: list = field(default_factory=list)  # bytes or binary file objects
    videos: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    media_options: dict = field(default_factory=dict)  # mm_processor_kwargs -> Engine.build_prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False  # streams: usage on every chunk, null until the last (stream_options.include_usage)
    tool_call: Any = None  # chat: serve.tools.ToolCall when the answer is a forced tool call
    structured_field: str | None = None  # the field the structured output came from (its errors name it)


def check_media_type(content_type: str, kind: str) -> None:
    """415 when a part or data URL declares a type that cannot be an ``kind`` ("image" | "video" | "audio")."""
    ct = content_type.split(";")[0].strip().lower()
    if ct in NEUTRAL_TYPES or ct.startswith(MEDIA_TYPES[kind]):
        return
    article = "an" if kind[0] in "aeiou" else "a"
    raise APIError(415, f"{kind} given with content type {ct!r}; send {article} {kind}/* type or "
                        "application/octet-stream", "unsupported_media_type")


def check_media_counts(num_images: int, num_videos: int, config: ServerConfig, num_audios: int = 0) -> None:
    for kind, count, limit in (("image", num_images, config.max_images), ("video", num_videos, config.max_videos),
                               ("audio", num_audios, config.max_audios)):
        if count > limit:
            raise bad_request(f"more than {limit} {kind}s in one request", f"too_many_{kind}s")


def parse_media_options(value: Any) -> dict:
    """``mm_processor_kwargs`` (a JSON object, or its text in a form) -> ``build_prompt``'s media options. Every
    option of our families is a positive integer; which names a model takes, its engine checks."""
    name = MEDIA_OPTIONS_FIELD
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise bad_request(f"{name} must be a JSON object such as {{\"max_soft_tokens\": 70}}") from None
    if not isinstance(value, dict):
        raise bad_request(f"{name} must be a JSON object such as {{\"max_soft_tokens\": 70}}")
    for key, option in value.items():
        if type(option) is not int or not 0 < option < INT64_LIMIT:
            shown = repr(option) if len(repr(option)) <= 40 else repr(option)[:40] + "..."
            raise bad_request(f"{name}.{key[:60]} must be a positive integer, got {shown}")
    return dict(value)


# sampling fields shared by the endpoints

def logit_bias(value, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI sends ``{"50256": -100}``: string keys (JSON) or ints (a form's JSON text may have either)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"logit_bias must be an object of token id -> bias, got {short(value)}", param="logit_bias")
    bias = {}
    for key, b in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            token_id = -1
        if not 0 <= token_id < (vocab_size or INT64_LIMIT) or str(token_id) != str(key).strip():
            raise bad_request(f"logit_bias key {short(key)} is not a token id of this model's vocabulary "
                              f"(0..{(vocab_size or INT64_LIMIT) - 1})", param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad_request(f"logit_bias[{key}] must be a number in [-100, 100], got {short(b)}",
                              param="logit_bias")
        bias[token_id] = float(b)
    return bias


def check_token_ids(ids, vocab_size: int | None, param: str) -> None:
    for token_id in ids or ():
        if vocab_size is not None and isinstance(token_id, int) and token_id >= vocab_size:
            raise bad_request(f"{param} has {token_id}, not a token id of this model (0..{vocab_size - 1})",
                              param=param)


def response_format(value) -> StructuredOutputs | None:
    """OpenAI's ``response_format`` -> a structured output (None for ``{"type": "text"}``)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str) or \
                not isinstance(schema, (dict, type(None))) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise bad_request('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                              param="response_format")
        return StructuredOutputs(json=schema if schema is not None else {"type": "object"})
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got {short(kind)}",
                      param="response_format")


def structured_outputs(value) -> StructuredOutputs | None:
    """vLLM's ``structured_outputs`` object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object such as {\"regex\": \"[0-9]+\"}",
                          param="structured_outputs")
    unknown = sorted(set(value) - {"json", "json_object", "regex", "choice", "grammar"})
    if unknown:
        raise bad_request(f"structured_outputs takes json, json_object, regex, choice or grammar, got "
                          f"{short(unknown)}", param="structured_outputs")
    try:
        return StructuredOutputs(json_object=value.get("json_object") or False,
                                 **{k: v for k, v in value.items() if k != "json_object"})
    except ValueError as exc:
        raise bad_request(str(exc), param="structured_outputs") from None


def structured(response_format_value, structured_outputs_value) -> StructuredOutputs | None:
    """``response_format`` or ``structured_outputs`` (not both)."""
    fmt, so = response_format(response_format_value), structured_outputs(structured_outputs_value)
    if fmt is not None and so is not None:
        raise bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
    return fmt or so


# /v1/generate's form: the same sampling fields, as text

_FORM_INT = ("max_tokens", "top_k", "seed", "n", "logprobs", "min_tokens")
_FORM_FLOAT = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_FORM_BOOL = ("stream", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
_FORM_JSON = ("logit_bias", "response_format", "structured_outputs", "stop_token_ids")  # JSON text
FORM_FIELDS = ("prompt", "stop", MEDIA_OPTIONS_FIELD) + _FORM_INT + _FORM_FLOAT + _FORM_BOOL + _FORM_JSON


def _form_value(name: str, raw: str) -> Any:
    text, shown = raw.strip(), repr(raw) if len(raw) <= 40 else repr(raw[:40]) + "..."
    if name in _FORM_JSON:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise bad_request(f"{name} must be JSON text, got {shown}", param=name) from None
    if name in _FORM_BOOL:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off", ""):
            return False
        raise bad_request(f"{name} must be true or false, got {shown}", param=name)
    try:
        value = int(text) if name in _FORM_INT else float(text)
    except ValueError:
        kind = "an integer" if name in _FORM_INT else "a number"
        raise bad_request(f"{name} must be {kind}, got {shown}", param=name) from None
    if name in _FORM_INT and not -INT64_LIMIT <= value < INT64_LIMIT:
        raise bad_request(f"{name} must fit in 64 bits, got {shown}", param=name)
    if not math.isfinite(value):
        raise bad_request(f"{name} must be finite, got {shown}", param=name)
    return value


def make_params(api_names: dict[str, str] | None = None, **values: Any) -> SamplingParams:
    """SamplingParams from already-typed values (None: default); its ValueError becomes a 400 whose ``param`` is
    the field its message starts with (``api_names``: SamplingParams field -> request field, where they differ)."""
    try:
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})
    except (ValueError, TypeError) as exc:
        name = str(exc).split(" ", 1)[0].split(".", 1)[0]
        param = (api_names or {}).get(name, name) if name in SamplingParams.__dataclass_fields__ else None
        raise bad_request(str(exc), param=param) from None


def parse_form(fields: dict[str, list[str]], images: list, videos: list, config: ServerConfig,
               audios: list = (), vocab_size: int | None = None) -> GenerateRequest:
    """``/v1/generate``: ``fields`` maps each non-file field to its values (``stop`` may repeat)."""
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        known = sorted(FORM_FIELDS + ("image", "video", "audio"))
        raise bad_request(f"unknown form field(s) {unknown}; known: {known}", param=unknown[0][:100])
    for name, values in fields.items():
        if name != "stop" and len(values) > 1:
            raise bad_request(f"form field {name!r} given {len(values)} times; give it once")
    if "prompt" not in fields:
        raise bad_request("the form needs a 'prompt' field", "missing_prompt")
    check_media_counts(len(images), len(videos), config, len(audios))
    options = parse_media_options(fields[MEDIA_OPTIONS_FIELD][0]) if MEDIA_OPTIONS_FIELD in fields else {}
    values = {name: _form_value(name, vals[0]) for name, vals in fields.items()
              if name not in ("prompt", "stop", MEDIA_OPTIONS_FIELD)}
    stream = values.pop("stream", False)
    values.setdefault("max_tokens", config.default_max_tokens)
    values["logit_bias"] = logit_bias(values.get("logit_bias"), vocab_size)
    check_token_ids(values.get("stop_token_ids"), vocab_size, "stop_token_ids")
    values["structured"] = structured(values.pop("response_format", None), values.pop("structured_outputs", None))
    params = make_params(stop=fields.get("stop") or None, **values)
    return GenerateRequest(fields["prompt"][0], images, videos, list(audios), options, params, stream,
                           structured_field="structured_outputs" if "structured_outputs" in fields else "response_format")
