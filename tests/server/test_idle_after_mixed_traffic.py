"""After mixed traffic drains, every per-request table is back at its idle value: a bounded soak.

Requests of every kind a server runs (streamed and not, n > 1, logprobs, stop strings, tools, a JSON
schema, /v1/responses, /v1/completions with echo, shared prefixes, clients that leave mid-stream or
while queued, refusals) leave nothing behind once answered: no request in the engine, the driver or the
server's count, every KV block free (those of the prefix cache unheld), no task on the server's loop
beyond its own, and no open file beyond those before. Counts, not RSS: RSS is noise at this size."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
SHARED = "You are a careful assistant. " * 30  # a prefix every "prefix" request shares
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "x",
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def request(i: int) -> tuple[str, dict, str]:
    """(route, body, how the client reads it) of the i-th request: each kind in turn."""
    chat = {"messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 6}
    kinds = [
        (CHAT, chat, "whole"),
        (CHAT, {**chat, "stream": True, "stream_options": {"include_usage": True}}, "stream"),
        (CHAT, {**chat, "max_tokens": 400, "ignore_eos": True, "stream": True}, "leave"),
        (CHAT, {**chat, "max_tokens": 400, "ignore_eos": True}, "cancel"),
        (CHAT, {**chat, "n": 3, "logprobs": True, "top_logprobs": 2}, "whole"),
        (CHAT, {**chat, "stop": ["a", "\n"], "stream": True}, "stream"),
        (CHAT, {**chat, "tools": TOOLS, "tool_choice": "required", "stream": True}, "stream"),
        (CHAT, {**chat, "response_format": SCHEMA}, "whole"),
        (CHAT, {**chat, "messages": [{"role": "system", "content": SHARED}, *chat["messages"]]}, "whole"),
        ("/v1/responses", {"input": f"Hi {i}", "max_output_tokens": 6, "stream": True}, "leave"),
        ("/v1/completions", {"prompt": f"Once {i}", "max_tokens": 4, "logprobs": 2, "echo": True}, "whole"),
        (CHAT, {**chat, "max_tokens": -1}, "whole"),  # refused
    ]
    return kinds[i % len(kinds)]


async def send(client: httpx.AsyncClient, i: int) -> str:
    route, body, how = request(i)
    if how == "cancel":  # gone before its answer, most likely while it waits for a row
        try:
            await asyncio.wait_for(client.post(route, json=body), 0.05)
        except TimeoutError:
            return "cancelled"
        return "answered"
    async with client.stream("POST", route, json=body) as r:
        lines = 0
        async for _ in r.aiter_lines():
            lines += 1
            if how == "leave" and lines >= 3:
                return "left"
        return str(r.status_code)


async def traffic(url: str, count: int) -> list[str]:
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> str:
            async with limit:
                return await send(client, i)

        return await asyncio.gather(*(one(i) for i in range(count)))


def server_tasks() -> int:
    """Tasks alive on the live server's event loop (the only other running loop in this process)."""
    # type(), not isinstance: the latter reads __class__, which some of torch's module stand-ins warn on
    loops = [o for o in gc.get_objects() if issubclass(type(o), asyncio.AbstractEventLoop) and o.is_running()]
    assert len(loops) == 1
    return len(asyncio.all_tasks(loops[0]))


def tables(live, llm) -> dict:
    gc.collect()
    engine, driver, state = llm.engine, llm.driver, live.server.config.app.state.qwenkit
    return {
        "engine requests": len(engine.requests),
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "held blocks": sum(1 for count in engine.blocks.ref_counts if count),
        "free blocks": engine.blocks.num_free - engine.blocks.num_blocks,
        "driver streams": len(driver._streams),
        "driver orphans": len(driver._orphans),
        "open ids": len(driver._open_ids),
        "active choices": state.active,
        "server tasks": server_tasks(),
        "open files": len(os.listdir("/proc/self/fd")),
    }


@pytest.mark.slow
def test_every_table_returns_to_idle_after_mixed_traffic(make_server, chat_llm):
    live = make_server(response_cache_entries=0, max_queue=1000)
    idle = tables(live, chat_llm)
    assert idle["engine requests"] == idle["held blocks"] == idle["active choices"] == 0
    seen: list[str] = []
    for _ in range(2):  # twice: what one round leaves would show as a difference the second time
        seen += asyncio.run(traffic(live.url, 96))
        assert chat_llm.driver.wait_idle()
        deadline = time.monotonic() + 10  # a left stream's handler notices the disconnect soon after
        while tables(live, chat_llm) != idle and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tables(live, chat_llm) == idle
    assert seen.count("200") >= 100 and seen.count("400") == 16 and seen.count("left") == 32
    assert seen.count("cancelled") + seen.count("answered") == 16
    assert len(chat_llm.engine.blocks.cached) > 0  # the prefix cache kept blocks, none of them held
