"""Parallel sampling (SamplingParams.n): one prefill, n sequences sharing the prompt's KV blocks, the partly filled
last block copied on write. The independent reference for every sequence is a separate n=1 request with the
sequence's seed (seed + i, vLLM's rule) in an engine without prefix caching, so no KV is shared there."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.outputs import Usage
from pipeline.sampling import SamplingParams

BLOCK_SIZE = 8
TEXT = "the red circle is left of the blue square, where is the"


def _engine(checkpoint, **options) -> Engine:
    options.setdefault("num_blocks", 128)
    return Engine(EngineConfig(model=str(checkpoint), block_size=BLOCK_SIZE, **options))


def _sampled(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, **kw)


def _run(engine: Engine, requests: dict[str, tuple]) -> dict[str, list]:
    """Adds {request id: (prompt, params)}, steps to the end; per request its final outputs by index, after
    checking that each sequence's deltas add up to its final output."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finals = {request_id: [None] * params.n for request_id, (_, params) in requests.items()}
    deltas = {(request_id, i): [] for request_id, (_, params) in requests.items() for i in range(params.n)}
    while engine.has_unfinished():
        for out in engine.step():
            assert finals[out.request_id][out.index] is None, "output after the sequence's final one"
            deltas[out.request_id, out.index] += out.delta_token_ids
            if out.finished:
                finals[out.request_id][out.index] = out
    for (request_id, i), ids in deltas.items():
        assert finals[request_id][i].token_ids == ids
    return finals


def _tokens(outs) -> list[list[int]]:
    return [out.token_ids for out in outs]


def _reference(checkpoint, prompt, params: SamplingParams, **options) -> list[list[int]]:
    """Sequence i of ``params`` as its own n=1 request seeded ``seed + i``, nothing shared."""
    engine = _engine(checkpoint, enable_prefix_caching=False, **options)
    singles = {f"s{i}": (prompt, replace(params, n=1, seed=params.seed + i))
               for i in range(params.n)}
    return [outs[0].token_ids for outs in _run(engine, singles).values()]


def _assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0
    assert all(block.ref_count == 0 for block in engine.block_manager.blocks)


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint):
    prompt = _engine(tiny_checkpoint).build_prompt(TEXT)
    assert len(prompt.token_ids) % BLOCK_SIZE, "the last prompt block must be partly filled (copied on write)"
    return prompt


def test_n4_seeded_prefills_once_differs_reproduces_and_leaves_the_pool_idle(tiny_checkpoint, prompt):
    engine = _engine(tiny_checkpoint)
    params = _sampled(seed=7, n=4)
    [outs] = _run(engine, {"r": (prompt, params)}).values()
    assert [out.index for out in outs] == [0, 1, 2, 3] and {out.request_id for out in outs} == {"r"}
    assert len({tuple(ids) for ids in _tokens(outs)}) > 1
    assert engine.stats().num_prefill_tokens == len(prompt.token_ids)  # the prompt once, not four times
    for out in outs:
        assert out.finish_reason == "length" and out.usage == Usage(len(prompt.token_ids), 12, 0)
    assert Usage.of_request([out.usage for out in outs]) == Usage(len(prompt.token_ids), 48, 0)
    _assert_idle(engine)
    [again] = _run(engine, {"again": (prompt, params)}).values()
    assert _tokens(again) == _tokens(outs)
    _assert_idle(engine)


def test_n4_greedy_gives_four_copies_of_the_n1_answer(tiny_checkpoint, prompt):
    engine = _engine(tiny_checkpoint)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    finals = _run(engine, {"one": (prompt, greedy), "four": (prompt, replace(greedy, n=4))})
    assert _tokens(finals["four"]) == _tokens(finals["one"]) * 4
    _assert_idle(engine)


def test_sequences_equal_separate_requests_with_their_seeds(tiny_checkpoint, prompt):
    params = _sampled(max_tokens=16, seed=123, n=4, top_k=50)
    engine = _engine(tiny_checkpoint)
    [outs] = _run(engine, {"r": (prompt, params)}).values()
    assert _tokens(outs) == _reference(tiny_checkpoint, prompt, params)
    _assert_idle(engine)


def test_preempted_sequences_recompute_to_the_same_tokens(tiny_checkpoint, prompt):
    params = _sampled(max_tokens=24, seed=5, n=4)
    engine = _engine(tiny_checkpoint, num_blocks=12)  # each sequence alone needs 7 blocks, all four 19
    [outs] = _run(engine, {"r": (prompt, params)}).values()
    assert engine.stats().num_preemptions > 0
    assert engine.stats().num_prefill_tokens > len(prompt.token_ids)  # recomputes are prefill too
    assert _tokens(outs) == _reference(tiny_checkpoint, prompt, params)
    _assert_idle(engine)


def test_abort_stops_every_sequence_before_and_after_the_fork(tiny_checkpoint, prompt):
    engine = _engine(tiny_checkpoint, max_num_batched_tokens=8)  # the prompt takes several chunked steps
    engine.add_request("early", prompt, _sampled(max_tokens=30, seed=1, n=3))
    engine.step()
    early = engine.abort("early")  # mid-prefill: no sequence forked yet
    assert [(o.request_id, o.index, o.finished, o.finish_reason, o.token_ids) for o in early] == [
        ("early", i, True, "abort", []) for i in range(3)]
    _assert_idle(engine)

    engine.add_request("late", prompt, _sampled(max_tokens=30, seed=1, n=3))
    while engine.stats().num_running < 3:  # forked
        engine.step()
    for _ in range(3):
        engine.step()
    late = engine.abort("late")
    assert sorted(o.index for o in late) == [0, 1, 2] and {o.request_id for o in late} == {"late"}
    assert all(o.finish_reason == "abort" and 0 < len(o.token_ids) < 30 for o in late)
    assert engine.abort("late") == [] and engine.abort("unknown") == []
    assert not engine.has_unfinished()
    _assert_idle(engine)


def test_sequences_finish_on_their_own(tiny_checkpoint, prompt):
    """A sequence that stops early ends alone; the request goes on until its last sequence is done."""
    engine = _engine(tiny_checkpoint)
    params = _sampled(max_tokens=12, seed=3, n=4)
    full = _tokens(_run(engine, {"full": (prompt, params)})["full"])
    stop_token = full[2][4]  # sequence 2 stops at its fifth token (or earlier if it drew that token before)
    stopped = replace(params, stop_token_ids=[stop_token])
    outs = _run(engine, {"stopped": (prompt, stopped)})["stopped"]
    for out, ids in zip(outs, full):
        cut = ids.index(stop_token) if stop_token in ids else None
        assert out.finish_reason == ("length" if cut is None else "stop")
        assert out.token_ids == (ids if cut is None else ids[:cut + 1])
    assert len(outs[2].token_ids) <= 5
    _assert_idle(engine)


def test_bad_n_is_a_value_error(tiny_checkpoint, prompt):
    engine = _engine(tiny_checkpoint, max_num_seqs=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request("big", prompt, _sampled(n=5))
    with pytest.raises(ValueError, match="seed"):
        engine.add_request("seed", prompt, _sampled(n=3, seed=2**64 - 2))
    engine.add_request("a", prompt, _sampled(n=2))
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("a", prompt, _sampled())
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("a#1", prompt, _sampled())  # one of "a"'s sequences has that internal id
    assert not any(r.startswith("big") or r.startswith("seed") for r in engine._requests)


def test_copy_blocks_copies_each_distinct_pool_once(tiny_checkpoint):
    runner = _engine(tiny_checkpoint, num_blocks=8).runner
    for pool in runner._kv_pools:
        pool.copy_(torch.randn(pool.shape))
    before = [pool.clone() for pool in runner._kv_pools]
    runner.copy_blocks([(1, 5), (2, 6), (3, 5)])  # block 5 was re-taken: the later copy wins
    for pool, old in zip(runner._kv_pools, before):
        expected = old.clone()
        expected[5], expected[6] = old[3], old[2]
        assert torch.equal(pool, expected)


@pytest.mark.slow
def test_an_image_prompt_with_n2_on_a_family_with_kv_sharing_layers(tmp_path):
    """Gemma 4 Unified with KV-sharing layers (their pools are their sources': copied once) and a bidirectional
    image run: both sequences equal their separate seeded requests."""
    from samples.random_gemma4_unified import make_checkpoint

    folder = make_checkpoint(tmp_path / "gemma", seed=1, num_hidden_layers=5, num_kv_shared_layers=2,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                          "sliding_attention", "full_attention"])
    engine = _engine(folder)
    assert len(engine.runner._kv_pools) < len(engine.runner.k_caches) + len(engine.runner.v_caches)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    prompt = engine.build_prompt("what is in <image> this picture", [image])
    assert len(prompt.token_ids) % BLOCK_SIZE and prompt.bidirectional_spans
    params = _sampled(max_tokens=10, seed=11, n=2)
    [outs] = _run(engine, {"img": (prompt, params)}).values()
    assert engine.stats().num_prefill_tokens == len(prompt.token_ids)
    assert _tokens(outs) == _reference(folder, prompt, params)
    _assert_idle(engine)
