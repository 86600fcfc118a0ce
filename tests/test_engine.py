"""The engine under continuous batching vs transformers' greedy output and vs its own single runs."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import normalize_patches
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.sampling import SamplingParams

WORDS = "the a red blue circle square left right shape picture how many is what where which colour".split()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(16, 90, size=2)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mixed_requests(n: int = 16, seed: int = 0):
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        num_images = i % 4  # 0 to 3 images
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 25))]
        if num_images > 1:  # markers between the words
            for k in range(num_images):
                words.insert(rng.randint(0, len(words)), "<image>")
        text = " ".join(words) + "?"
        images = [_image(100 * i + k) for k in range(num_images)]
        requests.append((text, images, rng.randint(1, 24)))
    return requests


def _engine(checkpoint, **options) -> Engine:
    options.setdefault("num_blocks", 256)
    options.setdefault("block_size", 8)
    return Engine(EngineConfig(model=str(checkpoint), **options))


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def _run_all(engine: Engine, prompts, params) -> dict[str, object]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[f"r{i}"] for i in range(len(prompts))]


def _transformers_greedy(hf_model, engine: Engine, prompt, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    media = {"pixel_values": normalize_patches(prompt.patches, engine.front_end.patch_config)} if prompt.patches.shape[0] else {}
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0, **media)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    requests = _mixed_requests()
    prompts = [engine.build_prompt(text, images) for text, images, _ in requests]
    params = [_greedy(n) for _, _, n in requests]
    singles = []
    for prompt, p in zip(prompts, params):
        singles.append(_run_all(engine, [prompt], [p])[0].token_ids)
    return prompts, params, singles


def test_continuous_batching_matches_single_runs_and_transformers(tiny_checkpoint, hf_model, mixed):
    prompts, params, singles = mixed
    engine = _engine(tiny_checkpoint, max_num_batched_tokens=64)  # forces chunked prefill mixed with decodes
    outs = _run_all(engine, prompts, params)
    for prompt, p, single, out in zip(prompts, params, singles, outs):
        assert out.token_ids == single
        assert out.finish_reason == "length" and len(out.token_ids) == p.max_tokens
        assert out.token_ids == _transformers_greedy(hf_model, engine, prompt, p.max_tokens)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_keeps_outputs_identical(tiny_checkpoint, mixed):
    prompts, params, singles = mixed
    longest = max(len(p.token_ids) + sp.max_tokens for p, sp in zip(prompts, params))
    engine = _engine(tiny_checkpoint, block_size=8, num_blocks=-(-longest // 8) + 4)
    outs = _run_all(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == singles
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_on_and_off_give_identical_outputs(tiny_checkpoint, mixed):
    prompts, params, singles = mixed
    engine = _engine(tiny_checkpoint, enable_prefix_caching=False)
    assert [o.token_ids for o in _run_all(engine, prompts, params)] == singles


def test_repeated_request_hits_cache_and_other_image_does_not(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    text = " ".join(WORDS * 3) + " <image> what is it?"
    first = engine.build_prompt(text, [_image(1)])
    again = engine.build_prompt(text, [_image(1)])
    other = engine.build_prompt(text, [_image(2)])
    assert first.token_ids == again.token_ids and first.media[0].content_hash == again.media[0].content_hash
    out_first = _run_all(engine, [first], [_greedy(4)])[0]
    assert out_first.usage.cached_tokens == 0
    out_again = _run_all(engine, [again], [_greedy(4)])[0]
    assert out_again.usage.cached_tokens > first.media[0].end - engine.config.block_size
    assert out_again.token_ids == out_first.token_ids
    if other.token_ids == first.token_ids:  # same patch grid: only the media hash tells them apart
        out_other = _run_all(engine, [other], [_greedy(4)])[0]
        assert out_other.usage.cached_tokens <= other.media[0].start
    # a different image of the same size: must not reuse the first image's blocks
    same_size = Image.fromarray(255 - np.asarray(_image(1)))
    swapped = engine.build_prompt(text, [same_size])
    assert swapped.token_ids == first.token_ids
    out_swapped = _run_all(engine, [swapped], [_greedy(4)])[0]
    assert 0 < out_swapped.usage.cached_tokens <= swapped.media[0].start


def test_abort_mid_generation_frees_every_block(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    prompt = engine.build_prompt("describe <image> please", [_image(3)])
    engine.add_request("a", prompt, _greedy(50))
    engine.add_request("b", prompt, _greedy(5))
    for _ in range(4):
        engine.step()
    [out] = engine.abort("a")
    assert out.request_id == "a" and out.finished and out.finish_reason == "abort" and 0 < len(out.token_ids) < 50
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.abort("a") == [] and engine.abort("never") == []


def test_stop_string_cuts_text_exactly_before_it(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    prompt = engine.build_prompt("tell me <image> a story", [_image(4)])
    full = _run_all(engine, [prompt], [_greedy(40)])[0].text
    assert len(full) > 12
    stop = full[8:11]
    cut = _run_all(engine, [prompt], [_greedy(40, stop=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.find(stop)]


def test_rejects_prompt_longer_than_context(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", " ".join(WORDS * 4), _greedy(4))
    assert not engine.has_unfinished()


def _sampled(seed: int, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)


def test_seeded_request_is_independent_of_chunking_batching_and_preemption(tiny_checkpoint):
    text = " ".join(WORDS * 2) + " <image> what is it?"
    alone_engine = _engine(tiny_checkpoint)
    prompt = alone_engine.build_prompt(text, [_image(7)])
    alone = _run_all(alone_engine, [prompt], [_sampled(1234)])[0].token_ids
    # a 16-token budget: the prompt is prefilled in many chunks, beside 8 other sampled requests
    others = [alone_engine.build_prompt(f"{WORDS[i]} <image> ?", [_image(20 + i)]) for i in range(8)]
    busy = _engine(tiny_checkpoint, max_num_batched_tokens=16)
    outs = _run_all(busy, [prompt, *others], [_sampled(1234)] + [_sampled(None) for _ in others])
    assert outs[0].token_ids == alone
    # a pool so small that requests are preempted and recomputed
    longest = len(prompt.token_ids) + 24
    tight = _engine(tiny_checkpoint, num_blocks=-(-longest // 8) + 2, max_num_batched_tokens=32)
    outs = _run_all(tight, [*others[:4], prompt], [_sampled(None) for _ in range(4)] + [_sampled(1234)])
    assert tight.scheduler.num_preemptions > 0
    assert outs[-1].token_ids == alone


def test_engine_leaves_the_process_rng_alone(tiny_checkpoint):
    torch.manual_seed(99)
    before = torch.get_rng_state()
    engine = _engine(tiny_checkpoint)
    _run_all(engine, [engine.build_prompt("a <image> b", [_image(8)])], [_sampled(None, 6)])
    assert torch.equal(torch.get_rng_state(), before)


def _with_generation_config(tiny_checkpoint, tmp_path, eos_ids):
    import json
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return folder


def test_eos_ids_from_generation_config_and_stop_token_not_in_text(tiny_checkpoint, tmp_path):
    engine = _engine(tiny_checkpoint)
    prompt = engine.build_prompt("tell me <image> a story", [_image(4)])
    full = _run_all(engine, [prompt], [_greedy(12)])[0].token_ids
    special = set(engine.tokenizer.tokenizer.get_added_tokens_decoder())
    eos = engine.tokenizer.eos_token_id
    before_eos = full.index(eos) if eos in full else len(full)
    stop_at = next(i for i in range(2, before_eos) if full[i] not in special and full[i] not in full[:i]
                   and engine.tokenizer.decode([full[i]]).strip())
    # a list of EOS ids in generation_config.json, none of them config.json's
    folder = _with_generation_config(tiny_checkpoint, tmp_path, [engine.tokenizer.eos_token_id, full[stop_at]])
    gc_engine = _engine(folder)
    out = _run_all(gc_engine, [prompt], [SamplingParams(max_tokens=12, temperature=0.0)])[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:stop_at + 1]
    assert out.text == engine.tokenizer.decode(full[:stop_at])
    # a non-special stop_token_ids token ends the request and is left out of the text
    out = _run_all(engine, [prompt], [_greedy(12, stop_token_ids=[full[stop_at]])])[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:stop_at + 1]
    assert engine.tokenizer.decode([full[stop_at]]) and out.text == engine.tokenizer.decode(full[:stop_at])


def test_two_engines_in_threads_do_not_share_step_state(tiny_checkpoint):
    import threading

    engines = [_engine(tiny_checkpoint), _engine(tiny_checkpoint)]
    prompts = [engines[0].build_prompt(" ".join(WORDS[:k]) + " <image> ?", [_image(30 + k)]) for k in range(3, 9)]
    expected = [o.token_ids for o in _run_all(_engine(tiny_checkpoint), prompts, [_greedy(16)] * len(prompts))]
    results, errors = {}, []
    start = threading.Barrier(2)

    def run(i):
        try:
            start.wait()
            for _ in range(3):
                results[i] = [o.token_ids for o in _run_all(engines[i], prompts, [_greedy(16)] * len(prompts))]
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == {0: expected, 1: expected}
