"""Sampler: greedy, top-k/top-p/min-p masks vs plain references, transformers' repetition penalty, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pipeline.sampling import (CDF_BLOCK, Sampler, SamplerState, SamplingParams, apply_repetition_penalty,
                               apply_top_k_top_p_min_p, inverse_cdf)

NEG_INF = float("-inf")


def ref_mask(row: list[float], top_k: int, top_p: float, min_p: float, temperature: float = 1.0) -> set[int]:
    """Plain-Python set of tokens that survive temperature, top-k, top-p (smallest prefix reaching p), min-p."""
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    if top_k > 0:
        order = order[:top_k]
    z = sum(math.exp(scaled[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += math.exp(scaled[i]) / z
        if mass >= top_p:
            break
    best = math.exp(scaled[kept[0]]) / z
    return {i for i in kept if math.exp(scaled[i]) / z >= min_p * best}


def sample(logits, params, generators=None, history=None):
    states = [SamplerState(g) for g in generators or [None] * len(params)]
    return Sampler()(logits, params, states, None if history is None else [(h, []) for h in history])


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (8, 0.9, 0.05), (1, 1.0, 0.0), (0, 0.01, 0.0), (100, 1.0, 0.0)],
)
def test_masks_match_plain_reference(top_k, top_p, min_p):
    logits = 2.5 * torch.randn(5, 40, generator=torch.Generator().manual_seed(top_k + int(100 * top_p)))
    b = logits.shape[0]
    masked = apply_top_k_top_p_min_p(
        logits, torch.full((b,), top_k), torch.full((b,), top_p), torch.full((b,), min_p)
    )
    for row, masked_row in zip(logits.tolist(), masked):
        kept = set(torch.nonzero(masked_row > NEG_INF).flatten().tolist())
        assert kept == ref_mask(row, top_k, top_p, min_p)
        assert torch.equal(masked_row[list(kept)], torch.tensor(row)[list(kept)])  # survivors unchanged


def test_masks_per_row_in_one_batch():
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(5))
    rows = [(3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.1), (0, 1.0, 0.0), (50, 0.999, 0.0), (150, 1.0, 0.01)]
    top_k, top_p, min_p = (torch.tensor(col) for col in zip(*rows))
    masked = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for row, masked_row, (k, p, m) in zip(logits.tolist(), masked, rows):
        assert set(torch.nonzero(masked_row > NEG_INF).flatten().tolist()) == ref_mask(row, k, p, m)


def test_top_p_over_bounded_candidates_and_the_fallback_match_plain_reference():
    """Top-p alone sorts only the best ``max_candidates``; a row whose candidates hold less than p falls back."""
    gen = torch.Generator().manual_seed(9)
    vocab, bound = 300, 8
    logits = torch.randn(5, vocab, generator=gen)
    logits[0, :3] += 9.0  # peaked: the 0.9 nucleus is inside the best 8
    logits[1, 10:14] += 7.0
    rows = [(0, 0.9, 0.0), (0, 0.95, 0.0), (0, 0.5, 0.0), (20, 0.8, 0.0), (0, 0.7, 0.01)]  # rows 2-4: flat
    top_k, top_p, min_p = (list(col) for col in zip(*rows))
    masked = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p, max_candidates=bound)
    mass_of_best = [sorted(row.softmax(-1).tolist(), reverse=True)[:bound] for row in logits]
    assert sum(mass_of_best[0]) >= 0.9 and sum(mass_of_best[2]) < 0.5  # both paths are taken
    for row, masked_row, (k, p, m) in zip(logits.tolist(), masked, rows):
        assert set(torch.nonzero(masked_row > NEG_INF).flatten().tolist()) == ref_mask(row, k, p, m)
    peaked_only = apply_top_k_top_p_min_p(logits[:2], top_k[:2], top_p[:2], min_p[:2], max_candidates=bound)
    assert torch.equal(peaked_only, masked[:2])


def ref_inverse_cdf(weights: list[float], u: float) -> tuple[int, float]:
    """Plain Python: the first index whose running sum exceeds u * total, and how far (relative to the total) the
    target is from the nearest step (a block's float32 sum may differ from the exact one by ~1e-7)."""
    total = sum(weights)
    target, running, margin = u * total, 0.0, float("inf")
    for i, w in enumerate(weights):
        running += w
        margin = min(margin, abs(running - target) / total)
        if running > target:
            return i, margin
    return max(i for i, w in enumerate(weights) if w > 0), 0.0


@pytest.mark.parametrize("vocab", [37, CDF_BLOCK, 8 * CDF_BLOCK + 5, 16 * CDF_BLOCK])  # 1 and 2 levels
def test_inverse_cdf_matches_plain_prefix_search(vocab):
    gen = torch.Generator().manual_seed(vocab)
    weights = torch.rand(6, vocab, generator=gen) ** 4
    weights[weights < 0.05] = 0.0  # zero weights are never drawn
    weights[5, :-1] = 0.0  # one token only, at the very end
    for trial in range(20):
        u = torch.rand(6, generator=gen, dtype=torch.float64)
        u[0] = 1.0 - 2.0**-53 if trial == 0 else u[0]
        ours = inverse_cdf(weights, u).tolist()
        for row, (w, ui) in enumerate(zip(weights.double().tolist(), u.tolist())):
            assert w[ours[row]] > 0
            expected, margin = ref_inverse_cdf(w, ui)
            assert ours[row] == expected or margin < 1e-6


@pytest.mark.parametrize("kwargs", [dict(top_k=4), dict(top_p=0.5), dict()])  # candidates; vocabulary-wide
def test_frequencies_at_a_vocabulary_of_many_blocks(kwargs):
    vocab, n = 8 * CDF_BLOCK + 100, 3000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(6))
    logits[[3, 700, vocab - 1, 1030]] += torch.tensor([7.0, 7.5, 8.0, 6.5])
    out = sample(logits.expand(n, -1).contiguous(), [SamplingParams(temperature=0.9, **kwargs)] * n)
    kept = sorted(ref_mask(logits.tolist(), kwargs.get("top_k", 0), kwargs.get("top_p", 1.0), 0.0, 0.9))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).double() / n
    probs = (logits[kept] / 0.9).double().softmax(-1)
    assert freq[kept].sum().item() == pytest.approx(1.0)  # nothing outside the filters
    top = probs.topk(min(4, len(kept))).indices
    assert torch.allclose(freq[kept][top], probs[top], atol=0.03)


def test_sampling_never_touches_the_global_rng():
    state = torch.get_rng_state()
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    sample(logits, [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=5),
                    SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0)])
    assert torch.equal(torch.get_rng_state(), state)


def test_mixed_rows_each_get_their_own_mask_and_samples_stay_inside():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=gen)
    params = [
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=0.0),
    ]
    allowed = [ref_mask(row, p.top_k, p.top_p, p.min_p, p.temperature) for row, p in zip(logits.tolist(), params[:3])]
    seen = [set() for _ in params]
    for seed in range(200):
        gens = [torch.Generator().manual_seed(seed * 4 + i) for i in range(4)]
        for row, tok in enumerate(sample(logits, params, gens).token_ids):
            seen[row].add(tok)
    for row in range(3):
        assert seen[row] <= allowed[row] and len(seen[row]) > 1
    assert seen[3] == {int(logits[3].argmax())}


def test_sampling_frequencies_follow_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 20000
    out = sample(logits.expand(n, -1).contiguous(), [SamplingParams(temperature=0.8)] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=5).float() / n
    assert torch.allclose(freq, (logits / 0.8).softmax(-1), atol=0.015)


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=gen)
    history = [[1, 5, 5, 7], [], [0, 19, 3]]
    penalties = [1.3, 1.5, 0.8]
    expected = torch.stack([
        RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]) if h else torch.zeros(1, 0, dtype=torch.long),
                                            logits[i : i + 1].clone())[0]
        for i, (h, p) in enumerate(zip(history, penalties))
    ])
    params = [SamplingParams(temperature=0.0, repetition_penalty=p) for p in penalties]
    assert sample(logits.clone(), params, history=history).token_ids == expected.argmax(-1).tolist()

    ours = logits.clone()
    apply_repetition_penalty(ours, torch.tensor(penalties), history)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("vocab", [64, 3000])  # 3000: top-p beyond the CPU candidates (the fallback)
def test_seeded_row_is_independent_of_batch_companions(vocab):
    target = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def run(companions: int) -> list[int]:
        gen = params.make_generator()
        tokens = []
        for step in range(12):
            others = torch.randn(companions, vocab, generator=torch.Generator().manual_seed(step))
            logits = torch.cat([others[: companions // 2], target[None], others[companions // 2 :]])
            ps = [SamplingParams(temperature=0.5 * (i % 3), top_k=i + 1, top_p=1.0 - 0.1 * (i % 2))
                  for i in range(companions)]  # greedy, top-k, top-k + top-p
            ps.insert(companions // 2, params)
            gens = [None] * companions
            gens.insert(companions // 2, gen)
            tokens.append(sample(logits, ps, gens).token_ids[companions // 2])
        return tokens

    alone = run(0)
    assert run(3) == alone and run(7) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = torch.randn(3, 25, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=2.0, repetition_penalty=1.5)]
    out = sample(logits.clone(), params, history=[[0], [1], [2]])
    ref = logits.log_softmax(-1)
    for row, tok in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(ref[row, tok].item(), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_defaults_and_normalization():
    p = SamplingParams(max_tokens=32, temperature=0.0)
    assert p.is_greedy and p.max_tokens == 32 and p.top_k == 0 and p.stop == []
    d = SamplingParams()
    assert d.max_tokens == 16 and d.temperature == 1.0 and not d.is_greedy
    assert SamplingParams(stop="END").stop == ["END"] and SamplingParams(top_k=-1).top_k == 0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 10**20}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -2**63 - 1}, "seed"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_validation_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_extreme_but_valid_seed_and_top_k_sample():
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=1.0, top_k=2**31 - 1, seed=2**64 - 1),
              SamplingParams(temperature=1.0, seed=-2**63)]
    out = Sampler()(logits, params, [SamplerState(p.make_generator()) for p in params])
    assert all(0 <= t < 50 for t in out.token_ids)


# the OpenAI / vLLM parameters


def ref_processed(row: list[float], params: SamplingParams, prompt: list[int], output: list[int],
                  eos: set[int]) -> list[float]:
    """Plain Python, in vLLM's order: logit bias, min_tokens' stop-token mask, repetition penalty (transformers'
    rule over prompt + output), then OpenAI's frequency and presence penalties over the output."""
    row = list(row)
    for token, bias in params.logit_bias.items():
        row[token] += bias
    if len(output) < params.min_tokens:
        for token in eos | set(params.stop_token_ids):
            row[token] = NEG_INF
    for token in set(prompt) | set(output):
        p = params.repetition_penalty
        row[token] = row[token] * p if row[token] < 0 else row[token] / p
    for token in set(output):
        row[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return row


def bound_sampler(vocab: int, eos=frozenset({2})) -> Sampler:
    sampler = Sampler()
    sampler.bind(None, eos, vocab)
    return sampler


def test_penalties_bias_and_min_tokens_match_plain_reference():
    vocab = 40
    logits = 2.0 * torch.randn(6, vocab, generator=torch.Generator().manual_seed(11))
    histories = [([1, 4, 4], [5, 5, 5, 9]), ([7], [7, 3, 3]), ([], [0, 1, 2, 3]), ([5], []), ([8, 8], [8, 30]),
                 ([1], [2, 2])]
    params = [
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.4),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5, repetition_penalty=1.3),
        SamplingParams(logit_bias={2: 5.0, 39: -100.0, 10: 0.5}, presence_penalty=-2.0),
        SamplingParams(min_tokens=2, stop_token_ids=[6, 7], logit_bias={6: 3.0}),
        SamplingParams(min_tokens=2, ignore_eos=True, repetition_penalty=0.8, frequency_penalty=2.0),  # done
        SamplingParams(min_tokens=3, ignore_eos=True),  # EOS masked all the same, as vLLM
    ]
    ours = bound_sampler(vocab).process_logits(logits.clone(), params, histories)
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        expected = torch.tensor(ref_processed(logits[row].tolist(), p, prompt, output, {2}))
        torch.testing.assert_close(ours[row], expected)
    assert ours[5, 2] == NEG_INF and ours[4, 2] > NEG_INF


def test_frequency_presence_penalties_match_vllm_formula():
    """vLLM's apply_penalties: logits -= f * bincount(output) ; logits -= p * (bincount > 0), over [B, V]."""
    vocab = 30
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(12))
    outputs = [[1, 1, 2, 29, 1], [], [0, 0]]
    f, p = torch.tensor([0.5, 1.0, -1.2]), torch.tensor([0.25, 1.0, 2.0])
    counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.long), minlength=vocab) for o in outputs])
    expected = logits - f[:, None] * counts - p[:, None] * (counts > 0)
    params = [SamplingParams(frequency_penalty=a, presence_penalty=b) for a, b in zip(f.tolist(), p.tolist())]
    ours = bound_sampler(vocab).process_logits(logits.clone(), params, [([3, 4], o) for o in outputs])
    torch.testing.assert_close(ours, expected)


def test_greedy_tokens_follow_the_processed_logits_and_logprobs_stay_raw():
    vocab = 20
    logits = torch.zeros(3, vocab)
    logits[:, 2] = 5.0  # EOS is the argmax
    logits[:, 4] = 4.0
    params = [SamplingParams(temperature=0.0, min_tokens=1, logprobs=1),  # EOS masked: 4
              SamplingParams(temperature=0.0, logit_bias={9: 10.0}),  # 9
              SamplingParams(temperature=0.0, frequency_penalty=2.0, min_tokens=1)]  # min_tokens met: EOS
    histories = [([1], []), ([1], [2]), ([1], [4, 4])]
    out = bound_sampler(vocab)(logits.clone(), params, [SamplerState() for _ in params], histories)
    assert out.token_ids == [4, 9, 2]
    assert out.logprobs[0] == pytest.approx(logits[0].log_softmax(-1)[4].item())


def test_sampled_rows_never_draw_masked_stop_tokens():
    vocab = 12
    logits = torch.zeros(400, vocab)
    logits[:, 2] = 3.0
    params = [SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[7])] * 400
    out = bound_sampler(vocab)(logits, params, [SamplerState() for _ in params], [([1], [3])] * 400)
    assert not {2, 7} & set(out.token_ids) and len(set(out.token_ids)) > 5


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_token_ids_outside_the_vocabulary_are_refused_before_a_step(field):
    sampler = bound_sampler(50)
    value = {50: 1.0} if field == "logit_bias" else [3, 77]
    with pytest.raises(ValueError, match=f"{field} has token id {50 if field == 'logit_bias' else 77}"):
        sampler.new_state(SamplingParams(**{field: value}))
    sampler.new_state(SamplingParams(logit_bias={49: -100.0}, stop_token_ids=[49]))


def test_the_engine_serves_logit_bias_and_min_tokens(tiny_checkpoint):
    from pipeline import Pipeline

    pipe = Pipeline.from_pretrained(str(tiny_checkpoint))
    tok, eos = pipe.engine.tokenizer, pipe.engine.tokenizer.eos_token_id
    x = tok.encode("x")[-1]
    out = pipe("hello", max_tokens=6, temperature=0.0, logit_bias={x: 100.0})
    assert out.token_ids == [x] * 6 and out.text == tok.decode([x] * 6) and out.finish_reason == "length"
    out = pipe("hello", max_tokens=10, temperature=1.0, seed=1, logit_bias={eos: 100.0}, min_tokens=4)
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    assert out.finish_reason == "stop"
    vocab = pipe.engine.runner.model.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias has token id {vocab}"):
        pipe("hello", logit_bias={vocab: 1.0})
    assert not pipe.engine.has_unfinished()


@pytest.mark.parametrize("kwargs", [dict(top_k=7), dict(top_k=30, top_p=0.6), dict(top_k=12, min_p=0.2)])
def test_small_top_k_from_candidates_draws_as_the_vocabulary_wide_path(monkeypatch, kwargs):
    """On CPU a batch whose rows all have a small top-k samples from topk(max k) alone; with the same uniforms it
    must draw what the vocabulary-wide path draws (forced here by allowing no candidates)."""
    import pipeline.sampling as sampling

    vocab = 8 * CDF_BLOCK + 77  # the vocabulary-wide draw in two levels
    logits = 3.0 * torch.randn(8, vocab, generator=torch.Generator().manual_seed(13))
    logits[3, [5, 600, 900]] = logits[3].max() + 1.0  # a tie at the top
    logits[4, :5], logits[4, [100, 700, 1100, vocab - 1]] = 20.0, 19.5  # a tie across the 7th place: kept whole
    params = [SamplingParams(temperature=0.5 + 0.2 * row, seed=row, **kwargs) for row in range(8)]

    def draws() -> list[list[int]]:
        states = [SamplerState(p.make_generator()) for p in params]
        return [sample_with(states) for _ in range(12)]

    def sample_with(states):
        return Sampler()(logits, params, states).token_ids

    candidates = draws()
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 0)
    assert draws() == candidates
    assert len({tuple(step) for step in candidates}) > 1


class CountingList(list):
    """A list that counts how often it is iterated (Python-level reads of a whole history)."""

    num_iterations = 0

    def __iter__(self):
        CountingList.num_iterations += 1
        return super().__iter__()


def test_a_row_whose_every_token_min_tokens_masks_gets_the_mask_back():
    """stop_token_ids covering the vocabulary with min_tokens leave no token: the mask is given back, so the
    row draws from its logits (an id inside the vocabulary) and greedy takes the raw argmax."""
    vocab = 1000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(21))
    params = [SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=list(range(vocab)), seed=row)
              for row in range(2)] + [SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=list(range(vocab)))]
    sampler = bound_sampler(vocab)
    for _ in range(20):
        states = [SamplerState(p.make_generator()) for p in params]
        out = sampler(logits.clone(), params, states, [([1], [])] * 3)
        assert all(0 <= t < vocab for t in out.token_ids)
        assert out.token_ids[2] == int(logits[2].argmax())


@pytest.mark.parametrize("vocab", [100, 8 * CDF_BLOCK + 3])
def test_inverse_cdf_never_returns_an_id_past_the_vocabulary(vocab):
    weights = torch.rand(3, vocab, generator=torch.Generator().manual_seed(22))
    weights[0] = float("nan")
    weights[1] = 0.0
    u = torch.tensor([0.5, 0.999999, 0.999999], dtype=torch.float64)
    index = inverse_cdf(weights, u)
    assert all(0 <= i < vocab for i in index.tolist())


@pytest.mark.parametrize("top_k", [576, 577, 1000])
def test_a_top_k_at_or_past_the_vocabulary_is_off(top_k):
    vocab = 576
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(23))

    def draws(k: int) -> list[int]:
        params = [SamplingParams(temperature=1.0, top_k=k, seed=row) for row in range(4)]
        states = [SamplerState(p.make_generator()) for p in params]
        return [t for _ in range(5) for t in Sampler()(logits, params, states).token_ids]

    assert draws(top_k) == draws(0)


def test_a_minus_inf_kth_value_is_not_a_tie():
    """A row (a grammar's) with fewer allowed tokens than k: its -inf k-th value is no tie at the candidates'
    edge, so the candidates path draws, the same token as the vocabulary-wide path."""
    import pipeline.sampling as sampling

    vocab = 300
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(24))
    logits[0, 3:] = NEG_INF  # 3 tokens allowed, k = 5
    top_k, top_p, min_p = [5, 5], [1.0, 1.0], [0.0, 0.0]
    inv_t = torch.ones(2, 1)
    for u in (0.1, 0.5, 0.9):
        uniforms = torch.full((2,), u, dtype=torch.float64)
        drawn = sampling._sample_top_k(logits, top_k, top_p, min_p, inv_t, uniforms)
        assert drawn is not None
        x = apply_top_k_top_p_min_p(logits - logits.amax(-1, keepdim=True), top_k, top_p, min_p)
        assert drawn.tolist() == inverse_cdf(x.exp(), uniforms).tolist()
        assert drawn[0] < 3


def test_processors_work_on_the_logits_in_place_and_logprobs_stay_raw():
    """One row's logit bias does not copy the batch: the sampler works on the logits it is given; a row that
    asks for logprobs gets those of the raw logits all the same."""
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(25))
    raw = logits.clone()
    params = [SamplingParams(temperature=0.0, logit_bias={7: 100.0}), SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.0, logit_bias={9: 100.0}, logprobs=0)]
    out = bound_sampler(vocab)(logits, params, [SamplerState() for _ in params], [([1], [])] * 3)
    assert out.token_ids == [7, int(raw[1].argmax()), 9]
    assert logits[0, 7] == raw[0, 7] + 100.0  # worked in place
    ref = raw.log_softmax(-1)
    assert out.logprobs[1] == pytest.approx(ref[1, out.token_ids[1]].item(), abs=1e-6)
    assert out.logprobs[2] == pytest.approx(ref[2, 9].item(), abs=1e-6)
    values, ids = ref[1].topk(2)
    assert [t for t, _ in out.top_logprobs[1]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[1]] == pytest.approx(values.tolist(), abs=1e-6)


def test_penalty_histories_read_the_prompt_once_per_request():
    """Repetition and frequency penalties over many steps match the plain reference, and each request's prompt
    is read in Python once (kept in its SamplerState), not rebuilt into a list every step."""
    vocab = 40
    plain = [[1, 4, 4, 30], [7, 7]]
    prompts = [CountingList(p) for p in plain]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2),
              SamplingParams(temperature=0.0, repetition_penalty=0.7)]
    states = [SamplerState() for _ in params]
    sampler = bound_sampler(vocab)
    outputs = [[], []]
    gen = torch.Generator().manual_seed(26)
    CountingList.num_iterations = 0
    for _ in range(8):
        logits = 3.0 * torch.randn(2, vocab, generator=gen)
        expected = [ref_processed(logits[row].tolist(), params[row], plain[row], outputs[row], {2}) for row in range(2)]
        out = sampler(logits, params, states, list(zip(prompts, outputs)))
        assert out.token_ids == [max(range(vocab), key=row.__getitem__) for row in expected]
        outputs = [o + [t] for o, t in zip(outputs, out.token_ids)]
    assert CountingList.num_iterations <= 2
