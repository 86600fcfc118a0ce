"""AsyncEngine: steps in its own thread, media in a pool, aborts free KV blocks, limits, failures, shutdown."""
from __future__ import annotations

import asyncio
import io
import threading

import pytest
import torch
from PIL import Image

from encoders import MediaError
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.sampling import SamplingParams
from serve.engine_loop import ENGINE_DIED, AsyncEngine, EngineDeadError, NotReadyError, QueueFullError
from server_fixtures import png_bytes


def _front(checkpoint, max_queue_len: int = 8, **options) -> AsyncEngine:
    options = {"num_blocks": 300, "block_size": 8, **options}
    return AsyncEngine(lambda: Engine(EngineConfig(model=str(checkpoint), **options)), max_queue_len=max_queue_len)


def _run(front: AsyncEngine, body, timeout_s: float = 60.0):
    async def main():
        front.start()
        assert await front.wait_ready(60.0), front.load_error
        try:
            return await asyncio.wait_for(body(front), timeout_s)
        finally:
            await front.shutdown(grace_s=5.0)

    return asyncio.run(main())


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _num_aborted(front: AsyncEngine) -> float:
    return front.metrics.finished.labels(reason="abort")._value.get()


async def _aborted_and_freed(front: AsyncEngine, num_aborted: int = 1, timeout_s: float = 10.0) -> bool:
    """Polls until the engine thread has aborted ``num_aborted`` requests and published stats with no KV in use."""
    for _ in range(int(timeout_s / 0.02)):
        stats = front.stats
        if _num_aborted(front) >= num_aborted and stats.num_kv_blocks_used == 0 and stats.num_running == 0:
            return True
        await asyncio.sleep(0.02)
    return False


def test_concurrent_requests_match_transformers_greedy(tiny_checkpoint, hf_model, hf_processor):
    images = [png_bytes(30 + 7 * i, 40 - 3 * i, seed=i) for i in range(3)]
    lengths = [5, 9, 13]

    async def body(front):
        streams = [await front.submit("What is this?", [img], [], _greedy(n)) for img, n in zip(images, lengths)]
        return await asyncio.gather(*(s.result() for s in streams))

    outs = _run(_front(tiny_checkpoint), body)
    for out, data, n in zip(outs, images, lengths):
        ref_in = hf_processor(images=Image.open(io.BytesIO(data)), text="What is this?", return_tensors="pt",
                              return_legacy_image_output=False)
        with torch.no_grad():
            ref = hf_model.generate(**ref_in, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, ref_in["input_ids"].shape[1]:].tolist()
        assert out.finish_reason == "length" and out.usage.prompt_tokens == ref_in["input_ids"].shape[1]


def test_closing_a_stream_aborts_and_frees_its_blocks(tiny_checkpoint):
    async def body(front):
        stream = await front.submit("Tell me everything", params=_greedy(1500))
        seen = 0
        async for out in stream:
            seen += len(out.delta_token_ids)
            if seen >= 3:
                break
        assert front.stats.num_kv_blocks_used > 0
        stream.close()  # what the HTTP layer does on disconnect
        assert await _aborted_and_freed(front)
        return seen, front.num_active

    seen, num_active = _run(_front(tiny_checkpoint), body)
    assert seen >= 3 and num_active == 0


def test_cancelled_consumer_aborts(tiny_checkpoint):
    async def body(front):
        stream = await front.submit("Go on and on", params=_greedy(1500))
        first = asyncio.Event()

        async def consume():
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _aborted_and_freed(front)
        return _num_aborted(front), front.num_active

    assert _run(_front(tiny_checkpoint), body) == (1, 0)


def test_queue_limit_rejects_and_recovers(tiny_checkpoint):
    async def body(front):
        first = await front.submit("one", params=_greedy(400))
        with pytest.raises(QueueFullError):
            await front.submit("two", params=_greedy(4))
        await first.result()
        second = await front.submit("two", params=_greedy(4))
        return (await second.result()).finish_reason

    assert _run(_front(tiny_checkpoint, max_queue_len=0, max_num_seqs=1), body) == "length"


def test_bad_input_raises_and_releases(tiny_checkpoint):
    async def body(front):
        with pytest.raises(MediaError):
            await front.submit("What is <image>", [b"\xff\xd8\xff\xe0 not really a jpeg"], [], _greedy(4))
        with pytest.raises(ValueError, match="marker"):
            await front.submit("<image> <image>", [png_bytes(8, 8)], [], _greedy(4))
        with pytest.raises(ValueError, match="max_model_len"):
            await front.submit("word " * 200, params=_greedy(4))
        return front.num_active, front.stats.num_kv_blocks_used

    assert _run(_front(tiny_checkpoint, max_model_len=64), body) == (0, 0)


def test_media_decoding_does_not_block_the_engine(tiny_checkpoint):
    """While a worker is held inside build_prompt, a text request still runs to the end."""
    gate, entered = threading.Event(), threading.Event()

    def factory():
        engine = Engine(EngineConfig(model=str(tiny_checkpoint), num_blocks=128, block_size=8))
        build = engine.build_prompt

        def slow_build(text, images=(), videos=(), *more, **options):
            if images:
                entered.set()
                gate.wait(30)
            return build(text, images, videos, *more, **options)

        engine.build_prompt = slow_build
        return engine

    async def body(front):
        slow = asyncio.create_task(front.submit("x <image>", [png_bytes(16, 16)], [], _greedy(3)))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        fast = await (await front.submit("quick", params=_greedy(6))).result()
        still_waiting = not slow.done()
        gate.set()
        return fast.finish_reason, still_waiting, (await (await slow).result()).finish_reason

    assert _run(AsyncEngine(factory), body) == ("length", True, "length")


def test_a_failing_step_fails_its_requests_not_the_server(tiny_checkpoint):
    def factory():
        engine = Engine(EngineConfig(model=str(tiny_checkpoint), num_blocks=128, block_size=8))
        step, calls = engine.step, {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("device fell over")
            return step()

        engine.step = flaky_step
        return engine

    async def body(front):
        doomed = await front.submit("first", params=_greedy(50))
        with pytest.raises(EngineDeadError, match="failed while running this request") as failed:
            await doomed.result()
        assert "device fell over" not in str(failed.value)  # logged, not shown to the user
        after = await (await front.submit("second", params=_greedy(4))).result()
        return after.finish_reason, front.stats.num_kv_blocks_used

    assert _run(AsyncEngine(factory), body) == ("length", 0)


def test_load_failure_is_not_ready():
    def factory():
        raise ValueError("model folder '/nowhere' does not exist")

    async def main():
        front = AsyncEngine(factory)
        front.start()
        assert not await front.wait_ready(10.0)
        with pytest.raises(NotReadyError, match="nowhere"):
            await front.submit("x")
        await front.shutdown(0.1)

    asyncio.run(main())


def test_shutdown_aborts_what_is_still_running(tiny_checkpoint):
    async def main():
        front = _front(tiny_checkpoint)
        front.start()
        assert await front.wait_ready(60.0)
        stream = await front.submit("long", params=_greedy(1800))
        collect = asyncio.create_task(stream.result())
        await asyncio.sleep(0.05)
        await front.shutdown(grace_s=0.0)
        out = await asyncio.wait_for(collect, 10)
        with pytest.raises(NotReadyError):
            await front.submit("after")
        return out.finish_reason, front.stats.num_kv_blocks_used

    assert asyncio.run(main()) == ("abort", 0)


def _wrapped(checkpoint, **patches):
    """A factory whose engine has ``name`` replaced by ``patches[name](original)``."""
    def factory():
        engine = Engine(EngineConfig(model=str(checkpoint), num_blocks=300, block_size=8))
        for name, wrap in patches.items():
            setattr(engine, name, wrap(getattr(engine, name)))
        return engine

    return factory


def test_an_exception_outside_step_fails_open_streams_and_kills_the_engine(tiny_checkpoint):
    armed = threading.Event()

    def stats(original):
        def failing():
            if armed.is_set():
                raise RuntimeError("stats exploded")
            return original()
        return failing

    async def body(front):
        stream = await front.submit("long", params=_greedy(1500))
        async for _ in stream:
            break  # the request is running
        armed.set()
        with pytest.raises(EngineDeadError) as died:
            await asyncio.wait_for(stream.result(), 10)  # promptly, not never
        assert str(died.value) == ENGINE_DIED and "exploded" not in str(died.value)
        assert not front.is_ready and front.dead
        with pytest.raises(NotReadyError, match="restarted"):
            await asyncio.wait_for(front.submit("after", params=_greedy(2)), 1)  # at once
        return front.num_active

    assert _run(AsyncEngine(_wrapped(tiny_checkpoint, stats=stats)), body) == 0


def test_consecutive_failing_steps_kill_the_engine(tiny_checkpoint):
    def step(original):
        def failing():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return failing

    async def body(front):
        for k in range(3):
            assert front.is_ready
            stream = await front.submit(f"try {k}", params=_greedy(4))
            with pytest.raises(EngineDeadError) as failed:
                await asyncio.wait_for(stream.result(), 10)
            assert "CUDA" not in str(failed.value)
        assert str(failed.value) == ENGINE_DIED  # the third in a row
        assert not front.is_ready
        with pytest.raises(NotReadyError):
            await asyncio.wait_for(front.submit("after", params=_greedy(2)), 1)
        return front.num_active

    assert _run(AsyncEngine(_wrapped(tiny_checkpoint, step=step), max_step_failures=3), body) == 0


def test_a_stalled_reader_costs_one_pending_entry(tiny_checkpoint):
    num_tokens = 200

    async def body(front):
        streamed = await front.submit("Tell me a long story", params=_greedy(num_tokens))
        for _ in range(3000):  # nobody reads while the engine produces every token (30 s at most)
            if front.metrics.finished.labels(reason="length")._value.get() >= 1:
                break
            assert streamed.num_pending <= 1
            await asyncio.sleep(0.01)
        assert front.metrics.finished.labels(reason="length")._value.get() == 1
        assert streamed.num_pending == 1
        outs = [out async for out in streamed]
        whole = await (await front.submit("Tell me a long story", params=_greedy(num_tokens))).result()
        return outs, whole

    outs, whole = _run(_front(tiny_checkpoint), body)
    assert len(outs) == 1 and outs[0].finished  # every delta merged into the one pending output
    assert len(whole.token_ids) == num_tokens
    assert outs[0].delta_token_ids == whole.token_ids and outs[0].delta_text == whole.text


def test_streamed_deltas_add_up_to_the_final_text(tiny_checkpoint):
    async def body(front):
        stream = await front.submit("Describe", params=_greedy(40))
        outs = [out async for out in stream]
        return outs

    outs = _run(_front(tiny_checkpoint), body)
    assert len(outs) > 1 and outs[-1].finished
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids


def test_admission_bounds_requests_reading_at_once(tiny_checkpoint):
    async def body(front):
        first = await front.admit()
        with pytest.raises(QueueFullError, match="being read"):
            await front.admit(wait_s=0.1)
        waiting = asyncio.create_task(front.admit(wait_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done() and front.num_active == 1
        stream = await front.submit("x", params=_greedy(3), admission=first)  # its slot frees once it is added
        second = await asyncio.wait_for(waiting, 5)
        await stream.result()
        assert front.num_active == 1
        await second.__aexit__(None, None, None)  # never used: gives its place back
        return front.num_active

    assert _run(AsyncEngine(_wrapped(tiny_checkpoint), max_num_reading=1), body) == 0


def test_call_runs_on_the_engine_thread_and_hooks_follow_each_step(tiny_checkpoint):
    seen = []

    async def body(front):
        front.step_hooks.append(lambda engine: seen.append(threading.current_thread().name))
        name = await front.call(lambda engine: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await front.call(lambda engine: 1 / 0)
        stream = await front.submit("hello", params=_greedy(3))
        [out async for out in stream]
        return name

    assert _run(_front(tiny_checkpoint), body) == "fusionserve-engine"
    assert len(seen) >= 3 and set(seen) == {"fusionserve-engine"}


def test_a_stream_with_n2_yields_both_sequences_and_ends(tiny_checkpoint):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=21, ignore_eos=True, n=2)

    async def body(front):
        outs = [out async for out in await front.submit("Tell me two things", params=params)]
        singles = [await (await front.submit("Tell me two things", params=SamplingParams(
            max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True))).result() for seed in (21, 22)]
        return outs, singles, front.num_active

    outs, singles, num_active = _run(_front(tiny_checkpoint), body)
    finals = {out.index: out for out in outs if out.finished}
    assert sorted(finals) == [0, 1] and outs[-1].finished and num_active == 0
    for index, single in enumerate(singles):
        streamed = [out for out in outs if out.index == index]
        assert sum((out.delta_token_ids for out in streamed), []) == finals[index].token_ids == single.token_ids
        assert "".join(out.delta_text for out in streamed) == finals[index].text == single.text


def test_closing_an_n3_stream_aborts_every_sequence(tiny_checkpoint):
    async def body(front):
        stream = await front.submit("Go on", params=SamplingParams(max_tokens=1500, temperature=1.0, n=3,
                                                                   ignore_eos=True))
        seen = set()
        async for out in stream:
            seen.add(out.index)
            if len(seen) == 3:
                break
        stream.close()
        assert await _aborted_and_freed(front, num_aborted=3)
        return _num_aborted(front), front.num_active

    assert _run(_front(tiny_checkpoint), body) == (3, 0)
