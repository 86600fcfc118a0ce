"""``compile_decode``: the decode step through torch.compile on CPU (``pipeline/compiled_decode.py``).

Greedy tokens against transformers' own models (the random Fuyu of conftest.py and a random Gemma 4 Unified),
with recompiles turned into errors after the warm-up: the graphs compiled at load (batch 1; 2-8, the few-row
linear; 9 and up, oneDNN's packed GEMM) serve every batch size and block-table width the requests reach.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Pipeline, SamplingParams
from pipeline.attention import cpu_kernel

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not cpu_kernel.available(), reason="the cpu attention op did not build here")]


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _compiled_tokens(folder, requests, max_tokens: list[int], **options) -> tuple[list[list[int]], int]:
    """Greedy tokens of ``requests`` run together (answer i ``max_tokens[i]`` long), and how many steps ran
    compiled."""
    pipe = Pipeline.from_pretrained(str(folder), compile_decode=True, **options)
    compiled = pipe.engine.runner.compiled
    calls = []
    run = compiled.run
    compiled.run = lambda *args: calls.append(args[0].shape[0]) or run(*args)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = pipe.generate(requests, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                                        for n in max_tokens])
    assert sorted(set(calls)) != [1], "batches of several sequences ran compiled too"
    return [o.token_ids for o in outs], calls


def test_fuyu_greedy_tokens_equal_transformers(tiny_checkpoint, hf_model, hf_processor):
    from PIL import Image

    images = [Image.fromarray(_image(i, 30 + 3 * i, 50 - 2 * i)) for i in range(12)]
    prompts = ["What is this?", "Describe it", "a", "and what colour is the thing on the left"] * 3
    # different prompt and answer lengths: the batch shrinks 12 -> 1 as answers end, through all three graphs
    lengths = [13, 3, 7, 1, 9, 5, 11, 2, 10, 4, 8, 6]
    requests = [{"prompt": p, "images": [im]} for p, im in zip(prompts, images)]
    ours, calls = _compiled_tokens(tiny_checkpoint, requests, lengths, num_blocks=512, block_size=8)
    assert len(calls) == max(lengths) - 1 and max(calls) == 11 and min(calls) == 1
    for prompt, image, tokens, n in zip(prompts, images, ours, lengths):
        inputs = hf_processor(images=image, text=prompt, return_tensors="pt", return_legacy_image_output=False)
        with torch.no_grad():
            ref = hf_model.generate(**inputs, max_new_tokens=max(lengths), do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        assert tokens == ref[0, inputs["input_ids"].shape[1]:][:n].tolist(), prompt


def test_gemma4_unified_greedy_tokens_equal_transformers(tmp_path):
    """Sliding windows shorter than the answers, KV-sharing layers, a text-only prompt shorter than a block."""
    from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

    from samples.random_gemma4_unified import make_checkpoint

    folder = make_checkpoint(tmp_path, seed=3, num_kv_shared_layers=2)
    requests = [{"prompt": "look <image> at it, what colour", "images": [_image(5, 60, 80)]},
                {"prompt": "hi", "images": []},
                {"prompt": "<image> and <image> how many", "images": [_image(6, 30, 90), _image(7, 50, 50)]}]
    ours, calls = _compiled_tokens(folder, requests, [16] * 3, block_size=4, num_blocks=256)
    assert len(calls) == 15
    processor = AutoProcessor.from_pretrained(folder)
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for request, tokens in zip(requests, ours):
        kwargs = {"images": [request["images"]]} if request["images"] else {}
        inputs = processor(text=request["prompt"].replace("<image>", "<|image|>"), return_tensors="pt", **kwargs)
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert tokens == ref.tolist(), request["prompt"]


def test_refusals(tiny_checkpoint):
    with pytest.raises(ValueError, match="cpu attention backend"):
        Pipeline.from_pretrained(str(tiny_checkpoint), compile_decode=True, attention_backend="torch")
    from pipeline.config import EngineConfig

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs"):
            EngineConfig(model=str(tiny_checkpoint), device="cuda", compile_decode=True)


def test_the_server_flag(tiny_checkpoint):
    from serve.cli import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["serve", "--model", str(tiny_checkpoint),
                                                    "--compile-decode"])).compile_decode
    default = engine_config(build_parser().parse_args(["serve", "--model", str(tiny_checkpoint)]))
    assert not default.compile_decode and default.pack_linears
    assert not engine_config(build_parser().parse_args(["serve", "--model", str(tiny_checkpoint),
                                                        "--no-pack-linears"])).pack_linears
