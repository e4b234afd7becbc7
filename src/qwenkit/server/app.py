"""The OpenAI-compatible HTTP app: routes, auth, CORS, metrics, tokenizer endpoints and the web page.

``create_app(llm)`` returns a FastAPI app that can be served by uvicorn (``qwenkit serve`` does) or
mounted in a user's own ASGI app.
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette._utils import get_route_path
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenkit.generate import LLM
from qwenkit.server import adapters as adapter_routes
from qwenkit.server import completions as routes
from qwenkit.server import embeddings as embeddings_route
from qwenkit.server import rerank as rerank_route
from qwenkit.server import responses as responses_route
from qwenkit.server.errors import APIError, BodyTooLarge, error_response, install_handlers
from qwenkit.server.logprobs import decoded
from qwenkit.server.request_ids import HEADER as REQUEST_ID_HEADER
from qwenkit.server.request_ids import RequestIds
from qwenkit.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RerankRequest,
    ResponsesRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from qwenkit.server.state import ServerConfig, ServerState
from qwenkit.tokenizer import TokenizerError

STATIC_DIR = Path(__file__).parent / "static"
# The page loads ES modules, which browsers refuse unless served as JavaScript; some systems' MIME tables
# (Windows' registry) say text/plain for .js.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class PageFiles(StaticFiles):
    """The chat page's files, each to be checked with the server before a cached copy is used (an ETag
    makes that a bodiless 304): with no Cache-Control a browser kept its copies as long as it guessed
    (a tenth of their age), and after an upgrade ran the old page, or new modules beside old ones."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


_PROTECTED = ("/v1/", "/v2/", "/rerank", "/tokenize", "/detokenize", "/tokenizer_info")
_HEAD_PATHS = ("/", "/health", "/metrics", "/v1/models")
# /health answers 503 once this many engine steps in a row have failed (a device fault, a lost rank), so
# an orchestrator's liveness probe restarts the server, as vLLM's does once its engine is dead; one failed
# step (a bug one request hit) fails those requests and the server goes on healthy.
UNHEALTHY_AFTER_FAILED_STEPS = 3


class RequestGate:
    """The API key, draining and body-size checks, before a request reaches its route.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` passes every
    chunk of a streamed response through a memory stream and a task of its own, which at 16 streams
    took about a quarter of the event loop's time per generated token."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: list) -> None:
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def noted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, noted_send, lambda: status is not None)
        except Exception:  # not a cancellation: no answer went out then
            status = status or 500  # what uvicorn answers for an exception out of the app
            raise
        finally:
            # not the scrapes themselves (at the path routed on: an app mounted under a prefix's too)
            if status is not None and get_route_path(scope) != "/metrics":
                self.state.metrics.answered(self._handler(scope), scope["method"], status)

    def _handler(self, scope: Scope) -> str:
        """The route's path template (``/v1/models/{model_id:path}``), never the path itself, so a client
        cannot make a label of every path it tries. A refused request has not been routed yet: it is
        matched here as the router would (a route of another method next), "other" if none serves it."""
        route = scope.get("route")
        if route is not None:
            return route.path
        partial = None
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                return candidate.path
            if match is Match.PARTIAL and partial is None:
                partial = candidate.path
        return partial or "other"

    async def _gated(self, scope: Scope, receive: Receive, send: Send, started) -> None:
        refusal = self._refusal(Request(scope))
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        limit, read = self.state.config.max_request_bytes, 0

        async def counted_receive() -> dict:  # a body sent without Content-Length is counted as it comes
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send)
        except BodyTooLarge as e:  # read outside FastAPI's body parsing (which makes it a 413 itself)
            if started():
                raise
            await error_response(e.api_error())(scope, receive, send)

    def _refusal(self, request: Request) -> APIError | None:
        state = self.state
        # the path the router routes on: without the prefix of an app mounted under one (whose whole
        # path, request.url.path, starts with that prefix and never with /v1/)
        path = get_route_path(request.scope)
        if state.config.api_key and path.startswith(_PROTECTED) and request.method != "OPTIONS":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not state.key_matches(given.strip()):
                return APIError(
                    401, "a valid API key is required: Authorization: Bearer KEY", None, "invalid_api_key"
                )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > state.config.max_request_bytes:
            return BodyTooLarge(state.config.max_request_bytes).api_error()
        if state.draining and request.method == "POST":
            return APIError(503, "the server is shutting down", None, "shutting_down", {"Retry-After": "5"})
        return None


def create_app(llm: LLM, config: ServerConfig | None = None) -> FastAPI:
    state = ServerState(llm, config or ServerConfig())
    app = FastAPI(title="qwenkit", version=_version(), docs_url="/docs", redoc_url=None)
    app.state.qwenkit = state
    install_handlers(app)

    app.add_middleware(RequestGate, state=state, routes=app.router.routes)  # filled below

    if state.config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            # any header, as vLLM and llama.cpp allow: the origin is the check, and the openai JS client
            # sends its x-stainless-* headers with every request (no credentials, so "*" echoes them)
            allow_headers=["*"],
            # its retry decision reads these, and its errors carry the request id; a browser hides them
            # from another origin's script
            expose_headers=["Retry-After", "x-should-retry", REQUEST_ID_HEADER],
        )
    app.add_middleware(RequestIds)  # outermost: every answer carries its id, a preflight's too

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await routes.chat_completions(state, body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        return await responses_route.responses(state, body, request)

    # The SDK's responses.retrieve / delete / cancel / input_items.list: nothing is stored, so each is a
    # 404 that says so (a bare "Not Found" read as a route this server lacks)
    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    @app.get("/v1/responses/{response_id}/input_items")
    @app.post("/v1/responses/{response_id}/cancel")
    async def stored_response(response_id: str):
        raise APIError(
            404,
            f"response {response_id!r} was not stored: this server keeps no responses (each is sent with "
            "store false)",
            "response_id",
            "not_found",
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await routes.completions(state, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        return await embeddings_route.embeddings(state, body, request)

    @app.post("/v1/rerank")
    @app.post("/rerank")
    @app.post("/v2/rerank")
    async def rerank(body: RerankRequest, request: Request) -> dict:
        return await rerank_route.rerank_documents(state, body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        state.check_model(model_id)  # an unknown one: the 404 every route gives
        return next(card for card in model_cards() if card["id"] == model_id)

    def model_cards() -> list[dict]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": int(_STARTED),
            "owned_by": "qwenkit",
            "max_model_len": llm.engine.max_seq_len,
            "root": llm.path or state.model_name,  # vLLM's: the checkpoint it was started with
            "parent": None,
        }
        # vLLM's cards of served LoRA adapters: root is the adapter's directory, parent the base model
        adapters = [
            {**card, "id": name, "root": path, "parent": state.model_name}
            for name, path in state.adapters.items()
        ]
        return [card, *adapters]

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        return await adapter_routes.load_lora_adapter(state, body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        return await adapter_routes.unload_lora_adapter(state, body)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        driver = state.llm.driver
        if driver.failed_steps >= UNHEALTHY_AFTER_FAILED_STEPS:  # a fault that fails every step
            error = f"the last {driver.failed_steps} engine steps failed: {driver.last_error}"
            return JSONResponse({"status": "failing", "error": error}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        # in a worker thread, as the generation routes read prompts: a long one (seconds for megabytes)
        # would otherwise stop the event loop, and with it /health and every stream
        ids = await asyncio.to_thread(tokenized, body)
        return {"count": len(ids), "max_model_len": llm.engine.max_seq_len, "tokens": ids}

    def tokenized(body: TokenizeRequest) -> list[int]:
        if body.messages is not None:  # the prompt a chat request with these fields gets (its own BOS)
            try:
                chat = body.as_chat_request()
            except ValidationError as e:  # refused as the chat route refuses it: a 400 naming the field
                raise RequestValidationError(e.errors()) from None
            # with the server's default template kwargs, as the chat route renders them (as vLLM's)
            return routes.chat_prompt(llm, chat, state.config.default_chat_template_kwargs, to_run=False)
        try:  # special-token text is the token, as /v1/completions reads a prompt (and vLLM's /tokenize)
            if body.add_special_tokens:  # what /v1/completions gives the text (vLLM's default too)
                return llm.tokenizer.encode_prompt(body.prompt, allow_special=True)
            return llm.tokenizer.encode(body.prompt, allow_special=True)
        except TokenizerError as e:  # text that is not valid Unicode (a lone surrogate)
            raise APIError(400, str(e), "prompt", "invalid_value") from None

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.check_model(body.model)
        # in a worker thread, as /tokenize: 2M ids took the event loop 0.6 s
        return {"prompt": await asyncio.to_thread(detokenized, body.tokens)}

    def detokenized(tokens: list[int]) -> str:
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < llm.config.vocab_size), None)
        if bad is not None:
            vocabulary = f"outside the vocabulary (0..{llm.config.vocab_size - 1})"
            raise APIError(400, f"token id {tokens[bad]} is {vocabulary}", f"tokens.{bad}", "invalid_value")
        return decoded(llm, tokens)  # a generated embedding-padding id is no 400: it has no text

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tok = llm.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": None,
            "chat_template": tok.chat_template,
            # a model's named ones ("default" and "tool_use", rendered where tools are offered) by name;
            # chat_template stays the default text, which clients (lm-eval) render as one template
            "chat_templates": dict(getattr(tok, "chat_templates", {})),
            "model_max_length": llm.engine.max_seq_len,
        }

    if (STATIC_DIR / "index.html").is_file():
        files = PageFiles(directory=STATIC_DIR)

        @app.get("/", include_in_schema=False)
        async def index(request: Request) -> Response:
            page = STATIC_DIR / "index.html"
            return files.file_response(page, page.stat(), request.scope)

        app.mount("/static", files, name="static")

    # HEAD as GET where probes and load balancers look (FastAPI, unlike Starlette, adds none); kept out
    # of the OpenAPI schema, where it would repeat the GET's operation id
    for route in [r for r in app.routes if getattr(r, "path", None) in _HEAD_PATHS]:
        if "GET" in route.methods:
            app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)

    return app


_STARTED = time.time()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwenkit")
    except PackageNotFoundError:
        return "0"
