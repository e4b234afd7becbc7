"""Errors in the OpenAI envelope: ``{"error": {"message", "type", "param", "code"}}``.

Every client error is a 4xx naming the field at fault (the SDK retries 5xx, so a bad request must never
look like a server fault); nothing reaches the client as a traceback.
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenkit.engine.sampling import PromptTooLongError
from qwenkit.errors import QwenkitError
from qwenkit.server.request_ids import HEADER as REQUEST_ID_HEADER
from qwenkit.server.request_ids import request_id

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI's own 401 body (code invalid_api_key tells it apart)
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if code is None and status == 400:  # every bad request says its kind, as the field checks' do
            code = "invalid_value"
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def context_code(error: Exception) -> str | None:
    """``context_length_exceeded`` for a prompt past the context window, as the generation routes say
    it (OpenAI's code); None (``invalid_value``) for any other bad input."""
    return "context_length_exceeded" if isinstance(error, PromptTooLongError) else None


def model_not_found(name: str, why: str) -> APIError:
    """vLLM's 404 for a request's ``model`` this server does not serve, ``why`` saying what it does."""
    return APIError(404, f"the model {name!r} does not exist{why}", "model", "model_not_found")


class BodyTooLarge(Exception):
    """Raised from a request's ``receive`` once its body passes ``--max-request-size`` (FastAPI turns
    an error while it reads a body into a 400 whose cause is this; the handler makes it a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes (--max-request-size)")

    def api_error(self) -> APIError:
        return APIError(413, str(self), None, "body_too_large")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, exc.headers)


def log_failure(request: Request, exc: Exception) -> None:
    """The log line of a request answered with a server error, whole or after its stream's 200, under the
    request's id: a failed generation's message (the engine logged the step), a bug's traceback."""
    if isinstance(exc, APIError):
        if exc.status == 500:
            log.error("%s: %s", request_id(request), exc.message)
    else:
        log.error("%s: unhandled error in %s", request_id(request), request.url.path, exc_info=exc)


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log_failure(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('msg', '')}", None
        elif not loc:
            message, param = "the body must be a JSON object", None
            kind = request.headers.get("content-type", "")
            if "json" not in kind.lower():  # FastAPI reads no other type (curl -d sends a form's)
                message += f" sent as Content-Type: application/json; this one came as {kind or 'no type'}"
        elif "param" in (first.get("ctx") or {}):  # schemas.invalid: the message shows the value
            param = named_param(first)
            message = f"{param}: {first['msg']}"
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and first["type"] not in ("missing",):
                shown = json.dumps(first["input"], default=str)
                message += f" (got {shown[:200]})"
        return error_response(APIError(400, message, param, "invalid_value"))

    @app.exception_handler(QwenkitError)
    async def _user_error(request: Request, exc: QwenkitError) -> JSONResponse:
        return error_response(APIError(400, str(exc), None, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):
            return error_response(exc.__cause__.api_error())
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body" names no cause
            return error_response(APIError(400, "the body is not valid JSON: it is nested too deeply", None))
        # with its headers: a 405's Allow names the methods the route takes
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log_failure(request, exc)
        # answered outside every middleware (Starlette's ServerErrorMiddleware): the id is added here
        body = error_body(500, f"internal error: {type(exc).__name__}")
        return JSONResponse(body, 500, {REQUEST_ID_HEADER: request_id(request)})


def named_param(error: dict) -> str | None:
    """The path a ``schemas.invalid`` error names (``stop.1``; ``messages.0.content.1.type`` where the
    field is a nested model's), or None for pydantic's own errors."""
    param = (error.get("ctx") or {}).get("param")
    if param is None:
        return None
    parent = [str(p) for p in error.get("loc", ())[:-1] if p != "body" and not _is_type_tag(p)]
    return ".".join([*parent, param])


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _is_type_tag(part: object) -> bool:
    """pydantic names the union member it tried (``str``, ``list[TextPart]``); that is not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)
