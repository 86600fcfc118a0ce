"""What the engine and the Pipeline hand back: dataclasses, not dicts.

A step's ``RequestOutput`` carries only what that step added (``delta_*``), so streaming a long answer
costs O(n) in all, not O(n^2). The whole answer (``text``, ``token_ids``, ``logprobs``) is filled in once,
on the request's final output. A consumer that falls behind merges pending deltas with ``merge``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class Usage:
    """One sequence's tokens. A request with ``n > 1`` has n sequences, each reporting the whole prompt in
    ``prompt_tokens`` (computed once, its KV shared); ``Usage.of_request`` counts it as OpenAI does."""

    prompt_tokens: int
    completion_tokens: int  # this sequence's generated tokens
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of_request(cls, usages: list[Usage]) -> Usage:
        """The usage of a request from its sequences' (OpenAI's and vLLM's rule for n > 1): the prompt once,
        the completion tokens summed over the sequences; cached tokens the fewest any sequence reports (a
        sequence recomputed after a preemption may count more of them)."""
        return cls(max(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages),
                   min(u.cached_tokens for u in usages))


TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """One sequence of a request after a step: what this step added, and on the final output the whole answer.
    A request with ``n > 1`` gives such outputs for each of its n sequences (``index``), all with its
    ``request_id``; each sequence has its own final output (``finished``), the request is done when all are."""

    request_id: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    usage: Usage
    index: int = 0  # which of the request's n sequences (SamplingParams.n) this is
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[float] | None = None  # per new token, when asked for
    delta_top_logprobs: list[TopLogprobs] | None = None
    # the whole answer: final output only ("" / [] / None before)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This output followed by ``later`` (the same sequence's next one) as one output."""
        assert later.request_id == self.request_id and later.index == self.index and not self.finished

        def joined(a, b):
            return None if a is None and b is None else (a or []) + (b or [])

        return replace(later, delta_text=self.delta_text + later.delta_text,
                       delta_token_ids=self.delta_token_ids + later.delta_token_ids,
                       delta_logprobs=joined(self.delta_logprobs, later.delta_logprobs),
                       delta_top_logprobs=joined(self.delta_top_logprobs, later.delta_top_logprobs))


@dataclass
class StreamChunk:
    """One piece of a stream: ``text`` is only the new text."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
