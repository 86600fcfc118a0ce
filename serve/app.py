"""The Starlette app: multipart ``/v1/generate``, OpenAI ``/v1/chat/completions``, models, health, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.outputs import Usage
from serve.chat import ChatTemplate, parse_chat
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError, QueueFullError
from serve.media_fetch import resolve_media
from serve.metrics import Metrics
from serve.protocol import APIError, ServerConfig, bad_request, from_value_error, parse_form
from serve.streams import RequestStream
from serve.uploads import check_content_length, multipart_boundary, read_body, read_multipart, within

logger = logging.getLogger(__name__)
ENDPOINTS = ("/v1/generate", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
PUBLIC_PATHS = ("/health",)


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


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


class EventStream(StreamingResponse):
    """SSE over a RequestStream; the request is closed (aborted if unfinished) however the response ends."""

    def __init__(self, stream: RequestStream, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request_stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request_stream.close()


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


class Server:
    def __init__(self, front: AsyncEngine, config: ServerConfig, template: ChatTemplate):
        self.front, self.config, self.template = front, config, template

    async def generate(self, request: Request) -> Response:
        multipart_boundary(request, self.config)  # 415 / 413 before admission
        async with await self.front.admit() as admission:  # then a reading slot, then the body
            form = await within(self.config.body_read_timeout_s, read_multipart(request, self.config))
            try:
                req = parse_form(form.fields, form.images, form.videos, self.config, form.audios)
                stream = await self.front.submit(req.prompt, req.images, req.videos, req.params, admission=admission,
                                                 audios=req.audios, media_options=req.media_options)
            finally:
                form.close()
        if req.stream:
            return EventStream(stream, self._generate_events(stream))
        out = await until_disconnect(request, stream.result())
        return JSONResponse({"id": stream.request_id, "text": out.text, "token_ids": out.token_ids,
                             "finish_reason": out.finish_reason, "usage": usage_json(out.usage)})

    async def _generate_events(self, stream: RequestStream) -> AsyncIterator[bytes]:
        try:
            async for out in stream:
                if out.delta_text or out.delta_token_ids or out.finished:
                    event = {"id": stream.request_id, "text": out.delta_text, "token_ids": out.delta_token_ids,
                             "finish_reason": out.finish_reason}
                    if out.finished:
                        event["usage"] = usage_json(out.usage)
                    yield sse(event)
        except EngineDeadError as exc:
            yield sse(to_api_error(exc, self.config).body())
        yield sse(b"[DONE]")

    async def chat(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type not in ("application/json", ""):
            raise APIError(415, f"/v1/chat/completions takes application/json, got {content_type!r}",
                           "unsupported_media_type")
        limit = self.config.max_upload_bytes
        check_content_length(request, limit)
        async with await self.front.admit() as admission:
            raw = await within(self.config.body_read_timeout_s, read_body(request, limit))
            body_len = len(raw)
            req, refs = await run_in_threadpool(parse_chat, raw, self.template, self.config)  # JSON + base64 off-loop
            del raw
            check_prompt_text(req.prompt, self.config)
            images, videos, audios = await resolve_media(refs, self.config, limit - body_len,
                                                         ("image", "video", "audio"))
            del refs  # the media bytes live only until the prompt is built, not while the answer runs
            stream = await self.front.submit(req.prompt, images, videos, req.params, admission=admission,
                                             audios=audios, media_options=req.media_options)
            del images, videos, audios
        chat_id, created = f"chatcmpl-{stream.request_id}", int(time.time())
        head = {"id": chat_id, "created": created, "model": self.config.model_name}
        if req.stream:
            return EventStream(stream, self._chat_events(stream, head, req.include_usage))
        out = await until_disconnect(request, stream.result())
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": usage_json(out.usage),
        })

    async def _chat_events(self, stream: RequestStream, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(delta: dict, finish_reason=None) -> bytes:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                             "logprobs": None}]})

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for out in stream:
                if out.delta_text:
                    yield chunk({"content": out.delta_text})
                if out.finished:
                    yield chunk({}, out.finish_reason)
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage_json(out.usage)})
        except EngineDeadError as exc:
            yield sse(to_api_error(exc, self.config).body())
        yield sse(b"[DONE]")

    async def models(self, request: Request) -> Response:
        model = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "fusionserve"}
        if self.front.engine is not None:  # vLLM's extension, and what the model takes
            model["max_model_len"] = self.front.engine.max_model_len
            model["modalities"] = list(self.front.modalities)
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        if not self.front.is_ready:
            raise NotReadyError(self.front.not_ready_reason)
        return JSONResponse({"status": "ok", "model": self.config.model_name})

    async def metrics(self, request: Request) -> Response:
        return Response(self.front.metrics.render(self.front.stats, self.front.num_preprocessing,
                                                  self.front.num_reading),
                        media_type=Metrics.content_type)


class GuardMiddleware:
    """API key check and per-endpoint request counting, around everything else."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.config.api_key and path not in PUBLIC_PATHS and not self._authorized(scope):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "invalid_api_key", "authentication_error", {"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("authorization", "")
        given = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return secrets.compare_digest(given.encode(), self.config.api_key.encode())


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(engine_config: EngineConfig | None = None, config: ServerConfig | None = None,
               engine_factory: Callable[[], Engine] | None = None) -> Starlette:
    """The app; the engine loads in its own thread at startup (``/health`` answers 503 until it is ready)."""
    engine_config = engine_config or EngineConfig()
    config = config or ServerConfig()
    if config.model_name == ServerConfig.model_name:
        config.model_name = Path(engine_config.model).name
    metrics = Metrics()
    front = AsyncEngine(engine_factory or (lambda: Engine(engine_config)), metrics, config.max_queue_len,
                        config.num_preprocess_workers, config.max_num_reading, config.admission_wait_s,
                        config.max_step_failures)
    template = ChatTemplate.from_pretrained(engine_config.model)
    server = Server(front, config, template)

    @asynccontextmanager
    async def lifespan(app):
        front.start()
        try:
            yield
        finally:
            await front.shutdown(config.shutdown_grace_s)

    async def on_error(request: Request, exc: Exception) -> Response:
        error = to_api_error(exc, config)
        if error.status >= 500 and not isinstance(exc, NotReadyError):
            logger.error("request failed: %r", exc, exc_info=exc)
        return error_response(error)

    routes = [
        Route("/v1/generate", server.generate, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
    ]
    handled = (APIError, ValueError, QueueFullError, NotReadyError, EngineDeadError, HTTPException, Exception)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=dict.fromkeys(handled, on_error))
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)
    app.state.front, app.state.config, app.state.template = front, config, template
    return app
