"""The server's CPU thread budget: torch threads + media workers x decoder threads add up to the CPUs."""
from __future__ import annotations

import pytest

from serve.cli import build_parser
from serve.threads import available_cpus, thread_budget


@pytest.mark.parametrize("num_cpus, decoder_threads, torch_threads, media_workers, expected", [
    (2, 1, None, None, (1, 1)),
    (4, 1, None, None, (3, 1)),
    (16, 1, None, None, (12, 4)),
    (64, 1, None, None, (60, 4)),  # media workers stop at 4 by default
    (16, 2, None, None, (12, 2)),  # a quarter of the cores for media
    (16, 1, 10, None, (10, 6)),  # torch given: media get the rest
    (16, 2, 10, None, (10, 3)),
    (16, 1, None, 2, (14, 2)),  # media given: torch gets the rest
    (16, 3, None, 5, (1, 5)),  # over the machine: torch keeps one thread
    (8, 1, 8, 8, (8, 8)),  # both given: as given
])
def test_budget(num_cpus, decoder_threads, torch_threads, media_workers, expected):
    budget = thread_budget(num_cpus, decoder_threads, torch_threads, media_workers)
    assert (budget.torch_threads, budget.media_workers) == expected
    if (torch_threads is None or media_workers is None) and budget.media_workers * decoder_threads < num_cpus:
        assert budget.num_threads == num_cpus  # adds up to the machine
    assert f"= {budget.num_threads} on {num_cpus} CPUs" in budget.describe()


@pytest.mark.parametrize("bad", [{"num_cpus": 0}, {"torch_threads": 0}, {"media_workers": -1},
                                 {"decoder_threads": 1.5}, {"torch_threads": True}])
def test_bad_budget_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        thread_budget(**{"num_cpus": 4, **bad})


def test_cli_options_and_the_machine():
    args = build_parser().parse_args(["serve", "--torch-threads", "3", "--media-workers", "2"])
    assert (args.torch_threads, args.media_workers) == (3, 2)
    assert 1 <= available_cpus() <= (__import__("os").cpu_count() or 1)

