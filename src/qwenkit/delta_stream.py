"""A stream of one request's Deltas, or of what a chat makes of them, read with ``for`` in this thread or
``async for`` inside a running event loop by one implementation: a request opened at the first read, and
the stages its Deltas go through (``LLM.stream``, ``chat_stream``, ``ChatSession.stream`` and ``ask``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from qwenkit.engine.driver import StreamKindError

if TYPE_CHECKING:
    from qwenkit.generate import TextStream
    from qwenkit.text_state import Delta

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Stage(Generic[T, U]):
    """One step of a stream's pipeline: ``feed`` turns each item into the items it passes on (none, one
    or several); ``end`` runs once, when the stream ends however it ends (read to its end, left, failed)."""

    feed: Callable[[T], Iterable[U]]
    end: Callable[[], None] = lambda: None


Opener = Callable[[asyncio.AbstractEventLoop | None], "tuple[TextStream, Stage[Delta, T]]"]


class DeltaStream(Iterator[T]):
    """One request's Deltas (``LLM.stream``), or what a chat makes of them (``chat_stream``,
    ``ChatSession.stream`` and ``ask``): ``for`` reads them in this thread; ``async for`` submits the
    request on the running event loop (``async for`` over a generator was a bare TypeError naming no way
    out). Nothing runs before the first read; ``opener(loop)`` then submits the request (with ``loop``, for
    ``async for``) and gives the stage its Deltas go through."""

    def __init__(self, opener: Opener[T]) -> None:
        self._open = opener
        self._sync: Generator[T, None, None] | None = None
        self._async: AsyncGenerator[T, None] | None = None

    @classmethod
    def deferred(cls, make: Callable[[], DeltaStream[T]]) -> DeltaStream[T]:
        """The stream ``make()`` returns, called at the first read (so that its arguments' errors, and
        its side effects, come where a generator's would)."""
        return cls(lambda loop: make()._open(loop))

    def then(self, stage: Callable[[], Stage[T, U]]) -> DeltaStream[U]:
        """This stream's items through one more stage, made at the first read (before this stream's own
        request is submitted; its ``end`` runs even where that submission fails)."""
        inner_open = self._open

        def opener(loop: asyncio.AbstractEventLoop | None) -> tuple[TextStream, Stage[Delta, U]]:
            outer = stage()
            try:
                source, inner = inner_open(loop)
            except BaseException:
                outer.end()
                raise

            def feed(delta: Delta) -> Iterable[U]:
                return (out for item in inner.feed(delta) for out in outer.feed(item))

            return source, Stage(feed, lambda: _end_both(inner.end, outer))

        return DeltaStream(opener)

    def __next__(self) -> T:
        if self._async is not None:
            raise StreamKindError("this stream is read with `async for` already")
        if self._sync is None:
            self._sync = _read(self._open)
        return next(self._sync)

    def close(self) -> None:
        """Stop reading: the request is aborted (a no-op once it has finished, or before it started)."""
        if self._async is not None:  # it did nothing: the request ran on, and a chat turn waited
            raise StreamKindError(
                "this stream is read with `async for`: close it with `await stream.aclose()`"
            )
        if self._sync is None:  # closed before its first read: it never runs
            self._sync = (item for item in ())
        self._sync.close()

    async def aclose(self) -> None:
        """``close`` for a stream read with ``async for``: at once, where a stream left by ``break`` ends
        when asyncio gets to closing it (a chat turn joins its history then)."""
        if self._async is None:
            self.close()
        else:
            await self._async.aclose()

    def __aiter__(self) -> AsyncGenerator[T, None]:
        if self._sync is not None or self._async is not None:
            raise StreamKindError("this stream is being read already")
        self._async = _aread(self._open, asyncio.get_running_loop())
        return self._async


# Module functions, not methods: a generator whose frame held its DeltaStream would be a reference cycle,
# so a stream left by `break` would end (abort, join its chat turn) only when the cycle is collected.
def _read(opener: Opener[T]) -> Generator[T, None, None]:
    source, stage = opener(None)
    try:
        for delta in source:
            yield from stage.feed(delta)
    finally:
        _end_both(source.abort, stage)


async def _aread(opener: Opener[T], loop: asyncio.AbstractEventLoop) -> AsyncGenerator[T, None]:
    source, stage = opener(loop)
    try:
        async for delta in source:
            for item in stage.feed(delta):
                yield item
    finally:
        _end_both(source.abort, stage)


def _end_both(first: Callable[[], None], then: Stage) -> None:
    """``first()`` (a request's abort, a stage's end), then ``then``'s end, even where the first raises."""
    try:
        first()
    finally:
        then.end()
