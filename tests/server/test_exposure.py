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
