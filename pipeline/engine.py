"""The engine: ``add_request`` / ``step`` / ``abort``. A step is schedule → run → postprocess."""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from pipeline.block_manager import BlockManager
from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk
from pipeline.models import get_family
from pipeline.models.loading import read_eos_token_ids
from pipeline.output_processor import OutputProcessor
from pipeline.outputs import RequestOutput
from pipeline.request import Request
from pipeline.sampling import SamplerOutput, SamplingParams
from pipeline.scheduler import Scheduler, SchedulerOutput
from tokenization import Prompt, TextTokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_kv_blocks_used: int
    num_kv_slots_filled: int  # tokens whose KV the running requests hold
    prefix_cache_hit_rate: float
    num_preemptions: int


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.front_end = get_family(config.model).make_front_end(
            config.model, config.media_limits, config.video_sampling, max_prompt_tokens=self.max_model_len)
        self.tokenizer = TextTokenizer.from_pretrained(config.model)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill)
        self.eos_token_ids = frozenset(read_eos_token_ids(config.model) | {self.tokenizer.eos_token_id})
        self.runner.sampler.bind(self.tokenizer, self.eos_token_ids, self.runner.model.vocab_size)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self._requests: dict[str, Request] = {}

    # requests

    def build_prompt(self, text, images=(), videos=(), audios=(), **media_options) -> Prompt:
        """Decode, patchify and interleave (thread-safe: servers call it from a worker pool). ``media_options``
        are the family's (Gemma 4 Unified: ``max_soft_tokens``); others are a ValueError."""
        return self.front_end.build(text, images=images, videos=videos, audios=audios, **media_options)

    def validate(self, prompt: Prompt, params: SamplingParams) -> None:
        """Raises ValueError for a request the engine would refuse."""
        self._check(self._request("", prompt, params))
        self.runner.sampler.new_state(params)

    def _check(self, req: Request) -> None:
        prompt: Prompt = req.payload
        num_audio_rows = 0 if prompt.audio_rows is None else prompt.audio_rows.shape[0]
        if prompt.num_image_tokens != prompt.patches.shape[0] or prompt.num_audio_tokens != num_audio_rows:
            raise ValueError(f"prompt has {prompt.num_image_tokens} image / {prompt.num_audio_tokens} audio tokens but "
                             f"{prompt.patches.shape[0]} / {num_audio_rows} rows; build prompts with Engine.build_prompt")
        reason = self.scheduler.reject_reason(req)
        if reason:
            raise ValueError(reason)

    def add_request(self, request_id: str, prompt: Prompt | str, params: SamplingParams | None = None,
                    images=(), videos=(), audios=()) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(prompt, Prompt):
            prompt = self.build_prompt(prompt, images, videos, audios)
        params = params or SamplingParams()
        req = self._request(request_id, prompt, params)
        self._check(req)
        req.sampler_state = self.runner.sampler.new_state(params)
        self.outputs.add(req)
        self._requests[request_id] = req
        self.scheduler.add(req)

    @staticmethod
    def _request(request_id: str, prompt: Prompt, params: SamplingParams) -> Request:
        if not prompt.token_ids:
            raise ValueError("the prompt is empty: give some text or media")
        return Request(request_id, list(prompt.token_ids), params,
                       media_spans=[(m.start, m.end, m.content_hash) for m in prompt.media],
                       atomic_spans=list(prompt.bidirectional_spans),
                       payload=prompt)  # the model runner reads its media rows

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks; returns its final output (None if unknown or finished)."""
        req = self.scheduler.abort(request_id)
        return self._finish(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # the step

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        samples = self._samples(scheduled)
        sampled = self._run(scheduled, samples)
        return self._postprocess(scheduled, samples, sampled)

    @staticmethod
    def _samples(scheduled: SchedulerOutput) -> list[bool]:
        """Per scheduled request: does this step reach its last token (so a token is sampled)?"""
        return [req.num_computed_tokens + n == req.num_tokens
                for req, n in zip(scheduled.requests, scheduled.num_new_tokens)]

    def _run(self, scheduled: SchedulerOutput, samples: list[bool]) -> SamplerOutput | None:
        """Only rows that end their prompt or decode compute logits and sample (seeded rows draw once per token)."""
        if scheduled.is_empty:
            return None
        chunks = [self._chunk(req, n, got) for req, n, got in zip(scheduled.requests, scheduled.num_new_tokens, samples)]
        sampling = [req for req, got in zip(scheduled.requests, samples) if got]
        return self.runner.run(chunks, [req.sampling_params for req in sampling],
                               [req.sampler_state for req in sampling],
                               [(req.prompt_token_ids, req.output_token_ids) for req in sampling])

    @staticmethod
    def _chunk(req: Request, num_new: int, needs_logits: bool) -> SeqChunk:
        """The request's tokens [start, end) with the media rows, 2-D positions and bidirectional runs in them."""
        start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
        prompt: Prompt = req.payload
        lo, hi = bisect.bisect_left(prompt.image_positions, start), bisect.bisect_left(prompt.image_positions, end)
        a_lo, a_hi = bisect.bisect_left(prompt.audio_positions, start), bisect.bisect_left(prompt.audio_positions, end)
        positions = prompt.row_position_ids
        return SeqChunk(
            req.all_token_ids[start:end], start, req.block_ids,
            patches=prompt.patches[lo:hi] if hi > lo else None,
            image_offsets=[p - start for p in prompt.image_positions[lo:hi]],
            row_position_ids=positions[lo:hi] if positions is not None and hi > lo else None,
            audio_rows=prompt.audio_rows[a_lo:a_hi] if a_hi > a_lo else None,
            audio_offsets=[p - start for p in prompt.audio_positions[a_lo:a_hi]],
            runs=[(s, e) for s, e in prompt.bidirectional_spans if s < end and e > start],
            needs_logits=needs_logits)

    def _postprocess(self, scheduled: SchedulerOutput, samples: list[bool], sampled: SamplerOutput | None
                     ) -> list[RequestOutput]:
        if scheduled.is_empty:
            return []
        tokens = iter(sampled.token_ids if sampled is not None else ())
        self.scheduler.update_from_output(scheduled, [next(tokens) if got else None for got in samples])
        outputs = []
        for row, req in enumerate(r for r, got in zip(scheduled.requests, samples) if got):
            if req.status.is_finished:  # aborted during the step
                continue
            want = sampled.logprobs is not None and req.sampling_params.logprobs is not None
            status, out = self.outputs.update(req, sampled.logprobs[row] if want else None,
                                              sampled.top_logprobs[row] if want else None)
            if status is not None:
                self.scheduler.finish(req, status)
                out = self._finish(req)
            outputs.append(out)
        return outputs

    def _finish(self, req: Request) -> RequestOutput:
        del self._requests[req.request_id]
        return self.outputs.finish(req)

    # introspection

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=bm.num_blocks, num_kv_blocks_used=bm.num_used_blocks,
            num_kv_slots_filled=sum(r.num_computed_tokens for r in self.scheduler.running),
            prefix_cache_hit_rate=bm.hit_rate, num_preemptions=self.scheduler.num_preemptions,
        )
