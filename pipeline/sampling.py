"""SamplingParams and the batched sampler: logit bias, min_tokens, repetition / frequency / presence penalties
(``pipeline.logits_processors``), structured outputs' masks, then greedy, temperature, top-k/p, min-p, seeds
(vLLM's names and order)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.logits_processors import (apply_frequency_presence_penalties, apply_logit_bias,  # noqa: F401
                                        apply_repetition_penalty, flat_index, flat_token_index, mask_tokens)

MAX_LOGPROBS = 20
MAX_N = 128
_GREEDY_EPS = 1e-5  # temperature below this is greedy (vLLM's convention)
TOP_P_CANDIDATES = 1024  # top-p without top-k sorts this many candidates first (on CPU)
CDF_BLOCK = 512  # inverse-CDF sampling sums blocks of this many weights, then searches one block
# where a filter or mask drops tokens, those with a log weight below this (probability < 1.6e-38 of the best) are
# dropped too and the rest exponentiated after a clamp: exp() past float32's normal range (and of -inf) runs
# 2-15x slower on CPU
LOG_WEIGHT_FLOOR = -87.0


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
    constraint of its structured output (``pipeline.structured``), advanced by each sampled token; for the penalties,
    its prompt's ids as a tensor (read once) and its output's, appended as tokens come."""

    generator: torch.Generator | None = None
    constraint: Any = None
    prompt_ids: torch.Tensor | None = None
    output_ids: torch.Tensor | None = None

    def history(self, prompt, output, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids, output ids) as long tensors on ``device``, built from the lists only where they grew."""
        if self.prompt_ids is None or len(self.prompt_ids) != len(prompt) or self.prompt_ids.device != device:
            self.prompt_ids = torch.tensor(prompt, dtype=torch.long, device=device)
        done = 0 if self.output_ids is None or self.output_ids.device != device else len(self.output_ids)
        if done > len(output):
            done = 0
        if done < len(output) or self.output_ids is None:
            new = torch.tensor(output[done:], dtype=torch.long, device=device)
            self.output_ids = torch.cat([self.output_ids, new]) if done else new
        return self.prompt_ids, self.output_ids


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None = None  # sampled token's logprob, per row
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per row: (token id, logprob), best first


def _host_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def filter_cutoffs(x: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float],
                   max_candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """Per row of ``x`` [B, V] (logits at the sampling temperature) the smallest value that survives top-k, then
    top-p within the top-k (the smallest prefix whose probability reaches p), then min-p; [B], -inf for no filter.

    Only candidates are sorted: topk(max k) for rows with top-k; for rows with top-p alone, the best
    ``max_candidates`` (on CPU; the whole vocabulary elsewhere, where sorting is cheap and a check would sync),
    falling back to the whole vocabulary when they hold less than p. Which filters run is decided on the host
    from the lists."""
    num_rows, vocab_size = x.shape
    device = x.device
    cutoff = torch.full((num_rows,), float("-inf"), device=device)
    has_k = [0 < k < vocab_size for k in top_k]
    has_p = [p < 1.0 for p in top_p]
    p_alone = [p_on and not k_on for k_on, p_on in zip(has_k, has_p)]  # top-p over the whole vocabulary
    row_max = row_sums = None
    if any(has_k) or any(has_p):
        bound = vocab_size if device.type != "cpu" else min(vocab_size, max_candidates)
        num_candidates = max([k for k, on in zip(top_k, has_k) if on]
                             + [bound for alone in p_alone if alone])
        while True:
            values = x.topk(num_candidates, dim=-1).values  # [B, K], best first
            row_max = values[:, :1]
            k_mask = torch.tensor(has_k, device=device)
            if any(has_k):
                k_index = torch.tensor([k - 1 if on else 0 for k, on in zip(top_k, has_k)], device=device)
                kth = values.gather(1, k_index[:, None]).squeeze(1)  # ties with the k-th value are kept
                cutoff = torch.where(k_mask, kth, cutoff)
            if not any(has_p):
                break
            probs = (values - row_max).exp_().masked_fill_(values < cutoff[:, None], 0.0)  # within the top-k
            total = probs.sum(dim=-1)
            if any(p_alone):
                if row_sums is None:  # the floor: exp() past float32's normal range is slow, and adds < 1e-32
                    row_sums = (x - row_max).clamp_(min=LOG_WEIGHT_FLOOR).exp_().sum(dim=-1)
                total = torch.where(k_mask, total, row_sums)
            probs /= total[:, None]
            p = torch.tensor(top_p, device=device)
            short = torch.tensor(p_alone, device=device) & (probs.sum(dim=-1) < p)
            if num_candidates < vocab_size and bool(short.any()):  # a flat row
                num_candidates = vocab_size
                continue
            mass_above = probs.cumsum(dim=-1) - probs  # probability of the better-ranked candidates
            num_keep = (mass_above < p[:, None]).sum(dim=-1, keepdim=True).clamp_(min=1)
            cut_p = values.gather(1, num_keep - 1).squeeze(1)
            cutoff = torch.where(torch.tensor(has_p, device=device), torch.maximum(cutoff, cut_p), cutoff)
            break
    if any(m > 0.0 for m in min_p):
        row_max = x.amax(dim=-1, keepdim=True) if row_max is None else row_max
        log_min_p = torch.tensor(min_p, device=device).log()  # p >= min_p * p_max; -inf for min_p 0
        cutoff = torch.maximum(cutoff, row_max.squeeze(1) + log_min_p)
    return cutoff


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k, top_p, min_p, max_candidates: int = TOP_P_CANDIDATES):
    """[B, V] logits with -inf where top-k, top-p or min-p (per row; host lists or CPU tensors) drop a token."""
    cutoff = filter_cutoffs(logits, _host_list(top_k), _host_list(top_p), _host_list(min_p),
                            max_candidates=max_candidates)
    return logits.masked_fill(logits < cutoff[:, None], float("-inf"))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``weights`` [B, V] (>= 0, each row with a positive sum) the index drawn with probability
    weight / sum for the uniform ``u`` [B] in [0, 1): the first index whose prefix sum exceeds u * sum.

    Past a few blocks, two levels, so no prefix sum runs over the whole vocabulary: the sums of blocks of
    ``CDF_BLOCK`` weights (float64 prefix over the blocks) pick the block, then that block's prefix sums the index."""
    num_rows, vocab_size = weights.shape
    if vocab_size <= 8 * CDF_BLOCK:  # small: one float64 prefix sum is cheaper than two levels of small ops
        cdf = weights.double().cumsum(dim=-1)
        return _first_above(cdf, u.double()[:, None] * cdf[:, -1:])
    pad = -vocab_size % CDF_BLOCK
    blocks = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = blocks.view(num_rows, -1, CDF_BLOCK)  # [B, num blocks, block]
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [B, num blocks]
    target = u.double()[:, None] * block_cdf[:, -1:]  # [B, 1]
    block = _first_above(block_cdf, target)  # [B]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    rows = torch.arange(num_rows, device=weights.device)
    in_block = blocks.reshape(-1, CDF_BLOCK).index_select(0, rows * blocks.shape[1] + block)  # [B, block]
    index = _first_above(in_block.double().cumsum(dim=-1), target - before[:, None])
    return (block * CDF_BLOCK + index).clamp_(max=vocab_size - 1)  # not into the padding


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index with cdf > target per row, never past the row's last positive step (rounding at u ~ 1)."""
    index = torch.searchsorted(cdf, target, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())  # the first index that reaches the row's total
    return torch.minimum(index, last).clamp_(max=cdf.shape[-1] - 1).squeeze(1)  # a NaN row: never past the end


def _sample_top_k(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float],
                  inv_temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """The draw of the vocabulary-wide path when every row has a small top-k (on CPU), from topk(max k) alone:
    the same kept tokens, in vocabulary order, without a pass over the vocabulary after the topk. None when a
    row's k-th value ties past the candidates (the vocabulary-wide path keeps all the ties)."""
    values, ids = logits.topk(max(top_k), dim=-1)  # [B, K], best first
    kth = values.gather(1, torch.tensor(top_k, device=logits.device)[:, None] - 1)  # [B, 1]
    edge = (values[:, -1:] == kth) & (kth > float("-inf"))  # a -inf k-th value (a grammar's row) is no tie
    if values.shape[1] < logits.shape[1] and bool(edge.any()):  # a tie reaches the edge
        if bool((((logits == kth).sum(dim=-1, keepdim=True) > (values == kth).sum(dim=-1, keepdim=True))
                 & edge).any()):
            return None
    x = (values - values[:, :1]).mul_(inv_temperature)  # log weights, as the full path's
    x.masked_fill_(x < filter_cutoffs(x, top_k, top_p, min_p)[:, None], float("-inf"))
    ids, order = ids.sort(dim=-1)  # vocabulary order, as the full path draws
    return ids.gather(1, inverse_cdf(x.gather(1, order).exp_(), u)[:, None]).squeeze(1)


class Sampler:
    """Samples one token per row: argmax for greedy rows; for the others, inverse-CDF sampling with one uniform
    per row over the filtered distribution, in vocabulary order. Seeded rows draw their uniform only from their
    own generator and every filter is per row, so a request's tokens do not depend on its batch companions.
    Unseeded rows draw from the sampler's own generator: the process's global RNG is never touched.
    Logprobs are of the raw model distribution (before penalties and temperature), as vLLM's default."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator or torch.Generator().manual_seed(0)
        self.device = self.generator.device
        self.tokenizer = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.vocab_size: int | None = None
        self._grammars = None  # pipeline.structured.GrammarCache, built on the first structured request
        self._grammars_lock = threading.Lock()  # new_state runs on server threads and the engine's

    def bind(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int) -> None:
        """The engine's text tokenizer, stop tokens and the model's vocabulary (the logits' width)."""
        self.tokenizer, self.eos_token_ids, self.vocab_size = tokenizer, frozenset(eos_token_ids), vocab_size

    def new_state(self, params: SamplingParams) -> SamplerState:
        """A request's state; raises ValueError for what this vocabulary cannot serve (before it is queued)."""
        if self.vocab_size is not None:
            for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
                bad = sorted(i for i in ids if i >= self.vocab_size)
                if bad:
                    raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary (ids 0 to "
                                     f"{self.vocab_size - 1})")
        constraint = None
        if params.structured is not None:
            with self._grammars_lock:
                if self._grammars is None:
                    import pipeline.structured as structured  # xgrammar: only for structured requests

                    assert self.tokenizer is not None and self.vocab_size, "Sampler.bind first"
                    self._grammars = structured.GrammarCache(self.tokenizer, self.vocab_size, self.eos_token_ids)
            constraint = self._grammars.constraint(params.structured)
        return SamplerState(generator=params.make_generator(self.device), constraint=constraint)

    @torch.inference_mode()  # the model's logits are inference tensors, worked on in place
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        states: list[SamplerState],
        histories: list[tuple[list[int], list[int]]] | None = None,
    ) -> SamplerOutput:
        """One token per row. ``histories``: per row (prompt token ids, output token ids), read only; None: no
        tokens yet. In order, as vLLM: logit bias, repetition penalty (prompt and output), frequency and presence
        penalties (output), min_tokens' stop-token mask, the structured outputs' masks; then argmax or sampling.
        Where one applies, float32 ``logits`` are worked on in place (no [B, V] copy); logprobs, of the raw
        logits, are taken before. A row left with no token by min_tokens and its grammar gets the min_tokens
        mask back (the grammar wins)."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(states)
        device, logits = logits.device, logits.float()
        want_logprobs = any(p.logprobs is not None for p in params)
        logprobs = logits.log_softmax(dim=-1) if want_logprobs else None  # [B, V], raw
        logits, changed, masked = self._process(logits, params, histories or [((), ())] * len(params), states)
        constraints = [state.constraint for state in states]
        if any(c is not None for c in constraints):
            from pipeline.structured import apply_constraints

            apply_constraints(logits, constraints)  # in place, on the constrained rows only
            changed = True
        if masked is not None:
            self._unmask_dead_rows(logits, masked, constraints)
        rows = [row for row, p in enumerate(params) if not p.is_greedy]  # rows that sample
        if not rows:
            token_ids = logits.argmax(dim=-1)
        elif len(rows) == len(params):
            token_ids = self._sample(logits, params, states, private=changed)
        else:
            token_ids = logits.argmax(dim=-1)
            index = torch.tensor(rows, device=device)
            sampled = self._sample(logits.index_select(0, index), [params[r] for r in rows], [states[r] for r in rows],
                                   private=True)
            token_ids.index_copy_(0, index, sampled)
        out = SamplerOutput(token_ids=token_ids.tolist())
        for constraint, token_id in zip(constraints, out.token_ids):
            if constraint is not None:
                constraint.accept(token_id)
        if want_logprobs:
            self._add_logprobs(out, logprobs, token_ids, params)
        return out

    def process_logits(self, raw: torch.Tensor, params: list[SamplingParams], histories,
                       states: list[SamplerState] | None = None) -> torch.Tensor:
        """``raw`` with what changes the distribution applied, in place (``raw`` itself is returned)."""
        return self._process(raw, params, histories, states)[0]

    def _process(self, logits: torch.Tensor, params: list[SamplingParams], histories, states
                 ) -> tuple[torch.Tensor, bool, tuple | None]:
        """(logits, whether anything changed them, the min_tokens mask's (rows, flat index, values before) or
        None). Tensors are built only for the rows that ask for each step; histories come from each row's
        SamplerState (the prompt read once). The stop-token mask comes last: -inf stays -inf under the penalties."""
        device, vocab_size, changed = logits.device, logits.shape[-1], False
        states = states if states is not None else [SamplerState() for _ in params]
        if any(p.logit_bias for p in params):
            changed = True
            apply_logit_bias(logits, [p.logit_bias for p in params])
        repeat = [p.repetition_penalty != 1.0 for p in params]
        counted = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        if any(r and len(h[0]) + len(h[1]) or c and len(h[1]) for h, r, c in zip(histories, repeat, counted)):
            changed = True
            empty = torch.empty(0, dtype=torch.long, device=device)
            seen = [state.history(prompt, output, device) if r or c else (empty, empty)
                    for state, (prompt, output), r, c in zip(states, histories, repeat, counted)]
            if any(repeat):
                apply_repetition_penalty(logits, torch.tensor([p.repetition_penalty for p in params], device=device),
                                         [torch.cat(h) if r else empty for h, r in zip(seen, repeat)])
            if any(counted):
                apply_frequency_presence_penalties(
                    logits, torch.tensor([p.frequency_penalty for p in params], device=device),
                    torch.tensor([p.presence_penalty for p in params], device=device),
                    [o if c else empty for (_, o), c in zip(seen, counted)])
        early = [p.min_tokens > len(output) for p, (_, output) in zip(params, histories)]
        masked = None
        if any(early):
            changed = True
            stops = [sorted(self.eos_token_ids.union(p.stop_token_ids)) if e else []  # EOS even with ignore_eos,
                     for p, e in zip(params, early)]  # as vLLM's min_tokens does
            index = flat_index(stops, vocab_size, device)
            masked = ([row for row, e in enumerate(early) if e], index, logits.view(-1).index_select(0, index))
            logits.view(-1).index_fill_(0, index, float("-inf"))
        return logits, changed, masked

    @staticmethod
    def _unmask_dead_rows(logits: torch.Tensor, masked: tuple, constraints: list) -> None:
        """Rows min_tokens masked that no token survives (with their grammar's mask): the stop tokens' values come
        back, then the grammar's mask again (the grammar wins over min_tokens)."""
        early, index, values = masked
        early_rows = torch.tensor(early, device=logits.device)
        alive = (logits.index_select(0, early_rows) > float("-inf")).any(dim=-1)
        if bool(alive.all()):
            return
        dead = early_rows[~alive]
        keep = torch.isin(torch.div(index, logits.shape[-1], rounding_mode="floor"), dead)
        logits.view(-1).index_copy_(0, index[keep], values[keep])
        dead_rows = dead.tolist()
        if any(constraints[row] is not None for row in dead_rows):
            from pipeline.structured import apply_constraints

            rows = logits.index_select(0, dead)
            apply_constraints(rows, [constraints[row] for row in dead_rows])
            logits.index_copy_(0, dead, rows)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState],
                private: bool) -> torch.Tensor:
        """One token per row of [B, V] ``logits``, every row at a temperature > 0; ``private``: the logits are
        this call's own copy (worked on in place: at a real vocabulary each fresh [B, V] buffer costs)."""
        device = logits.device
        u = torch.rand(len(params), generator=self.generator, device=device, dtype=torch.float64)
        seeded = [row for row, state in enumerate(states) if state.generator is not None]
        if seeded:
            own = [torch.rand(1, generator=states[row].generator, device=device, dtype=torch.float64) for row in seeded]
            u.index_copy_(0, torch.tensor(seeded, device=device), torch.cat(own))
        vocab_size = logits.shape[-1]
        top_k = [p.top_k if p.top_k < vocab_size else 0 for p in params]  # k >= V: every token
        top_p, min_p = [p.top_p for p in params], [p.min_p for p in params]
        inv_temperature = torch.tensor([1.0 / p.temperature for p in params], device=device)[:, None]
        if device.type == "cpu" and all(0 < k <= TOP_P_CANDIDATES for k in top_k):
            token_ids = _sample_top_k(logits, top_k, top_p, min_p, inv_temperature, u)
            if token_ids is not None:
                return token_ids
        row_max = logits.amax(dim=-1, keepdim=True)
        x = logits.sub_(row_max) if private else logits - row_max  # [B, V] log weights, row max 0
        if any(p.temperature != 1.0 for p in params):
            x.mul_(inv_temperature)
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p) or any(m > 0.0 for m in min_p):
            drop = x < filter_cutoffs(x, top_k, top_p, min_p).clamp(min=LOG_WEIGHT_FLOOR)[:, None]
        elif private:  # masks (-inf) or a bias may have pushed logits far down
            drop = x < LOG_WEIGHT_FLOOR
        else:
            return inverse_cdf(x.exp_(), u)  # weights: unnormalized probabilities
        return inverse_cdf(x.clamp_(min=LOG_WEIGHT_FLOOR).exp_().masked_fill_(drop, 0.0), u)

    @staticmethod
    def _add_logprobs(out: SamplerOutput, logprobs: torch.Tensor, token_ids: torch.Tensor,
                      params: list[SamplingParams]):
        out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        max_k = min(max(p.logprobs or 0 for p in params), logprobs.shape[-1])
        top_values, top_ids = logprobs.topk(max_k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out.top_logprobs = [
            list(zip(ids[: p.logprobs or 0], vals[: p.logprobs or 0])) for ids, vals, p in zip(top_ids, top_values, params)
        ]
