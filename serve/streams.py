"""The event-loop side of one request: its place in the admission (``Admission``) and its outputs
(``RequestStream``).

A stream keeps one pending output per sequence (``SamplingParams.n`` sequences, told apart by
``RequestOutput.index``): what its reader has not taken yet is merged into it (``RequestOutput.merge``), so a
client that stops reading costs O(n) entries however many tokens the engine produces, and the reader gets
the merged delta when it comes back. The stream ends when all ``num_sequences`` sequences have finished.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pipeline.outputs import RequestOutput

if TYPE_CHECKING:
    from serve.engine_loop import AsyncEngine


class Admission:
    """One request's place, taken before its body is read: counted in the capacity until ``close()`` (its
    stream closes it once it has one), and holding a reading slot until ``done_reading()``."""

    def __init__(self, front: AsyncEngine):
        self.front = front
        self.stream: RequestStream | None = None
        self._reading = self._counted = True

    def done_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.front.num_reading -= 1
            self.front._reading.release()

    def close(self) -> None:
        self.done_reading()
        if self._counted:
            self._counted = False
            self.front.num_active -= 1

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(self, *exc) -> None:
        if self.stream is None:  # never reached the engine
            self.close()
        else:
            self.done_reading()


class RequestStream:
    """The outputs of one accepted request, in order; what the reader has not taken yet waits merged into one
    pending output. ``close()`` aborts the request if it has not finished."""

    def __init__(self, front: AsyncEngine, request_id: str, arrival: float, admission: Admission,
                 num_sequences: int = 1):
        self.front, self.request_id, self.arrival = front, request_id, arrival
        self.admission = admission
        self.num_sequences = num_sequences  # SamplingParams.n
        self.finished = False  # the reader saw the end
        self._pending: dict[int, RequestOutput] = {}  # sequence index -> what the reader has not taken
        self._num_finished = 0  # sequences whose final output the reader took
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._released = False
        self._last_token_time: dict[int, float] = {}  # per sequence

    @property
    def num_pending(self) -> int:
        """Entries waiting for the reader: at most one per sequence, and an error."""
        return len(self._pending) + (self._error is not None)

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread, through the event loop."""
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._observe(item)
            earlier = self._pending.get(item.index)
            self._pending[item.index] = item if earlier is None else earlier.merge(item)
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                if not self._pending and self._error is None:
                    self._ready.clear()
                    await self._ready.wait()
                elif self._pending:
                    out = self._pending.pop(next(iter(self._pending)))
                    self._num_finished += out.finished
                    self.finished = self._num_finished >= self.num_sequences
                    yield out
                else:
                    self.finished = True
                    raise self._error
        finally:
            self.close()

    def _observe(self, out: RequestOutput) -> None:
        now, metrics = time.perf_counter(), self.front.metrics
        if out.delta_token_ids:
            last = self._last_token_time.get(out.index)
            if not self._last_token_time:
                metrics.time_to_first_token.observe(now - self.arrival)
            elif last is not None:
                gap = (now - last) / len(out.delta_token_ids)
                for _ in out.delta_token_ids:
                    metrics.inter_token_latency.observe(gap)
            self._last_token_time[out.index] = now

    async def result(self) -> RequestOutput:
        """The final output (the whole answer in ``text`` / ``token_ids``) of a one-sequence request."""
        assert self.num_sequences == 1
        return (await self.results())[0]

    async def results(self) -> list[RequestOutput]:
        """The final output of each sequence, by index."""
        finals = {}
        async for out in self:
            if out.finished:
                finals[out.index] = out
        assert len(finals) == self.num_sequences
        return [finals[i] for i in sorted(finals)]

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        if not self.finished:
            self.front.abort(self.request_id)
        self.admission.close()
