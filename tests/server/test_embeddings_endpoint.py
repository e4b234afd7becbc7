"""``POST /v1/embeddings`` through the official openai SDK (which asks for base64 unless told otherwise
and decodes it) and raw HTTP: values equal ``LLM.embed``'s, which equal transformers' (tests/
test_embeddings.py)."""

from __future__ import annotations

import base64
import re

import httpx
import numpy as np
import openai
import pytest
import torch
from live import LiveServer

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

TEXTS = ["What is the capital of China?", "Explain gravity", "hi"]


@pytest.fixture(scope="module")
def embed_llm(tmp_path_factory):
    from factories import write_tiny_embedding_model

    path = write_tiny_embedding_model(tmp_path_factory.mktemp("embed") / "q3e")
    return LLM.load(path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def embed_server(embed_llm):
    app = create_app(embed_llm, ServerConfig(served_model_name="q3e", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(embed_server):
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", max_retries=0)


def close(got, want) -> None:
    torch.testing.assert_close(
        torch.tensor(np.asarray(got, dtype=np.float32)), torch.tensor(want), rtol=0, atol=1e-6
    )


def test_sdk_default_base64_and_float_give_the_librarys_values(client, embed_llm):
    want = embed_llm.embed(TEXTS)
    for fmt in (openai.NOT_GIVEN, "float"):  # the SDK asks for base64 when none is given, and decodes it
        r = client.embeddings.create(model="q3e", input=TEXTS, encoding_format=fmt, user="u-1")
        assert r.object == "list" and r.model == "q3e"
        assert [d.index for d in r.data] == [0, 1, 2] and all(d.object == "embedding" for d in r.data)
        close([d.embedding for d in r.data], want)
        tokens = sum(len(embed_llm.encode(t)) for t in TEXTS)
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens


def test_a_default_prompt_name_is_not_applied(tmp_path, embed_llm):
    """vLLM's /v1/embeddings reads no sentence-transformers prompts (its get_pooling_config reads
    modules.json alone): the input is embedded as sent, where LLM.embed puts the default prompt first."""
    import json
    import shutil

    path = tmp_path / "default"
    shutil.copytree(embed_llm.path, path)
    st = json.loads((path / "config_sentence_transformers.json").read_text())
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({**st, "default_prompt_name": "query"})
    )
    llm = LLM.load(path, dtype="float32", progress=False)
    app = create_app(llm, ServerConfig(served_model_name="q3e", response_cache_entries=0))
    with LiveServer(app) as live:
        r = httpx.post(f"{live.url}/v1/embeddings", json={"model": "q3e", "input": TEXTS[:2]})
    assert r.status_code == 200
    close([d["embedding"] for d in r.json()["data"]], embed_llm.embed(TEXTS[:2]))
    close(llm.embed(TEXTS[:2]), embed_llm.embed(TEXTS[:2], prompt_name="query"))
    llm.close()


def test_base64_is_little_endian_float32(embed_server, embed_llm):
    body = {"model": "q3e", "input": "hi", "encoding_format": "base64"}
    r = httpx.post(f"{embed_server.url}/v1/embeddings", json=body)
    assert r.status_code == 200
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 4 * 32
    close(np.frombuffer(raw, dtype="<f4"), embed_llm.embed("hi")[0])


def test_dimensions_truncate_and_renormalize(client, embed_llm):
    r = client.embeddings.create(model="q3e", input=TEXTS[:2], dimensions=8)
    assert [len(d.embedding) for d in r.data] == [8, 8]
    close([d.embedding for d in r.data], embed_llm.embed(TEXTS[:2], dimensions=8))


def test_token_id_inputs(client, embed_llm):
    ids = embed_llm.encode(TEXTS[0])
    one = client.embeddings.create(model="q3e", input=ids, encoding_format="float")
    many = client.embeddings.create(model="q3e", input=[ids, [9707, 151643]], encoding_format="float")
    close([one.data[0].embedding], embed_llm.embed([TEXTS[0]]))
    close([d.embedding for d in many.data], embed_llm.embed([ids, [9707, 151643]]))
    assert one.usage.prompt_tokens == len(ids) and many.usage.prompt_tokens == len(ids) + 2


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": ""}, "input", r"input\[0\] is an empty string"),
        ({"input": []}, "input", "input must be a non-empty string, list of strings"),
        ({"input": ["a", [1, "b"]]}, "input", r"input\[1\] must be a non-empty string or a non-empty list"),
        ({"input": [1, 151936]}, "input", r"prompt token id 151936 is outside the vocabulary \(0..151935\)"),
        ({"input": "word " * 600}, "input", "the prompt has 602 tokens; the context window is 512"),
        (
            {"input": ["a", "word " * 60_000]},
            "input",
            r"input\[1\]: the prompt has at least \d+ tokens; the context window",
        ),
        ({"input": "a", "dimensions": 33}, "dimensions", r"dimensions must be an integer in \[1, 32\]"),
        ({"input": "a", "dimensions": 0}, "dimensions", r"dimensions must be an integer in \[1, 32\]"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "encoding_format: Input should be"),
        ({}, "input", "input: Field required"),
    ],
)
def test_bad_requests_are_one_line_400s(embed_server, body, param, message):
    r = httpx.post(f"{embed_server.url}/v1/embeddings", json={"model": "q3e", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    too_long = "context window" in message  # the generation routes' code for a prompt past the context
    assert error["type"] == "invalid_request_error"
    assert error["code"] == ("context_length_exceeded" if too_long else "invalid_value"), error
    assert error["param"] == param
    assert "\n" not in error["message"]
    assert re.search(message, error["message"]), error["message"]


def test_sdk_raises_bad_request_and_unknown_model_is_404(client):
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model="q3e", input="")
    with pytest.raises(openai.NotFoundError, match="the model 'other' does not exist"):
        client.embeddings.create(model="other", input="x")


def test_generation_on_the_headless_model_is_a_400(embed_server):
    r = httpx.post(
        f"{embed_server.url}/v1/completions", json={"model": "q3e", "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 400 and "no output head" in r.json()["error"]["message"]


def test_chat_models_embed_beside_generation(server, chat_llm):
    """A plain decoder (no sentence-transformers files): its last token, normalized, while it generates."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/embeddings", json={"model": "tiny", "input": ["Hello there", "x"]})
    assert r.status_code == 200
    close([d["embedding"] for d in r.json()["data"]], chat_llm.embed(["Hello there", "x"]))


def test_running_embeddings_count_as_active_and_leave_none(embed_server, embed_llm, monkeypatch):
    """Their batch rows count in the estimate the generation routes' --max-queue check reads."""
    from qwenkit import embedding

    state = embed_server.server.config.app.state.qwenkit
    seen, run_async = [], embedding.run_async

    async def watched(*args, **kwargs):
        seen.append(state.active)
        return await run_async(*args, **kwargs)

    monkeypatch.setattr(embedding, "run_async", watched)
    r = httpx.post(f"{embed_server.url}/v1/embeddings", json={"input": ["a", "b", "c"]})
    assert r.status_code == 200 and r.json()["model"] == "q3e"
    assert seen == [3] and state.active == 0
    assert embed_llm.driver.wait_idle() and embed_llm.engine.blocks.usage == 0


def test_embeddings_keep_to_the_queue_limit(make_server, monkeypatch):
    """--max-queue bounds embedding inputs as it bounds generation choices: more than rows + queue can ever
    hold is a 400 before any is read, a queue already full a 429 to retry (they ran past both)."""
    live = make_server(max_queue=0)
    state = live.server.config.app.state.qwenkit
    rows = state.llm.engine.scheduler.max_batch
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["x"] * (rows + 1)}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": f"{rows + 1} inputs can never be taken by this server: it runs {rows} rows and queues 0 "
        f"more (--max-batch, --max-queue); ask for at most {rows} inputs in one request",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_value",
    }
    monkeypatch.setattr(state, "active", rows)  # every row taken by running requests
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": "x"}, timeout=60)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    monkeypatch.setattr(state, "active", 0)
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["x"] * rows}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == rows


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}),
        ("/v1/completions", {"prompt": [1, 2], "stream": True}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1}),
        ("/v1/responses", {"input": "hi"}),
        ("/v1/responses", {"input": "hi", "stream": True}),
    ],
)
def test_every_generation_route_of_the_headless_model_is_a_one_line_400(embed_server, route, body):
    r = httpx.post(f"{embed_server.url}{route}", json={"model": "q3e", **body}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.endswith("it computes embeddings, not text") and "\n" not in message


def test_the_headless_models_other_routes_answer(embed_server, embed_llm):
    """The page, the model list and tokenization need no output head."""
    with httpx.Client(base_url=embed_server.url, timeout=60) as http:
        assert http.get("/").status_code == 200
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["q3e"]
        r = http.post("/tokenize", json={"model": "q3e", "prompt": "hi"})
        assert r.json()["tokens"] == embed_llm.encode("hi") == [6023, 151643]
