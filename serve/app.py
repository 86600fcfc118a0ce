"""The Starlette app: multipart ``/v1/generate``, OpenAI ``/v1/chat/completions``, models, health, metrics."""
from __future__ import annotations

import asyncio
import importlib.metadata
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
from pipeline.outputs import RequestOutput
from pipeline.sampling import SamplingParams
from serve.chat import ChatTemplate, chat_prompt, parse_chat
from serve.completions import accept_token_ids, parse_completion
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError, QueueFullError
from serve.media_fetch import resolve_media
from serve.metrics import Metrics
from serve.openai_fields import ServedModel, check_model, load_json, typed
from serve.protocol import APIError, ServerConfig, bad_request, from_value_error, parse_form, short
from serve.responses import MIN_LOGPROB, ChatChunks, TokenText, chat_choice, completion_choice, \
    completion_logprobs, finish_reason, merged, usage_json
from serve.streams import RequestStream
from serve.tools import tool_request
from serve.uploads import check_content_length, multipart_boundary, read_body, read_multipart, within

logger = logging.getLogger(__name__)
ENDPOINTS = ("/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
             "/version", "/health", "/metrics")
VERSION = importlib.metadata.version("fusionserve")
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


class Server:
    def __init__(self, front: AsyncEngine, config: ServerConfig, template: ChatTemplate):
        self.front, self.config, self.template = front, config, template

    @property
    def served(self) -> ServedModel:
        engine = self.front.engine
        if engine is None:
            return ServedModel(self.config.model_name)
        return ServedModel(self.config.model_name, engine.max_model_len, engine.runner.model.vocab_size)

    def _engine(self) -> Engine:
        if not self.front.is_ready:
            raise NotReadyError(self.front.not_ready_reason)
        return self.front.engine

    async def _check_structured(self, params: SamplingParams, param: str | None) -> None:
        """A structured output's grammar is compiled (and cached) on the engine thread before the request is
        queued, so a bad schema or grammar is a 400 naming its field."""
        if params.structured is not None:
            try:
                await self.front.call(lambda engine: engine.runner.sampler.new_state(params))
            except ValueError as exc:
                raise bad_request(str(exc), "invalid_structured_output", param=param) from None

    async def _read_json(self, request: Request, endpoint: str) -> bytes:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type not in ("application/json", ""):
            raise APIError(415, f"{endpoint} takes application/json, got {content_type!r}", "unsupported_media_type")
        check_content_length(request, self.config.max_upload_bytes)
        return await within(self.config.body_read_timeout_s, read_body(request, self.config.max_upload_bytes))

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

    # /v1/chat/completions

    async def chat(self, request: Request) -> Response:
        limit = self.config.max_upload_bytes
        async with await self.front.admit() as admission:
            raw = await self._read_json(request, "/v1/chat/completions")
            body_len = len(raw)
            req, refs = await run_in_threadpool(parse_chat, raw, self.template, self.config, self.served)
            del raw  # JSON + base64 were parsed off the loop
            check_prompt_text(req.prompt, self.config)
            await self._check_structured(req.params, req.structured_field)
            images, videos, audios = await resolve_media(refs, self.config, limit - body_len,
                                                         ("image", "video", "audio"))
            del refs  # the media bytes live only until the prompt is built, not while the answer runs
            stream = await self.front.submit(req.prompt, images, videos, req.params, admission=admission,
                                             audios=audios, media_options=req.media_options)
            del images, videos, audios
        stream.num_sequences = req.params.n
        text = TokenText(self.front.engine.tokenizer)
        head = {"id": f"chatcmpl-{stream.request_id}", "created": int(time.time()), "model": self.config.model_name}
        if req.stream:
            chunks = ChatChunks(head, req.params.n, text, req.tool_call, req.include_usage)
            return EventStream([stream], self._chat_events(stream, chunks))
        outs = await until_disconnect(request, stream.results())
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [chat_choice(out, text, req.tool_call) for out in outs],
                             "usage": usage_json(outs)})

    async def _chat_events(self, stream: RequestStream, chunks: ChatChunks) -> AsyncIterator[bytes]:
        finals = []
        try:
            for chunk in chunks.start():
                yield sse(chunk)
            async for out in stream:
                for chunk in chunks.delta(out):
                    yield sse(chunk)
                if out.finished:
                    finals.append(out)
            if chunks.include_usage:
                yield sse(chunks.usage(finals))
        except (EngineDeadError, APIError) as exc:
            yield sse(to_api_error(exc, self.config).body())
        yield sse(b"[DONE]")

    # /v1/completions

    async def completions(self, request: Request) -> Response:
        async with await self.front.admit() as admission:
            raw = await self._read_json(request, "/v1/completions")
            req = await run_in_threadpool(parse_completion, raw, self.config, self.served,
                                          self._engine().tokenizer.vocab_size)
            del raw
            await self._check_structured(req.params, req.structured_field)
            streams = [await self.front.submit(req.prompts[0], params=req.params, admission=admission)]
        try:  # each further prompt is a request of its own, admitted as it comes
            for prompt in req.prompts[1:]:
                streams.append(await self.front.submit(prompt, params=req.params))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        n, text = req.params.n, TokenText(self.front.engine.tokenizer)
        for stream in streams:
            stream.num_sequences = n
        head = {"id": f"cmpl-{streams[0].request_id}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_name}
        if req.stream:
            return EventStream(streams, self._completion_events(streams, head, n, text, req.include_usage))
        results = await until_disconnect(request, asyncio.gather(*(stream.results() for stream in streams)))
        return JSONResponse({**head, "choices": [completion_choice(out, k * n + out.index, text)
                                                 for k, outs in enumerate(results) for out in outs],
                             "usage": usage_json([out for outs in results for out in outs])})

    async def _completion_events(self, streams: list[RequestStream], head: dict, n: int, text: TokenText,
                                 include_usage: bool) -> AsyncIterator[bytes]:
        offsets, finals = {}, []
        usage = {"usage": None} if include_usage else {}
        try:
            async for k, out in merged(streams):
                index = k * n + out.index
                logprobs, offsets[index] = completion_logprobs(text, out.delta_token_ids, out.delta_logprobs,
                                                               out.delta_top_logprobs, offsets.get(index, 0))
                if out.delta_text or out.delta_token_ids or out.finished:
                    yield sse({**head, "choices": [{"index": index, "text": out.delta_text, "logprobs": logprobs,
                                                    "finish_reason": finish_reason(out) if out.finished else None}],
                               **usage})
                if out.finished:
                    finals.append(out)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_json(finals)})
        except (EngineDeadError, APIError) as exc:
            yield sse(to_api_error(exc, self.config).body())
        yield sse(b"[DONE]")

    # small endpoints

    async def tokenize(self, request: Request) -> Response:
        engine = self._engine()
        body = load_json(await self._read_json(request, "/tokenize"))
        check_model(body, self.served)
        unknown = sorted(set(body) - {"model", "prompt", "messages", "add_generation_prompt", "tools",
                                      "add_special_tokens", "return_token_strs"})
        if unknown:
            raise bad_request(f"unrecognized request field {unknown[0][:100]!r} for /tokenize", "unknown_field",
                              param=unknown[0][:100])
        if ("prompt" in body) == ("messages" in body):
            raise bad_request("/tokenize takes a prompt or messages", param="prompt")
        if body.get("add_special_tokens") not in (None, "messages" not in body):
            raise bad_request("add_special_tokens: the prompt layout places BOS itself", param="add_special_tokens")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise bad_request("prompt must be a string", param="prompt")
            check_prompt_text(body["prompt"], self.config)
            prompt = await run_in_threadpool(engine.build_prompt, body["prompt"])
        else:
            tools = None if body.get("tools") is None else tool_request({"tools": body["tools"],
                                                                        "tool_choice": "none"})[0]
            segments, refs = chat_prompt(body, self.template, self.config, tools)
            check_prompt_text(segments, self.config)
            images, videos, audios = await resolve_media(refs, self.config, self.config.max_upload_bytes,
                                                         ("image", "video", "audio"))
            prompt = await run_in_threadpool(engine.build_prompt, segments, images, videos, audios)
        answer = {"count": len(prompt.token_ids), "max_model_len": engine.max_model_len,
                  "tokens": prompt.token_ids}
        if typed(body, "return_token_strs", "true or false"):
            answer["token_strs"] = [TokenText(engine.tokenizer)(t) for t in prompt.token_ids]
        return JSONResponse(answer)

    async def detokenize(self, request: Request) -> Response:
        engine = self._engine()
        body = load_json(await self._read_json(request, "/detokenize"))
        check_model(body, self.served)
        if set(body) - {"model", "tokens"}:
            name = sorted(set(body) - {"model", "tokens"})[0][:100]
            raise bad_request(f"unrecognized request field {name!r} for /detokenize", "unknown_field", param=name)
        tokens = typed(body, "tokens", "a list of token ids")
        if tokens is None or any(t >= engine.tokenizer.vocab_size for t in tokens):
            raise bad_request(f"tokens must be a list of token ids below {engine.tokenizer.vocab_size}",
                              param="tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(tokens, skip_special_tokens=False)})

    def _model_card(self) -> dict:
        model = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "fusionserve"}
        if self.front.engine is not None:  # vLLM's extension, and what the model takes
            model["max_model_len"] = self.front.engine.max_model_len
            model["modalities"] = list(self.front.modalities)
        return model

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.config.model_name:
            raise APIError(404, f"the model {short(name)} does not exist; this server serves "
                                f"{self.config.model_name!r}", "model_not_found", param="model")
        return JSONResponse(self._model_card())

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

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
