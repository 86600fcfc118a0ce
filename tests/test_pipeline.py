"""The Python face: Pipeline.from_pretrained / __call__ / generate / stream."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import Pipeline, SamplingParams


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_pretrained(str(tiny_checkpoint), num_blocks=128, block_size=8)


def _png(seed: int, h: int = 40, w: int = 50) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_call_matches_transformers_greedy(pipe, hf_model, hf_processor):
    image = Image.open(io.BytesIO(_png(1)))
    out = pipe("What is this?", images=[image], max_tokens=12, temperature=0.0, ignore_eos=True)
    ref_in = hf_processor(images=image, text="What is this?", return_tensors="pt", return_legacy_image_output=False)
    with torch.no_grad():
        ref = hf_model.generate(**ref_in, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == ref[0, ref_in["input_ids"].shape[1]:].tolist()
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == ref_in["input_ids"].shape[1] and out.usage.completion_tokens == 12
    assert out.text == pipe.tokenizer.decode(out.token_ids)


def test_media_as_path_bytes_and_pil_are_the_same(pipe, tmp_path):
    data = _png(2)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    outs = [pipe("Describe <image>", images=[src], max_tokens=6, temperature=0.0)
            for src in (str(path), data, Image.open(io.BytesIO(data)))]
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_generate_many_in_request_order(pipe):
    requests = [{"prompt": f"question {i} <image>", "images": [_png(10 + i)]} for i in range(5)]
    requests.append({"prompt": "text only"})
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(6)]
    outs = pipe.generate(requests, params)
    assert [len(o.token_ids) for o in outs] == [3, 4, 5, 6, 7, 8]
    single = pipe(requests[2]["prompt"], images=requests[2]["images"], sampling_params=params[2])
    assert outs[2].token_ids == single.token_ids


def test_stream_concatenates_to_the_full_text(pipe):
    kwargs = dict(images=[_png(3)], max_tokens=20, temperature=0.0, ignore_eos=True)
    full = pipe("Tell me about <image>", **kwargs)
    chunks = list(pipe.stream("Tell me about <image>", **kwargs))
    assert "".join(c.text for c in chunks) == full.text
    assert sum(len(c.token_ids) for c in chunks) == 20
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_closing_a_stream_aborts_and_frees(pipe):
    stream = pipe.stream("Go on <image>", images=[_png(4)], max_tokens=50, temperature=0.0, ignore_eos=True)
    next(stream)
    stream.close()
    engine = pipe.engine
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_in_any_batch(pipe):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = pipe("sample <image>", images=[_png(5)], sampling_params=params)
    crowd = pipe.generate([{"prompt": "noise"}, {"prompt": "sample <image>", "images": [_png(5)]},
                           {"prompt": "more noise"}],
                          [SamplingParams(max_tokens=7, temperature=1.0), params, SamplingParams(max_tokens=3)])
    assert crowd[1].token_ids == alone.token_ids


def test_bad_input_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="temperature"):
        pipe("hi", temperature=-1.0)
    with pytest.raises(ValueError):
        pipe("two markers <image> <image>", images=[_png(6)])
    with pytest.raises(ValueError):
        pipe("corrupt <image>", images=[b"\x89PNG\r\n\x1a\nnot really"])
    with pytest.raises(ValueError, match="not both"):
        pipe("hi", sampling_params=SamplingParams(), max_tokens=3)
    assert not pipe.engine.has_unfinished()


def test_video_prompt_matches_transformers_on_the_same_tokens(pipe, hf_model):
    from encoders import normalize_patches
    from server_fixtures import mp4_bytes

    clip = mp4_bytes(num_frames=12)
    prompt = pipe.engine.build_prompt("Which way is it moving? <video>", videos=[clip])
    assert prompt.media[0].kind == "video" and prompt.num_image_tokens > 0
    chunks = list(pipe.stream(prompt, max_tokens=8, temperature=0.0, ignore_eos=True))
    ids = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=normalize_patches(prompt.patches, pipe.engine.front_end.patch_config),
                                max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [t for c in chunks for t in c.token_ids] == ref[0, ids.shape[1]:].tolist()


def test_generate_with_a_bad_request_leaves_nothing_in_the_engine(pipe):
    good = {"prompt": "What is this?", "images": [_png(3)]}
    with pytest.raises(ValueError):
        pipe.generate([good, good, {"prompt": "no image here <image>"}], SamplingParams(max_tokens=4))
    assert not pipe.engine.has_unfinished()
    bm = pipe.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert pipe("What is this?", images=[_png(3)], max_tokens=2).finish_reason is not None


def test_generate_groups_n_outputs_per_prompt(pipe):
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    one = pipe("Which one? <image>", images=[_png(7)], sampling_params=greedy)
    many = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=3)
    outs = pipe.generate([{"prompt": "Which one? <image>", "images": [_png(7)]}, "plain text"], [many, greedy])
    assert isinstance(outs[1], type(one))  # n == 1: the output itself, as before
    assert [o.index for o in outs[0]] == [0, 1, 2]
    assert [o.token_ids for o in outs[0]] == [one.token_ids] * 3 and outs[0][0].text == one.text
    seeded = pipe("Which one? <image>", images=[_png(7)], max_tokens=6, temperature=1.0, seed=9, n=2)
    assert [o.index for o in seeded] == [0, 1]
    assert seeded[1].token_ids == pipe("Which one? <image>", images=[_png(7)], max_tokens=6, temperature=1.0,
                                       seed=10).token_ids  # sequence i is seeded seed + i
    with pytest.raises(ValueError, match="n=2"):
        next(pipe.stream("hi", max_tokens=3, n=2))
    bm = pipe.engine.block_manager
    assert not pipe.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
