"""The torch reference backend vs plain per-sequence softmax attention written here."""
from __future__ import annotations

import random

import pytest
import torch

from pipeline.attention import AttentionMetadata, StepContext, get_backend, resolve_backend_name


def naive_attention(q, k, v, scale, window=None, runs=()):
    """q [Q, H, D] are the last Q of the S keys/values [S, Hkv, D]; plain matmul + softmax. Key j is seen from
    position i when j <= i (and i - j < window), or when i and j lie in one bidirectional run [s, e)."""
    num_q, num_s = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    i = torch.arange(num_s - num_q, num_s)[:, None]
    j = torch.arange(num_s)[None, :]
    seen = (j <= i) & ((i - j < window) if window is not None else True)
    for start, end in runs:
        seen |= (i >= start) & (i < end) & (j >= start) & (j < end)
    scores = scores.masked_fill(~seen, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


def run_case(query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim=16, seed=0, window=None,
             runs=None, shared_kv=False, poison_before=None):
    """``runs[i]``: sequence i's bidirectional runs; ``shared_kv``: the whole sequence is cached already and the
    layer is called with k = v = None (a KV-sharing layer); ``poison_before[i]``: sequence i's blocks wholly
    before this position hold NaN, so reading them shows in the output."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    blocks = list(range(1, num_blocks))  # block 0 stays spare: padding entries of the tables name it
    random.Random(seed).shuffle(blocks)
    tables, at = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(blocks[at:at + n])
        at += n
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    full_k = [torch.randn(s, num_kv_heads, head_dim, generator=g) for s in seq_lens]
    full_v = [torch.randn(s, num_kv_heads, head_dim, generator=g) for s in seq_lens]
    # the cached prefix of each sequence is already in the pool
    for table, s, q_len, k, v in zip(tables, seq_lens, query_lens, full_k, full_v):
        for pos in range(s if shared_kv else s - q_len):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
    for table, limit in zip(tables, poison_before or []):
        for block in table[:limit // block_size]:
            k_cache[block] = v_cache[block] = float("nan")
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g)
    new_k = torch.cat([k[s - ql:] for k, s, ql in zip(full_k, seq_lens, query_lens)])
    new_v = torch.cat([v[s - ql:] for v, s, ql in zip(full_v, seq_lens, query_lens)])
    if shared_kv:
        new_k = new_v = None
    runs = runs or [[] for _ in seq_lens]
    new_runs = [[(a, b) for a, b in seq_runs if b > s - ql] for seq_runs, s, ql in zip(runs, seq_lens, query_lens)]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, runs=new_runs)
    backend = get_backend("torch", "cpu")
    scale = head_dim ** -0.5
    with StepContext(backend).step(meta):
        out = backend.forward(q, new_k, new_v, k_cache, v_cache, meta, scale, window)
    expected, start = [], 0
    for ql, k, v, seq_runs in zip(query_lens, full_k, full_v, runs):
        expected.append(naive_attention(q[start:start + ql], k, v, scale, window, seq_runs))
        start += ql
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)
    # the new K/V landed in their slots
    for table, s, k, limit in zip(tables, seq_lens, full_k, poison_before or [0] * len(seq_lens)):
        first = limit // block_size * block_size
        got = torch.stack([k_cache[table[p // block_size], p % block_size] for p in range(first, s)])
        torch.testing.assert_close(got, k[first:])


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_batch(block_size):
    run_case([1, 1, 1, 1], [1, 7, 33, 16], block_size, num_heads=4, num_kv_heads=4)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_prefill_and_chunks_with_cached_prefix(num_kv_heads):
    run_case([9, 5, 20], [9, 30, 20], block_size=8, num_heads=4, num_kv_heads=num_kv_heads)


def test_many_decodes_of_varied_lengths_in_length_groups():
    seq_lens = [1 + (i * 37) % 61 for i in range(21)]  # sorted and cut into several groups by the backend
    run_case([1] * 21, seq_lens, block_size=4, num_heads=2, num_kv_heads=1)
    run_case([1] * 20 + [7], seq_lens, block_size=8, num_heads=2, num_kv_heads=2)


def test_many_prefill_chunks_in_length_groups():
    query_lens = [2 + (i * 7) % 19 for i in range(10)]
    seq_lens = [q + (i * 5) % 13 for i, q in enumerate(query_lens)]  # some continue a cached prefix
    run_case(query_lens + [1, 1, 1, 1], seq_lens + [9, 30, 4, 17], block_size=4, num_heads=2, num_kv_heads=2)


def test_mixed_step():
    run_case([1, 12, 1, 3], [40, 12, 5, 17], block_size=4, num_heads=2, num_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_sliding_window_prefill_chunks_and_decodes(block_size):
    # windows shorter than the chunks and than the cached prefixes; a mixed step with decodes
    run_case([9, 5, 20, 1, 1, 1, 1], [9, 30, 20, 40, 3, 17, 64], block_size, num_heads=4, num_kv_heads=2,
             window=6)
    run_case([12, 1], [12, 13], block_size, num_heads=2, num_kv_heads=1, window=1)  # only the token itself


@pytest.mark.parametrize("window", [None, 3, 100])
def test_bidirectional_runs(window):
    """Runs longer than the window; one continuing a cached prefix (a prefix hit ending inside a run); one in
    the cached past only; a decode after a run; a one-token chunk closing a run."""
    run_case([20, 9, 1, 6, 1], [20, 30, 25, 6, 18], block_size=4, num_heads=4, num_kv_heads=2, window=window,
             runs=[[(2, 10), (12, 15)], [(18, 27), (3, 8)], [(5, 12)], [(0, 6)], [(10, 18)]])


def test_sliding_window_reads_only_blocks_in_window_and_run():
    # seq 0: window 5 at positions 40..47 reaches back to 36; seq 1: decode at 60 reaches 56; seq 2: its run
    # [12, 33) reaches back past the window (19) to 12
    run_case([8, 1, 10], [48, 61, 33], block_size=4, num_heads=2, num_kv_heads=1, window=5,
             runs=[[], [], [(12, 33)]], poison_before=[36, 56, 12])


@pytest.mark.parametrize("window", [None, 4])
def test_kv_sharing_layer_reads_without_writing(window):
    run_case([7, 1, 1], [7, 19, 5], block_size=4, num_heads=4, num_kv_heads=1, window=window, shared_kv=True,
             runs=[[(1, 5)], [], []])


def test_one_group_of_consecutive_tokens_is_the_output():
    """Equal-length decodes in step order (one group, the whole step) and a lone prefill chunk."""
    run_case([1] * 5, [11] * 5, block_size=4, num_heads=2, num_kv_heads=1)
    run_case([13], [20], block_size=4, num_heads=2, num_kv_heads=2)


def test_backend_choice():
    from pipeline.attention.cpu_kernel import available

    on_cpu = "cpu" if available() else "torch"  # the C++ op when it builds (tests/test_paged_attention_cpu.py)
    assert resolve_backend_name(None, "cpu") == on_cpu
    assert resolve_backend_name("auto", "cpu") == on_cpu
    assert resolve_backend_name("torch", "cpu") == "torch"
    assert resolve_backend_name("flash", "cpu") == "flash"  # an explicit choice is honoured
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend_name("nope", "cpu")


def test_missing_flash_attn_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="not available"):
            get_backend("flash", "cpu")
    else:
        pytest.skip("flash-attn is installed here")


def test_auto_falls_back_to_triton_when_flash_attn_does_not_import(monkeypatch, caplog):
    """'auto' picked flash (installed) but its import fails, e.g. a wheel built for another torch: use triton."""
    import pipeline.attention as attention

    monkeypatch.setitem(attention.BACKENDS, "flash", ("pipeline.attention._no_such_module", "FlashBackend"))
    monkeypatch.setattr(attention, "resolve_backend_name", lambda name, device, *needs: "flash" if name in (None, "auto")
                        else name)
    with caplog.at_level("WARNING", logger="pipeline.attention"):
        backend = attention.get_backend("auto", "cpu")
    assert backend.name == "triton" and "using triton" in caplog.text
    with pytest.raises(ValueError, match="not available"):  # asked for by name: no silent substitute
        attention.get_backend("flash", "cpu")


def test_cuda_graph_batch_sizes_are_checked_and_trimmed(tiny_checkpoint):
    from pipeline.config import EngineConfig

    config = EngineConfig(model=str(tiny_checkpoint), max_num_seqs=12, cuda_graph_batch_sizes=(8, 1, 32, 16, 2, 4))
    assert config.cuda_graph_batch_sizes == (1, 2, 4, 8, 16)  # 12 sequences pad up to 16; 32 is never used
    assert EngineConfig(model=str(tiny_checkpoint), max_num_seqs=100, cuda_graph_batch_sizes=(1, 64)
                        ).cuda_graph_batch_sizes == (1, 64)  # fewer than max_num_seqs: the rest run eagerly
    for bad in ((0, 4), (2.5,), (True,)):
        with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
            EngineConfig(model=str(tiny_checkpoint), cuda_graph_batch_sizes=bad)
