"""`serve --lora-modules NAME=DIR ...`: LoRA adapters served beside the base model on one copy of its
weights, each request through the adapter its "model" names (vLLM's interface), with the official
openai client against a live server."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from factories import write_lora_adapter
from live import LiveServer

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-modules")
    return {
        name: str(write_lora_adapter(tiny_chat_model, root / name, seed, std=0.5))
        for name, seed in (("sql", 1), ("poet", 2))
    }


@pytest.fixture(scope="module")
def lora_llm(tiny_chat_model, adapters):
    llm = LLM.load(tiny_chat_model, max_batch_size=8, progress=False, adapters=adapters)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def lora_server(lora_llm, adapters):
    config = ServerConfig(served_model_name="tiny", lora_modules=tuple(adapters.items()))
    with LiveServer(create_app(lora_llm, config)) as live:
        yield live


@pytest.fixture(scope="module")
def client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0)


def direct(llm, adapter):
    ids = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, adapter=adapter))[0].text


def test_models_lists_the_adapters_with_their_parent(client, adapters, lora_server, tiny_chat_model):
    """vLLM's model cards: an adapter's root is its directory and its parent the base model; the base
    model's root is the checkpoint it was loaded from, and its parent null."""
    cards = client.models.list().data
    assert [c.id for c in cards] == ["tiny", "sql", "poet"]
    assert cards[1].parent == cards[2].parent == "tiny" and cards[1].root == adapters["sql"]
    assert cards[2].root == adapters["poet"]
    assert cards[0].model_extra["root"] == str(tiny_chat_model)
    raw = httpx.get(f"{lora_server.url}/v1/models").json()["data"]
    assert [(c["id"], c["root"], c["parent"]) for c in raw] == [
        ("tiny", str(tiny_chat_model), None),
        ("sql", adapters["sql"], "tiny"),
        ("poet", adapters["poet"], "tiny"),
    ]
    one = httpx.get(f"{lora_server.url}/v1/models/tiny").json()
    assert "parent" in one and one["parent"] is None and one["root"] == str(tiny_chat_model)


def test_each_request_runs_through_the_adapter_its_model_names(client, lora_llm):
    texts = {}
    for model, adapter in (("tiny", None), ("sql", "sql"), ("poet", "poet")):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        assert r.model == model
        texts[model] = r.choices[0].message.content
        assert texts[model] == direct(lora_llm, adapter)
    assert len(set(texts.values())) == 3  # the adapters matter
    # text completions and streams too
    ids = lora_llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    r = client.completions.create(model="poet", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == texts["poet"] and r.model == "poet"
    stream = client.chat.completions.create(
        model="sql", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts["sql"]
    assert {c.model for c in chunks} == {"sql"}


def test_concurrent_requests_of_different_adapters_batch_together(lora_server, lora_llm):
    """Requests through different adapters in flight at once get what each gets alone."""
    import concurrent.futures

    def ask(model):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
        return httpx.post(lora_server.url + "/v1/chat/completions", json=body, timeout=120).json()

    models = ["sql", "tiny", "poet", "sql", "poet", "tiny"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, models))
    for model, answer in zip(models, answers, strict=True):
        assert answer["choices"][0]["message"]["content"] == direct(
            lora_llm, None if model == "tiny" else model
        )


def test_unknown_model_is_404_naming_what_is_served(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == "the model 'gpt-4' does not exist; this server serves 'tiny', 'sql', 'poet'"


def test_the_response_cache_keeps_adapters_apart(lora_llm, adapters):
    config = ServerConfig(served_model_name="tiny", lora_modules=tuple(adapters.items()))
    with LiveServer(create_app(lora_llm, config)) as live:
        c = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        ask = dict(messages=MESSAGES, max_tokens=12, temperature=0)
        first = {
            m: c.chat.completions.create(model=m, **ask).choices[0].message.content for m in ("sql", "tiny")
        }
        again = {
            m: c.chat.completions.create(model=m, **ask).choices[0].message.content for m in ("tiny", "sql")
        }
    assert first == again and first["sql"] != first["tiny"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-modules", "sql"], "--lora-modules takes NAME=DIR items, got 'sql'"),
        (["--lora-modules", "a=/nonexistent"], "--lora-modules a: /nonexistent is not a directory"),
        (["--lora-modules", "a=.", "a=."], "--lora-modules names 'a' twice"),
        (["--lora-modules", "a=.", "--adapter", "."], "not both"),
        (["--lora-modules", "a=.", "--served-model-name", "a"], "is also a --lora-modules name"),
        (["--lora-modules", '{"name": "a"'], '--lora-modules: \'{"name": "a"\' is not JSON'),
        (["--lora-modules", '{"name": "a"}'], '--lora-modules: a JSON item needs "name" and "path" strings'),
        (["--lora-modules", '{"name": "a", "path": ".", "rank": 8}'], "--lora-modules a: unknown key 'rank'"),
        (["--lora-modules", '{"name": "a", "path": "/nonexistent"}'], "a: /nonexistent is not a directory"),
    ],
)
def test_bad_lora_modules_exit_2_with_one_line(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "serve", "--port", "1", *args], capture_output=True, text=True
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_metrics_name_the_adapters_of_running_requests(lora_server):
    """vLLM's vllm:lora_requests_info: the adapters of the requests running now, and how many are served."""

    def info() -> str:
        text = httpx.get(lora_server.url + "/metrics").text
        return next(line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{"))

    assert 'running_lora_adapters=""' in info() and 'max_lora="2"' in info()
    body = {"model": "poet", "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", lora_server.url + "/v1/chat/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()  # held: a generator dropped mid-way would close the stream
        for line in lines:
            if line.startswith("data: "):
                break  # the request is running
        assert 'running_lora_adapters="poet"' in info()


def test_lora_modules_take_vllms_json_form_too(tmp_path):
    """vLLM's --lora-modules also takes '{"name": ..., "path": ..., "base_model_name": ...}' items (a
    command line copied from vLLM was refused); the base must be the model this server serves."""
    from qwenkit.cli.serve import lora_modules
    from qwenkit.errors import ConfigError

    items = [
        f"sql={tmp_path}",
        json.dumps({"name": "chat", "path": str(tmp_path), "base_model_name": "tiny"}),
    ]
    assert lora_modules(items, "tiny") == {"sql": str(tmp_path), "chat": str(tmp_path)}
    with pytest.raises(ConfigError, match="base_model_name 'tiny' is not the model served .'other'."):
        lora_modules(items, "other")
