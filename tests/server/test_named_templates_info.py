"""A model with named chat templates, served: /tokenizer_info lists them (it gave the default one alone,
so a client rendering a request with tools could not know the "tool_use" template the server renders)."""

from __future__ import annotations

import json

import httpx
from factories import with_named_templates
from live import LiveServer

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

PLAIN = "{%- for m in messages %}{{ m.content }}\n{% endfor %}"


def test_tokenizer_info_lists_the_named_templates(tiny_chat_model, tmp_path):
    model = with_named_templates(tiny_chat_model, tmp_path / "m", PLAIN)
    tool_use = (model / "additional_chat_templates" / "tool_use.jinja").read_text()
    llm = LLM.load(model, dtype="float32", progress=False)
    try:
        app = create_app(llm, ServerConfig(served_model_name="m", response_cache_entries=0))
        with LiveServer(app) as live:
            info = httpx.get(live.url + "/tokenizer_info").json()
    finally:
        llm.close()
    assert info["chat_template"] == PLAIN  # the default's text, as lm-eval renders it
    assert info["chat_templates"] == {"default": PLAIN, "tool_use": tool_use}


def test_tokenizer_info_of_one_template(tiny_chat_model):
    llm = LLM.load(tiny_chat_model, dtype="float32", progress=False)
    try:
        with LiveServer(create_app(llm, ServerConfig(served_model_name="m"))) as live:
            info = httpx.get(live.url + "/tokenizer_info").json()
    finally:
        llm.close()
    template = json.loads((tiny_chat_model / "tokenizer_config.json").read_text())["chat_template"]
    assert (info["chat_template"], info["chat_templates"]) == (template, {})
