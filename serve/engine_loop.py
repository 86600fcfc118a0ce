"""The async front of the engine.

One dedicated thread owns the ``Engine``: it loads it, then loops — apply queued commands (add,
abort, stop), ``step()``, hand each output to its request's ``RequestStream`` with
``call_soon_threadsafe``. The event loop never runs a model step, and media decoding runs in a
worker pool (``build_prompt``), so a slow upload or a 4K video holds up neither.

Admission comes first: ``admit()`` takes a place in the capacity (``max_num_seqs + max_queue_len``)
and one of ``max_num_reading`` reading slots before a body is read, so at most that many requests
hold a body or decode media at once; the rest wait up to a few seconds, then get ``QueueFullError``.

Outputs go to a ``RequestStream`` (``serve/streams.py``) that merges what its reader has not taken
yet, so a stalled client costs O(1) entries per sequence. A request with ``SamplingParams.n > 1`` is n
sequences: the outputs of all n (each with its ``index``) go to the request's one stream, which is done when
all n have finished. A request whose consumer goes away (client disconnect)
is aborted, which frees its KV blocks. A failing step fails the open
requests; ``max_step_failures`` in a row, or an exception anywhere else in the loop, kills the
engine: every open request gets ``EngineDeadError`` and new ones ``NotReadyError`` (503).
``shutdown`` waits for running requests up to a grace period, then aborts the rest.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.engine import Engine, EngineStats
from pipeline.outputs import RequestOutput
from pipeline.sampling import SamplingParams
from serve.metrics import Metrics
from serve.streams import Admission, RequestStream

logger = logging.getLogger(__name__)
STEP_FAILED = "the engine failed while running this request; retry it (the server log has the cause)"
ENGINE_DIED = "the engine stopped after an internal error; the server must be restarted (its log has the cause)"


class QueueFullError(Exception):
    """More requests than ``max_num_seqs + max_queue_len`` are in flight, or no reading slot came free."""


class NotReadyError(Exception):
    """The engine is loading, failed to load, died, or the server is shutting down."""


class EngineDeadError(RuntimeError):
    """The engine failed while running this request; the message is for the user (the cause is logged)."""


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


@dataclass
class _Call:
    fn: Callable[[Engine], object]
    done: asyncio.Future


class _Stop:
    pass


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], Engine], metrics: Metrics | None = None,
                 max_queue_len: int = 256, num_preprocess_workers: int = 4, max_num_reading: int | None = None,
                 admission_wait_s: float = 5.0, max_step_failures: int = 3):
        self.engine_factory = engine_factory
        self.metrics = metrics or Metrics()
        self.max_queue_len = max_queue_len
        self.admission_wait_s, self.max_step_failures = admission_wait_s, max_step_failures
        self.max_num_reading = max_num_reading or num_preprocess_workers
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.stats: EngineStats | None = None  # snapshot, replaced by the engine thread
        self._pool = ThreadPoolExecutor(num_preprocess_workers, thread_name_prefix="fusionserve-media")
        self._reading = asyncio.Semaphore(self.max_num_reading)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._num_open: dict[str, int] = {}  # request id -> its sequences not finished yet (engine thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._closed = False  # the engine thread no longer takes commands
        self.dead = False  # it died of an internal error
        self.num_active = 0  # admitted, not yet finished or closed (event loop only)
        self.num_reading = 0  # admitted, holding a reading slot
        self.num_preprocessing = 0
        self.step_hooks: list[Callable[[Engine], None]] = []  # run on the engine thread after each step

    # lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fusionserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._accepting and not self.dead and self._thread is not None and self._thread.is_alive()

    @property
    def not_ready_reason(self) -> str:
        if self.dead:
            return ENGINE_DIED
        if self.load_error is not None:
            return str(self.load_error)
        return "loading the model" if self._thread is not None and not self._closed else "the server is stopping"

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

    # what the served family takes

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media kinds of the served family (its front end's ``modalities``); () before the engine loaded."""
        return getattr(self.engine.front_end, "modalities", ("image", "video")) if self.engine else ()

    @property
    def media_option_names(self) -> tuple[str, ...]:
        """The keyword-only options of the front end's ``build`` (Gemma 4 Unified: ``max_soft_tokens``, ...)."""
        if self.engine is None:
            return ()
        params = inspect.signature(self.engine.front_end.build).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def check_media_options(self, options: dict) -> None:
        names = self.media_option_names
        for key in options:
            if key not in names:
                takes = f"it takes {', '.join(names)}" if names else "it takes none"
                raise ValueError(f"mm_processor_kwargs.{key[:60]} is not a media option of this model ({takes})")

    # requests (event loop)

    @property
    def capacity(self) -> int:
        max_num_seqs = self.engine.config.max_num_seqs if self.engine else 0
        return max_num_seqs + self.max_queue_len

    def _check_ready(self) -> None:
        if not self.is_ready:
            raise NotReadyError(self.not_ready_reason)

    def _check_room(self) -> None:
        self._check_ready()
        if self.num_active >= self.capacity:
            raise QueueFullError(f"{self.num_active} requests in flight; the limit is {self.capacity}")

    async def admit(self, wait_s: float | None = None) -> Admission:
        """A place for one request, before its body is read; NotReadyError or QueueFullError (at once when the
        engine is full, after ``wait_s`` when every reading slot stays taken)."""
        self._check_room()
        wait_s = self.admission_wait_s if wait_s is None else wait_s
        acquire = asyncio.ensure_future(self._reading.acquire())
        done, _ = await asyncio.wait({acquire}, timeout=wait_s)
        if not done:
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            if not acquire.cancelled():  # it got the slot as the wait ran out: give it back
                self._reading.release()
            raise QueueFullError(f"{self.max_num_reading} requests are being read or decoded and none finished "
                                 f"within {wait_s:g} s")
        try:
            self._check_room()
        except BaseException:
            self._reading.release()
            raise
        self.num_active += 1
        self.num_reading += 1
        return Admission(self)

    async def submit(self, text: str, images=(), videos=(), params: SamplingParams | None = None,
                     request_id: str | None = None, admission: Admission | None = None, audios=(),
                     media_options: dict | None = None) -> RequestStream:
        """Preprocess in the pool, then add to the engine; returns once the engine accepted the request.
        Without ``admission`` it admits first. ``media_options`` go to ``Engine.build_prompt`` (the family's,
        e.g. ``max_soft_tokens``). Raises NotReadyError, QueueFullError, or ValueError / MediaError for bad
        input."""
        admission = admission or await self.admit()
        arrival = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        params = params or SamplingParams()
        stream = RequestStream(self, request_id, arrival, admission, num_sequences=params.n)
        added = False
        try:
            self._check_ready()
            self.check_media_options(media_options or {})
            extra = (audios,) if len(audios) else ()  # a plain (text, images, videos) call when there is no audio
            build = functools.partial(self.engine.build_prompt, text, images, videos, *extra, **(media_options or {}))
            self.num_preprocessing += 1
            try:
                prompt = await self._loop.run_in_executor(self._pool, build)
            finally:
                self.num_preprocessing -= 1
                self.metrics.preprocess_seconds.observe(time.perf_counter() - arrival)
            accepted = self._loop.create_future()
            self._commands.put(_Add(request_id, prompt, params, stream, accepted))
            added = True
            if self._closed:  # the thread may have drained the queue before this add arrived
                self._fail_queued()
            await accepted
        except BaseException:
            stream.finished = not added  # an added request that never came back must still be aborted
            stream.close()
            raise
        admission.stream = stream
        admission.done_reading()
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[Engine], object]):
        """``fn(engine)`` run on the engine thread between steps (what must not race a step: reading or writing
        KV blocks, draining block events); its result, or its exception."""
        if not self.is_ready:
            raise NotReadyError(self.not_ready_reason)
        done = self._loop.create_future()
        self._commands.put(_Call(fn, done))
        return await done

    # engine thread

    def _run(self) -> None:
        try:
            self.engine = self.engine_factory()
        except BaseException as exc:  # reported by /health and submit
            logger.exception("engine failed to load")
            self.load_error = exc
            self._closed = True
            return
        try:
            self._serve()
        except BaseException:
            logger.exception("the engine loop failed; failing every open request")
            self._die()
        finally:
            self._closed = True
            self._fail_queued()

    def _serve(self) -> None:
        self._publish_stats()
        self._accepting = True
        num_failed = 0  # steps in a row
        while True:
            if not self._apply_commands(block=not self.engine.has_unfinished()):
                return
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                    num_failed = 0
                except Exception:
                    num_failed += 1
                    logger.exception("engine step failed (%d in a row; the limit is %d)", num_failed,
                                     self.max_step_failures)
                    if num_failed >= self.max_step_failures:
                        self._die()
                        return
                    self._fail_all()
                    outputs = []
                self._publish_stats()  # before delivery: a client that saw a token sees that step's stats
                for hook in self.step_hooks:
                    hook(self.engine)
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
                self._accepting = False
                for request_id in list(self._streams):
                    self._abort_now(request_id)
                self._publish_stats()
                return False
            if isinstance(command, _Abort):
                self._abort_now(command.request_id)
            elif isinstance(command, _Call):
                self._call_now(command)
            else:
                self._add_now(command)

    def _add_now(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:
            self._post(command.accepted.set_exception, exc)
            return
        self._streams[command.request_id] = command.stream
        self._num_open[command.request_id] = command.params.n
        self._post(command.accepted.set_result, None)

    def _call_now(self, command: _Call) -> None:
        try:
            result = command.fn(self.engine)
        except Exception as exc:
            self._post(command.done.set_exception, exc)
        else:
            self._post(command.done.set_result, result)

    def _abort_now(self, request_id: str) -> None:
        for out in self.engine.abort(request_id):  # the final outputs of its sequences still running
            self._deliver(out)
        self._close(request_id)

    def _close(self, request_id: str) -> None:
        self._num_open.pop(request_id, None)
        self._streams.pop(request_id, None)

    def _fail_all(self) -> None:
        """After a failed step: every open request ends with ``EngineDeadError``; the engine goes on."""
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s after a failed step", request_id)
            self.metrics.finished.labels(reason="error").inc()
            self._post(stream.put, EngineDeadError(STEP_FAILED))
        self._streams.clear()
        self._num_open.clear()

    def _die(self) -> None:
        """The engine is gone: no new requests; every open and queued one fails (the engine is not touched)."""
        self.dead, self._accepting = True, False
        for stream in self._streams.values():
            self.metrics.finished.labels(reason="error").inc()
            self._post(stream.put, EngineDeadError(ENGINE_DIED))
        self._streams.clear()
        self._num_open.clear()

    def _fail_queued(self) -> None:
        """Adds still queued once the thread stopped taking commands (any thread)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._post(command.accepted.set_exception, NotReadyError(self.not_ready_reason))
            elif isinstance(command, _Call):
                self._post(command.done.set_exception, NotReadyError(self.not_ready_reason))

    def _deliver(self, out: RequestOutput) -> None:
        """To the request's stream; the stream leaves the table with the final output of its last sequence."""
        stream = self._streams.get(out.request_id)
        if out.finished:
            self.metrics.finished.labels(reason=out.finish_reason or "unknown").inc()  # per sequence, as vLLM
            if out.request_id in self._num_open:
                self._num_open[out.request_id] -= 1
                if not self._num_open[out.request_id]:
                    self._close(out.request_id)
        if stream is not None:
            self._post(stream.put, out)

    def _post(self, fn, *args) -> None:
        def guarded():
            if not (isinstance(getattr(fn, "__self__", None), asyncio.Future) and fn.__self__.done()):
                fn(*args)

        try:
            self._loop.call_soon_threadsafe(guarded)
        except RuntimeError:  # the loop closed under us (interpreter exit)
            pass

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
