"""OpenAI legacy completions (``POST /v1/completions``): the body -> prompts and SamplingParams.

``prompt`` is a string, a list of strings, a list of token ids, or a list of token-id lists; each prompt is
its own engine request with ``n`` sequences, and the choices are indexed across prompts
(``prompt_index * n + sequence_index``, as vLLM). Text prompts are tokenized as ``/v1/generate`` prompts
are (the family's layout: Fuyu's BOS and beginning-of-answer); a token-id prompt goes to the model as
given (``TokenIds``), its ids checked against the vocabulary. ``<image>`` markers in a text prompt are
plain text here: media go through ``/v1/chat/completions`` or ``/v1/generate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.sampling import SamplingParams
from serve.openai_fields import COMPLETIONS, ServedModel, check_fields, check_model, load_json, openai_params, \
    stream_options, structured_field, typed
from serve.protocol import ServerConfig, bad_request, short

MAX_PROMPTS = 64  # prompts in one request


class TokenIds(list):
    """A prompt given as token ids: the engine takes it without text tokenization (see ``accept_token_ids``)."""


def accept_token_ids(engine):
    """Lets ``engine.build_prompt`` take ``TokenIds`` (what ``AsyncEngine.submit`` calls on the worker pool): a
    text-only prompt of the family (no media rows) with exactly these ids. Returns the engine."""
    build = engine.build_prompt

    def build_prompt(text, *args, **kwargs):
        if isinstance(text, TokenIds):
            return replace(build(""), token_ids=list(text))
        return build(text, *args, **kwargs)

    engine.build_prompt = build_prompt
    return engine


@dataclass
class CompletionRequest:
    prompts: list[str | TokenIds]
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    structured_field: str | None = None  # the field a structured output came from (its errors name it)


def _prompts(value, vocab_size: int | None, config: ServerConfig) -> list[str | TokenIds]:
    def token_ids(ids: list) -> TokenIds:
        if not ids:
            raise bad_request("a token-id prompt must not be empty", param="prompt")
        bad = next((t for t in ids if type(t) is not int or not 0 <= t < (vocab_size or 2**63)), None)
        if bad is not None:
            raise bad_request(f"prompt token {short(bad)} is not a token id of this model's vocabulary "
                              f"(0..{(vocab_size or 2**63) - 1})", param="prompt")
        return TokenIds(ids)

    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(type(x) is int for x in value):
        prompts = [token_ids(value)]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        prompts = [token_ids(x) for x in value]
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                          f"lists, got {short(value)}", "missing_prompt" if value is None else "invalid_parameter",
                          param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
    for p in prompts:
        if isinstance(p, str) and len(p.encode("utf-8", "surrogatepass")) > config.max_prompt_bytes:
            raise bad_request(f"the prompt text is over {config.max_prompt_bytes} bytes", "prompt_too_long",
                              param="prompt")
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("the prompt contains a lone surrogate (such as \\ud800), which is not text",
                                  param="prompt") from None
    return prompts


def parse_completion(raw: bytes, config: ServerConfig, served: ServedModel, tokenizer_vocab_size: int | None = None
                     ) -> CompletionRequest:
    """``tokenizer_vocab_size``: prompt ids must be below it (the tokenizer's, as vLLM checks prompt ids)."""
    body = load_json(raw)
    check_fields(body, COMPLETIONS)
    check_model(body, served)
    prompts = _prompts(body.get("prompt"), tokenizer_vocab_size, config)
    stream = typed(body, "stream", "true or false") or False
    include_usage = stream_options(body, stream)
    return CompletionRequest(prompts, openai_params(body, COMPLETIONS, served), stream, include_usage,
                             structured_field(body, None))
