"""Every response's ``x-request-id`` header, as OpenAI's and vLLM's: the openai SDK reads it into
``response._request_id`` and ``APIStatusError.request_id``, and the server's log lines about a request
name it, so a user's report finds them.

A client's own ``X-Request-Id`` (``vllm bench serve`` sends one) is echoed when it is sane: printable
ASCII, at most 512 characters (OpenAI's bound on a client's request id). Anything else (control
characters, bytes past ASCII, a megabyte) is not repeated into headers and logs: the request gets an id
of our own, ``req_`` and 32 hex digits (OpenAI's form; ids here are ``<prefix>_<uuid4 hex>``, as the
Responses route's ``resp_``).
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
MAX_LENGTH = 512
# printable ASCII, no space at either end (a header's value loses those on the way anyway)
_SANE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def chosen_request_id(sent: str | None) -> str:
    """The client's id where it is sane, else a new one."""
    if sent is not None and len(sent) <= MAX_LENGTH and _SANE.fullmatch(sent):
        return sent
    return new_request_id()


def request_id(connection: HTTPConnection) -> str:
    """The id of the request being answered (the one its response's header carries)."""
    return connection.scope["state"]["request_id"]


class RequestIds:
    """Gives each HTTP request its id (in ``scope["state"]``, so ``request.state.request_id``) and puts it
    on the response. Outermost of the app's middleware, so the CORS preflight's answer and the gate's
    refusals carry it too (a 500 from an unhandled exception is answered outside every middleware: the
    errors module's handler adds the header itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = HTTPConnection(scope).headers.get(HEADER)
        rid = chosen_request_id(sent)
        scope.setdefault("state", {})["request_id"] = rid

        async def identified(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        await self.app(scope, receive, identified)
