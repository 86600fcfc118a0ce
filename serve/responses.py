"""Engine outputs -> OpenAI response bodies and stream chunks, for chat and (legacy) completions; and what every
endpoint shares over HTTP (errors as ``APIError``, server-sent events, disconnects).

Shared by both: the finish reason a client may see (``stop`` | ``length`` | ``tool_calls``: an aborted
sequence is an error, never ``"abort"``), usage over n choices (the prompt counted once, completion tokens
summed, as OpenAI), and logprobs. A token's text in logprobs is its own decoded piece
(``decode([id])``, special tokens kept, as vLLM renders it), ``bytes`` its UTF-8 bytes; logprobs below
-9999 (a masked token) are shown as -9999.0, as vLLM does, since JSON has no infinity.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse

from pipeline.outputs import RequestOutput
from serve.engine_loop import EngineDeadError, NotReadyError, QueueFullError
from serve.protocol import APIError, ServerConfig, bad_request, from_value_error
from serve.streams import RequestStream
from serve.tools import ToolCall, new_call_id, tool_calls

ABORTED = "the server stopped this request before it finished (it is shutting down); retry it"
MIN_LOGPROB = -9999.0


def finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "abort":
        raise APIError(503, ABORTED, "request_aborted", "server_error")
    return out.finish_reason


def usage_json(finals: list[RequestOutput]) -> dict:
    """One request's usage over its sequences (and over the prompts of one completions call: pass them all)."""
    by_prompt = {}
    for out in finals:  # each sequence's usage repeats its prompt's
        by_prompt.setdefault(out.request_id, out.usage)
    prompt = sum(u.prompt_tokens for u in by_prompt.values())
    completion = sum(out.usage.completion_tokens for out in finals)
    cached = sum(u.cached_tokens for u in by_prompt.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class TokenText:
    """Token ids -> their text as logprobs show it (cached: the top-k lists repeat ids)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def chat_logprobs(text: TokenText, token_ids: list[int], logprobs: list[float] | None, tops) -> dict | None:
    """``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        token = text(token_id)
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top or ()]}
                        for t, lp, top in zip(token_ids, logprobs, tops)]}


def completion_logprobs(text: TokenText, token_ids: list[int], logprobs: list[float] | None, tops,
                        offset: int = 0) -> tuple[dict | None, int]:
    """The legacy format: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token: the chosen token and the
    top k, text -> logprob), ``text_offset`` (each token's start in the answer, from ``offset``); and the offset
    after these tokens (a stream continues from it)."""
    if logprobs is None:
        return None, offset
    tokens, offsets = [], []
    for token_id in token_ids:
        tokens.append(text(token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top_dicts = [{text(t): _lp(lp), **{text(i): _lp(v) for i, v in top or ()}}
                 for t, lp, top in zip(token_ids, logprobs, tops)]
    return {"tokens": tokens, "token_logprobs": [_lp(v) for v in logprobs], "top_logprobs": top_dicts,
            "text_offset": offsets}, offset


# chat

def chat_choice(out: RequestOutput, text: TokenText, call: ToolCall | None) -> dict:
    reason, message = finish_reason(out), {"role": "assistant", "content": out.text}
    calls = tool_calls(call, out.text, new_call_id()) if call is not None else None
    if calls is not None:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        reason = "tool_calls" if reason == "stop" else reason
    return {"index": out.index, "message": message, "finish_reason": reason,
            "logprobs": chat_logprobs(text, out.token_ids, out.logprobs, out.top_logprobs)}


class ChatChunks:
    """One chat stream's chunks: a role chunk per choice, content (or tool-call) deltas with their logprobs, a
    finish chunk per choice, and with ``include_usage`` a ``usage`` on every chunk (null until the last,
    whose ``choices`` is empty). A named tool call streams its arguments as they come; a ``required`` one
    (whose name is part of the answer) comes whole in the choice's last delta."""

    def __init__(self, head: dict, n: int, text: TokenText, call: ToolCall | None, include_usage: bool):
        self.head = {**head, "object": "chat.completion.chunk"}
        self.n, self.text, self.call, self.include_usage = n, text, call, include_usage
        self.call_ids = [new_call_id() for _ in range(n)]
        self.answers = [""] * n  # a required call's text and logprobs, until it is whole
        self.held_logprobs: list[list] = [[] for _ in range(n)]

    def _chunk(self, index: int, delta: dict, reason: str | None = None, logprobs=None) -> dict:
        chunk = {**self.head, "choices": [{"index": index, "delta": delta, "finish_reason": reason,
                                           "logprobs": logprobs}]}
        return {**chunk, "usage": None} if self.include_usage else chunk

    def start(self) -> list[dict]:
        if self.call is not None and self.call.name is not None:
            return [self._chunk(i, {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": self.call_ids[i], "type": "function",
                 "function": {"name": self.call.name, "arguments": ""}}]}) for i in range(self.n)]
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def delta(self, out: RequestOutput) -> list[dict]:
        i, chunks = out.index, []
        logprobs = chat_logprobs(self.text, out.delta_token_ids, out.delta_logprobs, out.delta_top_logprobs)
        if self.call is None:
            if out.delta_text or logprobs and logprobs["content"]:
                chunks.append(self._chunk(i, {"content": out.delta_text}, logprobs=logprobs))
        elif self.call.name is not None:
            if out.delta_text:
                chunks.append(self._chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": out.delta_text}}]},
                                          logprobs=logprobs))
        else:
            self.answers[i] += out.delta_text
            self.held_logprobs[i] += logprobs["content"] if logprobs else []
        if out.finished:
            reason, made_call = finish_reason(out), self.call is not None
            if self.call is not None and self.call.name is None:
                calls = tool_calls(self.call, self.answers[i], self.call_ids[i])
                made_call = calls is not None
                delta = {"tool_calls": [{"index": 0, **c} for c in calls]} if calls else {"content": self.answers[i]}
                chunks.append(self._chunk(i, delta, logprobs={"content": self.held_logprobs[i]} if logprobs else None))
            chunks.append(self._chunk(i, {}, "tool_calls" if made_call and reason == "stop" else reason))
        return chunks

    def usage(self, finals: list[RequestOutput]) -> dict | None:
        return {**self.head, "choices": [], "usage": usage_json(finals)} if self.include_usage else None


# completions

def completion_choice(out: RequestOutput, index: int, text: TokenText) -> dict:
    logprobs, _ = completion_logprobs(text, out.token_ids, out.logprobs, out.top_logprobs)
    return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish_reason(out)}


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams as they come: (which stream, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: RequestStream):
        try:
            async for out in stream:
                await queue.put((k, out))
        except Exception as exc:  # EngineDeadError: the reader raises it
            await queue.put((k, exc))
        await queue.put((k, done))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            k, item = await queue.get()
            if item is done:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for task in tasks:
            task.cancel()


# HTTP

def to_api_error(exc: BaseException, config: ServerConfig) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy ({exc}); retry later", "queue_full", "rate_limit_error",
                        {"Retry-After": str(config.retry_after_s)})
    if isinstance(exc, NotReadyError):
        return APIError(503, f"not ready: {exc}", "not_ready", "server_error", {"Retry-After": "1"})
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), "http_error")
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), "engine_error", "server_error")
    return APIError(500, "internal server error", "internal_error", "server_error")


def check_prompt_text(prompt, config: ServerConfig) -> None:
    """Chat prompts (text or segments) carry at most ``max_prompt_bytes`` of text (the multipart prompt has its
    field limit): a 60 MB message is refused before the tokenizer sees it."""
    texts = [prompt] if isinstance(prompt, str) else [seg for seg in prompt if isinstance(seg, str)]
    if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) > config.max_prompt_bytes:
        raise bad_request(f"the prompt text is over {config.max_prompt_bytes} bytes", "prompt_too_long")


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


class EventStream(StreamingResponse):
    """SSE over RequestStreams; the requests are closed (aborted if unfinished) however the response ends."""

    def __init__(self, streams: list[RequestStream], events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request_streams = streams

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.request_streams:
                stream.close()


async def until_disconnect(request: Request, work):
    """Awaits ``work`` unless the client disconnects first (then ``work`` is cancelled)."""
    task = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task
