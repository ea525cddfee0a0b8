"""The lean ASGI app: every route of the route table, straight onto the data plane.

It imports no web framework, so a Lambda behind Mangum or any small host pays nothing for one,
and at thousands of requests a second the server pays no per-request framework layers either.
Paths outside the table (the OpenAPI docs) go to an optional fallback app. The ASGI lifespan
loads and unloads nothing: a process builds and loads its repository before or outside the app,
so a host that runs the lifespan around every invocation (Mangum) keeps its models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson

from edgerun.adapters.dataplane import Call, DataPlane, Reply
from edgerun.adapters.dataplane.call import JSON
from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.encoding import over_limit, start_decoding
from edgerun.adapters.http.routes import ROUTES, Route, match
from edgerun.adapters.http.status import error_headers, status_of
from edgerun.runtime.errors import PayloadTooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
DEFAULT_MAX_BODY_BYTES = 64 << 20
#: The cancel message of a request task whose client went away (`protocol.py` sends it): the
#: request is withdrawn and nobody is left to answer, so the task ends quietly.
CLIENT_GONE = "edgerun: the client closed the connection"


class EdgerunASGI:
    """OIP v2, TF Serving, repository and metrics routes as one ASGI callable."""

    def __init__(self, plane: DataPlane, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 fallback: ASGIApp | None = None, transport: str = "http",
                 routes: tuple[Route, ...] = ROUTES) -> None:
        self.plane = plane
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.fallback = fallback
        self.transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            if self.fallback is not None:
                return await self.fallback(scope, receive, send)
            return None
        try:
            await self._http(scope, receive, send)
        except asyncio.CancelledError as exc:
            if exc.args != (CLIENT_GONE,):
                raise
        return None

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params, allowed = match(scope["method"], scope["path"], self.routes)
        headers = dict(scope["headers"])

        def attribute(name: str) -> str | None:
            try:
                key = name.encode("latin-1")
            except UnicodeEncodeError:
                # no header has such a name (a sticky key meant for MQTT's UTF-8 user
                # properties): absent, where the lookup was a 500 for every request
                return None
            value = headers.get(key)
            return None if value is None else value.decode("latin-1")

        if route is None:  # answered here, before the data plane: the id the hook would give
            given = {"X-Request-Id": request_id(attribute("x-request-id"))}
            if allowed:
                return await _send_json(send, 405, {"error": f"method {scope['method']} is not "
                                                    f"allowed on {scope['path']}"},
                                        {"Allow": ", ".join(allowed), **given})
            if self.fallback is not None:
                return await self.fallback(scope, receive, _adding(send, given))
            return await _send_json(send, 404, {"error": f"no route {scope['path']}"}, given)
        call = Call(route.route, params.get("name", ""), params.get("version"),
                    attributes=attribute, transport=self.transport)
        # read once the hooks let the call through: a caller without a key is refused before
        # the server holds its body (up to the limit) or inflates it (a thousandfold, gzip)
        body = partial(read_body, receive, attribute("content-length"), self.max_body_bytes,
                       attribute("content-encoding")) if scope["method"] == "POST" else None
        reply = await self.plane.handle_async(call, body)
        await send_reply(send, reply, head=scope["method"] == "HEAD")


async def read_body(receive: Receive, content_length: str | None, limit: int,
                    coding: str | None = None) -> bytes:
    """The whole request body from ASGI messages, refused once it passes `limit` bytes, and
    decompressed when it came in a content coding: past its first `encoding.INLINE_BYTES`, on
    a worker thread (64 MiB took up to a third of a second on the event loop)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"request body of {content_length} bytes is over the {limit}-byte "
                              "limit")
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise over_limit(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            decoded = start_decoding(body, coding, limit)
            if isinstance(decoded, bytes):
                return decoded
            return await asyncio.get_running_loop().run_in_executor(None, decoded)


async def send_reply(send: Send, reply: Reply, *, head: bool = False) -> None:
    """A data-plane reply as an HTTP response: the error's status, its headers, the body
    (only its length for HEAD)."""
    status, raw = response_head(reply)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


def response_head(reply: Reply) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and the ASGI headers `send_reply` answers `reply` with (a serverless
    function measures its answer from them, as its platform will pass it on)."""
    headers = {**error_headers(reply.error), **reply.headers} if reply.error else reply.headers
    return status_of(reply.error), _head(reply.body, reply.content_type, headers)


def _adding(send: Send, headers: dict[str, str]) -> Send:
    """`send` with `headers` added to the response's head (for the fallback app's answers)."""
    extra = _raw(headers)

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


async def _send_json(send: Send, status: int, content: Any,
                     headers: dict[str, str] | None = None) -> None:
    await _send(send, status, orjson.dumps(content), JSON, headers or {})


async def _send(send: Send, status: int, body: bytes, content_type: str,
                headers: dict[str, str], head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _head(body, content_type, headers)})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _head(body: bytes, content_type: str, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()), *_raw(headers)]


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them: lower-case latin-1 names and values."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
