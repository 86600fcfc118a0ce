"""Paged KV blocks: reference counts, prefix caching by hash chains over full blocks, LRU eviction, and
forks (parallel sampling) that share every block of a prompt, the partly filled last one copied on write.

With ``record_kv_events`` the manager keeps a log of what enters and leaves the prefix cache (``BlockStored``,
``BlockRemoved``), drained by ``take_kv_events``: what a KV-aware router (NVIDIA Dynamo's) needs to know."""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

from pipeline.request import Request


def hash_block(parent: bytes | None, token_ids: list[int], media_keys: list[tuple[int, int, int, str]]) -> bytes:
    """Chain hash of one full block: parent hash, token ids and (block offset, media offset, length, content hash)
    of each media run inside it, so equal placeholder ids with other pixels never match."""
    key = repr((tuple(token_ids), tuple(media_keys))).encode()
    return hashlib.sha256((parent or b"") + key).digest()


def block_media_keys(media_spans: list[tuple[int, int, str]], start: int, end: int) -> list[tuple[int, int, int, str]]:
    keys = []
    for span_start, span_end, content_hash in media_spans:
        lo, hi = max(span_start, start), min(span_end, end)
        if lo < hi:
            keys.append((lo - start, lo - span_start, hi - lo, content_hash))
    return keys


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A full block entered the prefix cache: its chain hash, its parent's (None for a first block), its tokens
    and the content hashes of the media whose rows it holds."""

    block_hash: bytes
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    media_hashes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """A block left the prefix cache (evicted for reuse)."""

    block_hash: bytes


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


class BlockManager:
    """Blocks are free (no hash), evictable (hashed, unreferenced; LRU order) or in use (ref_count > 0: more
    than one for a cached prefix or a forked prompt that several sequences share)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first
        self._block_of_hash: dict[bytes, int] = {}
        self._num_registered: dict[str, int] = {}  # request_id -> leading blocks already in the cache
        self.num_queries_tokens = 0
        self.num_hit_tokens = 0
        self.record_kv_events = False
        self._kv_events: list[BlockStored | BlockRemoved] = []
        self._copies: list[tuple[int, int]] = []  # (source, destination) blocks whose KV the runner copies

    def take_kv_events(self) -> list[BlockStored | BlockRemoved]:
        """The cache's changes since the last call, in order (empty unless ``record_kv_events``)."""
        events, self._kv_events = self._kv_events, []
        return events

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queries_tokens if self.num_queries_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        hashes = req.block_hashes
        tokens = req.all_token_ids
        for i in range(len(hashes), num_full_blocks):
            start, end = i * self.block_size, (i + 1) * self.block_size
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[start:end], block_media_keys(req.media_spans, start, end)))
        return hashes

    def find_cached_prefix(self, req: Request) -> tuple[list[int], int]:
        """Longest cached run of full blocks; leaves at least one token to compute (the model must give logits)."""
        if not self.enable_prefix_caching:
            return [], 0
        block_ids = self.cached_block_ids(self._chain_hashes(req, (req.num_tokens - 1) // self.block_size))
        return block_ids, len(block_ids) * self.block_size

    def _target_len(self, req: Request, num_new_tokens: int, cached_blocks) -> int:
        num_cached = len(cached_blocks) * self.block_size
        assert not cached_blocks or (not req.block_ids and req.num_computed_tokens in (0, num_cached))
        return max(req.num_computed_tokens, num_cached) + num_new_tokens

    def _num_needed(self, req: Request, num_new_tokens: int, cached_blocks) -> int:
        target = self.num_blocks_for(self._target_len(req, num_new_tokens, cached_blocks))
        new = max(target - len(req.block_ids) - len(cached_blocks), 0)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)  # leave the evictable pool
        return new + revived + (self._shared_write_block(req) is not None)

    def _shared_write_block(self, req: Request) -> int | None:
        """Index in req.block_ids of the block its next token is written into, when another sequence holds it
        too (a forked, partly filled prompt block): it must be copied first."""
        i = req.num_computed_tokens // self.block_size
        return i if i < len(req.block_ids) and self.blocks[req.block_ids[i]].ref_count > 1 else None

    def can_allocate(self, req: Request, num_new_tokens: int, cached_blocks=()) -> bool:
        return self._num_needed(req, num_new_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks=()) -> None:
        """Grows req.block_ids to cover num_computed_tokens + num_new_tokens and takes refs on cached_blocks
        (admission only: they then cover the first len(cached_blocks) * block_size tokens, which the caller
        counts in num_computed_tokens)."""
        assert self.can_allocate(req, num_new_tokens, cached_blocks)
        target_len = self._target_len(req, num_new_tokens, cached_blocks)
        if not req.block_ids and self.enable_prefix_caching:
            self.num_queries_tokens += req.num_tokens
            self.num_hit_tokens += len(cached_blocks) * self.block_size
        if cached_blocks:
            for block_id in cached_blocks:
                block = self.blocks[block_id]
                assert block.block_hash is not None
                if block.ref_count == 0:
                    del self._evictable[block_id]
                block.ref_count += 1
            req.block_ids = list(cached_blocks)
            self._num_registered[req.request_id] = len(cached_blocks)
        shared = self._shared_write_block(req)
        if shared is not None:  # copy on write: this sequence gets its own copy, the others keep the block
            source = req.block_ids[shared]
            self.blocks[source].ref_count -= 1
            req.block_ids[shared] = self._take_block()
            self._copies.append((source, req.block_ids[shared]))
        for _ in range(self.num_blocks_for(target_len) - len(req.block_ids)):
            req.block_ids.append(self._take_block())

    def fork(self, parent: Request, child: Request) -> None:
        """``child`` (a sequence with the same prompt, nothing computed) shares every block of ``parent``: one
        more reference each. Full blocks are never written again; the first write into a shared partly filled
        block copies it (``allocate``). ``child`` then counts ``parent``'s computed tokens as its own."""
        assert not child.block_ids and child.all_token_ids[:parent.num_computed_tokens] == \
            parent.all_token_ids[:parent.num_computed_tokens]
        for block_id in parent.block_ids:
            self.blocks[block_id].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = parent.block_hashes[:parent.num_computed_tokens // self.block_size]
        if parent.request_id in self._num_registered:
            self._num_registered[child.request_id] = self._num_registered[parent.request_id]

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies made since the last call, in order: the runner copies their
        KV before the next forward writes into them."""
        copies, self._copies = self._copies, []
        return copies

    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)  # evict LRU
            block = self.blocks[block_id]
            del self._block_of_hash[block.block_hash]
            if self.record_kv_events:
                self._kv_events.append(BlockRemoved(block.block_hash))
            block.block_hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def cache_full_blocks(self, req: Request) -> None:
        """Registers the request's newly full, computed blocks under their chain hash."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        start = self._num_registered.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._chain_hashes(req, num_full)
        for i in range(start, num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self._block_of_hash:
                block.block_hash = hashes[i]
                self._block_of_hash[hashes[i]] = block.block_id
                if self.record_kv_events:
                    lo, hi = i * self.block_size, (i + 1) * self.block_size
                    self._kv_events.append(BlockStored(
                        hashes[i], hashes[i - 1] if i else None, tuple(req.all_token_ids[lo:hi]),
                        tuple(key[3] for key in block_media_keys(req.media_spans, lo, hi))))
        self._num_registered[req.request_id] = num_full

    def cached_block_ids(self, block_hashes: list[bytes]) -> list[int]:
        """The blocks holding the leading run of ``block_hashes`` that is in the cache (disaggregated prefill
        reads their KV out)."""
        block_ids = []
        for h in block_hashes:
            block_id = self._block_of_hash.get(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def import_blocks(self, block_hashes: list[bytes], token_ids: list[int] | None = None
                      ) -> list[tuple[int, bool]]:
        """Registers a chain of full blocks computed elsewhere (disaggregated decode): per hash, in order, (block
        id, whether the caller must now write its KV). Imported blocks are unreferenced (evictable, newest), so
        a request with that prefix admitted next finds them as a cache hit. Stops early when the pool is full
        of other requests' blocks. ``token_ids`` (the chain's tokens) only feed the KV events."""
        result = []
        for i, h in enumerate(block_hashes):
            block_id = self._block_of_hash.get(h)
            if block_id is not None:
                if self.blocks[block_id].ref_count == 0:
                    self._evictable.move_to_end(block_id)
                result.append((block_id, False))
                continue
            if len(self._free) + len(self._evictable) - sum(fill for _, fill in result) <= 0:
                break
            block_id = self._take_block()
            block = self.blocks[block_id]
            block.ref_count, block.block_hash = 0, h
            self._block_of_hash[h] = block_id
            self._evictable[block_id] = None
            if self.record_kv_events:
                lo, hi = i * self.block_size, (i + 1) * self.block_size
                self._kv_events.append(BlockStored(h, block_hashes[i - 1] if i else None,
                                                   tuple(token_ids[lo:hi]) if token_ids else (), ()))
            result.append((block_id, True))
        return result

    def free(self, req: Request) -> None:
        """Drops the request's refs; tail blocks first, so a request's tail is evicted before its head."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        req.block_ids = []
        self._num_registered.pop(req.request_id, None)
