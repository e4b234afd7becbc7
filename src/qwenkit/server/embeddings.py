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
from qwenkit.errors import GenerationError
from qwenkit.server.errors import APIError
from qwenkit.server.request_ids import request_id
from qwenkit.server.runs import check_capacity, check_queue
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
            raise APIError(400, str(e), "input") from None

    # as many inputs as rows and queue can ever hold, before any is read; then a queue as full as the
    # generation routes refuse is refused alike (429): --max-queue bounds what waits, embeddings too
    check_capacity(state, len(inputs), len(inputs), 1, unit="inputs")
    ids = await asyncio.to_thread(read)  # a long text is read while the event loop answers others
    check_queue(state, len(ids))
    state.active += len(ids)  # they take batch rows: the generation routes' queue estimate counts them
    try:
        done = await embedding.run_async(llm, ids, adapter, name=request_id(request))
    except GenerationError as e:  # the engine's step failed: not the client's fault
        _count(state, ids, arrived, "error")
        raise APIError(500, str(e)) from None
    except asyncio.CancelledError:  # the client went away: the engine stopped them
        _count(state, ids, arrived, "abort")
        raise
    finally:
        state.active -= len(ids)
    _count(state, ids, arrived, "stop", done)
    vectors = [embedding.finish(one.hidden, setup.normalize, body.dimensions) for one in done]
    as_base64 = body.encoding_format == "base64"
    data = [
        {"object": "embedding", "embedding": _base64(v) if as_base64 else v, "index": i}
        for i, v in enumerate(vectors)
    ]
    tokens = sum(map(len, ids))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": state.response_model(adapter), "usage": usage}


def _count(
    state: ServerState,
    ids: list[list[int]],
    arrived: float,
    reason: str,
    done: list[embedding.Embedded] | None = None,
) -> None:
    """Each input in /metrics as one engine request, as vLLM counts a pooling request: finished "stop"
    with its prompt tokens, no tokens generated, its latency and queue time; a failed or abandoned one's
    prompt counts no tokens (whether its step ran is not known here)."""
    e2e = time.perf_counter() - arrived
    for i, one in enumerate(ids):
        queued = done[i].queued if done is not None else None
        tokens = len(one) if done is not None else 0
        state.metrics.finished(reason, tokens, 0, None, e2e, queued=queued)


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 form: the little-endian float32 bytes (the SDK decodes it with numpy)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
