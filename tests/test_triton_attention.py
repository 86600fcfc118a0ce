"""Triton backend vs the torch reference: on CUDA when present, else on CPU through Triton's interpreter.

Tolerances: fp32 1e-4 (both sides compute in fp32, only the summation order differs); fp16 2e-2 (bf16 3e-2,
CUDA only) against the reference run in fp32 on the same (upcast) inputs, since the kernel rounds P and its
output to the half type.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit functions are defined
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from pipeline.attention import AttentionMetadata, get_backend, resolve_backend_name  # noqa: E402
from pipeline.attention.torch_ref import TorchBackend  # noqa: E402
from pipeline.attention.triton_backend import TritonBackend  # noqa: E402
from pipeline.attention.triton_kernels import paged_decode_kernel  # noqa: E402
from tests.test_attention import naive_attention  # noqa: E402

if DEVICE == "cpu" and type(paged_decode_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set (another module imported "
                "them first); run this module alone", allow_module_level=True)

NUM_BLOCKS = 48


def make_case(query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim, *, dtype=torch.float32,
              extra_blocks=0, seed=0):
    """Random q/k/v and pool; each sequence gets shuffled (non-adjacent) blocks, plus unused spare ones."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = []
    for s_len in seq_lens:
        num = -(-s_len // block_size) + extra_blocks
        tables.append(order[:num])
        order = order[num:]
    assert all(tables), "NUM_BLOCKS too small for this case"
    num_tokens = sum(query_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q = rand(num_tokens, num_heads, head_dim)
    k = rand(num_tokens, num_kv_heads, head_dim)
    v = rand(num_tokens, num_kv_heads, head_dim)
    k_cache = rand(NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    v_cache = rand(NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    return tables, q, k, v, k_cache, v_cache


def run_backend(backend, query_lens, seq_lens, tables, block_size, q, k, v, k_cache, v_cache, window=None,
                runs=None):
    """``runs[i]``: sequence i's bidirectional runs (those ending before its new tokens are left out here)."""
    if runs is not None:
        runs = [[(a, b) for a, b in seq_runs if b > s - ql] for seq_runs, s, ql in zip(runs, seq_lens, query_lens)]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE, runs=runs)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, q.shape[-1] ** -0.5, window)
    return out, k_cache, v_cache


def check(query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim, *, triton_backend=None,
          extra_blocks=0):
    tables, *tensors = make_case(query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim,
                                 extra_blocks=extra_blocks)
    backend = triton_backend or TritonBackend()
    out, k_cache, v_cache = run_backend(backend, query_lens, seq_lens, tables, block_size, *tensors)
    ref, ref_k_cache, ref_v_cache = run_backend(TorchBackend(), query_lens, seq_lens, tables, block_size, *tensors)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


# decode only: varied lengths (incl. 1 and exact block multiples), block sizes, MHA / GQA 2x / 4x, splits
@pytest.mark.parametrize("seq_lens,block_size,heads,head_dim,backend_args", [
    ([1, 16, 37, 90], 4, (4, 4), 16, {}),
    ([5, 64, 97], 8, (4, 2), 32, {}),
    ([3, 40], 16, (8, 2), 64, {}),
    ([1, 33, 100], 8, (4, 1), 16, {"num_kv_splits": 3, "block_n": 16}),
    ([8, 70, 2], 16, (6, 2), 24, {"num_kv_splits": 1, "block_n": 16}),
    ([17, 90], 4, (2, 2), 32, {"num_kv_splits": 8, "block_n": 16}),
])
def test_decode_matches_reference(seq_lens, block_size, heads, head_dim, backend_args):
    check([1] * len(seq_lens), seq_lens, block_size, *heads, head_dim, triton_backend=TritonBackend(**backend_args))


def test_decode_with_spare_blocks_in_the_table():
    # a block table wider than the sequences need (as a graph-captured runner keeps it)
    backend = TritonBackend(num_kv_splits=4, block_n=16)
    check([1, 1, 1], [7, 30, 12], 8, 4, 2, 32, extra_blocks=2, triton_backend=backend)


# prefill from scratch: the chunk is the whole sequence, spanning several query tiles and KV tiles
@pytest.mark.parametrize("query_lens,block_size,heads,head_dim", [
    ([20, 45], 8, (4, 4), 32),
    ([33, 2, 64], 16, (8, 2), 16),
    ([50], 4, (4, 1), 64),
])
def test_prefill_from_scratch(query_lens, block_size, heads, head_dim):
    check(query_lens, query_lens, block_size, *heads, head_dim, triton_backend=TritonBackend(block_m=16, block_n=16))


# a chunk continuing a cached prefix: the new tokens are the last query_len of seq_len
@pytest.mark.parametrize("query_lens,seq_lens,block_size,heads", [
    ([16, 30], [40, 95], 8, (4, 2)),
    ([7], [100], 16, (4, 4)),
    ([9, 25], [13, 60], 4, (8, 2)),
])
def test_chunk_continues_cached_prefix(query_lens, seq_lens, block_size, heads):
    check(query_lens, seq_lens, block_size, *heads, 32, triton_backend=TritonBackend(block_m=16, block_n=16))


def test_chunk_with_default_tiles():
    check([40, 12], [90, 12], 16, 4, 2, 64)


@pytest.mark.parametrize("heads,backend_args", [
    ((4, 4), {"num_kv_splits": 2, "block_m": 16, "block_n": 16}),
    ((8, 2), {"block_m": 32, "block_n": 16}),
])
def test_mixed_batch_of_decodes_and_chunks(heads, backend_args):
    # decodes interleaved with a fresh prefill and a continued chunk
    check([1, 20, 1, 33, 1], [9, 20, 50, 70, 1], 8, *heads, 16, triton_backend=TritonBackend(**backend_args))


def test_strided_q_from_a_fused_projection():
    # the model splits one [T, (H + 2 Hkv) * D] projection: q, k, v are strided views, not copies
    query_lens, seq_lens, block_size, heads, kv_heads, head_dim = [1, 12], [20, 30], 8, 4, 2, 16
    tables, q, k, v, k_cache, v_cache = make_case(query_lens, seq_lens, block_size, heads, kv_heads, head_dim)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    views = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q_view, k_view, v_view = (t.unflatten(1, (-1, head_dim)) for t in views)
    assert not q_view.is_contiguous()
    out, _, _ = run_backend(TritonBackend(block_m=16, block_n=16), query_lens, seq_lens, tables, block_size,
                            q_view, k_view, v_view, k_cache, v_cache)
    ref, _, _ = run_backend(TorchBackend(), query_lens, seq_lens, tables, block_size, q, k, v, k_cache, v_cache)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [
    (torch.float16, 2e-2),
    pytest.param(torch.bfloat16, 3e-2, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter gets bfloat16 dots wrong; the CUDA default dtype")),
])
def test_half_against_fp32_reference(dtype, tol):
    query_lens, seq_lens, block_size = [1, 24, 1], [30, 60, 75], 8
    tables, *tensors = make_case(query_lens, seq_lens, block_size, 4, 2, 32, dtype=dtype)
    backend = TritonBackend(num_kv_splits=2, block_m=16, block_n=16)
    out, k_cache, _ = run_backend(backend, query_lens, seq_lens, tables, block_size, *tensors)
    ref, ref_k_cache, _ = run_backend(TorchBackend(), query_lens, seq_lens, tables, block_size,
                                      *(t.float() for t in tensors))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert torch.equal(k_cache.float(), ref_k_cache)


def test_new_kv_lands_in_its_slots_and_nothing_else_moves():
    query_lens, seq_lens, block_size = [3, 1], [10, 6], 4
    tables, q, k, v, k_cache, v_cache = make_case(query_lens, seq_lens, block_size, 2, 2, 16)
    _, new_k, new_v = run_backend(TritonBackend(), query_lens, seq_lens, tables, block_size, q, k, v, k_cache, v_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    token = 0
    for q_len, s_len, table in zip(query_lens, seq_lens, tables):
        for pos in range(s_len - q_len, s_len):
            expected_k[table[pos // block_size], pos % block_size] = k[token]
            expected_v[table[pos // block_size], pos % block_size] = v[token]
            token += 1
    assert torch.equal(new_k, expected_k) and torch.equal(new_v, expected_v)


def test_decode_grid_depends_only_on_static_sizes():
    # CUDA-graph capture needs one grid per batch size: the split count must not read the lengths
    backend = TritonBackend(block_n=16)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    short = AttentionMetadata.build([1, 1], [2, 3], tables, 16, device=DEVICE)
    long = AttentionMetadata.build([1, 1], [60, 64], tables, 16, device=DEVICE)
    assert backend.kv_splits(short, 2, 16) == backend.kv_splits(long, 2, 16) > 1
    assert backend.kv_splits(long, 2, 16, sliding_window=20) == 2  # no more splits than the window has tiles


# sliding windows, bidirectional media runs, KV sharing, per-layer shapes, wide heads

def pool_keys(cache, table, seq_len, block_size):
    """[S, Hkv, D] of a sequence, gathered through its block table."""
    pos = torch.arange(seq_len)
    return cache[torch.tensor(table)[pos // block_size], pos % block_size]


def check_masked(query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim, *, window=None, runs=None,
                 shared_kv=False, triton_backend=None, seed=0):
    """Triton vs the torch reference and vs plain softmax per sequence; ``shared_kv``: called with k = v = None
    (the pool already holds every position). Returns the case and Triton's output."""
    tables, q, k, v, k_cache, v_cache = make_case(query_lens, seq_lens, block_size, num_heads, num_kv_heads,
                                                  head_dim, seed=seed)
    if shared_kv:
        k = v = None
    args = (query_lens, seq_lens, tables, block_size, q, k, v, k_cache, v_cache)
    backend = triton_backend or TritonBackend()
    out, new_k, new_v = run_backend(backend, *args, window=window, runs=runs)
    ref, ref_k, ref_v = run_backend(TorchBackend(), *args, window=window, runs=runs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(new_k, ref_k) and torch.equal(new_v, ref_v)
    if shared_kv:
        assert torch.equal(new_k, k_cache) and torch.equal(new_v, v_cache)
    start = 0
    for ql, s_len, table, seq_runs in zip(query_lens, seq_lens, tables, runs or [[]] * len(seq_lens)):
        expected = naive_attention(q[start:start + ql].cpu(), pool_keys(new_k.cpu(), table, s_len, block_size),
                                   pool_keys(new_v.cpu(), table, s_len, block_size), head_dim ** -0.5, window,
                                   seq_runs)
        torch.testing.assert_close(out[start:start + ql].cpu(), expected, atol=1e-4, rtol=1e-4)
        start += ql
    return tables, (q, k, v, k_cache, v_cache), out


@pytest.mark.parametrize("window,backend_args", [
    (6, {"num_kv_splits": 2, "block_m": 16, "block_n": 16}),  # window inside one tile
    (21, {"block_m": 16, "block_n": 16}),  # window over several tiles; default splits
    (1, {"num_kv_splits": 1, "block_m": 16, "block_n": 16}),  # only the token itself
])
def test_sliding_window_in_a_mixed_step(window, backend_args):
    # decodes far past the window, a fresh prefill longer than it, a chunk continuing a cached prefix
    check_masked([1, 20, 1, 9, 1], [40, 20, 70, 50, 5], 8, 4, 2, 16, window=window,
                 triton_backend=TritonBackend(**backend_args))


# runs across query tiles (8 tokens at block_m 16, GQA 2) and KV tiles (16); a chunk starting inside a run
# (a prefix hit ending in it) whose run reaches past the chunk's first query tile; a one-token chunk closing
# a run (decode kernel); a decode after a run; a run that is the whole prompt
RUNS_CASE = dict(query_lens=[20, 9, 1, 1, 6], seq_lens=[20, 30, 25, 18, 6],
                 runs=[[(5, 19)], [(3, 8), (18, 30)], [(5, 25)], [(4, 12)], [(0, 6)]])


@pytest.mark.parametrize("window", [None, 3, 12])
def test_bidirectional_runs(window):
    check_masked(RUNS_CASE["query_lens"], RUNS_CASE["seq_lens"], 4, 4, 2, 16, window=window, runs=RUNS_CASE["runs"],
                 triton_backend=TritonBackend(num_kv_splits=2, block_m=16, block_n=16))


@pytest.mark.parametrize("window,runs", [(None, None), (4, [[(1, 6)], [], [(9, 17)]])])
def test_kv_sharing_layer_reads_without_writing(window, runs):
    check_masked([7, 1, 3], [7, 19, 17], 4, 4, 1, 16, window=window, runs=runs, shared_kv=True,
                 triton_backend=TritonBackend(num_kv_splits=2, block_m=16, block_n=16))


@pytest.mark.parametrize("head_dim", [256, 512])
def test_wide_heads_with_default_tiles(head_dim):
    # the tiles chosen for the head dim; a run reaching past the chunk's first query tile
    check_masked([1, 10], [40, 26], 16, 2, 1, head_dim, window=8, runs=[[], [(20, 26)]])


def test_layers_of_different_shapes_share_one_step():
    """One step, three layers: sliding (Hkv 2, D 32), full (Hkv 1, D 64), and one reading the sliding layer's
    cache (k = v = None); the decode partial buffers of one shape must not serve another."""
    query_lens, seq_lens, block_size = [1, 12, 1], [30, 12, 45], 8
    tables, *sliding = make_case(query_lens, seq_lens, block_size, 4, 2, 32, seed=1)
    full = make_case(query_lens, seq_lens, block_size, 4, 1, 64, seed=2)[1:]  # its own pool, the same tables
    shared_q = make_case(query_lens, seq_lens, block_size, 4, 2, 32, seed=3)[1]
    outputs = []
    for backend in (TritonBackend(num_kv_splits=2, block_m=16, block_n=16), TorchBackend()):
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE,
                                       runs=[[], [(3, 9)], []])
        backend.prepare(meta)
        s_q, s_k, s_v, s_kc, s_vc = (t.clone() for t in sliding)
        f_q, f_k, f_v, f_kc, f_vc = (t.clone() for t in full)
        outputs.append((
            backend.forward(s_q, s_k, s_v, s_kc, s_vc, meta, 32 ** -0.5, 6),
            backend.forward(f_q, f_k, f_v, f_kc, f_vc, meta, 64 ** -0.5),
            backend.forward(shared_q, None, None, s_kc, s_vc, meta, 32 ** -0.5, 6),
        ))
    for out, ref in zip(*outputs):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_keys_before_the_window_are_never_read():
    """Every pool position a sequence's queries cannot see (before the lowest window start or run start) holds
    NaN: the output stays finite and bit-identical. Poisoning the first visible key instead shows up."""
    query_lens, seq_lens, block_size, window = [8, 1, 10, 1], [48, 61, 33, 70], 8, 5
    runs = [[], [], [(12, 33)], []]  # seq 2's run reaches back past its window (to 12)
    lowest = [40 - window + 1, 60 - window + 1, 12, 69 - window + 1]
    backend = TritonBackend(num_kv_splits=4, block_m=16, block_n=16)
    tables, (q, k, v, k_cache, v_cache), clean = check_masked(query_lens, seq_lens, block_size, 2, 1, 16,
                                                              window=window, runs=runs, triton_backend=backend)

    def poisoned(limits):
        k_bad, v_bad = k_cache.clone(), v_cache.clone()
        for table, limit in zip(tables, limits):
            for pos in range(limit):
                k_bad[table[pos // block_size], pos % block_size] = float("nan")
                v_bad[table[pos // block_size], pos % block_size] = float("nan")
        return run_backend(backend, query_lens, seq_lens, tables, block_size, q, k, v, k_bad, v_bad,
                           window=window, runs=runs)[0]

    out = poisoned(lowest)
    assert torch.isfinite(out).all() and torch.equal(out, clean)
    out = poisoned([lowest[0] + 1, 0, lowest[2] + 1, 0])  # one visible key of seqs 0 and 2
    assert out[:8].isnan().any() and out[9:19].isnan().any() and torch.equal(out[8], clean[8])


def test_auto_passes_over_backends_that_cannot_serve_the_model(monkeypatch, caplog):
    import pipeline.attention as attention

    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object())  # flash-attn "installed"
    assert resolve_backend_name("auto", "cuda", head_dims=[256, 128]) == "flash"
    with caplog.at_level("INFO", logger="pipeline.attention"):
        assert resolve_backend_name("auto", "cuda", head_dims=[256, 512]) == "triton"
    assert "not flash: head dim 512" in caplog.text
    assert resolve_backend_name("auto", "cuda", head_dims=[256], windows_or_runs=True) == "triton"
    assert resolve_backend_name("auto", "cuda", head_dims=[1024]) == "torch"
    from pipeline.attention.cpu_kernel import available

    assert resolve_backend_name("auto", "cpu", head_dims=[512]) == ("cpu" if available() else "torch")  # no limit


def test_backend_asked_by_name_that_cannot_serve_the_model():
    with pytest.raises(ValueError, match="head dim 512"):
        get_backend("flash", "cuda", head_dims=[256, 512])
    with pytest.raises(ValueError, match="sliding windows"):
        get_backend("flash", "cuda", head_dims=[128], windows_or_runs=True)
    with pytest.raises(ValueError, match="head dim 1024"):
        get_backend("triton", "cuda", head_dims=[1024])
    assert isinstance(get_backend("triton", "cpu", head_dims=[256, 512], windows_or_runs=True), TritonBackend)


def test_registry_builds_it():
    assert isinstance(get_backend("triton", "cpu"), TritonBackend)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="block_n"):
        TritonBackend(block_n=24)
    with pytest.raises(ValueError, match="num_kv_splits"):
        TritonBackend(num_kv_splits=0)
    tables, *tensors = make_case([1], [5], 4, 3, 2, 16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        run_backend(TritonBackend(), [1], [5], tables, 4, *tensors)
    tables, *tensors = make_case([1], [5], 4, 1, 1, 1024)
    with pytest.raises(ValueError, match="head dims up to 512"):
        run_backend(TritonBackend(), [1], [5], tables, 4, *tensors)
    tables, *tensors = make_case([1], [5], 4, 1, 1, 16)
    with pytest.raises(ValueError, match="sliding_window"):
        run_backend(TritonBackend(), [1], [5], tables, 4, *tensors, window=0)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    meta = AttentionMetadata.build([1], [3], [[0]], 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        TritonBackend().prepare(meta)
