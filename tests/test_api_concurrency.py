"""One ``LLM`` shared the ways applications share it: a thread pool, asyncio tasks, streams left half
read, Ctrl-C. Calls made together give what each gives alone (they batch; they never corrupt each
other), and a stream its reader leaves (``break``, collected, cancelled, interrupted) frees its KV
blocks within a step, so the next call neither waits for it nor runs beside it.

bfloat16 on the CPU kernels, which compute each row on its own: the rows of a step then do not depend
on how many there are (see test_generate_api's ``test_many_prompts_equal_one_at_a_time``)."""

from __future__ import annotations

import _thread
import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from qwenkit import kernels
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

PROMPTS = ["Hello", "The sky is", "def f(x):", "1 2 3", "Once upon a time", "abc"]
LONG = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # seconds of steps


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    if not kernels.available():
        pytest.skip("bf16 steps are batch-invariant only on the CPU kernels")
    with LLM.load(tiny_chat_model, dtype="bfloat16", progress=False) as llm:
        yield llm


def settings(i: int) -> SamplingParams:
    """Greedy, seeded and penalized sampling, and several lengths: one model, many settings."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=0, seed=i),
        dict(temperature=0.7, top_p=0.9, seed=100 + i, repetition_penalty=1.2),
    ]
    return SamplingParams(max_tokens=10 + i % 5, ignore_eos=True, **kinds[i % 3])


def key(c) -> tuple:
    return c.token_ids, c.text, c.finish_reason


def assert_all_freed(llm: LLM) -> None:
    assert llm.driver.wait_idle(timeout=5) and llm.engine.blocks.usage == 0


def test_a_thread_pool_sharing_one_llm_gets_what_each_call_gets_alone(llm):
    jobs = [(PROMPTS[i % len(PROMPTS)], settings(i)) for i in range(12)]
    alone = [llm.generate(p, sp)[0] for p, sp in jobs]
    # a stop string from the middle of each text: the text layer of every call is its own too
    stops = [c.text[len(c.text) // 2 :][:2] for c in alone]
    jobs += [(p, replace(sp, stop=(s,))) for (p, sp), s in zip(jobs, stops, strict=True) if s.strip()]
    alone += [llm.generate(p, sp)[0] for p, sp in jobs[len(alone) :]]
    assert any(c.finish_reason == "stop" for c in alone)

    def call(i: int):
        prompt, params = jobs[i]
        if i % 2:
            return llm.generate(prompt, params)[0]
        return list(llm.stream(prompt, params))[-1].completion

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(call, range(len(jobs))))
    assert [key(c) for c in together] == [key(c) for c in alone]
    assert_all_freed(llm)


def test_a_stream_left_by_break_or_collected_frees_its_blocks_at_once(llm):
    expected = llm.generate("The sky is", settings(0))[0].token_ids
    for delta in llm.stream("Once upon a time", LONG):
        assert delta.token_ids
        break
    assert_all_freed(llm)
    deltas = llm.stream("Once upon a time", LONG)
    next(deltas)
    del deltas
    gc.collect()
    assert_all_freed(llm)
    held = llm.submit("Once upon a time", LONG)
    for _ in held:
        break
    assert_all_freed(llm)
    assert not held.completion.finish_reason and len(held.completion.token_ids) < 4000
    assert llm.generate("The sky is", settings(0))[0].token_ids == expected


def test_ctrl_c_in_generate_or_a_stream_ends_its_requests(llm):
    def interrupt_once_running() -> None:
        deadline = time.monotonic() + 30
        while llm.engine.blocks.usage == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    for call in (lambda: llm.generate(PROMPTS[:3], LONG), lambda: list(llm.stream(PROMPTS[0], LONG))):
        kicker = threading.Thread(target=interrupt_once_running)
        kicker.start()
        with pytest.raises(KeyboardInterrupt):
            call()
        kicker.join()
        assert_all_freed(llm)


def test_asyncio_tasks_share_one_llm_and_a_left_or_cancelled_stream_frees_its_blocks(llm):
    alone = [llm.generate(p, settings(i))[0] for i, p in enumerate(PROMPTS)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # a blocking call from inside a running loop (a notebook cell) works: the engine has its own thread
        assert key(llm.generate(PROMPTS[0], settings(0))[0]) == key(alone[0])

        async def read(i: int, prompt: str):
            return [d async for d in llm.submit(prompt, settings(i), loop=loop)][-1].completion

        together = await asyncio.gather(*(read(i, p) for i, p in enumerate(PROMPTS)))
        assert [key(c) for c in together] == [key(c) for c in alone]

        async for _ in llm.submit(PROMPTS[0], LONG, loop=loop):
            break
        for _ in range(2):  # asyncio closes a left async generator (which aborts) in a task it schedules
            await asyncio.sleep(0)
        assert_all_freed(llm)

        async def read_all() -> None:
            async for _ in llm.submit(PROMPTS[0], LONG, loop=loop):
                pass

        task = asyncio.create_task(read_all())
        while llm.engine.blocks.usage == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_all_freed(llm)

    asyncio.run(main())


def test_llm_stream_is_read_with_async_for_inside_a_running_loop(llm):
    """``async for`` over ``llm.stream()`` in an async handler was a bare TypeError ("requires an object
    with __aiter__ method, got generator"); it now submits the request on the running loop."""
    alone = [llm.generate(p, settings(i))[0] for i, p in enumerate(PROMPTS[:3])]

    async def read(i: int, prompt: str):
        return [d async for d in llm.stream(prompt, settings(i))][-1].completion

    async def main() -> list:
        together = await asyncio.gather(*(read(i, p) for i, p in enumerate(PROMPTS[:3])))
        async for _ in llm.stream(PROMPTS[0], LONG):
            break
        for _ in range(2):  # asyncio closes the left async generator (which aborts) in a task it schedules
            await asyncio.sleep(0)
        assert_all_freed(llm)
        return together

    assert [key(c) for c in asyncio.run(main())] == [key(c) for c in alone]
    stream = llm.stream(PROMPTS[0], LONG)
    stream.close()  # before its first read: it never runs
    assert list(stream) == [] and not llm.engine.has_unfinished()
