"""Prompt-only engine requests (embeddings, reranking scores): a caller's prompts submitted together, so
the engine batches them beside the generation running there, each read once it ends, and all aborted on
any way out (an error, a client gone) so their KV memory is freed at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from qwenkit.engine import SamplingParams, SamplingParamsError

if TYPE_CHECKING:
    from qwenkit.engine.driver import RequestStream
    from qwenkit.engine.engine import StepOutput
    from qwenkit.generate import LLM

T = TypeVar("T")
Item = TypeVar("Item")


@dataclass(frozen=True)
class Finished(Generic[T]):
    """One prompt's result, and how long it waited for its first step (the server's metrics)."""

    value: T
    queued: float | None  # seconds from submission to its first step (None: it never had one)


def check_each(items: Sequence[Item], check: Callable[[Item], None], name: str, always: bool = False) -> None:
    """``check`` each item; its SamplingParamsError names the item (``name[i]: ...``) where there are
    several, or ``always``."""
    for i, item in enumerate(items):
        try:
            check(item)
        except SamplingParamsError as exc:  # its kind kept: a prompt too long is the server's own code
            raise type(exc)(f"{name}[{i}]: {exc}" if always or len(items) > 1 else str(exc)) from None


def run(
    llm: LLM, ids: list[list[int]], params: SamplingParams, read: Callable[[list[StepOutput]], T]
) -> list[T]:
    """``read`` of each prompt's outputs, in order."""
    with llm.driver.together():  # queued as one batch
        streams = [llm.driver.submit(one, params) for one in ids]
    try:
        return [read(list(stream)) for stream in streams]
    finally:
        for stream in streams:
            stream.abort()


async def run_async(
    llm: LLM,
    ids: list[list[int]],
    params: SamplingParams,
    read: Callable[[list[StepOutput]], T],
    name: str | None = None,
) -> list[Finished[T]]:
    """``run`` from an event loop, which stays free while the engine computes. ``name``: the requests' id
    in the engine's log (a server's request id)."""
    loop = asyncio.get_running_loop()
    submitted = time.perf_counter()
    with llm.driver.together():
        streams = [llm.driver.submit(one, params, loop=loop, name=name) for one in ids]

    async def finished(stream: RequestStream) -> Finished[T]:
        outputs = [out async for out in stream]
        first = next((o.scheduled_at for o in outputs if o.scheduled_at is not None), None)
        return Finished(read(outputs), None if first is None else max(first - submitted, 0.0))

    try:
        return list(await asyncio.gather(*(finished(s) for s in streams)))
    finally:
        for stream in streams:
            stream.abort()
