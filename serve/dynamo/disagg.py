"""Disaggregated prefill -> decode: the prompt's KV blocks move from the prefill worker to the decode worker.

Dynamo's prefill router sends a request to a prefill worker first (max_tokens=1), then to a decode worker
with the prefill's terminal ``disaggregated_params`` in ``prefill_result``. The transfer is ours, and the
engine needs no change for it:
- prefill: the prompt runs; its full blocks enter the prefix cache (evictable, by chain hash). The handoff
  names the prefill's rank in the transfer group and the blocks' chain hashes.
- decode: the worker builds the same prompt (same hashes), asks the prefill's rank for those blocks, and the
  prefill's serving thread answers with the leading run still in its cache (``cached_block_ids``), read on
  its engine thread. The decode worker registers them (``import_blocks``), writes their K/V into the block ids
  it got, on its engine thread, then adds the request: the prefix cache hit covers the transferred blocks,
  and it computes only the rest (the last, partial block at least) and generates, token-identical to an
  aggregated worker.

Transport: ``torch.distributed`` point-to-point in one group of all prefill and decode workers, gloo over
TCP (CPU tensors; on CUDA the blocks are staged through host memory). Every message is a fixed-shape
tensor: a request ``[2] int64`` (number of hashes, request tag), the hashes ``[n, 32] uint8``; the answer
``[1] int64`` (blocks sent), then per distinct layer cache (KV-sharing layers share one) its K and V rows of
those blocks as raw bytes. Each decode worker holds one transfer at a time.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
_REQUEST_TAG = 1
_HASH_LEN = 32


def layer_caches(runner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The distinct (K, V) pools of the model runner, in layer order (a KV-sharing layer reuses its source's)."""
    seen, caches = set(), []
    for k, v in zip(runner.k_caches, runner.v_caches):
        if k.data_ptr() not in seen:
            seen.add(k.data_ptr())
            caches.append((k, v))
    return caches


def read_blocks(engine, block_hashes: list[bytes]) -> list[torch.Tensor]:
    """Engine thread: per distinct cache, ``[2, n, block_size, kv_heads, head_dim]`` of the leading run of
    ``block_hashes`` still cached (n may be short of all, 0 included), on the CPU."""
    ids = engine.block_manager.cached_block_ids(block_hashes)
    index = torch.tensor(ids, dtype=torch.long)
    return [torch.stack([k[index.to(k.device)], v[index.to(v.device)]]).cpu() for k, v in layer_caches(engine.runner)]


def write_blocks(engine, block_hashes: list[bytes], token_ids: list[int], kv: list[torch.Tensor]) -> int:
    """Engine thread: registers the chain as cached blocks and writes the K/V of those that were not cached
    yet; returns how many blocks the cache now holds of the chain."""
    placed = engine.block_manager.import_blocks(block_hashes, token_ids)
    for (k, v), rows in zip(layer_caches(engine.runner), kv):
        for i, (block_id, must_write) in enumerate(placed):
            if must_write:
                k[block_id].copy_(rows[0, i])
                v[block_id].copy_(rows[1, i])
    return len(placed)


class KvTransfer:
    """One worker's end of the transfer group. ``serve``: a thread answers block requests (prefill)."""

    def __init__(self, front, master: str, rank: int, world_size: int, serve: bool, timeout_s: float = 600.0):
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--kv-transfer-master must be host:port, got {master!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"--kv-transfer-rank must be in [0, {world_size}), got {rank}")
        self.front, self.rank, self.world_size, self.serve = front, rank, world_size, serve
        self.init_method, self.timeout_s = f"tcp://{host}:{port}", timeout_s
        self._lock = asyncio.Lock()  # one pull at a time on this worker
        self._tags = itertools.count(2)
        self._thread: threading.Thread | None = None
        self._closed = False

    async def connect(self) -> None:
        """Joins the group (waits for every member) off the event loop, then starts serving."""
        await asyncio.get_running_loop().run_in_executor(None, lambda: dist.init_process_group(
            "gloo", init_method=self.init_method, rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=self.timeout_s)))
        logger.info("KV transfer: rank %d of %d joined %s", self.rank, self.world_size, self.init_method)
        if self.serve:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._serve, name="fusionserve-kv-transfer", daemon=True)
            self._thread.start()

    def handoff(self, block_hashes: list[bytes]) -> dict:
        """The prefill terminal's ``disaggregated_params``."""
        return {"fusionserve_kv": {"rank": self.rank, "block_hashes": [h.hex() for h in block_hashes]}}

    async def pull(self, prefill_result: dict, prompt) -> int:
        """Decode: fetches the prompt's blocks from the prefill worker and imports them; returns how many."""
        from serve.dynamo.kv_events import prompt_block_hashes

        params = (prefill_result.get("disaggregated_params") or {}).get("fusionserve_kv")
        if not isinstance(params, dict):
            raise ValueError("prefill_result.disaggregated_params has no fusionserve_kv handoff; is the prefill "
                             "worker a fusionserve one?")
        block_size = self.front.engine.block_manager.block_size
        hashes = prompt_block_hashes(prompt, block_size)
        if [h.hex() for h in hashes] != params.get("block_hashes"):
            raise ValueError("the prefill worker's prompt blocks differ from this worker's (another checkpoint, "
                             "block size or prompt?)")
        if not hashes:
            return 0
        caches = layer_caches(self.front.engine.runner)
        async with self._lock:
            kv = await asyncio.get_running_loop().run_in_executor(
                None, self._fetch, int(params["rank"]), hashes, caches)
        if kv is None:
            return 0
        num = kv[0].shape[1]
        tokens = prompt.token_ids[:num * block_size]
        return await self.front.call(lambda engine: write_blocks(engine, hashes[:num], tokens, kv))

    def _fetch(self, src: int, hashes: list[bytes], caches) -> list[torch.Tensor] | None:
        tag = next(self._tags)
        dist.send(torch.tensor([len(hashes), tag], dtype=torch.long), src, tag=_REQUEST_TAG)
        dist.send(_hash_tensor(hashes), src, tag=tag)
        count = torch.zeros(1, dtype=torch.long)
        dist.recv(count, src, tag=tag)
        num = int(count.item())
        if num == 0:
            return None
        kv = []
        for k, _ in caches:
            rows = torch.empty((2, num) + tuple(k.shape[1:]), dtype=k.dtype)
            dist.recv(_bytes(rows), src, tag=tag)
            kv.append(rows)
        return kv

    def _serve(self) -> None:
        header = torch.zeros(2, dtype=torch.long)
        while not self._closed:
            try:
                src = dist.recv(header, tag=_REQUEST_TAG)
            except RuntimeError:
                if not self._closed:
                    logger.exception("KV transfer: the serving thread stopped")
                return
            num, tag = int(header[0]), int(header[1])
            hashes_t = torch.empty((num, _HASH_LEN), dtype=torch.uint8)
            dist.recv(hashes_t, src, tag=tag)
            hashes = [bytes(row.tolist()) for row in hashes_t]
            try:
                kv = asyncio.run_coroutine_threadsafe(
                    self.front.call(lambda engine: read_blocks(engine, hashes)), self._loop).result()
            except Exception:
                logger.exception("KV transfer: reading blocks for rank %d failed; it recomputes them", src)
                kv = []
            num_sent = kv[0].shape[1] if kv else 0
            dist.send(torch.tensor([num_sent], dtype=torch.long), src, tag=tag)
            for rows in kv if num_sent else ():
                dist.send(_bytes(rows.contiguous()), src, tag=tag)

    def close(self) -> None:
        self._closed = True
        if dist.is_initialized():
            dist.destroy_process_group()


def _hash_tensor(hashes: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8).view(len(hashes), _HASH_LEN)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as uint8 (gloo moves any dtype as bytes this way)."""
    return t.view(torch.uint8)
