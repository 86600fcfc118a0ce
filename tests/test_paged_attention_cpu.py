"""The cpu backend's C++ paged attention op (pipeline/attention/csrc/) vs plain softmax attention written here, its
choice and fallback, and through the engine: greedy tokens equal to the torch backend's and transformers'."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import Pipeline, SamplingParams
from pipeline.attention import AttentionMetadata, get_backend, resolve_backend_name
from pipeline.attention import cpu_kernel

op = cpu_kernel.load_op()
needs_op = pytest.mark.skipif(op is None, reason="the C++ op did not build here (no compiler?)")


def test_the_op_builds_where_there_is_a_compiler():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    assert op is not None and cpu_kernel.available()


def random_tables(seq_lens, block_size, seed, spare=3):
    """Shuffled, non-contiguous blocks per sequence; padding entries name random blocks (never read)."""
    rng = random.Random(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + spare
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    tables, at = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(blocks[at:at + n])
        at += n
    return tables, num_blocks


def expected_rows(q, k_cache, v_cache, tables, query_lens, seq_lens, scale, window, runs):
    """Per query token: softmax(q k^T * scale) v over the keys it sees, in float64 from the pool's values."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    rows, t = [], 0
    for table, q_len, s_len, seq_runs in zip(tables, query_lens, seq_lens, runs):
        slots = [(table[p // block_size], p % block_size) for p in range(s_len)]
        keys = torch.stack([k_cache[b, o] for b, o in slots]).double().repeat_interleave(group, 1)  # [S, H, D]
        values = torch.stack([v_cache[b, o] for b, o in slots]).double().repeat_interleave(group, 1)
        for pos in range(s_len - q_len, s_len):
            first, end = (max(0, pos - window + 1) if window else 0), pos + 1
            for start, stop in seq_runs:
                if start <= pos < stop:
                    first, end = min(first, start), max(end, stop)
            end = min(end, s_len)
            w = torch.einsum("hd,shd->hs", q[t].double(), keys[first:end]).mul(scale).softmax(-1)
            rows.append(torch.einsum("hs,shd->hd", w, values[first:end]))
            t += 1
    return torch.stack(rows)


def check(query_lens, seq_lens, block_size=16, num_heads=4, num_kv_heads=2, head_dim=64, window=None, runs=None,
          dtype=torch.float32, seed=0, strided_q=False):
    g = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_tables(seq_lens, block_size, seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    num_tokens = sum(query_lens)
    if strided_q:  # a slice of a fused [T, 3, H, D] projection: rows not contiguous
        q = torch.randn(num_tokens, 3, num_heads, head_dim, generator=g).to(dtype)[:, 1]
    else:
        q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    runs = runs or [[] for _ in seq_lens]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, runs=runs)
    scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    op(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.query_run_start,
       meta.query_run_end, scale, window or 0, out)
    ref = expected_rows(q, k_cache, v_cache, tables, query_lens, seq_lens, scale, window, runs)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def decode_lens(batch: int, seed: int) -> list[int]:
    """1, block boundaries (16, 32, 48) and one past them, and random lengths."""
    special = [1, 16, 17, 32, 33, 48, 2, 15]
    rng = random.Random(seed)
    return [special[i] if i < len(special) else rng.randint(1, 120) for i in range(batch)][:batch]


@needs_op
@pytest.mark.parametrize("batch", [1, 40])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_decode_rows(batch, window, ratio, head_dim):
    seq_lens = decode_lens(batch, seed=head_dim + ratio)
    if batch == 1:
        seq_lens = [97]
    check([1] * batch, seq_lens, num_heads=2 * ratio, num_kv_heads=2, head_dim=head_dim, window=window,
          seed=batch + ratio)


@needs_op
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_block_sizes(block_size):
    check([1] * 6, [1, block_size, block_size + 1, 2 * block_size, 3 * block_size - 1, 70], block_size=block_size)


@needs_op
@pytest.mark.parametrize("head_dim", [20, 512])
def test_head_dims_off_the_vector_width_and_gemma4_global(head_dim):
    check([1, 1, 3], [30, 1, 40], num_heads=8, num_kv_heads=1, head_dim=head_dim, window=12)


@needs_op
@pytest.mark.parametrize("window", [None, 7])
def test_prefill_chunks_and_mixed_steps(window):
    """Chunks longer than a tile (16 tokens), chunks continuing a cached prefix, decodes between them."""
    check([1, 37, 1, 16, 5, 1], [40, 37, 5, 50, 100, 1], num_heads=4, num_kv_heads=2, window=window)
    check([64], [64], num_heads=2, num_kv_heads=2, head_dim=32, window=window)


@needs_op
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 24])
def test_prefill_tiles(window, ratio, head_dim):
    """Prefill chunks (tiles of 8 or more query rows per KV head take the blocked path when the head dim is a
    multiple of 16; 24 is not): fresh and after a cached prefix, a partial last tile (rows padded), 4 to 130
    tokens (chunks of keys up to five), with a bidirectional run and decodes beside them."""
    check([130, 4, 1, 21, 9], [130, 70, 33, 21, 90], num_heads=2 * ratio, num_kv_heads=2, head_dim=head_dim,
          window=window, runs=[[(3, 50)], [], [], [(0, 12)], [(83, 88)]], seed=ratio + head_dim)


@needs_op
@pytest.mark.parametrize("window", [None, 3, 100])
def test_bidirectional_runs(window):
    """Runs longer than the window; a chunk starting inside a run (a prefix hit); a decode after a run; a
    one-token chunk closing a run (a decode row inside a run)."""
    check([20, 9, 1, 6, 1], [20, 30, 25, 6, 18], block_size=4, num_heads=4, num_kv_heads=2, window=window,
          runs=[[(2, 10), (12, 15)], [(18, 27)], [], [(0, 6)], [(10, 18)]])


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_pools(dtype):
    check([1] * 5 + [9], [1, 17, 64, 100, 33, 20], num_heads=8, num_kv_heads=2, head_dim=128, window=30,
          dtype=dtype)


@needs_op
def test_strided_queries():
    check([1, 1, 4], [10, 33, 20], strided_q=True)


@needs_op
def test_a_large_step_takes_the_streaming_copy_path():
    """Past 8 MiB of K/V per call each chunk is copied into a buffer first: the same values."""
    check([1] * 40, [400 + i for i in range(40)], num_heads=8, num_kv_heads=8, head_dim=64, seed=3)


@needs_op
def test_bad_inputs_are_errors():
    q = torch.randn(2, 4, 16)
    cache = torch.randn(4, 4, 2, 16)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.tensor([1, 1], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, cache, cache, tables.long(), lens, cu, None, None, 1.0, 0, out)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(q.double(), cache, cache, tables, lens, cu, None, None, 1.0, 0, out)
    with pytest.raises(RuntimeError, match="seq_len"):
        op(q, cache, cache, tables, torch.tensor([1, 9], dtype=torch.int32), cu, None, None, 1.0, 0, out)


@needs_op
@pytest.mark.parametrize("shared_kv", [False, True])
def test_backend_writes_new_kv_and_equals_the_torch_backend(shared_kv):
    """Through AttentionBackend.forward: new K/V land in their slots first (none for a KV-sharing layer, which
    reads the pool as it is); the output equals the torch reference backend's."""
    query_lens, seq_lens, block_size = [1, 12, 1, 3], [40, 12, 5, 17], 4
    tables, num_blocks = random_tables(seq_lens, block_size, seed=1)
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(num_blocks, block_size, 2, 32, generator=g)
    q = torch.randn(sum(query_lens), 4, 32, generator=g)
    k = v = None if shared_kv else torch.randn(sum(query_lens), 2, 32, generator=g)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, runs=[[], [(2, 6)], [], []])
    outs, pools = {}, {}
    for name in ("cpu", "torch"):
        backend = get_backend(name, "cpu")
        k_cache, v_cache = pool.clone(), pool.clone() + 1
        backend.prepare(meta)
        outs[name] = backend.forward(q, k, None if k is None else v * 2, k_cache, v_cache, meta, 0.25, 6)
        pools[name] = (k_cache, v_cache)
    torch.testing.assert_close(outs["cpu"], outs["torch"], atol=1e-5, rtol=1e-5)
    for got, want in zip(pools["cpu"], pools["torch"]):
        assert torch.equal(got, want)
    if shared_kv:
        assert torch.equal(pools["cpu"][0], pool)


def test_choice_and_refusals():
    assert resolve_backend_name("torch", "cpu") == "torch"  # the oracle stays selectable
    assert resolve_backend_name("auto", "cpu") == ("cpu" if op is not None else "torch")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend_name("cpu", "cuda")


def run_without_a_compiler(script: str, bin_dir, extensions_dir) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python whose PATH is ``bin_dir``, a C++ compiler that does not exist and an empty
    extension folder (nothing built yet); asserts it exited 0."""
    env = {**os.environ, "PATH": str(bin_dir), "TORCH_EXTENSIONS_DIR": str(extensions_dir), "CXX": "no-such-c++"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    return run


def test_without_a_compiler_auto_is_the_torch_path_with_one_warning(tmp_path):
    """A fresh extension folder and no compiler: 'auto' logs one warning and serves with torch; 'cpu' by name is a
    ValueError."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from pipeline.attention import get_backend\n"
        "assert get_backend('auto', 'cpu').name == 'torch'\n"
        "assert get_backend(None, 'cpu').name == 'torch'\n"
        "try:\n    get_backend('cpu', 'cpu')\nexcept ValueError as e:\n    print('refused:', e)\n")
    run = run_without_a_compiler(script, bin_dir, tmp_path / "ext")
    assert run.stderr.count("CPU paged attention op unavailable, using the torch attention path") == 1, run.stderr
    assert "refused:" in run.stdout and "did not build" in run.stdout


# engine level: the random Fuyu (tests/conftest.py) and the random Gemma 4 Unified


def _greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _image(seed: int, h: int = 40, w: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tokens_by_backend(folder, requests, **options) -> dict[str, list[list[int]]]:
    outs = {}
    for backend in ("cpu", "torch"):
        pipe = Pipeline.from_pretrained(str(folder), attention_backend=backend, **options)
        assert pipe.engine.runner.backend.name == backend
        outs[backend] = [o.token_ids for o in pipe.generate(requests, _greedy())]
    return outs


@needs_op
def test_fuyu_greedy_tokens_equal_the_torch_backends_and_transformers(tiny_checkpoint, hf_model, hf_processor):
    from PIL import Image

    image = Image.fromarray(_image(1))
    requests = [{"prompt": "What is this?", "images": [image]}] + [
        {"prompt": f"question {i} <image> and more words", "images": [_image(10 + i)]} for i in range(4)]
    # a small token budget: prefill chunks beside decodes in one step
    outs = _tokens_by_backend(tiny_checkpoint, requests, num_blocks=128, block_size=8, max_num_batched_tokens=48)
    assert outs["cpu"] == outs["torch"]
    ref_in = hf_processor(images=image, text="What is this?", return_tensors="pt", return_legacy_image_output=False)
    with torch.no_grad():
        ref = hf_model.generate(**ref_in, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert outs["cpu"][0] == ref[0, ref_in["input_ids"].shape[1]:].tolist()


@needs_op
@pytest.mark.parametrize("overrides", [{}, {"num_kv_shared_layers": 2, "attention_k_eq_v": True,
                                            "num_global_key_value_heads": 1}], ids=["default", "kv_shared_k_eq_v"])
def test_gemma4_greedy_tokens_equal_the_torch_backends_and_transformers(tmp_path, overrides):
    """Sliding windows shorter than the prompt, image runs attended both ways, head dims per layer type."""
    from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

    from samples.random_gemma4_unified import make_checkpoint

    folder = make_checkpoint(tmp_path, seed=3, **overrides)
    requests = [{"prompt": "look <image> at it, what colour", "images": [_image(5, 60, 80)]},
                {"prompt": "the red circle is left of the blue square, which is", "images": []},
                {"prompt": "<image> and <image> how many", "images": [_image(6, 30, 90), _image(7, 50, 50)]}]
    outs = _tokens_by_backend(folder, requests, block_size=4, num_blocks=256, max_num_batched_tokens=64)
    assert outs["cpu"] == outs["torch"]
    processor = AutoProcessor.from_pretrained(folder)
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for request, ours in zip(requests, outs["cpu"]):
        kwargs = {"images": [request["images"]]} if request["images"] else {}
        inputs = processor(text=request["prompt"].replace("<image>", "<|image|>"), return_tensors="pt", **kwargs)
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert ours == ref.tolist(), request["prompt"]
