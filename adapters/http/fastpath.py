"""An ASGI layer in front of the FastAPI app that answers infer and predict requests itself.

At thousands of requests a second the framework's per-request layers (middleware stack,
routing, dependency resolution, Request and Response objects) cost more CPU than the request's
own work, and on a small host that CPU is taken from the model. Those two routes go straight
to the same `InferenceHandler` the FastAPI routes call; everything else (metadata, health,
repository, metrics, docs, lifespan) passes through to FastAPI untouched.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from edgerun.adapters.http.inference import InferenceHandler, Receive, Reply

_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_PREDICT = re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+))?:predict")
Send = Any


class FastPath:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.handler: InferenceHandler = app.state.inference

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            match = _INFER.fullmatch(path)
            if match is not None:
                reply = await self.handler.infer(match[1], match[2], _headers(scope), receive)
                return await _send(send, reply)
            match = _PREDICT.fullmatch(path)
            if match is not None:
                reply = await self.handler.predict(match[1], match[2], _headers(scope), receive)
                return await _send(send, reply)
        await self.app(scope, receive, send)


def _headers(scope: dict[str, Any]):
    """A case-insensitive header lookup over the ASGI (lower-case, bytes) header list."""
    headers = dict(scope["headers"])

    def get(name: str) -> str | None:
        value = headers.get(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    return get


async def _send(send: Send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type.encode()),
               (b"content-length", str(len(reply.body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
