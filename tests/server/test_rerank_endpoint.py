"""``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``) over real HTTP, in vLLM's shape: scores equal
``LLM.rerank``'s, which equal the Qwen3-Reranker model card's transformers computation
(tests/test_rerank.py); the most relevant first; bad input one-line 400s."""

from __future__ import annotations

import httpx
import pytest
from live import LiveServer

from qwenkit import rerank
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

QUERY = "What is the capital of China?"
DOCS = ["The capital of China is Beijing.", "Gravity attracts bodies.", "hi", "Paris is in France."]


@pytest.fixture(scope="module")
def rerank_llm(tmp_path_factory):
    from factories import write_tiny_chat_model

    path = write_tiny_chat_model(tmp_path_factory.mktemp("rerank") / "q3r")
    return LLM.load(path, dtype="float32", progress=False, max_seq_len=256, max_batch_size=2)


@pytest.fixture(scope="module")
def server(rerank_llm):
    config = ServerConfig(served_model_name="q3r", response_cache_entries=0, api_key="k", max_queue=3)
    with LiveServer(create_app(rerank_llm, config)) as live:
        yield live


def post(server, body: dict, path: str = "/v1/rerank", key: str | None = "k") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def test_results_are_the_librarys_scores_most_relevant_first(server, rerank_llm):
    want = rerank_llm.rerank(QUERY, DOCS)
    r = post(server, {"model": "q3r", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "usage", "results"} and body["model"] == "q3r"
    assert body["id"].startswith("rerank-")
    order = sorted(range(4), key=lambda i: -want[i])
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-6)
        assert x["document"] == {"text": DOCS[x["index"]]}
    tokens = sum(map(len, rerank.prompt_ids(rerank_llm, QUERY, DOCS)))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_top_n_return_documents_instruction_and_other_paths(server, rerank_llm):
    want = rerank_llm.rerank(QUERY, DOCS, "Find geography facts")
    best = max(range(4), key=lambda i: want[i])
    body = {"query": QUERY, "documents": DOCS, "top_n": 1, "return_documents": False}
    for path in ("/rerank", "/v2/rerank"):
        r = post(server, {**body, "instruction": "Find geography facts"}, path)
        assert r.status_code == 200, r.text
        [only] = r.json()["results"]
        assert only == {"index": best, "relevance_score": pytest.approx(want[best], abs=1e-6)}
    # Cohere's and Jina's {"text": ...} documents; top_n past the count, or 0 (vLLM's default): all
    objects = [{"text": d} for d in DOCS]
    for top_n in (10, 0):
        r = post(server, {"query": QUERY, "documents": objects, "top_n": top_n})
        assert len(r.json()["results"]) == 4


def test_bad_input_is_a_one_line_400(server):
    cases = [
        ({"query": "", "documents": DOCS}, "query must be a non-empty string", "query"),
        ({"query": QUERY, "documents": []}, "documents must be a non-empty list of strings", "documents"),
        ({"query": QUERY}, "documents must be a non-empty list of strings", "documents"),
        ({"query": QUERY, "documents": "one"}, "documents must be a non-empty list of strings", "documents"),
        ({"query": QUERY, "documents": ["a", {"x": 1}]}, "documents[1] must be a string", "documents"),
        ({"query": QUERY, "documents": DOCS, "top_n": -1}, "top_n must be at least 1", "top_n"),
        ({"query": QUERY, "documents": ["a", "w " * 400]}, "documents[1]: the prompt has", "documents"),
        ({"query": QUERY, "documents": ["a"] * 6}, "6 documents can never be taken", "documents"),
    ]
    for body, message, param in cases:
        r = post(server, body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"] and "\n" not in error["message"], error
        assert error["param"] == param
        too_long = "the prompt has" in message  # the generation routes' code for a prompt past the context
        assert error["code"] == ("context_length_exceeded" if too_long else "invalid_value"), error
    r = post(server, {"query": QUERY, "documents": DOCS, "top_n": "2"})
    assert r.status_code == 400 and "top_n" in r.text


def test_the_api_key_guards_every_path(server):
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        assert post(server, {"query": QUERY, "documents": DOCS}, path, key=None).status_code == 401


def test_an_unknown_model_is_a_404(server):
    r = post(server, {"model": "other", "query": QUERY, "documents": DOCS})
    assert r.status_code == 404


def test_a_model_without_a_head_is_refused_as_generation_is(tmp_path):
    """Not a document's fault: the 400 names no document (was "documents[0]: ..." with param documents)."""
    from factories import write_tiny_embedding_model

    from qwenkit.model.transformer import HEADLESS

    llm = LLM.load(write_tiny_embedding_model(tmp_path / "e"), dtype="float32", progress=False)
    with LiveServer(create_app(llm, ServerConfig(served_model_name="e", response_cache_entries=0))) as live:
        r = post(live, {"query": QUERY, "documents": DOCS}, key=None)
        chat = httpx.post(
            f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    assert r.status_code == 400 and chat.status_code == 400
    assert (
        r.json()["error"]
        == chat.json()["error"]
        == {
            "message": HEADLESS,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_value",
        }
    )
    llm.close()


def test_a_model_naming_a_served_adapter_scores_through_it(rerank_llm, tmp_path):
    from factories import write_lora_adapter

    adapter = write_lora_adapter(rerank_llm.path, tmp_path / "a", seed=3, std=0.5)
    llm = LLM.load(rerank_llm.path, dtype="float32", progress=False, max_seq_len=256, adapters={"a": adapter})
    config = ServerConfig(
        served_model_name="q3r", response_cache_entries=0, lora_modules=(("a", str(adapter)),)
    )
    with LiveServer(create_app(llm, config)) as live:
        r = post(live, {"model": "a", "query": QUERY, "documents": DOCS, "top_n": 0}, key=None)
    assert r.status_code == 200, r.text
    want = llm.rerank(QUERY, DOCS, adapter="a")
    assert r.json()["model"] == "a"
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(
        dict(enumerate(want))
    )
    assert want != pytest.approx(llm.rerank(QUERY, DOCS), abs=1e-3)
    llm.close()


def test_a_reranker_gguf_answers_the_directorys_scores_and_refuses_the_rest(rerank_llm, tmp_path):
    """llama.cpp's converter's file of the same model (pooling rank, cls.output's rows of "yes" and "no"):
    the same scores on every rerank path; text and embedding routes a one-line 400 (it has no head)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "gguf"))
    from gguf_files import write_qwen3_reranker_gguf

    from qwenkit.model.score_head import RANK_ONLY

    want = rerank_llm.rerank(QUERY, DOCS)
    path = write_qwen3_reranker_gguf(Path(rerank_llm.path), tmp_path / "r.gguf")
    llm = LLM.load(path, dtype="float32", progress=False, max_seq_len=256)
    config = ServerConfig(served_model_name="q3r", response_cache_entries=0)
    with LiveServer(create_app(llm, config)) as live:
        for route in ("/v1/rerank", "/rerank", "/v2/rerank"):
            r = post(live, {"query": QUERY, "documents": DOCS}, route, key=None)
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results] == sorted(range(4), key=lambda i: -want[i])
            assert {x["index"]: x["relevance_score"] for x in results} == pytest.approx(
                dict(enumerate(want)), abs=1e-6
            )
        for route, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
            ("/v1/embeddings", {"input": "hi"}),
        ):
            r = post(live, body, route, key=None)
            assert r.status_code == 400, (route, r.text)
            assert RANK_ONLY in r.json()["error"]["message"], (route, r.text)
    llm.close()
