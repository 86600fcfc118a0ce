"""The engine: ``add_request`` / ``step`` / ``abort``. A step is schedule → run → postprocess."""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from functools import partial

import torch

from encoders import normalize_patches, PatchConfig
from pipeline.block_manager import BlockManager
from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk
from pipeline.outputs import RequestOutput, Usage
from pipeline.request import Request, RequestStatus
from pipeline.sampling import SamplerOutput, SamplingParams
from pipeline.scheduler import Scheduler, SchedulerOutput
from tokenization import IncrementalDetokenizer, Interleaver, Prompt, TextTokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Progress:
    """Per-request output state the scheduler does not keep."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    num_emitted_tokens: int = 0
    emitted_text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


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
        self.tokenizer = TextTokenizer.from_pretrained(config.model)
        self.patch_config = PatchConfig.from_pretrained(config.model)
        self.interleaver = Interleaver(self.tokenizer, self.patch_config, config.media_limits, config.video_sampling)
        self.runner = ModelRunner(config, partial(normalize_patches, cfg=self.patch_config))
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill)
        self.eos_token_id = self.runner.args.eos_token_id
        self._requests: dict[str, Request] = {}
        self._progress: dict[str, _Progress] = {}
        torch.manual_seed(config.seed)

    # requests

    def build_prompt(self, text: str, images=(), videos=()) -> Prompt:
        """Decode, patchify and interleave (thread-safe: servers call it from a worker pool)."""
        return self.interleaver.build(text, images=images, videos=videos)

    def add_request(self, request_id: str, prompt: Prompt | str, params: SamplingParams | None = None,
                    images=(), videos=()) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt = self.build_prompt(prompt, images, videos)
        params = params or SamplingParams()
        if not prompt.token_ids:
            raise ValueError("the prompt is empty: give some text or media")
        if prompt.num_image_tokens != prompt.patches.shape[0]:
            raise ValueError(f"prompt has {prompt.num_image_tokens} image tokens but {prompt.patches.shape[0]} "
                             "patch rows; build prompts with Engine.build_prompt")
        req = Request(request_id, list(prompt.token_ids), params,
                      media_spans=[(m.start, m.end, m.content_hash) for m in prompt.media],
                      payload=prompt)  # the model runner reads its image positions and patch rows
        reason = self.scheduler.reject_reason(req)
        if reason:
            raise ValueError(reason)
        self._progress[request_id] = _Progress(IncrementalDetokenizer(self.tokenizer),
                                               params.make_generator(self.runner.device))
        self._requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks; returns its final output (None if unknown or finished)."""
        req = self.scheduler.abort(request_id)
        return self._finish_output(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # the step

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        sampled = self._run(scheduled)
        return self._postprocess(scheduled, sampled)

    def _run(self, scheduled: SchedulerOutput) -> SamplerOutput | None:
        if scheduled.is_empty:
            return None
        chunks = [self._chunk(req, n) for req, n in zip(scheduled.requests, scheduled.num_new_tokens)]
        params = [req.sampling_params for req in scheduled.requests]
        generators = [self._progress[req.request_id].generator for req in scheduled.requests]
        history = None
        if any(p.repetition_penalty != 1.0 for p in params):
            history = [req.all_token_ids for req in scheduled.requests]
        return self.runner.run(chunks, params, generators, history)

    @staticmethod
    def _chunk(req: Request, num_new: int) -> SeqChunk:
        start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
        prompt: Prompt = req.payload
        lo = bisect.bisect_left(prompt.image_positions, start)
        hi = bisect.bisect_left(prompt.image_positions, end)
        offsets = [p - start for p in prompt.image_positions[lo:hi]]
        return SeqChunk(req.all_token_ids[start:end], start, req.block_ids,
                        prompt.patches[lo:hi] if offsets else None, offsets)

    def _postprocess(self, scheduled: SchedulerOutput, sampled: SamplerOutput | None) -> list[RequestOutput]:
        if sampled is None:
            return []
        receives = [req.num_computed_tokens + n == req.num_tokens
                    for req, n in zip(scheduled.requests, scheduled.num_new_tokens)]
        self.scheduler.update_from_output(
            scheduled, [tok if got else None for tok, got in zip(sampled.token_ids, receives)])
        outputs = []
        for row, (req, got) in enumerate(zip(scheduled.requests, receives)):
            if not got or req.status.is_finished:
                continue
            progress = self._progress[req.request_id]
            if sampled.logprobs is not None and req.sampling_params.logprobs is not None:
                progress.logprobs.append(sampled.logprobs[row])
                progress.top_logprobs.append(sampled.top_logprobs[row])
            progress.detokenizer.add([req.output_token_ids[-1]])
            status, text = self._check_stop(req, progress.detokenizer.text)
            if status is not None:
                self.scheduler.finish(req, status)
                outputs.append(self._finish_output(req, text))
            else:
                outputs.append(self._output(req, text))
        return outputs

    def _check_stop(self, req: Request, text: str) -> tuple[RequestStatus | None, str | None]:
        """(finish status or None, the text to show: None for all of it; a stop string and what follows it are
        cut, and while running a possible stop-string prefix at the end is held back)."""
        params, token = req.sampling_params, req.output_token_ids[-1]
        if token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos):
            return RequestStatus.FINISHED_STOPPED, None
        longest_stop = max(map(len, params.stop), default=0)
        if longest_stop:
            tail_from = max(0, len(self._progress[req.request_id].emitted_text) - longest_stop)
            hits = [i for i in (text.find(s, tail_from) for s in params.stop) if i >= 0]
            if hits:
                return RequestStatus.FINISHED_STOPPED, text[:min(hits)]
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, text[:max(0, len(text) - longest_stop + 1)] if longest_stop else text

    def _output(self, req: Request, text: str) -> RequestOutput:
        progress = self._progress[req.request_id]
        delta_ids = req.output_token_ids[progress.num_emitted_tokens:]
        emitted = progress.emitted_text
        delta_text = text[len(emitted):] if text.startswith(emitted) else ""
        progress.num_emitted_tokens = req.num_output_tokens
        progress.emitted_text = emitted + delta_text
        want_logprobs = req.sampling_params.logprobs is not None
        return RequestOutput(
            request_id=req.request_id, text=progress.emitted_text, token_ids=list(req.output_token_ids),
            finished=req.status.is_finished, finish_reason=req.status.finish_reason,
            usage=Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens),
            delta_text=delta_text, delta_token_ids=delta_ids,
            logprobs=list(progress.logprobs) if want_logprobs else None,
            top_logprobs=list(progress.top_logprobs) if want_logprobs else None,
        )

    def _finish_output(self, req: Request, text: str | None = None) -> RequestOutput:
        progress = self._progress[req.request_id]
        if text is None:
            text = progress.detokenizer.text + progress.detokenizer.flush()
        out = self._output(req, text)
        del self._requests[req.request_id], self._progress[req.request_id]
        return out

    # introspection

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=bm.num_blocks, num_kv_blocks_used=bm.num_used_blocks,
            num_kv_slots_filled=sum(r.num_computed_tokens for r in self.scheduler.running),
            prefix_cache_hit_rate=bm.hit_rate, num_preemptions=self.scheduler.num_preemptions,
        )
