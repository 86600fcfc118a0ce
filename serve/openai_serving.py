"""The OpenAI-compatible handlers (vLLM's ``serving_chat`` / ``serving_completion`` / tokenize): chat and legacy
completions, streamed and not, with n choices, logprobs, structured outputs and tool calls; ``/v1/models``,
``/tokenize``, ``/detokenize``, ``/version``. Request parsing is in ``serve/chat.py`` / ``serve/completions.py``
(fields: ``serve/openai_fields.py``), response shaping in ``serve/responses.py``."""
from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.engine import Engine
from pipeline.sampling import SamplingParams
from serve.chat import ChatTemplate, chat_prompt, parse_chat
from serve.completions import parse_completion
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError
from serve.media_fetch import resolve_media
from serve.openai_fields import ServedModel, check_model, load_json, typed
from serve.protocol import APIError, ServerConfig, bad_request, short
from serve.responses import ChatChunks, EventStream, TokenText, chat_choice, check_prompt_text, completion_choice, \
    completion_logprobs, finish_reason, merged, sse, to_api_error, until_disconnect, usage_json
from serve.streams import RequestStream
from serve.tools import tool_request
from serve.uploads import check_content_length, read_body, within

VERSION = importlib.metadata.version("fusionserve")


class OpenAIServing:
    """The handlers over one ``AsyncEngine``: each admits first (a place in the capacity and a reading slot),
    reads and parses the body off the event loop, then submits; the answer is one JSON body or SSE."""

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

    def _check_json(self, request: Request) -> None:
        """415 / 413 from the headers, before admission."""
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type not in ("application/json", ""):
            raise APIError(415, f"{request.url.path} takes application/json, got {content_type!r}",
                           "unsupported_media_type")
        check_content_length(request, self.config.max_upload_bytes)

    async def _read_json(self, request: Request) -> bytes:
        return await within(self.config.body_read_timeout_s, read_body(request, self.config.max_upload_bytes))

    # /v1/chat/completions

    async def chat(self, request: Request) -> Response:
        limit = self.config.max_upload_bytes
        self._check_json(request)
        async with await self.front.admit() as admission:
            raw = await self._read_json(request)
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
        self._check_json(request)
        async with await self.front.admit() as admission:
            raw = await self._read_json(request)
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
        self._check_json(request)
        async with await self.front.admit():  # a reading slot while the body is read and its media decoded
            engine = self._engine()
            body = load_json(await self._read_json(request))
            prompt = await self._tokenized(engine, body)
        answer = {"count": len(prompt.token_ids), "max_model_len": engine.max_model_len,
                  "tokens": prompt.token_ids}
        if typed(body, "return_token_strs", "true or false"):
            answer["token_strs"] = [TokenText(engine.tokenizer)(t) for t in prompt.token_ids]
        return JSONResponse(answer)

    async def _tokenized(self, engine: Engine, body: dict):
        """The prompt ``/tokenize`` describes: a text as ``/v1/completions`` lays it out, or messages as
        ``/v1/chat/completions`` renders them (media decoded: their placeholder ids count)."""
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
            return await run_in_threadpool(engine.build_prompt, body["prompt"])
        tools = None if body.get("tools") is None else tool_request({"tools": body["tools"], "tool_choice": "none"})[0]
        segments, refs = chat_prompt(body, self.template, self.config, tools)
        check_prompt_text(segments, self.config)
        images, videos, audios = await resolve_media(refs, self.config, self.config.max_upload_bytes,
                                                     ("image", "video", "audio"))
        return await run_in_threadpool(engine.build_prompt, segments, images, videos, audios)

    async def detokenize(self, request: Request) -> Response:
        engine = self._engine()
        self._check_json(request)
        body = load_json(await self._read_json(request))
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

