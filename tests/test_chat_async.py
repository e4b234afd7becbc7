"""The chat API read with ``async for`` inside a running event loop (an async web handler): ``chat_stream``,
``ChatSession.stream`` and ``ChatSession.ask`` were plain generators, so ``async for`` over them was
Python's bare TypeError. Read either way they give the same Deltas, token for token, and leave the same
history; a stream left mid-way frees its KV blocks and leaves the history as the ``for`` path leaves it."""

from __future__ import annotations

import asyncio
import gc

import pytest

from qwenkit.chat import ChatSession, chat_stream
from qwenkit.engine import SamplingParams
from qwenkit.engine.driver import StreamKindError
from qwenkit.generate import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=0, seed=7, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # seconds of steps
USER = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    with LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False) as llm:
        yield llm


def key(deltas) -> list[tuple]:
    done = deltas[-1].completion
    return [(d.text, d.reasoning, d.finish_reason) for d in deltas] + [(done.token_ids, done.text)]


def assert_all_freed(llm: LLM) -> None:
    assert llm.driver.wait_idle(timeout=5) and llm.engine.blocks.usage == 0


def collect(stream) -> list:
    async def main() -> list:
        return [item async for item in stream]

    return asyncio.run(main())


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chat_stream_read_with_async_for_equals_for(llm, params):
    sync = list(chat_stream(llm, USER, params))
    assert len(sync) > 1 and sync[-1].finish_reason == "length"
    assert key(collect(chat_stream(llm, USER, params))) == key(sync)
    assert_all_freed(llm)


def test_a_session_read_with_async_for_keeps_the_same_history(llm):
    sync = ChatSession(llm, GREEDY, system="Be brief.")
    by_turn = [list(sync.stream("one")), list(sync.stream("two"))]
    answer = "".join(sync.ask("three"))
    assert len(sync.history) == 6 and answer

    aio = ChatSession(llm, GREEDY, system="Be brief.")
    assert [key(collect(aio.stream(text))) for text in ("one", "two")] == [key(d) for d in by_turn]
    assert "".join(collect(aio.ask("three"))) == answer
    assert aio.history == sync.history
    assert (aio.completion.token_ids, aio.completion.finish_reason) == (
        sync.completion.token_ids,
        sync.completion.finish_reason,
    )
    assert_all_freed(llm)


def test_a_session_stream_left_mid_way_frees_its_blocks_and_keeps_the_turn_as_for_does(llm):
    sync = ChatSession(llm, LONG)
    gc.disable()  # left by `break`, the stream ends at once, not when a reference cycle is collected
    try:
        for _ in sync.stream("one"):
            break
        assert [m["role"] for m in sync.history] == ["user", "assistant"]
        assert llm.driver.wait_idle(timeout=1) and llm.engine.blocks.usage == 0
    finally:
        gc.enable()

    aio = ChatSession(llm, LONG)

    async def main() -> None:
        async for _ in aio.stream("one"):
            break
        for _ in range(2):  # asyncio closes a left async generator (which aborts) in a task it schedules
            await asyncio.sleep(0)
        assert_all_freed(llm)
        async for _ in aio.ask("two"):
            break
        for _ in range(2):
            await asyncio.sleep(0)
        assert_all_freed(llm)

    asyncio.run(main())
    assert aio.history[:2] == sync.history and len(aio.history) == 4
    assert aio.history[2] == {"role": "user", "content": "two"}


def test_a_stream_closed_unread_never_runs_and_leaves_the_history(llm):
    session = ChatSession(llm, GREEDY)
    stream = session.stream("one")
    stream.close()
    assert list(stream) == [] and session.history == [] and not llm.engine.has_unfinished()
    # and one read with `for` refuses `async for` by name, as LLM.stream does
    stream = session.stream("two")
    assert next(stream).text is not None
    with pytest.raises(StreamKindError, match="^this stream is being read already"):
        stream.__aiter__()
    stream.close()
    assert_all_freed(llm)
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_aclose_ends_an_async_read_at_once_and_close_names_it(llm):
    session = ChatSession(llm, LONG)

    async def main() -> None:
        stream = session.stream("one")
        async for _ in stream:
            with pytest.raises(
                StreamKindError, match=r"^this stream is read with `async for`: close it with"
            ):
                stream.close()
            await stream.aclose()  # no sleep for asyncio's finalizer: ended now
            assert [m["role"] for m in session.history] == ["user", "assistant"]
            assert llm.driver.wait_idle(timeout=1) and llm.engine.blocks.usage == 0
            break

    asyncio.run(main())
    assert len(session.history) == 2
