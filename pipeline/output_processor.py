"""From sampled tokens to what callers see (vLLM's output processor): incremental detokenizing, stop
tokens and strings, logprobs, finish reasons, and per-step delta outputs.

Each step's ``RequestOutput`` carries only what the step added, so a long stream costs O(n); the whole
answer is assembled once, on the final output. As vLLM: a stop token (EOS unless ``ignore_eos``, or one of
``stop_token_ids``) ends the request; it stays in ``token_ids`` and is left out of the text, unless
``include_stop_str_in_output`` (then it is decoded as any token, so a special one still needs
``skip_special_tokens=False`` to show). A stop string ends it too and is cut with what follows (kept, with
``include_stop_str_in_output``); while running, a possible stop-string prefix at the end of the text is held
back. Before ``min_tokens`` tokens neither is checked, and text made by those tokens is not searched for stop
strings; but a stop token after which the request's grammar is terminated ends it (the grammar wins).
``skip_special_tokens`` is the detokenizer's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.outputs import RequestOutput, TopLogprobs, Usage
from pipeline.request import Request, RequestStatus
from tokenization import IncrementalDetokenizer


@dataclass
class _State:
    detokenizer: IncrementalDetokenizer
    emitted_text: str = ""  # text released to the caller so far
    num_emitted_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    num_emitted_logprobs: int = 0
    num_searched_chars: int = 0  # text already searched for stop strings (or made before min_tokens)
    cut_text: str | None = None  # the text up to a stop string that ended the request


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self._states: dict[str, _State] = {}

    def add(self, req: Request) -> None:
        skip = req.sampling_params.skip_special_tokens
        self._states[req.request_id] = _State(IncrementalDetokenizer(self.tokenizer, skip_special_tokens=skip))

    def update(self, req: Request, logprob: float | None = None, top: TopLogprobs | None = None
               ) -> tuple[RequestStatus | None, RequestOutput | None]:
        """After ``req`` got its next token: (finish status or None, the running delta output or None when it
        finishes; then call ``finish`` once the scheduler has freed it)."""
        state, params, token = self._states[req.request_id], req.sampling_params, req.output_token_ids[-1]
        if params.logprobs is not None:
            state.logprobs.append(logprob)
            state.top_logprobs.append(top)
        checks_stops = req.num_output_tokens >= params.min_tokens  # the sampler masked stop tokens before
        is_stop_token = token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos)
        constraint = getattr(req.sampler_state, "constraint", None)
        if is_stop_token and (checks_stops or (constraint is not None and constraint.is_terminated)):
            if params.include_stop_str_in_output:
                state.detokenizer.add([token])
            return RequestStatus.FINISHED_STOPPED, None
        state.detokenizer.add([token])
        text = state.detokenizer.text
        if params.stop and req.num_output_tokens > params.min_tokens:
            state.cut_text = self._cut_at_stop(text, state.num_searched_chars, params)
            if state.cut_text is not None:
                return RequestStatus.FINISHED_STOPPED, None
        state.num_searched_chars = len(text)
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        held = 0 if params.include_stop_str_in_output else max(map(len, params.stop), default=1) - 1
        return None, self._delta(req, state, text[:max(0, len(text) - held)], finished=False)

    @staticmethod
    def _cut_at_stop(text: str, num_searched: int, params) -> str | None:
        """The text up to the earliest stop string that ends past ``num_searched`` (through it, with
        ``include_stop_str_in_output``), or None."""
        hits = [(i, s) for s in params.stop if (i := text.find(s, max(0, num_searched - len(s) + 1))) >= 0]
        if not hits:
            return None
        start, stop = min(hits)
        return text[:start + len(stop) if params.include_stop_str_in_output else start]

    def finish(self, req: Request) -> RequestOutput:
        """The final output of a finished (or aborted) request: the last delta plus the whole answer."""
        state = self._states.pop(req.request_id)
        text = state.cut_text
        if text is None:
            text = state.detokenizer.text + state.detokenizer.flush()
        out = self._delta(req, state, text, finished=True)
        out.text, out.token_ids = state.emitted_text, list(req.output_token_ids)
        if req.sampling_params.logprobs is not None:
            out.logprobs, out.top_logprobs = state.logprobs, state.top_logprobs
        return out

    def _delta(self, req: Request, state: _State, text: str, finished: bool) -> RequestOutput:
        emitted = state.emitted_text
        delta_text = text[len(emitted):] if text.startswith(emitted) else ""
        state.emitted_text = emitted + delta_text
        delta_ids = req.output_token_ids[state.num_emitted_tokens:]
        state.num_emitted_tokens = req.num_output_tokens
        out = RequestOutput(
            request_id=req.request_id, finished=finished, finish_reason=req.status.finish_reason if finished else None,
            usage=Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens),
            delta_text=delta_text, delta_token_ids=list(delta_ids))
        if req.sampling_params.logprobs is not None:
            out.delta_logprobs = state.logprobs[state.num_emitted_logprobs:]
            out.delta_top_logprobs = state.top_logprobs[state.num_emitted_logprobs:]
            state.num_emitted_logprobs = len(state.logprobs)
        return out
