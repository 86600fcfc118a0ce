"""The engine: ``add_request`` / ``step`` / ``abort``. A step is schedule → run → postprocess.

A request with ``SamplingParams(n=k)`` is k sequences (``Request``, internal ids ``"{request_id}#{i}"``): the
first is scheduled; at the step that computes the prompt's last token, its one logits row is sampled k times
(sequence i with its own sampler state, seeded ``seed + i`` as vLLM's child requests) and the others fork off
it, sharing the prompt's KV blocks. Every output carries the caller's ``request_id`` and the sequence's
``index``; each sequence streams and finishes on its own, and the request is done when all k are.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
from dataclasses import dataclass

from pipeline.block_manager import BlockManager
from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk
from pipeline.models import get_family
from pipeline.models.loading import read_eos_token_ids
from pipeline.output_processor import OutputProcessor
from pipeline.outputs import RequestOutput
from pipeline.request import Request, RequestStatus
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
    num_prefill_tokens: int  # tokens run through the model as prefill so far, recomputes included (not decodes)


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
        self._requests: dict[str, Request] = {}  # unfinished sequences by internal id
        self._seqs: dict[str, list[Request]] = {}  # the caller's request id -> its unfinished sequences

    # requests

    def build_prompt(self, text, images=(), videos=(), audios=(), **media_options) -> Prompt:
        """Decode, patchify and interleave (thread-safe: servers call it from a worker pool). ``media_options``
        are the family's (Gemma 4 Unified: ``max_soft_tokens``); others are a ValueError."""
        return self.front_end.build(text, images=images, videos=videos, audios=audios, **media_options)

    def validate(self, prompt: Prompt, params: SamplingParams) -> None:
        """Raises ValueError for a request the engine would refuse."""
        self._check(self._sequences("", prompt, params)[0])
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
        """Queues the request: ``params.n`` sequences of one prompt (outputs: ``request_id`` and their ``index``)."""
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(prompt, Prompt):
            prompt = self.build_prompt(prompt, images, videos, audios)
        seqs = self._sequences(request_id, prompt, params or SamplingParams())
        if any(seq.request_id in self._requests for seq in seqs):
            raise ValueError(f"request id {request_id!r} is already in use (by one of another request's sequences)")
        self._check(seqs[0])
        for seq in seqs:
            seq.sampler_state = self.runner.sampler.new_state(seq.sampling_params)
        for seq in seqs:
            self.outputs.add(seq)
            self._requests[seq.request_id] = seq
        self._seqs[request_id] = seqs
        self.scheduler.add(seqs[0])

    @staticmethod
    def _sequences(request_id: str, prompt: Prompt, params: SamplingParams) -> list[Request]:
        """The request's ``params.n`` sequences, each with n=1 and (if seeded) its own seed; the first holds the
        others as its forks."""
        if not prompt.token_ids:
            raise ValueError("the prompt is empty: give some text or media")
        if params.seed is not None and params.seed + params.n - 1 >= 2**64:
            raise ValueError(f"seed + n - 1 must fit 64 bits (sequence i samples with seed + i); got seed "
                             f"{params.seed} and n={params.n}")
        seqs = []
        for i in range(params.n):
            seq_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            seqs.append(Request(
                request_id if params.n == 1 else f"{request_id}#{i}", list(prompt.token_ids), seq_params,
                media_spans=[(m.start, m.end, m.content_hash) for m in prompt.media],
                atomic_spans=list(prompt.bidirectional_spans),
                payload=prompt,  # the model runner reads its media rows
                parent_id=None if params.n == 1 else request_id, index=i))
        seqs[0].forks = seqs[1:]
        return seqs

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stops the request's sequences still running and frees their blocks; returns their final outputs
        (empty if the request is unknown or finished)."""
        outputs = []
        for seq in list(self._seqs.get(request_id, ())):
            if self.scheduler.abort(seq.request_id) is None:  # a fork not made yet (its parent is aborted first)
                seq.status = RequestStatus.FINISHED_ABORTED
            outputs.append(self._finish(seq))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # the step

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        samples = self._samples(scheduled)
        sampled = self._run(scheduled, samples)
        return self._postprocess(scheduled, samples, sampled)

    @staticmethod
    def _samples(scheduled: SchedulerOutput) -> list[list[Request]]:
        """Per scheduled request, the sequences sampled from its logits row this step: none (the step does not
        reach its last token), itself, or at the end of a prompt with forks itself and each fork."""
        return [[req, *req.forks] if req.num_computed_tokens + n == req.num_tokens else []
                for req, n in zip(scheduled.requests, scheduled.num_new_tokens)]

    def _run(self, scheduled: SchedulerOutput, samples: list[list[Request]]) -> SamplerOutput | None:
        """Only rows that end their prompt or decode compute logits and sample (seeded rows draw once per token)."""
        if scheduled.is_empty:
            return None
        chunks = [self._chunk(req, n, bool(seqs))
                  for req, n, seqs in zip(scheduled.requests, scheduled.num_new_tokens, samples)]
        rows = [row for row, seqs in enumerate(seqs for seqs in samples if seqs) for _ in seqs]
        sampling = list(itertools.chain.from_iterable(samples))
        return self.runner.run(chunks, [seq.sampling_params for seq in sampling],
                               [seq.sampler_state for seq in sampling],
                               [(seq.prompt_token_ids, seq.output_token_ids) for seq in sampling],
                               sample_rows=rows if len(rows) > len(set(rows)) else None,
                               block_copies=scheduled.blocks_to_copy)

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

    def _postprocess(self, scheduled: SchedulerOutput, samples: list[list[Request]], sampled: SamplerOutput | None
                     ) -> list[RequestOutput]:
        if scheduled.is_empty:
            return []
        tokens = iter(sampled.token_ids if sampled is not None else ())
        self.scheduler.update_from_output(scheduled, [[next(tokens) for _ in seqs] for seqs in samples])
        outputs = []
        for row, seq in enumerate(itertools.chain.from_iterable(samples)):
            if seq.status.is_finished:  # aborted during the step
                continue
            want = sampled.logprobs is not None and seq.sampling_params.logprobs is not None
            status, out = self.outputs.update(seq, sampled.logprobs[row] if want else None,
                                              sampled.top_logprobs[row] if want else None)
            if status is None:
                outputs.append(self._for_caller(seq, out))
            else:
                self.scheduler.finish(seq, status)
                outputs.append(self._finish(seq))
        return outputs

    def _finish(self, seq: Request) -> RequestOutput:
        del self._requests[seq.request_id]
        seqs = self._seqs[seq.caller_id]
        seqs.remove(seq)
        if not seqs:
            del self._seqs[seq.caller_id]
        return self._for_caller(seq, self.outputs.finish(seq))

    @staticmethod
    def _for_caller(seq: Request, out: RequestOutput) -> RequestOutput:
        out.request_id, out.index = seq.caller_id, seq.index
        return out

    # introspection

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=bm.num_blocks, num_kv_blocks_used=bm.num_used_blocks,
            num_kv_slots_filled=sum(r.num_computed_tokens for r in self.scheduler.running),
            prefix_cache_hit_rate=bm.hit_rate, num_preemptions=self.scheduler.num_preemptions,
            num_prefill_tokens=self.scheduler.num_prefill_tokens,
        )
