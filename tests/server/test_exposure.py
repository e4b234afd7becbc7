"""What a private deployment exposes: the API key on every route that needs it, wherever the app sits."""

from __future__ import annotations

import httpx
from live import LiveServer
from starlette.applications import Starlette
from starlette.routing import Mount

from qwenkit.server import ServerConfig, create_app


def test_the_api_key_guards_the_routes_of_an_app_mounted_under_a_prefix(chat_llm):
    """README's "embeddable in your own ASGI app": mounted at /qwen, Starlette keeps the whole path in
    scope["path"] (the prefix goes to root_path) and routes on what follows the prefix. The key check
    read the whole path, which starts with /qwen, so every /v1 route, /tokenize and the adapter loader
    answered without a key."""
    inner = create_app(chat_llm, ServerConfig(served_model_name="tiny", api_key="s3cret"))
    outer = Starlette(routes=[Mount("/qwen", app=inner)])
    with LiveServer(outer, health="/qwen/health") as live:
        base = live.url + "/qwen"
        assert httpx.get(base + "/health").json() == {"status": "ok"}  # public, as vLLM's
        refused = [
            httpx.get(base + "/v1/models"),
            httpx.head(base + "/v1/models"),
            httpx.get(base + "/v1/models/tiny"),
            httpx.post(base + "/tokenize", json={"prompt": "hi"}),
            httpx.post(base + "/detokenize", json={"tokens": [1]}),
            httpx.get(base + "/tokenizer_info"),
            httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
            httpx.post(base + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/etc"}),
        ]
        assert [r.status_code for r in refused] == [401] * len(refused)
        assert refused[0].json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base + "/v1/models", headers=key).json()["data"][0]["id"] == "tiny"


def test_a_completion_requests_prompts_are_checked_off_the_event_loop(make_server, monkeypatch):
    """Each prompt's sampling parameters were checked on the event loop: 1,000,000 prompts of "hi" (a
    7 MB body, refused in the end for its size) held /health and every stream for 37 s. Where a prompt's
    parameters are checked, no event loop runs."""
    import asyncio

    from qwenkit.server import completions

    where = []

    def noted(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return checked(*args, **kwargs)

    checked = completions.sampling_params
    monkeypatch.setattr(completions, "sampling_params", noted)
    live = make_server()
    r = httpx.post(live.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert where == ["worker thread"] * 3


def test_a_chat_prompt_past_the_context_is_refused_before_its_tools_grammar_is_built(
    make_server, chat_llm, monkeypatch
):
    """The grammar of a forced tool call was compiled before the prompt's length was checked: 20,000
    tools (a 1.3M-token prompt) took 57 s of llguidance to end in a grammar error that hid the real
    one, the prompt's length."""
    from qwenkit.server import tool_use

    built = []
    grammar = tool_use._grammar
    monkeypatch.setattr(tool_use, "_grammar", lambda *a: built.append(1) or grammar(*a))
    live = make_server()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    long = "word " * (chat_llm.engine.max_seq_len + 10)
    body = {"messages": [{"role": "user", "content": long}], "tools": [tool], "tool_choice": "required"}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert built == []
    fits = {**body, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(live.url + "/v1/chat/completions", json=fits).status_code == 200
    assert built == [1]


def test_the_metrics_scrapes_of_an_app_mounted_under_a_prefix_are_not_counted(chat_llm):
    """As the API key's gate, the metrics read the whole path: /qwen/metrics is no "/metrics", so every
    scrape of a mounted app was counted as a request of the /metrics handler (a bare app's are not)."""
    inner = create_app(chat_llm, ServerConfig(served_model_name="tiny"))
    outer = Starlette(routes=[Mount("/qwen", app=inner)])
    with LiveServer(outer, health="/qwen/health") as live:
        assert httpx.get(live.url + "/qwen/metrics").status_code == 200
        text = httpx.get(live.url + "/qwen/metrics").text
        assert 'handler="/health"' in text  # the start-up probe's requests are counted
        assert 'handler="/metrics"' not in text
