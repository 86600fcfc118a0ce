"""Block manager: ref counts, hash-chain prefix hits (media hash in the key), LRU eviction, nothing leaked."""
from __future__ import annotations

import pytest

from pipeline.block_manager import BlockManager
from pipeline.request import Request
from pipeline.sampling import SamplingParams


def make_req(rid: str, tokens: list[int], media=()) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), media_spans=list(media))


def admit(bm: BlockManager, req: Request) -> int:
    """Admission as the scheduler does it, computing the whole sequence in one step; returns cached tokens."""
    cached, num_cached = bm.find_cached_prefix(req)
    num_new = req.num_tokens - num_cached
    assert bm.can_allocate(req, num_new, cached)
    req.num_computed_tokens = num_cached
    bm.allocate(req, num_new, cached)
    req.num_computed_tokens += num_new
    bm.cache_full_blocks(req)
    return num_cached


def test_allocate_grow_free_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_req("a", range(10))
    assert bm.can_allocate(req, 10) and not bm.can_allocate(req, 33)
    bm.allocate(req, 10)
    assert len(req.block_ids) == 3 and len(set(req.block_ids)) == 3
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    req.num_computed_tokens = 10
    req.append_token(99)
    req.append_token(98)
    bm.allocate(req, 2)  # 12 tokens still fit 3 blocks
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 12
    req.append_token(97)
    bm.allocate(req, 1)
    assert len(req.block_ids) == 4 and all(bm.blocks[b].ref_count == 1 for b in req.block_ids)
    bm.free(req)
    assert req.block_ids == [] and bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_hash_chain_hit_shares_blocks_and_never_covers_whole_sequence():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", range(10))
    assert admit(bm, a) == 0
    assert bm.num_cached_blocks == 2  # two full blocks of 4; the third holds 2 tokens

    b = make_req("b", [*range(9), 500])  # shares 9 tokens: both full blocks
    assert admit(bm, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_count for i in a.block_ids[:2]] == [2, 2]

    c = make_req("c", [0, 1, 2, 3, 4, 5, 6, 700, 8])  # second block differs
    assert bm.find_cached_prefix(c) == ([a.block_ids[0]], 4)

    d = make_req("d", [100, 1, 2, 3, 4, 5, 6, 7, 8])  # first block differs: the chain breaks, block 2 cannot hit
    assert bm.find_cached_prefix(d) == ([], 0)

    e = make_req("e", range(8))  # exactly two cached blocks: one token must stay to compute
    assert bm.find_cached_prefix(e) == ([a.block_ids[0]], 4)

    for r in (a, b):
        bm.free(r)
    assert bm.num_free_blocks == 16
    assert bm.num_queries_tokens == 20 and bm.num_hit_tokens == 8 and bm.hit_rate == pytest.approx(0.4)


def test_same_tokens_with_other_media_hash_do_not_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = [7, 7, 7, 7, 7, 7, 1, 2, 3, 4]  # image placeholders at [0, 6)
    a = make_req("a", tokens, [(0, 6, "img-A")])
    admit(bm, a)
    a_blocks = a.block_ids[:2]
    bm.free(a)

    other = make_req("b", tokens, [(0, 6, "img-B")])
    assert bm.find_cached_prefix(other) == ([], 0)
    shifted = make_req("c", tokens, [(1, 6, "img-A")])  # same pixels hash, other positions
    assert bm.find_cached_prefix(shifted) == ([], 0)
    same = make_req("d", tokens, [(0, 6, "img-A")])
    assert bm.find_cached_prefix(same) == (a_blocks, 8)


def test_media_only_in_later_block_keeps_earlier_block_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6]
    a = make_req("a", tokens, [(4, 8, "img-A")])
    admit(bm, a)
    b = make_req("b", tokens, [(4, 8, "img-B")])
    assert bm.find_cached_prefix(b) == ([a.block_ids[0]], 4)
    bm.free(a)


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_req("a", [1, 2, 3, 4, 5])  # 2 full blocks cached + 1 partial
    b = make_req("b", [6, 7, 8])  # 1 full block cached + 1 partial
    admit(bm, a)
    admit(bm, b)
    a_head, a_mid = a.block_ids[:2]
    (b_head,) = b.block_ids[:1]
    bm.free(a)  # released first: least recently used
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 3

    c = make_req("c", range(100, 110))
    bm.allocate(c, 6)  # 3 blocks: never-cached free ones go first
    assert bm.num_cached_blocks == 3
    c.num_computed_tokens = 6
    bm.allocate(c, 2)  # 4th block evicts the least recently released: a's tail
    assert a_mid in c.block_ids and bm.num_cached_blocks == 2
    assert bm.find_cached_prefix(make_req("a2", [1, 2, 3, 4, 5])) == ([a_head], 2)
    c.num_computed_tokens = 8
    bm.allocate(c, 2)  # next: a's head, b still cached
    assert a_head in c.block_ids
    assert bm.find_cached_prefix(make_req("a3", [1, 2, 3, 4, 5])) == ([], 0)
    assert bm.find_cached_prefix(make_req("b2", [6, 7, 8])) == ([b_head], 2)
    bm.free(c)
    assert bm.num_free_blocks == 6


def test_hit_revives_evictable_block_and_counts_it_against_free():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_req("a", [1, 2, 3])
    admit(bm, a)
    bm.free(a)
    b = make_req("b", [1, 2, 3, 4, 5, 6])  # hit 1 block (evictable) + needs 2 new: exactly the pool
    cached, num_cached = bm.find_cached_prefix(b)
    assert num_cached == 2 and bm.can_allocate(b, 4, cached)
    assert not bm.can_allocate(b, 5, cached)
    b.num_computed_tokens = num_cached
    bm.allocate(b, 4, cached)
    assert bm.num_free_blocks == 0 and b.block_ids[0] == cached[0]
    bm.free(b)
    assert bm.num_free_blocks == 3


def test_identical_concurrent_requests_register_once_and_free_all():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_req("a", range(5)), make_req("b", range(5))
    for r in (a, b):  # both admitted before either computed: no hit, duplicate blocks
        bm.allocate(r, 5)
    for r in (a, b):
        r.num_computed_tokens = 5
        bm.cache_full_blocks(r)
    assert bm.num_cached_blocks == 2
    assert bm.find_cached_prefix(make_req("c", range(5))) == (a.block_ids[:2], 4)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_req("a", range(5))
    admit(bm, a)
    bm.free(a)
    assert bm.find_cached_prefix(make_req("b", range(5))) == ([], 0) and bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 8


def fork_all(bm: BlockManager, parent: Request, n: int) -> list[Request]:
    """n - 1 forks of a computed prompt, each with its own first token (as the scheduler makes them)."""
    children = [make_req(f"{parent.request_id}#{i}", parent.prompt_token_ids) for i in range(1, n)]
    for i, child in enumerate(children, start=1):
        bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.append_token(100 + i)
    parent.append_token(100)
    return [parent, *children]


def grow(bm: BlockManager, seq: Request, token: int) -> None:
    """One decode step: room for the sequence's last token, which is then computed."""
    bm.allocate(seq, 1)
    seq.num_computed_tokens += 1
    bm.cache_full_blocks(seq)
    seq.append_token(token)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_fork_shares_every_block_and_copies_the_partial_one_on_write(prefix_caching):
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=prefix_caching)
    parent = make_req("p", range(10))  # two full blocks and one holding 2 tokens
    admit(bm, parent)
    prompt_blocks = list(parent.block_ids)
    seqs = fork_all(bm, parent, 3)
    assert all(seq.block_ids == prompt_blocks for seq in seqs)
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [3, 3, 3] and bm.num_used_blocks == 3
    assert bm.take_copies() == []
    for seq in seqs:
        grow(bm, seq, 7)
    copies = bm.take_copies()
    assert copies == [(prompt_blocks[2], seqs[0].block_ids[2]), (prompt_blocks[2], seqs[1].block_ids[2])]
    assert seqs[2].block_ids == prompt_blocks  # the last holder writes into the block itself
    assert len({seq.block_ids[2] for seq in seqs}) == 3 and bm.num_used_blocks == 5
    assert [bm.blocks[b].ref_count for b in prompt_blocks] == [3, 3, 1]
    for seq in seqs:  # the next token goes into the sequence's own block: no more copies
        grow(bm, seq, 8)
    assert bm.take_copies() == [] and bm.num_used_blocks == 5
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)


def test_fork_of_a_prompt_of_whole_blocks_copies_nothing():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_req("p", range(8))
    admit(bm, parent)
    seqs = fork_all(bm, parent, 4)
    for seq in seqs:
        grow(bm, seq, 7)
    assert bm.take_copies() == []
    assert len({seq.block_ids[2] for seq in seqs}) == 4 and bm.num_used_blocks == 2 + 4


def test_forked_blocks_register_and_evict_with_correct_kv_events():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.record_kv_events = True
    parent = make_req("p", range(6))  # one full block, one holding 2 tokens
    admit(bm, parent)
    [stored_prompt] = bm.take_kv_events()
    seqs = fork_all(bm, parent, 2)
    for token in (7, 8):  # both sequences fill their own copy of the second block
        for seq in seqs:
            grow(bm, seq, token)
    events = bm.take_kv_events()
    assert [type(e).__name__ for e in events] == ["BlockStored", "BlockStored"]
    assert {e.token_ids for e in events} == {(4, 5, 100, 7), (4, 5, 101, 7)}
    assert all(e.parent_hash == stored_prompt.block_hash for e in events)
    assert len({e.block_hash for e in events}) == 2
    for seq in seqs:
        bm.free(seq)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 5  # evictable
    other = make_req("o", [50 + i for i in range(20)])  # needs all five blocks: evicts the three cached
    admit(bm, other)
    removed = [e for e in bm.take_kv_events() if type(e).__name__ == "BlockRemoved"]
    assert {e.block_hash for e in removed} == {stored_prompt.block_hash, *(e.block_hash for e in events)}


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    parent = make_req("p", range(10))  # all three blocks; the third has room for 2 more tokens
    admit(bm, parent)
    child = fork_all(bm, parent, 2)[1]
    assert not bm.can_allocate(child, 1)  # its token fits the shared block's room, but it needs its own copy
    bm.free(parent)
    assert bm.can_allocate(child, 1)  # the only holder now: it writes in place
    grow(bm, child, 7)
    assert bm.take_copies() == [] and bm.num_free_blocks == 0
