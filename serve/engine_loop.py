"""The async front of the engine.

One dedicated thread owns the ``Engine``: it loads it, then loops — apply queued commands (add,
abort, stop), ``step()``, hand each output to its request's ``asyncio.Queue`` with
``call_soon_threadsafe``. The event loop never runs a model step, and media decoding runs in a
worker pool (``build_prompt``), so a slow upload or a 4K video holds up neither. A request whose
consumer goes away (client disconnect: the stream is cancelled or closed) is aborted, which frees
its KV blocks. ``shutdown`` waits for running requests up to a grace period, then aborts the rest.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.engine import Engine, EngineStats
from pipeline.outputs import RequestOutput
from pipeline.sampling import SamplingParams
from serve.metrics import Metrics

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests than ``max_num_seqs + max_queue_len`` are in flight."""


class NotReadyError(Exception):
    """The engine is loading, failed to load, or the server is shutting down."""


class EngineDeadError(RuntimeError):
    """A model step raised; the request cannot go on (the server does)."""


@dataclass
class _Add:
    request_id: str
    prompt: object  # tokenization.Prompt
    params: SamplingParams
    stream: RequestStream
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class RequestStream:
    """The outputs of one accepted request, in order; ``close()`` aborts it if it has not finished."""

    def __init__(self, front: AsyncEngine, request_id: str, arrival: float):
        self.front, self.request_id, self.arrival = front, request_id, arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._released = False
        self._last_token_time: float | None = None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self._observe(item)
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def _observe(self, out: RequestOutput) -> None:
        now, metrics = time.perf_counter(), self.front.metrics
        if out.delta_token_ids:
            if self._last_token_time is None:
                metrics.time_to_first_token.observe(now - self.arrival)
            else:
                gap = (now - self._last_token_time) / len(out.delta_token_ids)
                for _ in out.delta_token_ids:
                    metrics.inter_token_latency.observe(gap)
            self._last_token_time = now

    async def result(self) -> RequestOutput:
        """The last output (the whole text)."""
        last = None
        async for out in self:
            last = out
        assert last is not None and last.finished
        return last

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        if not self.finished:
            self.front.abort(self.request_id)
        self.front._release()


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], Engine], metrics: Metrics | None = None,
                 max_queue_len: int = 256, num_preprocess_workers: int = 4):
        self.engine_factory = engine_factory
        self.metrics = metrics or Metrics()
        self.max_queue_len = max_queue_len
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.stats: EngineStats | None = None  # snapshot, replaced by the engine thread
        self._pool = ThreadPoolExecutor(num_preprocess_workers, thread_name_prefix="fusionserve-media")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self.num_active = 0  # accepted, not yet finished or closed (event loop only)
        self.num_preprocessing = 0

    # lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fusionserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready and self.load_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.is_ready

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let running requests finish for ``grace_s``; abort the rest; stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_Stop())
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # requests (event loop)

    @property
    def capacity(self) -> int:
        max_num_seqs = self.engine.config.max_num_seqs if self.engine else 0
        return max_num_seqs + self.max_queue_len

    async def submit(self, text: str, images=(), videos=(), params: SamplingParams | None = None,
                     request_id: str | None = None) -> RequestStream:
        """Preprocess in the pool, then add to the engine; returns once the engine accepted the request.
        Raises NotReadyError, QueueFullError, or ValueError / MediaError for bad input."""
        if not self.is_ready:
            raise NotReadyError(str(self.load_error) if self.load_error else "the engine is not ready")
        if self.num_active >= self.capacity:
            raise QueueFullError(f"{self.num_active} requests in flight; the limit is {self.capacity}")
        arrival = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, arrival)
        self.num_active += 1
        added = False
        try:
            self.num_preprocessing += 1
            try:
                prompt = await self._loop.run_in_executor(self._pool, self.engine.build_prompt, text, images, videos)
            finally:
                self.num_preprocessing -= 1
                self.metrics.preprocess_seconds.observe(time.perf_counter() - arrival)
            accepted = self._loop.create_future()
            self._commands.put(_Add(request_id, prompt, params or SamplingParams(), stream, accepted))
            added = True
            await accepted
        except BaseException:
            stream.finished = not added  # an added request that never came back must still be aborted
            stream.close()
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _release(self) -> None:
        self.num_active -= 1

    # engine thread

    def _run(self) -> None:
        try:
            self.engine = self.engine_factory()
        except BaseException as exc:  # reported by /health and submit
            logger.exception("engine failed to load")
            self.load_error = exc
            return
        self._publish_stats()
        self._accepting = True
        while True:
            if not self._apply_commands(block=not self.engine.has_unfinished()):
                return
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    logger.exception("engine step failed; failing its requests")
                    self._fail_all(exc)
                    outputs = []
                self._publish_stats()  # before delivery: a client that saw a token sees that step's stats
                for out in outputs:
                    self._deliver(out)
            self._publish_stats()

    def _apply_commands(self, block: bool) -> bool:
        """Runs every queued command (waiting for one when ``block``); False after a stop."""
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                for request_id in list(self._streams):
                    self._abort_now(request_id)
                self._publish_stats()
                return False
            if isinstance(command, _Abort):
                self._abort_now(command.request_id)
            else:
                self._add_now(command)

    def _add_now(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:
            self._post(command.accepted.set_exception, exc)
            return
        self._streams[command.request_id] = command.stream
        self._post(command.accepted.set_result, None)

    def _abort_now(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(out)
        self._streams.pop(request_id, None)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s after a failed step", request_id)
            self.metrics.finished.labels(reason="error").inc()
            self._post(stream.queue.put_nowait, EngineDeadError(f"the engine failed on this request: {exc}"))
        self._streams.clear()

    def _deliver(self, out: RequestOutput) -> None:
        if out.finished:
            self.metrics.finished.labels(reason=out.finish_reason or "unknown").inc()
        stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if stream is not None:
            self._post(stream.queue.put_nowait, out)

    def _post(self, fn, *args) -> None:
        def guarded():
            if not (isinstance(fn.__self__, asyncio.Future) and fn.__self__.done()):
                fn(*args)

        try:
            self._loop.call_soon_threadsafe(guarded)
        except RuntimeError:  # the loop closed under us (interpreter exit)
            pass

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
