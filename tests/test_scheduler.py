"""Scheduler driven by a fake model that writes and reads a paged 'KV' of token ids: budget, chunked prefill,
mixed steps, preemption, FCFS, abort. Outputs are checked against an unbatched, unpaged reference loop."""
from __future__ import annotations

import random

import pytest

from pipeline.block_manager import BlockManager
from pipeline.request import Request, RequestStatus
from pipeline.sampling import SamplingParams
from pipeline.scheduler import Scheduler, SchedulerOutput


def next_token(history: list[tuple[int, str | None]], index: int = 0) -> int:
    """The fake model: a function of every (token, media hash) before it; sequence ``index`` of a request with
    forks samples its own token from the same history (as a seeded sampler would)."""
    return hash((tuple(history), index)) % 1000


def reference_outputs(req: Request) -> list[int]:
    media = media_by_position(req)
    history = [(t, media.get(i)) for i, t in enumerate(req.prompt_token_ids)]
    out = []
    for _ in range(req.sampling_params.max_tokens):
        out.append(next_token(history, req.index))
        history.append((out[-1], None))
    return out


def media_by_position(req: Request) -> dict[int, str]:
    return {i: h for start, end, h in req.media_spans for i in range(start, end)}


class FakeRunner:
    """Writes each computed token into its paged slot; samples from what the slots hold, so a wrong block table
    or a wrong prefix-cache hit changes the output."""

    def __init__(self, bm: BlockManager):
        self.block_size = bm.block_size
        self.slots: dict[int, tuple[int, str | None]] = {}

    def slot(self, req: Request, pos: int) -> int:
        return req.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, out: SchedulerOutput) -> list[list[int]]:
        for src, dst in out.blocks_to_copy:  # copy on write, before anything is written
            for i in range(self.block_size):
                if src * self.block_size + i in self.slots:
                    self.slots[dst * self.block_size + i] = self.slots[src * self.block_size + i]
        sampled = []
        for req, num_new in zip(out.requests, out.num_new_tokens):
            start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
            assert 0 < num_new and end <= min(req.num_tokens, len(req.block_ids) * self.block_size)
            media = media_by_position(req)
            for pos in range(start, end):
                self.slots[self.slot(req, pos)] = (req.all_token_ids[pos], media.get(pos))
            history = [self.slots[self.slot(req, p)] for p in range(end)]
            sampled.append([next_token(history, seq.index) for seq in (req, *req.forks)] if end == req.num_tokens
                           else [])
        return sampled


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=128, **kw):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=kw.pop("prefix_caching", True))
    return Scheduler(bm, max_num_seqs, budget, max_model_len, **kw), FakeRunner(bm)


def make_req(rid, prompt_len, max_tokens=5, seed=0, media=(), atomic=()):
    rng = random.Random(seed)
    return Request(rid, [rng.randrange(1000) for _ in range(prompt_len)], SamplingParams(max_tokens=max_tokens),
                   media_spans=list(media), atomic_spans=list(atomic))


def drive(sched: Scheduler, runner: FakeRunner, max_steps=500, on_step=None) -> list[Request]:
    """The engine loop: schedule, run, update, stop at max_tokens. Returns requests in finishing order."""
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        ids = [id(r) for r in out.requests]
        assert len(ids) == len(set(ids)), "request scheduled twice in a step"
        assert out.num_batched_tokens <= sched.max_num_batched_tokens or len(out.requests) == 1  # a span alone
        assert len(out.requests) <= sched.max_num_seqs and sched.num_running <= sched.max_num_seqs
        assert not set(map(id, sched.running)) & set(map(id, sched.waiting)), "request in both queues"
        if on_step:
            on_step(out)
        sched.update_from_output(out, runner.run(out))
        for req in out.requests:
            if req.num_output_tokens >= req.sampling_params.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
                finished.append(req)
    assert not sched.has_unfinished(), "scheduler stalled"
    return finished


def test_budget_and_seq_limits_with_random_workload():
    sched, runner = make_scheduler(num_blocks=40, budget=24, max_num_seqs=4)
    reqs = [make_req(f"r{i}", prompt_len=3 + 7 * i % 40, max_tokens=1 + i % 6, seed=i) for i in range(12)]
    for r in reqs:
        sched.add(r)
    finished = drive(sched, runner)
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    for r in reqs:
        assert r.output_token_ids == reference_outputs(r)
        assert r.status == RequestStatus.FINISHED_LENGTH and r.block_ids == []
    assert sched.block_manager.num_free_blocks == 40


def test_chunked_prefill_spans_steps_and_image_splits_across_chunks():
    sched, runner = make_scheduler(budget=16)
    req = make_req("long", prompt_len=50, max_tokens=3, media=[(10, 40, "img")])
    sched.add(req)
    steps = []
    drive(sched, runner, on_step=lambda out: steps.append(list(out.num_new_tokens)))
    assert steps == [[16], [16], [16], [2], [1], [1]]  # the image [10, 40) is cut at 16 and 32
    assert req.output_token_ids == reference_outputs(req)


def test_prefill_chunks_mix_with_decodes():
    sched, runner = make_scheduler(budget=10)
    short = make_req("short", prompt_len=4, max_tokens=6, seed=1)
    sched.add(short)
    out = sched.schedule()
    sched.update_from_output(out, runner.run(out))
    long = make_req("long", prompt_len=30, max_tokens=2, seed=2)
    sched.add(long)
    mixed = []

    def record(out):
        if len(out.requests) == 2:
            mixed.append(dict(zip((r.request_id for r in out.requests), out.num_new_tokens)))

    drive(sched, runner, on_step=record)
    assert mixed[:3] == [{"short": 1, "long": 9}] * 3  # one decode + a prefill chunk per step
    for r in (short, long):
        assert r.output_token_ids == reference_outputs(r)


def test_chunked_prefill_off_schedules_whole_prompts():
    sched, runner = make_scheduler(budget=20, enable_chunked_prefill=False, max_model_len=20)
    a, b = make_req("a", prompt_len=12, max_tokens=3, seed=1), make_req("b", prompt_len=12, max_tokens=3, seed=2)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert first.requests == [a] and first.num_new_tokens == [12]  # b's 12 tokens do not fit the 8 left
    sched.update_from_output(first, runner.run(first))
    second = sched.schedule()
    assert second.requests == [a, b] and second.num_new_tokens == [1, 12]
    sched.update_from_output(second, runner.run(second))
    drive(sched, runner)
    assert a.output_token_ids == reference_outputs(a) and b.output_token_ids == reference_outputs(b)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_newest_first_no_loss_no_duplication(prefix_caching):
    sched, runner = make_scheduler(num_blocks=10, block_size=4, budget=64, max_num_seqs=8,
                                   prefix_caching=prefix_caching)
    reqs = [make_req(f"r{i}", prompt_len=9, max_tokens=14, seed=i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    preemptions = []

    def check(out):
        for victim in out.preempted:
            assert victim.status == RequestStatus.WAITING and victim.block_ids == []
            assert victim.num_computed_tokens == 0 and victim not in out.requests
            assert sched.waiting[0] is out.preempted[-1]
            assert all(r.arrival_time <= victim.arrival_time for r in sched.running)  # newest went first
            preemptions.append(victim.request_id)
        if not prefix_caching:  # every block has one owner
            owned = [b for r in sched.running for b in r.block_ids]
            assert len(owned) == len(set(owned))

    finished = drive(sched, runner, on_step=check)
    assert preemptions and sched.num_preemptions == len(preemptions)
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2"]
    for r in reqs:
        assert r.output_token_ids == reference_outputs(r) and len(r.output_token_ids) == 14
    assert sched.block_manager.num_free_blocks == 10


def test_fcfs_admission_and_head_of_line():
    sched, runner = make_scheduler(max_num_seqs=1, budget=64)
    reqs = [make_req(f"r{i}", prompt_len=5 + i, max_tokens=2, seed=i) for i in range(4)]
    for r in reqs:
        sched.add(r)
    finished = drive(sched, runner)
    assert [r.request_id for r in finished] == ["r0", "r1", "r2", "r3"]

    sched, runner = make_scheduler(num_blocks=8, block_size=4, budget=64)
    big, small = make_req("big", prompt_len=20, max_tokens=4), make_req("small", prompt_len=2, max_tokens=4)
    hog = make_req("hog", prompt_len=16, max_tokens=4)
    for r in (hog, big, small):
        sched.add(r)
    out = sched.schedule()
    assert out.requests == [hog]  # big does not fit the 4 free blocks; small must not jump ahead of it
    assert list(sched.waiting) == [big, small]


def test_prefix_hit_is_reported_and_outputs_stay_correct():
    sched, runner = make_scheduler(block_size=4)
    first = make_req("first", prompt_len=21, max_tokens=3, seed=7, media=[(2, 14, "img")])
    sched.add(first)
    drive(sched, runner)
    again = Request("again", first.prompt_token_ids[:18] + [1, 2, 3], SamplingParams(max_tokens=3),
                    media_spans=[(2, 14, "img")])
    other_img = Request("other", list(again.prompt_token_ids), SamplingParams(max_tokens=3),
                        media_spans=[(2, 14, "img-2")])
    for r in (again, other_img):
        sched.add(r)
    drive(sched, runner)
    assert again.num_cached_tokens == 16 and other_img.num_cached_tokens == 0
    for r in (again, other_img):
        assert r.output_token_ids == reference_outputs(r)
    bm = sched.block_manager
    assert bm.num_hit_tokens == 16 and bm.num_free_blocks == bm.num_blocks


def test_abort_frees_blocks_from_both_queues():
    sched, runner = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=1)
    running, waiting = make_req("run", prompt_len=10), make_req("wait", prompt_len=10)
    sched.add(running)
    sched.add(waiting)
    out = sched.schedule()
    sched.update_from_output(out, runner.run(out))
    assert sched.num_running == 1 and sched.num_waiting == 1 and sched.block_manager.num_used_blocks == 3
    assert sched.abort("run") is running and running.status.finish_reason == "abort"
    assert sched.abort("wait") is waiting and waiting.status == RequestStatus.FINISHED_ABORTED
    assert sched.abort("nope") is None
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 12


def test_abort_mid_step_skips_update():
    sched, runner = make_scheduler()
    req = make_req("a", prompt_len=6)
    sched.add(req)
    out = sched.schedule()
    sampled = runner.run(out)
    sched.abort("a")
    sched.update_from_output(out, sampled)
    assert req.output_token_ids == [] and sched.block_manager.num_used_blocks == 0


def test_reject_reason_for_requests_that_can_never_run():
    sched, _ = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    assert sched.reject_reason(make_req("ok", prompt_len=10, max_tokens=6)) is None
    assert "max_model_len" in sched.reject_reason(make_req("long", prompt_len=64))
    assert "KV blocks" in sched.reject_reason(make_req("pool", prompt_len=10, max_tokens=7))
    nochunk, _ = make_scheduler(budget=8, enable_chunked_prefill=False)
    assert "max_num_batched_tokens" in nochunk.reject_reason(make_req("big", prompt_len=6, max_tokens=3))


def _chunks_split(sched, runner, reqs):
    """Drives the requests; returns, per request, the spans any step's chunk cut inside, and the steps."""
    cuts, steps = {r.request_id: [] for r in reqs}, []

    def check(out):
        steps.append([(r.request_id, n) for r, n in zip(out.requests, out.num_new_tokens)])
        for req, n in zip(out.requests, out.num_new_tokens):
            end = req.num_computed_tokens + n
            cuts[req.request_id] += [(s, e) for s, e in req.atomic_spans if s < end < e]

    finished = drive(sched, runner, on_step=check)
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    for req in reqs:
        assert req.output_token_ids == reference_outputs(req)
    return cuts, steps


def test_atomic_spans_are_never_split_across_chunks():
    sched, runner = make_scheduler(num_blocks=80, budget=16, max_num_seqs=6)
    reqs = [make_req(f"r{i}", prompt_len=40, seed=i, media=[(5 + i, 17 + i, f"m{i}"), (25, 34, f"n{i}")],
                     atomic=[(5 + i, 17 + i), (25, 34)]) for i in range(6)]
    for r in reqs:
        sched.add(r)
    cuts, steps = _chunks_split(sched, runner, reqs)
    assert cuts == {r.request_id: [] for r in reqs}
    assert all(sum(n for _, n in step) <= 16 for step in steps)


def test_a_span_longer_than_the_budget_runs_alone():
    sched, runner = make_scheduler(num_blocks=80, budget=8, max_num_seqs=4)
    small = [make_req(f"s{i}", prompt_len=6, max_tokens=8, seed=i) for i in range(3)]
    big = make_req("big", prompt_len=30, seed=9, media=[(4, 24, "img")], atomic=[(4, 24)])
    for r in [*small, big]:
        sched.add(r)
    cuts, steps = _chunks_split(sched, runner, [*small, big])
    assert cuts["big"] == []
    alone = [step for step in steps if ("big", 20) in step]
    assert alone == [[("big", 20)]]


def test_a_prefix_hit_ending_inside_a_span_schedules_the_rest_of_it_whole():
    sched, runner = make_scheduler(num_blocks=80, budget=32, block_size=4)
    first = make_req("a", prompt_len=30, seed=3, media=[(6, 22, "img")], atomic=[(6, 22)])
    sched.add(first)
    drive(sched, runner)
    again = make_req("b", prompt_len=30, seed=3, media=[(6, 22, "img")], atomic=[(6, 22)])
    again.prompt_token_ids[15] = (again.prompt_token_ids[15] + 1) % 1000  # blocks from position 12 on differ
    again.all_token_ids[15] = again.prompt_token_ids[15]
    sched.max_num_batched_tokens = 12
    sched.add(again)
    cuts, steps = _chunks_split(sched, runner, [again])
    assert again.num_cached_tokens == 12  # the hit ends inside the span [6, 22)
    assert steps[0][0][0] == "b" and steps[0][0][1] >= 10  # the rest of the span, whole, in the first step
    assert cuts["b"] == []


def test_a_waiting_span_longer_than_the_budget_is_admitted_alone_while_others_decode():
    sched, runner = make_scheduler(num_blocks=80, budget=32, max_num_seqs=4)
    long_decode = make_req("a", prompt_len=4, max_tokens=100, seed=1)
    big = make_req("b", prompt_len=42, seed=2, media=[(0, 40, "img")], atomic=[(0, 40)])
    behind = make_req("c", prompt_len=2, seed=3)
    for r in (long_decode, big, behind):
        sched.add(r)
    cuts, steps = _chunks_split(sched, runner, [long_decode, big, behind])
    first_b = next(i for i, step in enumerate(steps) if any(rid == "b" for rid, _ in step))
    assert steps[first_b] == [("b", 40)]  # alone
    assert first_b < 10  # not after "a" finished its 100 tokens
    assert cuts["b"] == []


def make_group(rid, prompt_len, n, max_tokens=6, seed=0):
    """A request with n sequences, as the engine makes them: the first holds the others as its forks."""
    seqs = [make_req(f"{rid}#{i}", prompt_len, max_tokens=max_tokens, seed=seed) for i in range(n)]
    for i, seq in enumerate(seqs):
        seq.index, seq.parent_id = i, rid
    seqs[0].forks = seqs[1:]
    return seqs


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_forks_share_the_prompt_and_copy_its_partial_block_on_write(prefix_caching):
    sched, runner = make_scheduler(num_blocks=40, block_size=4, prefix_caching=prefix_caching)
    seqs = make_group("g", prompt_len=10, n=4)  # blocks [0, 4) [4, 8) full, [8, 10) partly filled
    sched.add(seqs[0])
    steps = []

    def check(out):
        steps.append(out)
        if len(steps) == 2:  # the first decode of the forked sequences
            assert sorted(out.requests, key=lambda r: r.index) == seqs
            assert len(out.blocks_to_copy) == 3  # three copies of the shared partial block; the last writes it
            shared = seqs[0].block_ids[:2]
            assert all(seq.block_ids[:2] == shared for seq in seqs)
            assert [sched.block_manager.blocks[b].ref_count for b in shared] == [4, 4]
            partial = [seq.block_ids[2] for seq in seqs]
            assert len(set(partial)) == 4 and {src for src, _ in out.blocks_to_copy} == set(partial) - {
                dst for _, dst in out.blocks_to_copy}

    finished = drive(sched, runner, on_step=check)
    assert sorted(finished, key=lambda r: r.index) == seqs
    assert steps[0].requests == [seqs[0]] and steps[0].num_new_tokens == [10]
    assert sched.num_prefill_tokens == 10  # the prompt once, not four times
    for seq in seqs:
        assert seq.output_token_ids == reference_outputs(seq)
    assert len({tuple(seq.output_token_ids) for seq in seqs}) == 4
    assert sched.block_manager.num_free_blocks == 40


def test_a_prompt_that_fills_its_last_block_forks_without_copies():
    sched, runner = make_scheduler(num_blocks=40, block_size=4)
    seqs = make_group("g", prompt_len=8, n=3)
    sched.add(seqs[0])
    copies = []
    drive(sched, runner, on_step=lambda out: copies.extend(out.blocks_to_copy))
    assert copies == [] and sched.num_prefill_tokens == 8
    for seq in seqs:
        assert seq.output_token_ids == reference_outputs(seq)


def test_forked_sequences_are_preempted_and_recomputed_on_their_own():
    sched, runner = make_scheduler(num_blocks=9, block_size=4, budget=64)
    seqs = make_group("g", prompt_len=10, n=3, max_tokens=12)  # 3 x 22 tokens: more blocks than the pool holds
    other = make_req("other", prompt_len=5, max_tokens=12, seed=5)
    sched.add(seqs[0])
    sched.add(other)
    preempted = []
    drive(sched, runner, on_step=lambda out: preempted.extend(out.preempted))
    assert any(seq in preempted for seq in seqs[1:])
    for seq in (*seqs, other):
        assert seq.output_token_ids == reference_outputs(seq)
    assert sched.num_prefill_tokens > 10 + 5  # recomputes count
    assert sched.block_manager.num_free_blocks == 9


def test_a_request_with_forks_is_admitted_when_all_its_sequences_fit():
    sched, runner = make_scheduler(max_num_seqs=4, budget=64)
    first = make_req("first", prompt_len=4, max_tokens=3)
    seqs = make_group("g", prompt_len=6, n=4, max_tokens=3)
    for req in (first, seqs[0]):
        sched.add(req)
    out = sched.schedule()
    assert out.requests == [first] and sched.num_running_seqs == 1  # 1 + 4 sequences exceed max_num_seqs
    sched.update_from_output(out, runner.run(out))
    drive(sched, runner)  # asserts num_running <= max_num_seqs at every step
    for seq in seqs:
        assert seq.output_token_ids == reference_outputs(seq)
    assert "max_num_seqs" in sched.reject_reason(make_group("big", prompt_len=4, n=5)[0])
