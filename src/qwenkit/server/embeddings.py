"""``POST /v1/embeddings`` (OpenAI's): each input's embedding, computed by the engine as an embed request
beside the generation running there (``qwenkit.embedding``)."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi import Request

from qwenkit import embedding
from qwenkit.engine import SamplingParamsError
from qwenkit.server.errors import APIError, context_code
from qwenkit.server.prompt_requests import run_counted
from qwenkit.server.request_ids import request_id
from qwenkit.server.runs import check_capacity
from qwenkit.server.schemas import EmbeddingRequest
from qwenkit.server.state import ServerState
from qwenkit.tokenizer import TokenizerError


async def embeddings(state: ServerState, body: EmbeddingRequest, request: Request) -> dict:
    arrived = time.perf_counter()
    llm = state.llm
    adapter = state.check_model(body.model)
    try:
        inputs = embedding.check_inputs(body.input)
    except SamplingParamsError as e:
        raise APIError(400, str(e), "input") from None
    try:
        embedding.check_dimensions(body.dimensions, llm.config.hidden_size)
    except SamplingParamsError as e:
        raise APIError(400, str(e), "dimensions") from None
    setup = llm.embedding_setup  # a pooling qwenkit does not do: a 400 naming it (ConfigError)

    def read() -> list[list[int]]:
        try:  # text as /v1/completions reads a prompt (special-token text is the token)
            return embedding.prompt_ids(llm, inputs)
        except (SamplingParamsError, TokenizerError) as e:  # out of the vocabulary, over the context
            raise APIError(400, str(e), "input", context_code(e)) from None

    # as many inputs as rows and queue can ever hold, before any is read; then a queue as full as the
    # generation routes refuse is refused alike (429): --max-queue bounds what waits, embeddings too
    check_capacity(state, len(inputs), len(inputs), 1, unit="inputs")
    ids = await asyncio.to_thread(read)  # a long text is read while the event loop answers others
    done = await run_counted(
        state, ids, arrived, lambda: embedding.run_async(llm, ids, adapter, name=request_id(request))
    )
    vectors = [embedding.finish(one.value, setup.normalize, body.dimensions) for one in done]
    as_base64 = body.encoding_format == "base64"
    data = [
        {"object": "embedding", "embedding": _base64(v) if as_base64 else v, "index": i}
        for i, v in enumerate(vectors)
    ]
    tokens = sum(map(len, ids))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": state.response_model(adapter), "usage": usage}


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 form: the little-endian float32 bytes (the SDK decodes it with numpy)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
