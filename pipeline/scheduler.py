"""Continuous batching: per-step token budget, chunked prefill mixed with decodes, preemption by recompute, and
parallel sampling (n sequences forked off one prompt prefill)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pipeline.block_manager import BlockManager
from pipeline.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step: request i computes its tokens [num_computed_tokens, num_computed_tokens + num_new_tokens[i]),
    after the runner copied the KV of the blocks in ``blocks_to_copy`` (source, destination: copy on write)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def add(self, req: Request, num_new_tokens: int) -> None:
        self.requests.append(req)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    """First come, first served. Each step schedules the running requests (oldest first, a decode or the next
    prefill chunk each), then admits waiting ones while the token budget, max_num_seqs and blocks allow. When
    blocks run out the newest running request is preempted: its blocks are freed and it goes back to the front
    of the waiting queue to recompute prompt + outputs. A request's atomic spans (bidirectional media runs) are
    never split across steps (vLLM's disable_chunked_mm_input): a chunk ends before a span that does not fit the
    step's remaining budget; a span longer than the whole budget is scheduled alone, in a step of its own.

    A request with forks (SamplingParams.n > 1) is admitted only when max_num_seqs has room for all its sequences;
    once its prompt is computed, each fork shares its blocks and joins the running requests (vLLM V0's sequence
    group fork): the prompt is prefilled once. From then on each sequence is scheduled, and may be preempted,
    on its own."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ):
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1 and max_model_len >= 1
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # tokens computed by prefills, recomputes included (not decodes)
        self._admit_alone = False  # the next step admits the head of the queue alone (its span needs the budget)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_running_seqs(self) -> int:
        """Running sequences, counting the forks a running request will make at the end of its prompt."""
        return len(self.running) + sum(len(req.forks) for req in self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def max_seq_len(self, req: Request) -> int:
        return min(req.num_prompt_tokens + req.sampling_params.max_tokens, self.max_model_len)

    def reject_reason(self, req: Request) -> str | None:
        """Why the request could never be scheduled (the engine raises it as a ValueError at add time)."""
        if 1 + len(req.forks) > self.max_num_seqs:
            return (f"n={1 + len(req.forks)} sequences cannot run at once with max_num_seqs={self.max_num_seqs}: "
                    f"lower n or raise max_num_seqs")
        if req.num_prompt_tokens >= self.max_model_len:
            return (f"prompt has {req.num_prompt_tokens} tokens; max_model_len is {self.max_model_len}, "
                    f"which leaves no room to generate: shorten the prompt or use fewer/smaller media")
        num_blocks = self.block_manager.num_blocks_for(self.max_seq_len(req))
        if num_blocks > self.block_manager.num_blocks:
            return (f"prompt + max_tokens needs {num_blocks} KV blocks but the cache holds "
                    f"{self.block_manager.num_blocks}: lower max_tokens or shorten the prompt")
        if not self.enable_chunked_prefill and self.max_seq_len(req) > self.max_num_batched_tokens:
            return (f"prompt + max_tokens ({self.max_seq_len(req)} tokens) exceeds max_num_batched_tokens "
                    f"({self.max_num_batched_tokens}) with chunked prefill off: lower max_tokens or enable it")
        return None

    def add(self, req: Request) -> None:
        assert self.reject_reason(req) is None, self.reject_reason(req)
        assert req.status == RequestStatus.WAITING and not req.block_ids
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = len(self.running) if self._admit_alone else 0  # running requests wait one step
        self._admit_alone = False
        while i < len(self.running) and budget > 0:  # running: decodes and prefill chunks
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            assert num_new > 0 and req.num_tokens <= self.max_model_len
            assert self.enable_chunked_prefill or num_new == 1
            num_new = self._fit(req, req.num_computed_tokens, num_new, budget, alone=out.is_empty)
            if not num_new:  # an atomic span that does not fit what is left of the budget waits
                if self._span_len(req, req.num_computed_tokens) > self.max_num_batched_tokens:
                    self.running.insert(0, self.running.pop(i))  # longer than any budget: first, alone, next step
                    return self._with_copies(out)
                i += 1
                continue
            while not self.block_manager.can_allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self.block_manager.allocate(req, num_new)
                out.add(req, num_new)
                budget -= num_new
                i += 1
        if out.preempted:
            return self._with_copies(out)
        while self.waiting and budget > 0 and self.num_running_seqs < self.max_num_seqs:  # admit
            req = self.waiting[0]
            if self.num_running_seqs + 1 + len(req.forks) > self.max_num_seqs:
                break
            cached_blocks, num_cached = self.block_manager.find_cached_prefix(req)
            num_new = req.num_tokens - num_cached
            if not self.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._fit(req, num_cached, num_new, budget, alone=out.is_empty)
            if not num_new:
                self._admit_alone = self._span_len(req, num_cached) > self.max_num_batched_tokens
                break
            if not self.block_manager.can_allocate(req, num_new, cached_blocks):
                break
            self.waiting.popleft()
            req.num_computed_tokens, req.num_prefill_len = num_cached, req.num_tokens
            self.block_manager.allocate(req, num_new, cached_blocks)
            req.num_cached_tokens = max(req.num_cached_tokens, min(num_cached, req.num_prompt_tokens))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.add(req, num_new)
            budget -= num_new
        return self._with_copies(out)

    def _with_copies(self, out: SchedulerOutput) -> SchedulerOutput:
        out.blocks_to_copy = self.block_manager.take_copies()
        return out

    def _fit(self, req: Request, start: int, num_new: int, budget: int, alone: bool) -> int:
        """How many of the ``num_new`` tokens from ``start`` to schedule now (0: wait for the next step)."""
        end = start + min(num_new, budget)
        for span_start, span_end in req.atomic_spans:
            if span_start < end < span_end:  # the chunk would end inside this span
                if span_start > start:
                    return span_start - start
                return span_end - start if alone else 0  # longer than the whole budget: alone
        return end - start

    @staticmethod
    def _span_len(req: Request, start: int) -> int:
        """Tokens from ``start`` to the end of the atomic span it lies in (0 if none)."""
        return next((end - start for s, end in req.atomic_spans if s <= start < end), 0)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, sampled: list[list[int]]) -> None:
        """Advances computed tokens; a request whose step reached its last token gets its sampled token. Per
        request ``sampled`` holds no token (a prefill chunk), one, or, at the end of a prompt with forks, one
        per sequence (the request's first): each fork then shares the prompt's blocks and starts running."""
        assert len(sampled) == len(out.requests)
        for req, num_new, token_ids in zip(out.requests, out.num_new_tokens, sampled):
            if req.status.is_finished:  # aborted during the step
                continue
            start, req.num_computed_tokens = req.num_computed_tokens, req.num_computed_tokens + num_new
            assert req.num_computed_tokens <= req.num_tokens
            self.num_prefill_tokens += max(0, min(req.num_computed_tokens, req.num_prefill_len) - start)
            self.block_manager.cache_full_blocks(req)
            if req.num_computed_tokens < req.num_tokens:
                assert not token_ids, f"request {req.request_id} got a token in the middle of its prefill"
                continue
            assert len(token_ids) == 1 + len(req.forks), f"request {req.request_id}: {len(token_ids)} tokens"
            req.append_token(token_ids[0])
            for fork, token_id in zip(req.forks, token_ids[1:]):
                self._fork(req, fork, token_id)
            req.forks = []

    def _fork(self, parent: Request, child: Request, token_id: int) -> None:
        self.block_manager.fork(parent, child)
        child.num_computed_tokens, child.num_prefill_len = parent.num_computed_tokens, parent.num_prefill_len
        child.num_cached_tokens = parent.num_cached_tokens
        child.append_token(token_id)
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def finish(self, req: Request, status: RequestStatus) -> None:
        assert status.is_finished and not req.status.is_finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status

    def abort(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                return req
        return None
