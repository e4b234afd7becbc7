"""What the prompt-only routes (``/v1/embeddings``, ``/v1/rerank``) share: their prompts run as engine
requests that take batch rows (the queue limit and the generation routes' queue estimate count them),
an engine failure is a 500, and ``/metrics`` counts each prompt as one request, as vLLM counts pooling
requests: finished "stop" with its prompt tokens, no tokens generated, its latency and queue time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from qwenkit.errors import GenerationError
from qwenkit.prompt_only import Finished
from qwenkit.server.errors import APIError
from qwenkit.server.runs import check_queue
from qwenkit.server.state import ServerState

T = TypeVar("T")


async def run_counted(
    state: ServerState,
    ids: list[list[int]],
    arrived: float,
    run: Callable[[], Awaitable[list[Finished[T]]]],
) -> list[Finished[T]]:
    """``run()`` the prompts ``ids`` of a request that arrived at ``arrived`` (perf_counter time): a queue
    as full as the generation routes refuse is a 429 first; each prompt counted in /metrics after."""
    check_queue(state, len(ids))
    state.active += len(ids)  # they take batch rows: the generation routes' queue estimate counts them
    try:
        done = await run()
    except GenerationError as e:  # the engine's step failed: not the client's fault
        _count(state, ids, arrived, "error")
        raise APIError(500, str(e)) from None
    except asyncio.CancelledError:  # the client went away: the engine stopped them
        _count(state, ids, arrived, "abort")
        raise
    finally:
        state.active -= len(ids)
    _count(state, ids, arrived, "stop", done)
    return done


def _count(
    state: ServerState, ids: list[list[int]], arrived: float, reason: str, done: list | None = None
) -> None:
    """A failed or abandoned prompt counts no tokens (whether its step ran is not known here)."""
    e2e = time.perf_counter() - arrived
    for i, one in enumerate(ids):
        queued = done[i].queued if done is not None else None
        tokens = len(one) if done is not None else 0
        state.metrics.finished(reason, tokens, 0, None, e2e, queued=queued)
