"""``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``), as vLLM, Jina and Cohere answer it: each
document's relevance to the query (``qwenkit.rerank``: a reranker's P("yes"), computed by the engine as
scoring requests beside the generation running there), the most relevant first."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from qwenkit import rerank
from qwenkit.engine import SamplingParamsError
from qwenkit.errors import ConfigError
from qwenkit.server.errors import APIError, context_code
from qwenkit.server.prompt_requests import run_counted
from qwenkit.server.request_ids import request_id
from qwenkit.server.runs import check_capacity
from qwenkit.server.schemas import RerankRequest
from qwenkit.server.state import ServerState
from qwenkit.tokenizer import TokenizerError


async def rerank_documents(state: ServerState, body: RerankRequest, request: Request) -> dict:
    arrived = time.perf_counter()
    llm = state.llm
    adapter = state.check_model(body.model)
    docs = body.documents
    if isinstance(docs, list):  # Cohere's and Jina's clients may send {"text": ...} objects
        docs = [d["text"] if isinstance(d, dict) and set(d) == {"text"} else d for d in docs]
    try:
        docs = rerank.check_request(body.query, docs, body.instruction)
    except SamplingParamsError as e:
        raise APIError(400, str(e), str(e).split(" ")[0].split("[")[0]) from None  # the field it names
    if body.top_n is not None and body.top_n < 0:  # 0 is vLLM's default: every document
        raise APIError(
            400, f"top_n must be at least 1 (0 or none: every document), got {body.top_n}", "top_n"
        )
    try:
        rerank.answer_ids(llm)
    except ConfigError as e:
        raise APIError(400, str(e), "model") from None
    try:
        rerank.check_model(llm, adapter)
    except SamplingParamsError as e:  # a model without a head: refused as the generation routes refuse it
        raise APIError(400, str(e)) from None

    def read() -> list[list[int]]:
        try:
            return rerank.prompt_ids(llm, body.query, docs, body.instruction)
        except (SamplingParamsError, TokenizerError) as e:  # over the context
            raise APIError(400, str(e), "documents", context_code(e)) from None

    check_capacity(state, len(docs), len(docs), 1, unit="documents")
    ids = await asyncio.to_thread(read)  # long documents are read while the event loop answers others
    done = await run_counted(
        state, ids, arrived, lambda: rerank.run_async(llm, ids, adapter, name=request_id(request))
    )
    order = sorted(range(len(docs)), key=lambda i: -done[i].value)  # stable: ties keep document order
    results = []
    for i in order[: body.top_n or None]:
        result: dict = {"index": i, "relevance_score": done[i].value}
        if body.return_documents is not False:  # vLLM and Jina return them; Cohere's clients say false
            result["document"] = {"text": docs[i]}
        results.append(result)
    tokens = sum(map(len, ids))
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": state.response_model(adapter),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }
