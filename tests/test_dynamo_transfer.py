"""serve/dynamo/disagg.py's block read-out and import: a decode engine that imports a prefill engine's prompt
blocks computes only the rest and generates what transformers generates (the independent reference)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.sampling import SamplingParams
from serve.dynamo.disagg import layer_caches, read_blocks, write_blocks
from serve.dynamo.kv_events import prompt_block_hashes
from test_engine import _transformers_greedy

B = 8


def _engine(checkpoint) -> Engine:
    return Engine(EngineConfig(model=str(checkpoint), num_blocks=64, block_size=B))


def _run(engine: Engine, request_id: str, prompt, max_tokens: int):
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                return out


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint):
    pixels = torch.randint(0, 256, (20, 28, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return _engine(tiny_checkpoint).build_prompt("What is in <image> this picture, please?",
                                                 [Image.fromarray(pixels.numpy())])


def test_imported_blocks_are_a_cache_hit_and_the_answer_is_transformers(tiny_checkpoint, hf_model, prompt):
    prefill, decode = _engine(tiny_checkpoint), _engine(tiny_checkpoint)
    _run(prefill, "p", prompt, max_tokens=1)
    hashes = prompt_block_hashes(prompt, B)
    kv = read_blocks(prefill, hashes)
    assert len(kv) == len(layer_caches(prefill.runner)) and kv[0].shape[1] == len(hashes) > 0
    assert write_blocks(decode, hashes, prompt.token_ids, kv) == len(hashes)
    out = _run(decode, "d", prompt, max_tokens=10)
    assert out.usage.cached_tokens == len(hashes) * B
    assert out.token_ids == _transformers_greedy(hf_model, decode, prompt, 10)


def test_blocks_evicted_before_the_read_are_recomputed(tiny_checkpoint, hf_model, prompt):
    prefill, decode = _engine(tiny_checkpoint), _engine(tiny_checkpoint)
    _run(prefill, "p", prompt, max_tokens=1)
    hashes = prompt_block_hashes(prompt, B)
    kv = read_blocks(prefill, hashes[:2] + [b"\0" * 32] + hashes[3:])  # the leading run only: 2 blocks
    assert kv[0].shape[1] == 2
    assert write_blocks(decode, hashes[:2], prompt.token_ids, kv) == 2
    out = _run(decode, "d", prompt, max_tokens=10)
    assert out.usage.cached_tokens == 2 * B
    assert out.token_ids == _transformers_greedy(hf_model, decode, prompt, 10)


def test_nothing_cached_reads_empty_rows(tiny_checkpoint, prompt):
    engine = _engine(tiny_checkpoint)
    kv = read_blocks(engine, prompt_block_hashes(prompt, B))
    assert [rows.shape[1] for rows in kv] == [0] * len(kv)
