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

from pipeline.attention import AttentionMetadata, get_backend  # noqa: E402
from pipeline.attention.torch_ref import TorchBackend  # noqa: E402
from pipeline.attention.triton_backend import TritonBackend  # noqa: E402
from pipeline.attention.triton_kernels import paged_decode_kernel  # noqa: E402

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


def run_backend(backend, query_lens, seq_lens, tables, block_size, q, k, v, k_cache, v_cache):
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, q.shape[-1] ** -0.5)
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
    assert backend.kv_splits(short, 2) == backend.kv_splits(long, 2) > 1


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


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    meta = AttentionMetadata.build([1], [3], [[0]], 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        TritonBackend().prepare(meta)
