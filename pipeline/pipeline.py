"""Pipeline: the synchronous Python face of the engine.

    pipe = Pipeline.from_pretrained()                       # the bundled model
    out = pipe("What shape is this? <image>", images=["a.png"], max_tokens=32, temperature=0.0)
    for chunk in pipe.stream("Describe <video>", videos=["clip.mp4"]): print(chunk.text, end="")
    answers = pipe("Name a shape:", n=4, temperature=1.0, seed=0)  # n > 1: a list of n outputs, by index
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.outputs import RequestOutput, StreamChunk
from pipeline.sampling import SamplingParams
from tokenization import Prompt


class Pipeline:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: str = "cpu", dtype: str | None = None,
                        **engine_options: Any) -> "Pipeline":
        """``path``: a Hugging Face-format Fuyu or Gemma 4 Unified folder (None: the bundled model); options: EngineConfig fields."""
        return cls(Engine(EngineConfig.from_options(model=path, device=device, dtype=dtype, **engine_options)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def __call__(self, prompt: str | Prompt, images: Sequence = (), videos: Sequence = (), audios: Sequence = (),
                 sampling_params: SamplingParams | None = None, **sampling: Any
                 ) -> RequestOutput | list[RequestOutput]:
        """One prompt's output; with ``n > 1`` the list of its n outputs (see ``generate``)."""
        params = _params(sampling_params, sampling)
        return self.generate([{"prompt": prompt, "images": images or (), "videos": videos or (),
                               "audios": audios or ()}], params)[0]

    def generate(self, requests: Sequence[dict | str | Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput | list[RequestOutput]]:
        """Runs many requests at once (continuous batching); outputs in the order of ``requests``, one per prompt:
        its final ``RequestOutput`` when its ``n`` is 1, the list of its n final outputs (by ``index``, each with
        its own text, finish reason and usage) when ``n > 1`` — as vLLM's ``RequestOutput.outputs``. The n
        sequences share the prompt's prefill and KV blocks."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(requests)
        if len(sampling_params) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(sampling_params)} SamplingParams")
        prompts = [self._prompt(request) for request in requests]  # bad media or text: nothing added yet
        for prompt, params in zip(prompts, sampling_params):
            self.engine.validate(prompt, params)
        ids: list[str] = []
        results: dict[str, list[RequestOutput | None]] = {}
        num_open = sum(params.n for params in sampling_params)
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(self._add(prompt, params))
                results[ids[-1]] = [None] * params.n
            while num_open:
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id][out.index] = out
                        num_open -= 1
        finally:
            if num_open:
                for request_id in ids:
                    self.engine.abort(request_id)
        return [outs if params.n > 1 else outs[0] for outs, params in zip(results.values(), sampling_params)]

    def stream(self, prompt: str | Prompt, images: Sequence = (), videos: Sequence = (), audios: Sequence = (),
               sampling_params: SamplingParams | None = None, **sampling: Any) -> Iterator[StreamChunk]:
        """Yields the new text as it is generated; closing the iterator early aborts the request. One sequence:
        ``n > 1`` is a ValueError (``generate`` gives the n outputs)."""
        request = {"prompt": prompt, "images": images or (), "videos": videos or (), "audios": audios or ()}
        params = _params(sampling_params, sampling)
        if params.n > 1:
            raise ValueError(f"stream yields the text of one sequence; for n={params.n} use generate, or the "
                             f"engine's outputs (each carries its sequence's index)")
        request_id = self._add(self._prompt(request), params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != request_id or not (out.delta_text or out.delta_token_ids or out.finished):
                        continue
                    finished = out.finished
                    yield StreamChunk(request_id, out.delta_text, out.delta_token_ids, out.finish_reason, out.usage)
        finally:
            if not finished:
                self.engine.abort(request_id)

    def _prompt(self, request: dict | str | Prompt) -> Prompt:
        if isinstance(request, (str, Prompt)):
            request = {"prompt": request}
        unknown = set(request) - {"prompt", "images", "videos", "audios", "media_options"}
        if unknown or "prompt" not in request:
            raise ValueError(f"a request is a dict with 'prompt' and optional 'images' / 'videos' / 'audios' / "
                             f"'media_options'; got keys {sorted(request)}")
        if isinstance(request["prompt"], Prompt):
            return request["prompt"]
        return self.engine.build_prompt(request["prompt"], request.get("images", ()), request.get("videos", ()),
                                        request.get("audios", ()), **request.get("media_options", {}))

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = f"pipe-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params)
        return request_id


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is not None and overrides:
        raise ValueError("pass either sampling_params or sampling keywords (max_tokens=..., temperature=...), not both")
    return params or SamplingParams(**overrides)
