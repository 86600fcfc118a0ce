"""What the engine and the Pipeline hand back: dataclasses, not dicts."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """State of one request after a step: the whole text so far plus what this step added."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    usage: Usage
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # per output token, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class StreamChunk:
    """One piece of a stream: ``text`` is only the new text."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
