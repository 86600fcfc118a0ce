"""Request state: status, token ids, num_computed_tokens, block table."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """One sequence. Its first num_computed_tokens tokens have KV in the blocks of block_ids.

    A caller's request with ``n > 1`` is n sequences: the first is scheduled with the others in its ``forks``;
    once its prompt is computed they fork off it, sharing its blocks (``Scheduler.update_from_output``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    media_spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, content_hash)
    atomic_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end): never split across steps
    payload: Any = None  # opaque here: the model runner's media patches
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, max over admissions
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # block manager's chain hashes of full blocks
    sampler_state: Any = None  # the sampler's per-request state (seeded generator, grammar constraint)
    parent_id: str | None = None  # the caller's request id, when this is one of its n > 1 sequences
    index: int = 0  # which of the caller's n sequences (SamplingParams.n) this is
    forks: list[Request] = field(default_factory=list)  # sequences that share this one's prompt: forked off
    num_prefill_len: int = 0  # num_tokens at the last admission: the tokens a prefill (or recompute) computes

    def __post_init__(self):
        assert self.prompt_token_ids, "empty prompt"
        prev_end = 0
        for start, end, _ in self.media_spans:
            assert prev_end <= start < end <= len(self.prompt_token_ids), f"bad media span {(start, end)}"
            prev_end = end
        prev_end = 0
        for start, end in self.atomic_spans:
            assert prev_end <= start < end <= len(self.prompt_token_ids), f"bad atomic span {(start, end)}"
            prev_end = end
        self._token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def caller_id(self) -> str:
        """The request id the caller gave (internal ids of n > 1 sequences never reach a caller)."""
        return self.request_id if self.parent_id is None else self.parent_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs (the live list: read only)."""
        return self._token_ids

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)
