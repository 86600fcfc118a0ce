"""SamplingParams and the batched sampler (greedy, temperature, top-k/p, min-p, repetition penalty, seed)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20
MAX_N = 128
_GREEDY_EPS = 1e-5  # temperature below this is greedy (vLLM's convention)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class StructuredOutputs:
    """A constraint on the output (vLLM's ``structured_outputs``): exactly one of a JSON schema (dict or JSON
    text), any JSON object, a regular expression, one of fixed strings, or an EBNF grammar."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        if self.json_object not in (True, False):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (object or JSON text), got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a list of non-empty strings, got {self.choice!r}")


@dataclass
class SamplingParams:
    """Per-request sampling options; defaults follow vLLM. Bad values raise ValueError."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's only; k: plus top-k alternatives
    n: int = 1  # parallel samples of one prompt (its KV blocks shared)
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # no stop token (EOS, stop_token_ids) and no stop string before this many tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be an integer >= 1 (below 2**31), or 0 / -1 for all tokens, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer that fits 64 bits, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                _is_int(k) and k >= 0 and _is_number(v) and -100.0 <= v <= 100.0 for k, v in self.logit_bias.items()):
            raise ValueError("logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], "
                             f"got {self.logit_bias!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise ValueError(f"structured must be a StructuredOutputs, got {self.structured!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The request's own generator (on the logits' device), or None to use the global RNG."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class SamplerState:
    """A request's own sampling state, made once by ``Sampler.new_state``: its seeded generator and the
    constraint of its structured output (``pipeline.structured``), advanced by each sampled token."""

    generator: torch.Generator | None = None
    constraint: Any = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None = None  # sampled token's logprob, per row
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per row: (token id, logprob), best first


def apply_repetition_penalty(logits: torch.Tensor, penalties: torch.Tensor, token_history: list[list[int]]) -> None:
    """In place, as transformers' RepetitionPenaltyLogitsProcessor: seen tokens' positive logits / p, negative * p."""
    if not any(token_history):
        return
    lengths = torch.tensor([len(h) for h in token_history], device=logits.device)
    rows = torch.repeat_interleave(torch.arange(len(token_history), device=logits.device), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_history)), device=logits.device, dtype=torch.long)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[rows, cols] = True
    p = penalties[:, None].expand_as(logits)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    logits.copy_(torch.where(seen, penalized, logits))


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k, top_p, min_p):
    """Masks [B, V] logits with -inf; top_k [B] (0 = off), top_p [B], min_p [B] as host lists (or CPU tensors):
    which filters run is decided on the host, so a GPU step does not wait on the device. Ties at the k-th value
    are kept. Sorts the vocabulary only when a row uses top-p; top-k alone takes topk(max k); min-p needs no order."""
    vocab_size = logits.shape[-1]
    top_k_host, top_p_host, min_p_host = (x.tolist() if isinstance(x, torch.Tensor) else list(x)
                                          for x in (top_k, top_p, min_p))
    top_k, top_p, min_p = (torch.tensor(x, device=logits.device) for x in (top_k_host, top_p_host, min_p_host))
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    if any(p < 1.0 for p in top_p_host):
        sorted_logits, _ = logits.sort(dim=-1, descending=True)  # [B, V]
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V] probability of better-ranked tokens
        keep_sorted = (mass_above < top_p[:, None]) & (sorted_logits > float("-inf"))  # within top-k
        keep_sorted[:, 0] = True
        num_keep = keep_sorted.sum(dim=-1, keepdim=True)  # [B, 1]
        logits = logits.masked_fill(logits < sorted_logits.gather(1, num_keep - 1), float("-inf"))
    elif any(k_ > 0 for k_ in top_k_host):
        max_k = max(k_ if k_ > 0 else vocab_size for k_ in top_k_host)
        top_values = logits.topk(min(max_k, vocab_size), dim=-1).values  # [B, max k]
        logits = logits.masked_fill(logits < top_values.gather(1, (k - 1)[:, None]), float("-inf"))
    if any(p > 0.0 for p in min_p_host):
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(too_unlikely, float("-inf"))
    return logits


class Sampler:
    """Samples one token per row. Seeded rows draw their noise only from their own generator, so a request's
    tokens do not depend on its batch companions (exponential race: argmax(probs / q), q ~ Exp(1)).
    Logprobs are of the raw model distribution (before penalties and temperature), as vLLM's default.
    Unseeded rows draw from the sampler's own generator: the process's global RNG is never touched."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator or torch.Generator().manual_seed(0)
        self.device = self.generator.device
        self.tokenizer = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.vocab_size: int | None = None
        self._grammars = None  # pipeline.structured.GrammarCache, built on the first structured request

    def bind(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int) -> None:
        """The engine's text tokenizer, stop tokens and the model's vocabulary (the logits' width)."""
        self.tokenizer, self.eos_token_ids, self.vocab_size = tokenizer, frozenset(eos_token_ids), vocab_size

    def new_state(self, params: SamplingParams) -> SamplerState:
        """A request's state; raises ValueError for what this vocabulary cannot serve (before it is queued)."""
        constraint = None
        if params.structured is not None:
            if self._grammars is None:
                from pipeline.structured import GrammarCache  # xgrammar: only for structured requests

                assert self.tokenizer is not None and self.vocab_size, "Sampler.bind first"
                self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_token_ids)
            constraint = self._grammars.constraint(params.structured)
        return SamplerState(generator=params.make_generator(self.device), constraint=constraint)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        states: list[SamplerState],
        histories: list[tuple[list[int], list[int]]] | None = None,
    ) -> SamplerOutput:
        """One token per row. ``histories``: per row (prompt token ids, output token ids), read only."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(states)
        generators = [state.generator for state in states]
        token_history = None if histories is None else [list(p) + list(o) for p, o in histories]
        device = logits.device
        raw = logits = logits.float()
        if token_history is not None and any(p.repetition_penalty != 1.0 for p in params):
            logits = raw.clone()
            penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
            apply_repetition_penalty(logits, penalties, token_history)
        constraints = [state.constraint for state in states]
        if any(c is not None for c in constraints):
            from pipeline.structured import apply_constraints

            logits = logits.clone() if logits is raw else logits
            apply_constraints(logits, constraints)  # in place, on the constrained rows only
        greedy_ids = logits.argmax(dim=-1)
        if all(p.is_greedy for p in params):
            token_ids = greedy_ids
        else:
            greedy = torch.tensor([p.is_greedy for p in params], device=device)
            temperature = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params], device=device)
            logits = logits / temperature[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
                logits = apply_top_k_top_p_min_p(logits, [p.top_k for p in params], [p.top_p for p in params],
                                                  [p.min_p for p in params])
            probs = logits.softmax(dim=-1)
            q = torch.empty_like(probs).exponential_(generator=self.generator)
            for row, gen in enumerate(generators):
                if gen is not None:
                    q[row].exponential_(generator=gen)
            sampled_ids = (probs / q.clamp_(min=1e-20)).argmax(dim=-1)
            token_ids = torch.where(greedy, greedy_ids, sampled_ids)
        out = SamplerOutput(token_ids=token_ids.tolist())
        for constraint, token_id in zip(constraints, out.token_ids):
            if constraint is not None:
                constraint.accept(token_id)
        if any(p.logprobs is not None for p in params):
            self._add_logprobs(out, raw, token_ids, params)
        return out

    @staticmethod
    def _add_logprobs(out: SamplerOutput, raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]):
        logprobs = raw.log_softmax(dim=-1)  # [B, V]
        out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        max_k = min(max(p.logprobs or 0 for p in params), raw.shape[-1])
        top_values, top_ids = logprobs.topk(max_k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out.top_logprobs = [
            list(zip(ids[: p.logprobs or 0], vals[: p.logprobs or 0])) for ids, vals, p in zip(top_ids, top_values, params)
        ]
