"""Every OpenAI and vLLM request field of ``/v1/chat/completions`` and ``/v1/completions``, in one table, and
the typed reading of the sampling ones into ``SamplingParams`` values.

A field is SUPPORTED (it does what it does on OpenAI / vLLM), INFORMATIONAL (it cannot change an answer:
an end-user id, tags; accepted as the references accept it), or REFUSED: given with a value other than
its neutral ones (the reference's default), it is a 400 whose ``error.param`` names it. A field in neither
table is a 400 too (OpenAI's "unrecognized request argument"), so nothing a client sends is silently
dropped. The README's table is generated from ``FIELDS`` (``markdown_table``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.sampling import MAX_LOGPROBS, SamplingParams, StructuredOutputs
from serve.protocol import INT64_LIMIT as INT_LIMIT
from serve.protocol import APIError, bad_request, check_token_ids, logit_bias, make_params, short, structured

CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)
SUPPORTED, INFORMATIONAL, REFUSED = "supported", "informational", "refused"


@dataclass(frozen=True)
class Field:
    name: str
    origin: str  # "OpenAI" | "vLLM"
    endpoints: tuple[str, ...]
    status: str
    note: str = ""
    neutral: tuple = (None,)  # REFUSED: the values that mean "not used" (the reference's default)


def _f(name, origin, endpoints, status, note="", neutral=(None,)) -> Field:
    return Field(name, origin, endpoints if isinstance(endpoints, tuple) else (endpoints,), status, note, neutral)


FIELDS: tuple[Field, ...] = (
    # the request itself
    _f("model", "OpenAI", BOTH, SUPPORTED, "the served name (`--served-model-name`, default the model folder's "
       "name); absent: the served model; another name: 404 `model_not_found`"),
    _f("messages", "OpenAI", CHAT, SUPPORTED, "roles system, developer, user, assistant (with `tool_calls`), tool; "
       "parts text, image_url, video_url, input_audio, audio_url"),
    _f("prompt", "OpenAI", COMPLETIONS, SUPPORTED, "a string, a list of strings, token ids, or a list of token-id "
       "lists (one choice per prompt and n); token ids skip tokenization; `<image>` markers are text"),
    _f("stream", "OpenAI", BOTH, SUPPORTED, "server-sent events ending with `data: [DONE]`"),
    _f("stream_options", "OpenAI", BOTH, SUPPORTED, "`include_usage` (every chunk carries `usage`, null until the "
       "last); `continuous_usage_stats` is refused"),
    # sampling
    _f("max_tokens", "OpenAI", BOTH, SUPPORTED, "default: what is left of the context (max_model_len - prompt)"),
    _f("max_completion_tokens", "OpenAI", CHAT, SUPPORTED, "wins over `max_tokens`"),
    _f("temperature", "OpenAI", BOTH, SUPPORTED, "0 = greedy; default 1"),
    _f("top_p", "OpenAI", BOTH, SUPPORTED),
    _f("n", "OpenAI", BOTH, SUPPORTED, "1..128 choices; the prompt is prefilled once"),
    _f("seed", "OpenAI", BOTH, SUPPORTED, "per-request generator: the same seed gives the same answer"),
    _f("stop", "OpenAI", BOTH, SUPPORTED, "a string or a list; the stop string is cut from the answer"),
    _f("presence_penalty", "OpenAI", BOTH, SUPPORTED, "-2..2, over generated tokens"),
    _f("frequency_penalty", "OpenAI", BOTH, SUPPORTED, "-2..2, over generated tokens"),
    _f("logit_bias", "OpenAI", BOTH, SUPPORTED, "token id (JSON string key) -> -100..100, ids checked against the "
       "vocabulary"),
    _f("logprobs", "OpenAI", BOTH, SUPPORTED, f"chat: true/false; completions: an integer 0..{MAX_LOGPROBS} "
       "(legacy format)"),
    _f("top_logprobs", "OpenAI", CHAT, SUPPORTED, f"0..{MAX_LOGPROBS}, with `logprobs: true`"),
    _f("response_format", "OpenAI", BOTH, SUPPORTED, "`text`, `json_object`, `json_schema` (xgrammar); a bad "
       "schema is a 400"),
    _f("tools", "OpenAI", CHAT, SUPPORTED, "function tools, rendered through the chat template"),
    _f("tool_choice", "OpenAI", CHAT, SUPPORTED, "`none`, `required`, or a named function (arguments generated "
       "under its JSON schema); `auto` is refused: neither served family defines a tool-call format"),
    _f("parallel_tool_calls", "OpenAI", CHAT, SUPPORTED, "true or false: each choice makes one call, which both allow"),
    _f("user", "OpenAI", BOTH, INFORMATIONAL, "an end-user id for the caller's records"),
    _f("safety_identifier", "OpenAI", CHAT, INFORMATIONAL, "an end-user id for the caller's records"),
    _f("prompt_cache_key", "OpenAI", CHAT, INFORMATIONAL, "prefix caching is automatic"),
    _f("metadata", "OpenAI", CHAT, INFORMATIONAL, "tags of a stored completion; nothing is stored"),
    _f("store", "OpenAI", CHAT, REFUSED, "nothing is stored", (None, False)),
    _f("service_tier", "OpenAI", CHAT, REFUSED, "one tier", (None, "auto", "default")),
    _f("modalities", "OpenAI", CHAT, REFUSED, "text output only", (None, ["text"])),
    _f("audio", "OpenAI", CHAT, REFUSED, "no audio output"),
    _f("prediction", "OpenAI", CHAT, REFUSED, "no speculative decoding"),
    _f("reasoning_effort", "OpenAI", CHAT, REFUSED, "the served families do not reason"),
    _f("verbosity", "OpenAI", CHAT, REFUSED),
    _f("web_search_options", "OpenAI", CHAT, REFUSED),
    _f("functions", "OpenAI", CHAT, REFUSED, "deprecated: use `tools`"),
    _f("function_call", "OpenAI", CHAT, REFUSED, "deprecated: use `tool_choice`"),
    _f("echo", "OpenAI", BOTH, REFUSED, "the prompt is not returned with the answer", (None, False)),
    _f("suffix", "OpenAI", COMPLETIONS, REFUSED, "no fill-in-the-middle", (None, "")),
    _f("best_of", "OpenAI", COMPLETIONS, SUPPORTED, "only equal to n (no ranking by logprob); other values refused"),
    # vLLM's extensions
    _f("top_k", "vLLM", BOTH, SUPPORTED, "0 or -1: all tokens"),
    _f("min_p", "vLLM", BOTH, SUPPORTED),
    _f("repetition_penalty", "vLLM", BOTH, SUPPORTED, "transformers' definition, over prompt and output"),
    _f("min_tokens", "vLLM", BOTH, SUPPORTED, "no stop token or string before this many tokens"),
    _f("stop_token_ids", "vLLM", BOTH, SUPPORTED),
    _f("include_stop_str_in_output", "vLLM", BOTH, SUPPORTED),
    _f("skip_special_tokens", "vLLM", BOTH, SUPPORTED),
    _f("ignore_eos", "vLLM", BOTH, SUPPORTED),
    _f("structured_outputs", "vLLM", BOTH, SUPPORTED, "exactly one of `json`, `json_object`, `regex`, `choice`, "
       "`grammar` (xgrammar)"),
    _f("mm_processor_kwargs", "vLLM", CHAT, SUPPORTED, "the family's media options (Gemma 4 Unified: "
       "`max_soft_tokens`, ...)"),
    _f("add_generation_prompt", "vLLM", CHAT, SUPPORTED, "default true; false needs a chat template"),
    _f("use_beam_search", "vLLM", BOTH, REFUSED, "no beam search", (None, False)),
    _f("length_penalty", "vLLM", BOTH, REFUSED, "beam search only", (None, 1, 1.0)),
    _f("spaces_between_special_tokens", "vLLM", BOTH, REFUSED, "", (None, True)),
    _f("truncate_prompt_tokens", "vLLM", BOTH, REFUSED, "a prompt too long is a 400"),
    _f("prompt_logprobs", "vLLM", BOTH, REFUSED),
    _f("allowed_token_ids", "vLLM", BOTH, REFUSED, "use `logit_bias` or `structured_outputs`"),
    _f("bad_words", "vLLM", BOTH, REFUSED, "", (None, [])),
    _f("continue_final_message", "vLLM", CHAT, REFUSED, "", (None, False)),
    _f("add_special_tokens", "vLLM", BOTH, REFUSED, "the prompt layout places BOS itself"),
    _f("documents", "vLLM", CHAT, REFUSED),
    _f("chat_template", "vLLM", CHAT, REFUSED, "the checkpoint's template is used"),
    _f("chat_template_kwargs", "vLLM", CHAT, REFUSED, "", (None, {})),
    _f("guided_json", "vLLM", BOTH, REFUSED, "removed in vLLM: use `structured_outputs.json`"),
    _f("guided_regex", "vLLM", BOTH, REFUSED, "removed in vLLM: use `structured_outputs.regex`"),
    _f("guided_choice", "vLLM", BOTH, REFUSED, "removed in vLLM: use `structured_outputs.choice`"),
    _f("guided_grammar", "vLLM", BOTH, REFUSED, "removed in vLLM: use `structured_outputs.grammar`"),
    _f("guided_decoding_backend", "vLLM", BOTH, REFUSED, "xgrammar is the one backend"),
    _f("guided_whitespace_pattern", "vLLM", BOTH, REFUSED),
    _f("priority", "vLLM", BOTH, REFUSED, "first come, first served", (None, 0)),
    _f("request_id", "vLLM", BOTH, REFUSED, "the server names requests"),
    _f("logits_processors", "vLLM", BOTH, REFUSED),
    _f("return_tokens_as_token_ids", "vLLM", BOTH, REFUSED, "", (None, False)),
    _f("return_token_ids", "vLLM", BOTH, REFUSED, "", (None, False)),
    _f("cache_salt", "vLLM", BOTH, REFUSED),
    _f("kv_transfer_params", "vLLM", BOTH, REFUSED, "disaggregated serving runs through the Dynamo worker"),
    _f("vllm_xargs", "vLLM", BOTH, REFUSED),
    _f("include_reasoning", "vLLM", CHAT, REFUSED, "the served families do not reason", (None, True)),
    _f("prompt_embeds", "vLLM", COMPLETIONS, REFUSED),
)
FIELDS_BY_NAME: dict[str, dict[str, Field]] = {
    endpoint: {f.name: f for f in FIELDS if endpoint in f.endpoints} for endpoint in BOTH}


_SHAPES = {"parallel_tool_calls": "true or false", "user": "a string", "safety_identifier": "a string",
           "prompt_cache_key": "a string", "metadata": "an object"}  # fields no parser reads further


def check_fields(body: dict, endpoint: str) -> None:
    """400 naming the field for an unknown field, or a refused one given with a non-neutral value."""
    known = FIELDS_BY_NAME[endpoint]
    for name, value in body.items():
        spec = known.get(name)
        if name in _SHAPES and spec is not None:
            typed(body, name, _SHAPES[name])
        if spec is None:
            raise bad_request(f"unrecognized request field {short(name)} for /v1/{endpoint.replace('chat', 'chat/completions')}",
                              "unknown_field", param=str(name)[:100])
        if spec.status == REFUSED and not any(value == v and type(value) is type(v) for v in spec.neutral):
            reason = f": {spec.note}" if spec.note else ""
            raise bad_request(f"{name} is not supported by this server{reason}", "unsupported_field", param=name)


def markdown_table() -> str:
    """The README's table of request fields."""
    rows = ["| field | from | chat | completions | status | notes |", "|---|---|---|---|---|---|"]
    for f in FIELDS:
        status = {SUPPORTED: "supported", INFORMATIONAL: "accepted, no effect on the answer",
                  REFUSED: "400 unless " + " / ".join("absent" if v is None else json.dumps(v) for v in f.neutral)
                  }[f.status]
        rows.append(f"| `{f.name}` | {f.origin} | {'yes' if CHAT in f.endpoints else ''} | "
                    f"{'yes' if COMPLETIONS in f.endpoints else ''} | {status} | {f.note} |")
    return "\n".join(rows)


# typed reading

CHECKS = {  # JSON types (bool is not a number); floats are finite already
    "a 64-bit integer": lambda v: type(v) is int and -INT_LIMIT <= v < INT_LIMIT,
    "a number": lambda v: type(v) is float or type(v) is int and -INT_LIMIT <= v < INT_LIMIT,
    "true or false": lambda v: type(v) is bool,
    "an object": lambda v: type(v) is dict,
    "a string": lambda v: type(v) is str,
    "a string or a list of strings": lambda v: type(v) is str or type(v) is list and all(type(x) is str for x in v),
    "a list of token ids": lambda v: type(v) is list and all(type(x) is int and 0 <= x < INT_LIMIT for x in v),
}
SAMPLING = {  # request field -> (what it must be, SamplingParams field)
    "temperature": ("a number", "temperature"), "top_p": ("a number", "top_p"),
    "top_k": ("a 64-bit integer", "top_k"), "min_p": ("a number", "min_p"),
    "repetition_penalty": ("a number", "repetition_penalty"), "seed": ("a 64-bit integer", "seed"),
    "stop": ("a string or a list of strings", "stop"), "ignore_eos": ("true or false", "ignore_eos"),
    "n": ("a 64-bit integer", "n"), "presence_penalty": ("a number", "presence_penalty"),
    "frequency_penalty": ("a number", "frequency_penalty"), "min_tokens": ("a 64-bit integer", "min_tokens"),
    "stop_token_ids": ("a list of token ids", "stop_token_ids"),
    "include_stop_str_in_output": ("true or false", "include_stop_str_in_output"),
    "skip_special_tokens": ("true or false", "skip_special_tokens"),
}


def typed(body: dict, name: str, what: str, param: str | None = None):
    value = body.get(name)
    if value is not None and not CHECKS[what](value):
        raise bad_request(f"{param or name} must be {what}, got {short(value)}", param=param or name)
    return value


def sampling_values(body: dict, vocab_size: int | None) -> dict:
    """The sampling fields both endpoints share, typed, as ``SamplingParams`` keyword arguments (absent: left
    out). ``max_tokens``, ``logprobs`` and the structured output are the endpoints' own."""
    values = {param: typed(body, name, what) for name, (what, param) in SAMPLING.items()}
    values["logit_bias"] = logit_bias(body.get("logit_bias"), vocab_size)
    check_token_ids(values["stop_token_ids"], vocab_size, "stop_token_ids")
    return {k: v for k, v in values.items() if v is not None}


def stream_options(body: dict, stream: bool) -> bool:
    """``include_usage`` (only with ``stream``, as OpenAI)."""
    options = typed(body, "stream_options", "an object") or {}
    if options and not stream:
        raise bad_request("stream_options is only for stream: true", param="stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown or options.get("continuous_usage_stats"):
        raise bad_request(f"stream_options takes include_usage only, got {short(sorted(options))}",
                          param="stream_options")
    return typed(options, "include_usage", "true or false", "stream_options.include_usage") or False


@dataclass(frozen=True)
class ServedModel:
    """What request parsing needs of the served model (None: the engine has not loaded yet)."""

    name: str
    max_model_len: int | None = None
    vocab_size: int | None = None


def check_model(body: dict, served: ServedModel) -> None:
    model = typed(body, "model", "a string")
    if model is not None and model != served.name:
        raise APIError(404, f"the model {short(model)} does not exist; this server serves {served.name!r}",
                       "model_not_found", param="model")


def load_json(raw: bytes):
    """A JSON object body, or a 400: too deep, non-finite or out-of-range numbers are refused."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    try:
        body = json.loads(raw, parse_constant=refuse_constant, parse_float=finite_float)
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply", "invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits, the two above
        raise bad_request(f"the body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def openai_params(body: dict, endpoint: str, served: ServedModel, forced: StructuredOutputs | None = None
                  ) -> SamplingParams:
    """SamplingParams of a chat or completions body. ``forced``: the structured output a tool choice imposes.
    Without ``max_tokens`` the answer may run to the end of the context, as on OpenAI and vLLM (the engine stops
    a sequence at ``max_model_len``, so ``max_model_len`` tokens is "what is left after the prompt")."""
    values = sampling_values(body, served.vocab_size)
    max_tokens = typed(body, "max_tokens", "a 64-bit integer")
    if endpoint == CHAT:
        newer = typed(body, "max_completion_tokens", "a 64-bit integer")
        max_tokens = max_tokens if newer is None else newer
        logprobs, top = typed(body, "logprobs", "true or false"), typed(body, "top_logprobs", "a 64-bit integer")
        if top is not None and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        values["logprobs"] = (top or 0) if logprobs else None
    else:
        values["logprobs"] = typed(body, "logprobs", "a 64-bit integer")
        best_of = typed(body, "best_of", "a 64-bit integer")
        if best_of is not None and best_of != values.get("n", 1):
            raise bad_request(f"best_of must equal n (here {values.get('n', 1)}): answers are not ranked by logprob",
                              param="best_of")
    chosen = structured(body.get("response_format"), body.get("structured_outputs"))
    if forced is not None and chosen is not None:
        raise bad_request("response_format or structured_outputs cannot be combined with a forced tool call",
                          param="response_format")
    if max_tokens is None:
        max_tokens = served.max_model_len or SamplingParams.max_tokens
    names = {"logprobs": "top_logprobs" if endpoint == CHAT else "logprobs", "structured": "response_format",
             "max_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"}
    return make_params(names, max_tokens=max_tokens, structured=forced or chosen, **values)


def structured_field(body: dict, forced: StructuredOutputs | None) -> str | None:
    """The request field a structured output came from (a bad grammar is a 400 naming it)."""
    if forced is not None:
        return "tools"
    return next((name for name in ("response_format", "structured_outputs") if body.get(name) is not None), None)
