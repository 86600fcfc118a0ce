"""Our block manager's cache events -> Dynamo KV events in the frontend's token space.

Dynamo's KV router hashes the ``token_ids`` the frontend sent (the rendered chat text, no media rows) block by
block, and matches them against the tokens of the blocks a worker says it holds. Our blocks hold another
stream: the family's layout (a BOS, media placeholder runs, the beginning-of-answer id). So each request
registers its **routing chain**: the frontend's ids cut into blocks of the router's block size, each block
anchored to the one of our blocks (by chain hash) whose presence in our cache means we hold its prefix:
- the leading run where the frontend ids equal ours (after our BOS) maps token for token: a routing block is
  anchored at our block holding its last token;
- past the first difference (the first media item), the frontend's text has only the template's placeholder
  text where we hold pixels; the remaining routing blocks are anchored at the prompt's last full block, whose
  chain hash covers every media content hash before it. The router thus counts them as held only while this
  worker holds the whole prompt prefix with those very media.

A routing block is published (``publish_stored``, with its parent) when its first anchor enters our cache,
and removed (``publish_removed``) when its last anchor is evicted. Routing block hashes are a chain of
SHA-256 over the frontend ids, as 63-bit ints, so equal prefixes of two requests give the same ids.
The frontend sends no media identity for our families (its ids hold the template's placeholder text), so the
events carry none either (no ``block_mm_infos``): two requests with the same text and other images look alike
to the router, and the second then misses in our cache (correct output, a lost hit).
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from pipeline.block_manager import BlockRemoved, BlockStored, block_media_keys, hash_block
from tokenization import Prompt


@dataclass(frozen=True, slots=True)
class RoutingBlock:
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


def prompt_block_hashes(prompt: Prompt, block_size: int) -> list[bytes]:
    """Chain hashes of the prompt's full blocks, as the block manager computes them at admission."""
    spans = [(m.start, m.end, m.content_hash) for m in prompt.media]
    hashes: list[bytes] = []
    for start in range(0, len(prompt.token_ids) - block_size + 1, block_size):
        end = start + block_size
        hashes.append(hash_block(hashes[-1] if hashes else None, prompt.token_ids[start:end],
                                 block_media_keys(spans, start, end)))
    return hashes


def routing_chain(frontend_ids: list[int], prompt: Prompt, block_size: int, bos_token_id: int
                  ) -> list[tuple[RoutingBlock, bytes]]:
    """(routing block, our anchor block's hash) for each full block of ``frontend_ids`` that has an anchor."""
    ours = prompt.token_ids
    hashes = prompt_block_hashes(prompt, block_size)
    if not hashes:
        return []
    shift = int(bool(ours) and ours[0] == bos_token_id and frontend_ids[:1] != [bos_token_id])
    num_equal = 0
    while (num_equal < len(frontend_ids) and num_equal + shift < len(ours)
           and frontend_ids[num_equal] == ours[num_equal + shift]):
        num_equal += 1
    chain, parent, digest = [], None, b""
    for end in range(block_size, len(frontend_ids) + 1, block_size):
        anchor = (end - 1 + shift) // block_size if end <= num_equal else len(hashes) - 1
        if anchor >= len(hashes):
            break
        tokens = tuple(frontend_ids[end - block_size:end])
        digest = hashlib.sha256(digest + repr(tokens).encode()).digest()
        block = RoutingBlock(int.from_bytes(digest[:8], "little") >> 1, parent, tokens)
        chain.append((block, hashes[anchor]))
        parent = block.block_hash
    return chain


class KvEventTranslator:
    """Keeps the routing blocks anchored to our blocks and publishes their changes. ``register`` runs on the
    event loop, ``apply`` on the engine thread (a step hook): both under one lock. Before a publisher is
    attached, what would be published waits in order."""

    def __init__(self, publisher=None):
        self._lock = threading.Lock()
        self._publisher = publisher
        self._pending: list[tuple[str, object]] = []
        self._anchored: dict[bytes, dict[int, RoutingBlock]] = {}  # our hash -> routing blocks it holds
        self._refs: dict[int, int] = {}  # routing hash -> anchors of it in our cache
        self._stored: set[bytes] = set()  # our hashes in our cache
        self._pins: dict[bytes, int] = {}  # our hash -> requests in flight that registered blocks on it
        self.num_stored_published = 0
        self.num_removed_published = 0

    def attach(self, publisher) -> None:
        with self._lock:
            self._publisher = publisher
            pending, self._pending = self._pending, []
            for kind, payload in pending:
                self._send(kind, payload)

    def register(self, chain: list[tuple[RoutingBlock, bytes]]) -> None:
        """A request's chain, before it is added to the engine; ``release`` it when the request ends."""
        with self._lock:
            for anchor in dict.fromkeys(anchor for _, anchor in chain):
                self._pins[anchor] = self._pins.get(anchor, 0) + 1
            for block, anchor in chain:
                held = self._anchored.setdefault(anchor, {})
                if block.block_hash not in held:
                    held[block.block_hash] = block
                    if anchor in self._stored:
                        self._hold(block)

    def release(self, chain: list[tuple[RoutingBlock, bytes]]) -> None:
        """The request ended: anchors no request counts on and not in our cache are forgotten."""
        with self._lock:
            for anchor in dict.fromkeys(anchor for _, anchor in chain):
                self._pins[anchor] -= 1
                if not self._pins[anchor]:
                    del self._pins[anchor]
                    if anchor not in self._stored:
                        self._anchored.pop(anchor, None)

    def apply(self, events: list[BlockStored | BlockRemoved]) -> None:
        with self._lock:
            for event in events:
                if isinstance(event, BlockStored):
                    if event.block_hash not in self._stored:
                        self._stored.add(event.block_hash)
                        for block in self._anchored.get(event.block_hash, {}).values():  # parents first
                            self._hold(block)
                elif event.block_hash in self._stored:
                    self._stored.discard(event.block_hash)
                    held = self._anchored.get(event.block_hash, {})
                    for block in reversed(held.values()):  # children first
                        self._drop(block)
                    if event.block_hash not in self._pins:
                        self._anchored.pop(event.block_hash, None)

    def _hold(self, block: RoutingBlock) -> None:
        self._refs[block.block_hash] = self._refs.get(block.block_hash, 0) + 1
        if self._refs[block.block_hash] == 1:
            self._send("stored", block)

    def _drop(self, block: RoutingBlock) -> None:
        self._refs[block.block_hash] -= 1
        if not self._refs[block.block_hash]:
            del self._refs[block.block_hash]
            self._send("removed", block)

    def _send(self, kind: str, block: RoutingBlock) -> None:
        if self._publisher is None:
            self._pending.append((kind, block))
        elif kind == "stored":
            self._publisher.publish_stored(token_ids=list(block.token_ids), num_block_tokens=[len(block.token_ids)],
                                           block_hashes=[block.block_hash], parent_hash=block.parent_hash)
            self.num_stored_published += 1
        else:
            self._publisher.publish_removed(block_hashes=[block.block_hash])
            self.num_removed_published += 1
