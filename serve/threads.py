"""The server's CPU thread budget: torch intra-op threads + media workers x decoder threads = the cores.

Each media worker decodes one request at a time with ``decoder_threads`` FFmpeg threads, and the engine
thread's torch ops use ``torch_threads``; together they fill the CPUs this process may run on (its
affinity mask), so neither starves the other. Defaults: a quarter of the cores for media (1 to 4
workers), the rest for torch. ``--torch-threads`` / ``--media-workers`` override one
side and the other gets what is left; given both, they are used as given (and a sum over the cores
is logged as a warning).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)
MAX_DEFAULT_MEDIA_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadBudget:
    num_cpus: int
    torch_threads: int
    media_workers: int
    decoder_threads: int

    @property
    def num_threads(self) -> int:
        return self.torch_threads + self.media_workers * self.decoder_threads

    def describe(self) -> str:
        return (f"{self.torch_threads} torch threads + {self.media_workers} media workers x {self.decoder_threads} "
                f"decoder thread(s) = {self.num_threads} on {self.num_cpus} CPUs")


def thread_budget(num_cpus: int, decoder_threads: int = 1, torch_threads: int | None = None,
                  media_workers: int | None = None) -> ThreadBudget:
    for name, value in (("num_cpus", num_cpus), ("decoder_threads", decoder_threads),
                        ("torch_threads", torch_threads), ("media_workers", media_workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if media_workers is None:
        if torch_threads is None:  # a quarter of the cores, 1..4 workers
            media_workers = min(MAX_DEFAULT_MEDIA_WORKERS, max(1, num_cpus // 4 // decoder_threads))
        else:
            media_workers = max(1, (num_cpus - torch_threads) // decoder_threads)
    if torch_threads is None:
        torch_threads = max(1, num_cpus - media_workers * decoder_threads)
    return ThreadBudget(num_cpus, torch_threads, media_workers, decoder_threads)


def apply_thread_budget(budget: ThreadBudget) -> None:
    """Sets torch's intra-op threads for the whole process (server start only; the media workers are the
    ServerConfig's ``num_preprocess_workers``)."""
    import torch

    torch.set_num_threads(budget.torch_threads)
    if budget.num_threads > budget.num_cpus:
        logger.warning("thread budget over the machine: %s", budget.describe())
