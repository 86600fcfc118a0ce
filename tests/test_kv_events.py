"""serve/dynamo/kv_events.py: our block manager's events -> Dynamo KV events over the frontend's token ids.

The reference is the block manager itself (its hashes and its stored / removed events as blocks are cached
and evicted) and plain-Python slicing of the frontend's ids (what Dynamo's router hashes per block)."""
from __future__ import annotations

import torch

from pipeline.block_manager import BlockManager, BlockRemoved, BlockStored
from pipeline.request import Request
from pipeline.sampling import SamplingParams
from serve.dynamo.kv_events import KvEventTranslator, prompt_block_hashes, routing_chain
from tokenization import MediaSpan, Prompt

BOS, BOA, IMAGE = 1, 7, 300
B = 4  # block size


class Recorder:
    """Dynamo's KvEventPublisher interface (publish_stored / publish_removed), recorded."""

    def __init__(self):
        self.stored: list[dict] = []
        self.removed: list[int] = []

    def publish_stored(self, token_ids, num_block_tokens, block_hashes, parent_hash=None):
        assert num_block_tokens == [len(token_ids)] and len(block_hashes) == 1
        self.stored.append({"tokens": list(token_ids), "hash": block_hashes[0], "parent": parent_hash})

    def publish_removed(self, block_hashes):
        self.removed += block_hashes

    def held_tokens(self) -> list[list[int]]:
        """The chains the router would hold (stored minus removed), each as its tokens in order."""
        alive = {s["hash"]: s for s in self.stored if s["hash"] not in self.removed}
        chains = []
        for s in alive.values():
            if not any(t["parent"] == s["hash"] for t in alive.values()):  # a leaf
                tokens, cur = [], s
                while cur is not None:
                    tokens = cur["tokens"] + tokens
                    cur = alive.get(cur["parent"])
                chains.append(tokens)
        return chains


def text_prompt(frontend_ids: list[int]) -> Prompt:
    """The family's layout of a text prompt: BOS, the text, beginning of answer."""
    return Prompt(token_ids=[BOS] + frontend_ids + [BOA], patches=torch.empty(0, 3, dtype=torch.uint8), media=[],
                  image_positions=[])


def image_prompt(before: list[int], num_image: int, after: list[int], content_hash: str) -> Prompt:
    ids = [BOS] + before + [IMAGE] * num_image + after + [BOA]
    start = 1 + len(before)
    return Prompt(token_ids=ids, patches=torch.zeros(num_image, 3, dtype=torch.uint8),
                  media=[MediaSpan(start, start + num_image, content_hash, "image")],
                  image_positions=list(range(start, start + num_image)))


def run(bm: BlockManager, request_id: str, prompt: Prompt) -> Request:
    """Computes the prompt (a cache hit where there is one), caches its full blocks, finishes it."""
    req = Request(request_id, list(prompt.token_ids), SamplingParams(),
                  media_spans=[(m.start, m.end, m.content_hash) for m in prompt.media])
    cached, num_cached = bm.find_cached_prefix(req)
    bm.allocate(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)
    bm.free(req)
    return req


def manager(num_blocks: int = 64) -> BlockManager:
    bm = BlockManager(num_blocks, B)
    bm.record_kv_events = True
    return bm


def test_prompt_block_hashes_are_the_block_managers():
    prompt = image_prompt([10, 11, 12], 6, [20, 21, 22, 23, 24], "c0ffee")
    bm = manager()
    req = run(bm, "a", prompt)
    stored = [e.block_hash for e in bm.take_kv_events() if isinstance(e, BlockStored)]
    assert prompt_block_hashes(prompt, B) == stored == req.block_hashes
    assert len(stored) == len(prompt.token_ids) // B


def test_text_prompt_publishes_the_frontends_blocks_as_ours_enter_the_cache():
    frontend = list(range(100, 114))  # 14 ids: 3 full routing blocks
    prompt = text_prompt(frontend)
    publisher, bm = Recorder(), manager()
    events = KvEventTranslator(publisher)
    chain = routing_chain(frontend, prompt, B, BOS)
    events.register(chain)
    assert publisher.stored == []  # nothing cached yet
    run(bm, "a", prompt)
    events.apply(bm.take_kv_events())
    events.release(chain)
    # what the router hashes: the frontend's ids in blocks of B, chained
    assert publisher.held_tokens() == [frontend[:12]]
    assert [s["tokens"] for s in publisher.stored] == [frontend[0:4], frontend[4:8], frontend[8:12]]
    assert publisher.stored[0]["parent"] is None
    assert [s["parent"] for s in publisher.stored[1:]] == [s["hash"] for s in publisher.stored[:-1]]


def test_a_routing_block_is_anchored_where_its_last_token_is_in_our_stream():
    """Our BOS shifts the frontend's ids by one: routing block k ends in our block k + 1 (for B > 1)."""
    frontend = list(range(100, 111))  # 11 ids: 2 full routing blocks
    prompt = text_prompt(frontend)  # 13 ids: our blocks [BOS 100 101 102] [103 .. 106] [107 .. 110] (+ BOA)
    hashes = prompt_block_hashes(prompt, B)
    chain = routing_chain(frontend, prompt, B, BOS)
    assert [anchor for _, anchor in chain] == [hashes[1], hashes[2]]
    assert [block.token_ids for block, _ in chain] == [tuple(frontend[:4]), tuple(frontend[4:8])]
    # a routing block whose last token falls in our last, partial block has no anchor yet: not published
    longer = list(range(100, 112))  # 12 ids, 3 routing blocks; ours 14: blocks 0..2 full
    assert len(routing_chain(longer, text_prompt(longer), B, BOS)) == 2


def test_eviction_removes_the_routing_blocks_of_the_evicted_block():
    frontend = list(range(100, 110))  # 10 ids: ours 12 -> 3 full blocks; 2 routing blocks anchored
    prompt = text_prompt(frontend)
    publisher, bm = Recorder(), manager(num_blocks=3)
    events = KvEventTranslator(publisher)
    chain = routing_chain(frontend, prompt, B, BOS)
    events.register(chain)
    run(bm, "a", prompt)
    events.apply(bm.take_kv_events())
    events.release(chain)
    assert len(publisher.stored) == 2 and publisher.removed == []
    other = Request("b", list(range(200, 212)), SamplingParams())  # needs all 3 blocks: evicts ours
    bm.allocate(other, other.num_tokens)
    events.apply(bm.take_kv_events())
    assert sorted(publisher.removed) == sorted(s["hash"] for s in publisher.stored)
    assert publisher.held_tokens() == []


def test_after_an_image_the_routing_blocks_wait_for_the_whole_prompt_with_that_image():
    """Past the first difference (the image), routing blocks are anchored at our last full block, whose hash
    covers the image's content hash: another image with the same text does not make them held."""
    before, after = [10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]
    placeholder_text = [90, 91, 92]  # the frontend's ids for the template's "<image>" text
    frontend = before + placeholder_text + after  # 17 ids: 4 routing blocks
    prompt = image_prompt(before, 8, after, "image-a")  # 1 + 7 + 8 + 7 + 1 = 24 ids: 6 full blocks
    hashes = prompt_block_hashes(prompt, B)
    chain = routing_chain(frontend, prompt, B, BOS)
    assert [anchor for _, anchor in chain] == [hashes[1], hashes[-1], hashes[-1], hashes[-1]]

    publisher, bm = Recorder(), manager()
    events = KvEventTranslator(publisher)
    other_image = image_prompt(before, 8, after, "image-b")
    run(bm, "b", other_image)  # same text, other pixels: only the text before the image is shared
    events.register(chain)
    events.apply(bm.take_kv_events())
    assert publisher.held_tokens() == [frontend[:4]]
    run(bm, "a", prompt)
    events.apply(bm.take_kv_events())
    events.release(chain)
    assert publisher.held_tokens() == [frontend[:16]]


def test_a_routing_block_shared_by_two_anchors_is_removed_with_the_last():
    before = [10, 11, 12]
    shared = [30, 31, 32, 33, 34, 35, 36, 37]
    first = image_prompt(before, 4, shared + [40, 41, 42, 43], "img")
    second = image_prompt(before, 4, shared + [50, 51, 52, 53], "img")
    front_first = before + [90] + shared + [40, 41, 42, 43]
    front_second = before + [90] + shared + [50, 51, 52, 53]
    publisher, bm = Recorder(), manager(num_blocks=16)
    events = KvEventTranslator(publisher)
    chains = [routing_chain(front_first, first, B, BOS), routing_chain(front_second, second, B, BOS)]
    for chain, prompt, name in zip(chains, (first, second), "ab"):
        events.register(chain)
        run(bm, name, prompt)
        events.apply(bm.take_kv_events())
        events.release(chain)
    assert sorted(publisher.held_tokens()) == sorted([front_first[:16], front_second[:16]])
    shared_hashes = {b.block_hash for b, _ in chains[0]} & {b.block_hash for b, _ in chains[1]}
    assert len(shared_hashes) == 3  # the frontend's first 12 ids are the same
    events.apply([BlockRemoved(prompt_block_hashes(first, B)[-1])])  # the first request's tail leaves our cache
    assert not shared_hashes & set(publisher.removed)
    assert publisher.held_tokens() == [front_second[:16]]


def test_events_before_the_publisher_attaches_are_sent_in_order_on_attach():
    frontend = list(range(100, 110))
    prompt = text_prompt(frontend)
    bm, events = manager(), KvEventTranslator()
    chain = routing_chain(frontend, prompt, B, BOS)
    events.register(chain)
    run(bm, "a", prompt)
    events.apply(bm.take_kv_events())
    publisher = Recorder()
    events.attach(publisher)
    assert publisher.held_tokens() == [frontend[:8]]
