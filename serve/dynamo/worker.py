"""``fusionserve dynamo-worker``: our engine as an NVIDIA Dynamo (1.6.1) unified backend (``LLMEngine``).

Dynamo's frontend (``python -m dynamo.frontend``) takes the OpenAI requests, renders the chat template,
tokenizes, routes (``--router-mode kv`` reads our KV events) and detokenizes; this worker turns each request
into the prompt ``fusionserve serve`` would build (``serve/dynamo/inputs.py``), runs it on an ``AsyncEngine``
(the server's engine thread) and streams ``{"token_ids", "text"}`` chunks back (the ``text`` keeps the
frontend from detokenizing our ids out of their context). Bad input comes back as Dynamo's
``InvalidArgument`` (a 400 at the frontend), a worker that is full or stopping as ``Unknown`` /
``EngineShutdown``, never a dead worker; a request the client drops is aborted,
which frees its KV blocks.

Modes (``--mode``): ``aggregated``; ``prefill`` runs the prompt for one token and hands its KV blocks to the
decode worker the frontend's prefill router picks; ``decode`` pulls them first (``serve/dynamo/disagg.py``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import uuid
from pathlib import Path

from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, WorkerConfig
from dynamo.common.backend.metrics import register_engine_registry
from dynamo.common.backend.publisher import PushSource
from dynamo.common.backend.run import run
from dynamo.common.constants import DisaggregationMode
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument, Unknown
from prometheus_client import CollectorRegistry, Gauge

from pipeline.engine import Engine
from serve.chat import ChatTemplate
from serve.cli import _add_model_args, engine_config
from serve.dynamo.inputs import PLAIN_TEMPLATE, InputBuilder
from serve.dynamo.kv_events import KvEventTranslator, prompt_block_hashes, routing_chain
from serve.engine_loop import AsyncEngine, EngineDeadError, NotReadyError, QueueFullError
from serve.protocol import APIError, ServerConfig
from serve.threads import apply_thread_budget, available_cpus, thread_budget
from tokenization import IncrementalDetokenizer, Prompt

logger = logging.getLogger(__name__)
MODES = {"aggregated": DisaggregationMode.AGGREGATED, "prefill": DisaggregationMode.PREFILL,
         "decode": DisaggregationMode.DECODE}
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionserve dynamo-worker", description=__doc__.split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--mode", choices=list(MODES), default="aggregated", help="disaggregation role")
    p.add_argument("--served-model-name", default=None, help="the name clients ask for (default: the folder's)")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--component", default=None, help="default: fusionserve, or fusionserve-prefill in prefill mode")
    p.add_argument("--endpoint", default="generate")
    p.add_argument("--discovery-backend", default="etcd", help="etcd | file | kubernetes (file: one machine)")
    p.add_argument("--request-plane", default="tcp", choices=["tcp", "nats"])
    p.add_argument("--event-plane", default=None, choices=["zmq", "nats"])
    p.add_argument("--no-kv-events", action="store_true", help="publish no KV events (no KV-aware routing)")
    p.add_argument("--kv-transfer-master", default=None,
                   help="host:port of the prefill/decode KV transfer group (torch.distributed, gloo over TCP)")
    p.add_argument("--kv-transfer-rank", type=int, default=None, help="this worker's rank in that group")
    p.add_argument("--kv-transfer-world-size", type=int, default=None, help="workers in that group")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--media-workers", type=int, default=None, help="media decoding workers")
    return p


class WorkerEngine(Engine):
    """The engine, taking prompts the worker built already (it needs their blocks' hashes before adding them)."""

    def build_prompt(self, text, images=(), videos=(), audios=(), **media_options) -> Prompt:
        if isinstance(text, Prompt):
            return text
        return super().build_prompt(text, images, videos, audios, **media_options)


class FusionServeEngine(LLMEngine):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mode = MODES[args.mode]
        self.config = engine_config(args)
        self.model_name = args.served_model_name or Path(self.config.model).name
        self.front: AsyncEngine | None = None
        self.inputs: InputBuilder | None = None
        self.events = KvEventTranslator()
        self.transfer = None  # serve.dynamo.disagg.KvTransfer in prefill / decode mode
        self._running: dict[str, str] = {}  # Dynamo context id -> our request id

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[FusionServeEngine, WorkerConfig]:
        args = build_parser().parse_args(argv)
        mode = MODES[args.mode]
        if mode != DisaggregationMode.AGGREGATED and None in (args.kv_transfer_master, args.kv_transfer_rank,
                                                              args.kv_transfer_world_size):
            raise SystemExit("fusionserve dynamo-worker: --mode prefill/decode needs --kv-transfer-master, "
                             "--kv-transfer-rank and --kv-transfer-world-size")
        engine = cls(args)
        template = None if ChatTemplate.from_pretrained(engine.config.model).source else str(PLAIN_TEMPLATE)
        component = args.component or ("fusionserve-prefill" if mode == DisaggregationMode.PREFILL else "fusionserve")
        worker = WorkerConfig(namespace=args.namespace, component=component, endpoint=args.endpoint,
                              model_name=str(engine.config.model), served_model_name=engine.model_name,
                              discovery_backend=args.discovery_backend, request_plane=args.request_plane,
                              event_plane=args.event_plane, disaggregation_mode=mode,
                              enable_kv_routing=not args.no_kv_events, custom_jinja_template=template)
        return engine, worker

    async def start(self, worker_id: int) -> EngineConfig:
        budget = thread_budget(available_cpus(), self.config.video_sampling.decoder_threads, self.args.torch_threads,
                               self.args.media_workers)
        apply_thread_budget(budget)
        self.front = AsyncEngine(lambda: WorkerEngine(self.config), num_preprocess_workers=budget.media_workers)
        self.front.start()
        if not await self.front.wait_ready(600.0):
            raise RuntimeError(f"the engine did not start: {self.front.not_ready_reason}")
        engine = self.front.engine
        self.inputs = InputBuilder(ChatTemplate.from_pretrained(self.config.model), engine.tokenizer,
                                   engine.eos_token_ids)
        await self.front.call(lambda e: setattr(e.block_manager, "record_kv_events", True))
        self.front.step_hooks.append(lambda e: self.events.apply(e.block_manager.take_kv_events()))
        if self.mode != DisaggregationMode.AGGREGATED:
            from serve.dynamo.disagg import KvTransfer

            self.transfer = KvTransfer(self.front, self.args.kv_transfer_master, self.args.kv_transfer_rank,
                                       self.args.kv_transfer_world_size, serve=self.mode == DisaggregationMode.PREFILL)
            await self.transfer.connect()
        bm = engine.block_manager
        logger.info("fusionserve dynamo-worker %s: %s, %d KV blocks of %d tokens", self.args.mode, self.model_name,
                    bm.num_blocks, bm.block_size)
        return EngineConfig(model=str(self.config.model), served_model_name=self.model_name, llm=LlmRegistration(
            context_length=engine.max_model_len, kv_cache_block_size=bm.block_size, total_kv_blocks=bm.num_blocks,
            max_num_seqs=self.config.max_num_seqs, max_num_batched_tokens=self.config.max_num_batched_tokens))

    async def kv_event_sources(self):
        return [PushSource(on_ready=self.events.attach)]

    async def register_prometheus(self, metrics) -> None:
        """Our counters next to Dynamo's on the worker's system port (``/metrics``)."""
        registry, bm, front = CollectorRegistry(), self.front.engine.block_manager, self.front
        gauges = {
            "fusionserve_prefix_cache_query_tokens": ("Prompt tokens looked up in the prefix cache",
                                                      lambda: bm.num_queries_tokens),
            "fusionserve_prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache",
                                                    lambda: bm.num_hit_tokens),
            "fusionserve_kv_blocks_used": ("KV blocks held by running requests", lambda: bm.num_used_blocks),
            "fusionserve_requests_running": ("Requests the engine is running or has waiting",
                                             lambda: front.stats.num_running + front.stats.num_waiting),
            "fusionserve_kv_events_stored": ("Routing blocks published as stored",
                                             lambda: self.events.num_stored_published),
        }
        for name, (text, read) in gauges.items():
            Gauge(name, text, registry=registry).set_function(read)
        register_engine_registry(metrics, registry)

    async def generate(self, request, context):
        request_id = f"{context.id()}-{uuid.uuid4().hex[:8]}"
        try:
            built = await asyncio.get_running_loop().run_in_executor(None, self.inputs.build, request)
            if self.mode == DisaggregationMode.PREFILL:
                built.params.max_tokens, built.params.min_tokens = 1, 0
            stream, chain, prompt = await self._submit(request, built, request_id)
        except (ValueError, APIError) as exc:
            raise InvalidArgument(str(exc)) from None
        except NotReadyError as exc:
            raise EngineShutdown(f"the worker is not ready: {exc}") from None
        except QueueFullError as exc:
            raise Unknown(f"the worker is full ({exc}); retry later") from None
        self._running[context.id()] = request_id
        try:
            async for chunk in self._chunks(stream, context, prompt, built):
                yield chunk
        finally:
            self._running.pop(context.id(), None)
            stream.close()
            self.events.release(chain)

    async def _submit(self, request, built, request_id):
        """Builds the prompt, registers its routing chain, pulls the prefill's KV (decode), adds the request."""
        engine = self.front.engine
        prompt = await asyncio.get_running_loop().run_in_executor(
            None, lambda: engine.build_prompt(built.prompt, built.images, built.videos, built.audios,
                                              **built.media_options))
        if built.continuation:
            logger.info("request %s: a migrated request, going on after %d generated tokens", request_id,
                        len(built.continuation))
            prompt = dataclasses.replace(prompt, token_ids=prompt.token_ids + built.continuation)
        chain = routing_chain(request.get("token_ids") or [], prompt, engine.block_manager.block_size,
                              engine.tokenizer.bos_token_id)
        self.events.register(chain)
        try:
            if self.mode == DisaggregationMode.DECODE and request.get("prefill_result"):
                await self.transfer.pull(request["prefill_result"], prompt)
            stream = await self.front.submit(prompt, params=built.params, request_id=request_id)
        except BaseException:
            self.events.release(chain)
            raise
        return stream, chain, prompt

    async def _chunks(self, stream, context, prompt, built):
        detokenizer = None
        if built.continuation:  # the text goes on from the answer so far, as one unbroken decode would
            detokenizer = IncrementalDetokenizer(self.front.engine.tokenizer, built.params.skip_special_tokens)
            detokenizer.add(built.continuation)
        try:
            async for out in stream:
                if context.is_stopped():
                    self.front.abort(stream.request_id)
                    return
                text = out.delta_text
                if detokenizer is not None:
                    text = detokenizer.add(out.delta_token_ids) + (detokenizer.flush() if out.finished else "")
                chunk = {"token_ids": out.delta_token_ids, "index": 0, "text": text}
                if out.finished:
                    usage = out.usage
                    chunk["finish_reason"] = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
                    chunk["completion_usage"] = {
                        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
                    if self.mode == DisaggregationMode.PREFILL:
                        chunk["disaggregated_params"] = self.transfer.handoff(
                            prompt_block_hashes(prompt, self.front.engine.block_manager.block_size))
                yield chunk
        except EngineDeadError as exc:
            raise Unknown(str(exc)) from None

    async def abort(self, context) -> None:
        request_id = self._running.get(context.id())
        if request_id is not None and self.front is not None:
            self.front.abort(request_id)

    async def cleanup(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
            self.transfer = None
        if self.front is not None:
            await self.front.shutdown(grace_s=0.0)
            self.front = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(FusionServeEngine, argv)
    return 0
