"""Our Fuyu implementation over the paged KV cache vs transformers' FuyuForCausalLM (the reference)."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import EngineConfig
from pipeline.model_runner import ModelRunner, SeqChunk

TEXT = "What is shown in this picture, and what colour is it?"


def _image(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_inputs(processor, text: str, image):
    out = processor(images=image, text=text, return_tensors="pt", return_legacy_image_output=False)
    return out["input_ids"][0], out["pixel_values"]


def _runner(checkpoint, **options) -> ModelRunner:
    options.setdefault("num_blocks", 64)
    return ModelRunner(EngineConfig(model=str(checkpoint), **options))


def _chunk(runner, ids: list[int], patches, start: int, end: int, table: list[int], image_rows_before: int):
    """SeqChunk for ids[start:end] of a sequence, with the patch rows of the image tokens inside it."""
    image_id = runner.args.image_token_id
    offsets = [i - start for i in range(start, end) if ids[i] == image_id]
    rows = patches[image_rows_before:image_rows_before + len(offsets)] if offsets else None
    return SeqChunk(ids[start:end], start, table, rows, offsets), image_rows_before + len(offsets)


def _prefill_logits(runner, ids, patches, table, cuts=()):
    """All-token logits of one sequence prefilled in chunks split at ``cuts``."""
    bounds = [0, *cuts, len(ids)]
    rows, out = 0, []
    for start, end in zip(bounds, bounds[1:]):
        chunk, rows = _chunk(runner, ids, patches, start, end, table, rows)
        out.append(runner.forward([chunk], all_logits=True))
    return torch.cat(out)


def _table(runner, num_tokens: int, seed: int = 0) -> list[int]:
    blocks = list(range(runner.num_blocks))
    random.Random(seed).shuffle(blocks)
    return blocks[: -(-num_tokens // runner.block_size)]


def test_logits_match_transformers_one_image(tiny_checkpoint, hf_model, hf_processor):
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(0, 40, 70))
    with torch.no_grad():
        ref = hf_model(input_ids=ids[None], pixel_values=patches).logits[0]
    runner = _runner(tiny_checkpoint)
    ours = _prefill_logits(runner, ids.tolist(), patches, _table(runner, len(ids)))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_without_qk_layernorm(tmp_path, hf_processor):
    """Persimmon's qk_layernorm=False path: queries and keys are rotated in the projection's output itself."""
    from transformers import FuyuForCausalLM

    from samples.random_checkpoint import make_checkpoint

    folder = make_checkpoint(tmp_path / "no-qk-norm", seed=3, qk_layernorm=False)
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(1, 50, 30))
    with torch.no_grad():
        ref = FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(
            input_ids=ids[None], pixel_values=patches).logits[0]
    runner = _runner(folder)
    ours = _prefill_logits(runner, ids.tolist(), patches, _table(runner, len(ids)), cuts=(len(ids) - 3,))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_two_images_with_text_between(tiny_checkpoint, hf_model, hf_processor):
    ids1, patches1 = _hf_inputs(hf_processor, "First picture.", _image(1, 64, 33))
    ids2, patches2 = _hf_inputs(hf_processor, "And the second one: which is larger?", _image(2, 100, 64))
    ids = torch.cat([ids1, ids2])  # image, <s>, text, <0x04>, image, <s>, text, <0x04>
    patches = torch.cat([patches1, patches2])
    with torch.no_grad():
        ref = hf_model(input_ids=ids[None], pixel_values=patches).logits[0]
    runner = _runner(tiny_checkpoint)
    ours = _prefill_logits(runner, ids.tolist(), patches, _table(runner, len(ids), seed=1))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_32_greedy_tokens_identical(tiny_checkpoint, hf_model, hf_processor):
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(3, 48, 48))
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids[None], pixel_values=patches, attention_mask=torch.ones_like(ids[None]),
                                max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_tokens = ref[0, len(ids):].tolist()
    runner = _runner(tiny_checkpoint)
    seq = ids.tolist()
    table = _table(runner, len(seq) + 32, seed=2)
    logits = _prefill_logits(runner, seq, patches, table)[-1:]
    generated = []
    for _ in range(32):
        token = int(logits[0].argmax())
        generated.append(token)
        seq.append(token)
        logits = runner.forward([SeqChunk([token], len(seq) - 1, table)])
    assert len(ref_tokens) == 32
    assert generated == ref_tokens


def test_chunked_prefill_over_scattered_blocks_matches_one_prefill(tiny_checkpoint, hf_processor):
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(4, 64, 64))
    ids = ids.tolist()
    runner = _runner(tiny_checkpoint, block_size=16)
    whole = _prefill_logits(runner, ids, patches, _table(runner, len(ids), seed=3))
    table = _table(runner, len(ids), seed=4)
    assert any(b - a != 1 for a, b in zip(table, table[1:])), "blocks should be non-adjacent"
    # cut inside the image (an image split across chunks) and inside the text
    chunked = _prefill_logits(runner, ids, patches, table, cuts=(23, len(ids) - 9))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_packed_sequences_match_their_single_runs(tiny_checkpoint, hf_processor):
    runner = _runner(tiny_checkpoint, block_size=8, num_blocks=128)
    seqs = []
    for seed, (h, w, text) in enumerate([(40, 70, "short"), (64, 64, TEXT), (20, 90, "a b c d e f g h i j k")]):
        ids, patches = _hf_inputs(hf_processor, text, _image(10 + seed, h, w))
        seqs.append((ids.tolist(), patches))
    tables = [list(range(i * 40, i * 40 + 40)) for i in range(3)]
    alone = [_prefill_logits(runner, ids, p, t)[-1] for (ids, p), t in zip(seqs, tables)]
    # one flat step: seq 0 prefills whole, seq 1 prefills a chunk after a cached prefix, seq 2 decodes
    prefix_1 = 17
    _prefill_logits(runner, seqs[1][0][:prefix_1], seqs[1][1], tables[1])
    _prefill_logits(runner, seqs[2][0][:-1], seqs[2][1], tables[2])
    rows_1 = sum(1 for t in seqs[1][0][:prefix_1] if t == runner.args.image_token_id)
    chunks = [
        _chunk(runner, seqs[0][0], seqs[0][1], 0, len(seqs[0][0]), tables[0], 0)[0],
        _chunk(runner, seqs[1][0], seqs[1][1], prefix_1, len(seqs[1][0]), tables[1], rows_1)[0],
        SeqChunk(seqs[2][0][-1:], len(seqs[2][0]) - 1, tables[2]),
    ]
    packed = runner.forward(chunks)
    for i in range(3):
        torch.testing.assert_close(packed[i], alone[i], atol=1e-5, rtol=1e-5)


def test_bfloat16_stays_close_to_float32_reference(tiny_checkpoint, hf_model, hf_processor):
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(5, 56, 56))
    with torch.no_grad():
        ref = hf_model(input_ids=ids[None], pixel_values=patches).logits[0]
    runner = _runner(tiny_checkpoint, dtype="bfloat16")
    assert all(k.dtype == torch.bfloat16 for k in runner.k_caches)
    ours = _prefill_logits(runner, ids.tolist(), patches, _table(runner, len(ids)))
    # bfloat16 keeps 8 mantissa bits; seen here: max error 3% and mean error 0.4% of the logits' std
    spread = ref.std().item()
    assert (ours - ref).abs().max().item() < 0.1 * spread
    assert (ours - ref).abs().mean().item() < 0.01 * spread
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


# loader


def test_loads_sharded_checkpoint(tmp_path, tiny_checkpoint, hf_model, hf_processor):
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    hf_processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(6, 32, 32))
    with torch.no_grad():
        ref = hf_model(input_ids=ids[None], pixel_values=patches).logits[0]
    runner = _runner(tmp_path)
    ours = _prefill_logits(runner, ids.tolist(), patches, _table(runner, len(ids)))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture
def ckpt_copy(tmp_path, tiny_checkpoint):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_refuses_pickle_checkpoint(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        _runner(ckpt_copy)


def test_missing_tensor_is_named(ckpt_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt_copy / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.dense_4h_to_h\.weight"):
        _runner(ckpt_copy)


def test_wrong_shape_is_named(ckpt_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt_copy / "model.safetensors")
    tensors["vision_embed_tokens.weight"] = tensors["vision_embed_tokens.weight"][:, :10].contiguous()
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"vision_embed_tokens\.weight.*shape"):
        _runner(ckpt_copy)


def test_unsupported_model_type(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["model_type"] = "llava"
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llava"):
        _runner(ckpt_copy)


def test_a_one_token_chunk_on_an_image_token_never_replays_a_decode_graph(tiny_checkpoint, hf_processor):
    ids, patches = _hf_inputs(hf_processor, TEXT, _image(5, 40, 70))
    ids = ids.tolist()

    class Graphs:  # stands in for DecodeGraphs on CPU: it would take any decode-only step
        def can_run(self, meta):
            return True

        def run(self, *args):
            raise AssertionError("a step with patch rows replayed the decode graph")

    logits = []
    for graphs in (None, Graphs()):
        runner = _runner(tiny_checkpoint)
        runner.graphs = graphs
        table = _table(runner, len(ids))
        rows, steps = 0, []
        for start in range(3):  # one-token chunks: each is an image token
            chunk, rows = _chunk(runner, ids, patches, start, start + 1, table, rows)
            assert chunk.image_offsets == [0]
            steps.append(runner.forward([chunk]))
        logits.append(torch.cat(steps))
    torch.testing.assert_close(logits[1], logits[0])


def test_building_a_runner_leaves_the_process_heap_policy_alone(tiny_checkpoint, monkeypatch):
    import pipeline.model_runner as model_runner

    calls = []
    monkeypatch.setattr(model_runner, "keep_freed_memory", lambda: calls.append(1))
    _runner(tiny_checkpoint)
    assert calls == []
    _runner(tiny_checkpoint, keep_freed_memory=True)
    assert calls == [1]
