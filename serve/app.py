"""The Starlette app: multipart ``/v1/generate``, the OpenAI endpoints (``serve/openai_serving.py``), health,
metrics, the API key."""
from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.outputs import RequestOutput
from serve.chat import ChatTemplate
from serve.completions import accept_token_ids
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError, QueueFullError
from serve.metrics import Metrics
from serve.openai_serving import OpenAIServing
from serve.protocol import APIError, ServerConfig, parse_form
from serve.responses import MIN_LOGPROB, EventStream, TokenText, finish_reason, sse, to_api_error, until_disconnect, \
    usage_json
from serve.streams import RequestStream
from serve.uploads import multipart_boundary, read_multipart, within

logger = logging.getLogger(__name__)
ENDPOINTS = ("/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
             "/version", "/health", "/metrics")
PUBLIC_PATHS = ("/health",)


def _token_logprobs(text: TokenText, token_ids: list[int], logprobs: list[float], tops) -> list[dict]:
    """/v1/generate's logprobs: per token, its id, text and logprob, and the top ones."""
    return [{"token_id": t, "token": text(t), "logprob": max(lp, MIN_LOGPROB),
             "top_logprobs": [{"token_id": i, "token": text(i), "logprob": max(v, MIN_LOGPROB)} for i, v in top or ()]}
            for t, lp, top in zip(token_ids, logprobs, tops)]


def _generate_choice(out: RequestOutput, text: TokenText) -> dict:
    choice = {"index": out.index, "text": out.text, "token_ids": out.token_ids, "finish_reason": finish_reason(out)}
    if out.logprobs is not None:
        choice["logprobs"] = _token_logprobs(text, out.token_ids, out.logprobs, out.top_logprobs)
    return choice


class Server(OpenAIServing):
    """The OpenAI handlers, and ``/v1/generate`` (multipart), ``/health``, ``/metrics``."""

    # /v1/generate (multipart)

    async def generate(self, request: Request) -> Response:
        multipart_boundary(request, self.config)  # 415 / 413 before admission
        async with await self.front.admit() as admission:  # then a reading slot, then the body
            form = await within(self.config.body_read_timeout_s, read_multipart(request, self.config))
            try:
                req = parse_form(form.fields, form.images, form.videos, self.config, form.audios,
                                 self.served.vocab_size)
                await self._check_structured(req.params, req.structured_field)
                stream = await self.front.submit(req.prompt, req.images, req.videos, req.params, admission=admission,
                                                 audios=req.audios, media_options=req.media_options)
            finally:
                form.close()
        stream.num_sequences = req.params.n
        text = TokenText(self.front.engine.tokenizer)
        if req.stream:
            return EventStream([stream], self._generate_events(stream, text))
        outs = await until_disconnect(request, stream.results())
        choices = [_generate_choice(out, text) for out in outs]
        body = {"id": stream.request_id, **choices[0]} if len(choices) == 1 else {"id": stream.request_id,
                                                                                    "choices": choices}
        return JSONResponse({**body, "usage": usage_json(outs)})

    async def _generate_events(self, stream: RequestStream, text: TokenText) -> AsyncIterator[bytes]:
        try:
            async for out in stream:
                if out.delta_text or out.delta_token_ids or out.finished:
                    event = {"id": stream.request_id, "index": out.index, "text": out.delta_text,
                             "token_ids": out.delta_token_ids, "finish_reason": finish_reason(out) if out.finished
                             else None}
                    if out.delta_logprobs is not None:
                        event["logprobs"] = _token_logprobs(text, out.delta_token_ids, out.delta_logprobs,
                                                            out.delta_top_logprobs)
                    if out.finished:
                        event["usage"] = usage_json([out])
                    yield sse(event)
        except (EngineDeadError, APIError) as exc:
            yield sse(to_api_error(exc, self.config).body())
        yield sse(b"[DONE]")

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
    make_engine = engine_factory or (lambda: Engine(engine_config))
    front = AsyncEngine(lambda: accept_token_ids(make_engine()), metrics, config.max_queue_len,
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
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/version", server.version, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
    ]
    handled = (APIError, ValueError, QueueFullError, NotReadyError, EngineDeadError, HTTPException, Exception)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=dict.fromkeys(handled, on_error))
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)
    app.state.front, app.state.config, app.state.template = front, config, template
    return app
