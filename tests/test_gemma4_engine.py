"""Gemma 4 Unified through the engine: continuous batching, chunked prefill (image runs scheduled whole),
preemption and prefix-cache hits each give the same greedy tokens as single runs, which equal transformers'; a
checkpoint with causal media (use_bidirectional_attention null) equals transformers' on both CPU backends."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline import Pipeline, SamplingParams
from samples.random_gemma4_unified import make_checkpoint

WORDS = "the a red blue circle square left right shape picture how many is what where which colour".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gemma4-engine"), seed=3)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(24, 120, size=2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _requests(n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 20))]
        for _ in range(i % 3):  # 0-2 images, markers between the words
            words.insert(rng.randint(0, len(words)), "<image>")
        requests.append({"prompt": " ".join(words) + "?", "images": [_image(100 * i + k) for k in range(i % 3)]})
    return requests


def _greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run(folder, requests, **options) -> tuple[Pipeline, list[list[int]]]:
    options.setdefault("block_size", 4)
    pipe = Pipeline.from_pretrained(str(folder), **options)
    return pipe, [o.token_ids for o in pipe.generate(requests, _greedy())]


@pytest.fixture(scope="module")
def singles(folder):
    requests = _requests()
    pipe = Pipeline.from_pretrained(str(folder), block_size=4, num_blocks=256, max_num_seqs=1)
    return requests, [pipe.generate([r], _greedy())[0].token_ids for r in requests]


def test_single_runs_match_transformers(folder, singles):
    from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

    requests, outs = singles
    processor = AutoProcessor.from_pretrained(folder)
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for request, ours in list(zip(requests, outs))[:6]:
        text = request["prompt"].replace("<image>", "<|image|>")
        kwargs = {"images": [request["images"]]} if request["images"] else {}
        inputs = processor(text=text, return_tensors="pt", **kwargs)
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert ours == ref.tolist(), request["prompt"]


def test_mixed_batch_with_a_small_token_budget_equals_single_runs(folder, singles):
    requests, expected = singles
    pipe, outs = _run(folder, requests, num_blocks=512, max_num_batched_tokens=40)
    assert outs == expected


def test_preemption_keeps_outputs_identical(folder, singles):
    requests, expected = singles
    pipe, outs = _run(folder, requests, num_blocks=170, max_num_batched_tokens=64)
    assert pipe.engine.scheduler.num_preemptions > 0
    assert outs == expected
    bm = pipe.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_hit_ending_inside_an_image_run_gives_the_same_tokens(folder):
    pipe = Pipeline.from_pretrained(str(folder), block_size=4, num_blocks=256)
    cache_off = Pipeline.from_pretrained(str(folder), block_size=4, num_blocks=256, enable_prefix_caching=False)
    request = {"prompt": "look at this <image>", "images": [_image(7)]}  # ends with the run and <image|>
    alone = cache_off.generate([request], _greedy())[0]
    pipe.generate([request], _greedy())
    again = pipe.generate([request], _greedy())[0]  # the hit stops at the last full block before the end
    run_start, run_end = pipe.engine.build_prompt(request["prompt"], request["images"]).bidirectional_spans[0]
    assert run_start < again.usage.cached_tokens < run_end
    assert again.token_ids == alone.token_ids


def test_triton_backend_gives_the_torch_backends_tokens(folder):
    """Under TRITON_INTERPRET=1 (tests/conftest.py): sliding windows, image runs, per-layer head dims."""
    request = {"prompt": "look <image> at it", "images": [_image(5)], "media_options": {"max_soft_tokens": 70}}
    outs = {}
    for backend in ("torch", "triton"):
        pipe = Pipeline.from_pretrained(str(folder), block_size=16, num_blocks=64, attention_backend=backend,
                                        max_num_batched_tokens=32)
        assert pipe.engine.runner.backend.name == backend
        outs[backend] = pipe.generate([request], _greedy(6))[0].token_ids
    assert outs["triton"] == outs["torch"]


def test_a_chat_answer_ends_at_the_end_of_its_turn(folder):
    pipe = Pipeline.from_pretrained(str(folder), num_blocks=64)
    turn_end = pipe.tokenizer.tokenizer.token_to_id("<turn|>")
    assert {pipe.tokenizer.eos_token_id, turn_end} <= pipe.engine.eos_token_ids  # generation_config.json's list


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory):
    """text_config.use_bidirectional_attention = null: every layer causal, inside media runs too."""
    return make_checkpoint(tmp_path_factory.mktemp("gemma4-causal"), seed=3, use_bidirectional_attention=None)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_causal_media_checkpoint_matches_transformers(causal_folder, backend):
    """A checkpoint with causal media: through the engine (prefill chunks that may now split an image) each
    request, with images and audio, gives transformers' greedy tokens; its prompts have no bidirectional runs."""
    import json

    from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

    from pipeline.attention.cpu_kernel import available

    if backend == "cpu" and not available():
        pytest.skip("the C++ op did not build here")
    assert json.loads((causal_folder / "config.json").read_text())["text_config"]["use_bidirectional_attention"] \
        is None
    wave = np.random.default_rng(10).standard_normal(3000).astype(np.float32)
    requests = [{"prompt": "look <image> at it, what colour", "images": [_image(5)]},
                {"prompt": "<image> and <image> how many", "images": [_image(6), _image(7)]},
                {"prompt": "hear <audio> and see <image>", "images": [_image(8)], "audios": [wave]},
                {"prompt": "what is <audio> this", "audios": [wave[:2000]]}]
    pipe = Pipeline.from_pretrained(str(causal_folder), attention_backend=backend, block_size=4, num_blocks=256,
                                    max_num_batched_tokens=32)
    assert pipe.engine.runner.backend.name == backend
    outs = [o.token_ids for o in pipe.generate(requests, _greedy())]
    processor = AutoProcessor.from_pretrained(causal_folder)
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(causal_folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for request, ours in zip(requests, outs):
        text = request["prompt"].replace("<image>", "<|image|>").replace("<audio>", "<|audio|>")
        kwargs = {"images": [request["images"]]} if request.get("images") else {}
        if request.get("audios"):
            kwargs["audio"] = request["audios"]
        inputs = processor(text=text, return_tensors="pt", **kwargs)
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert ours == ref.tolist(), request["prompt"]
    for request in requests:  # nothing for the scheduler to keep whole or the attention to widen
        prompt = pipe.engine.build_prompt(request["prompt"], request.get("images", ()), (), request.get("audios", ()))
        assert prompt.bidirectional_spans == [], request["prompt"]
