"""The infer and predict requests, independent of the ASGI framework around them.

The FastAPI routes and the fast path in front of them (`fastpath.py`) both call this: bytes
and a header lookup in, a `Reply` out, the core's errors mapped to status codes on the way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgerun.adapters.http import oip, tfserving
from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InferenceError, InvalidInput, ModelNotFound, ModelNotReady,
                                    Overloaded)
from edgerun.runtime.metrics import LATENCY_BUCKETS
from edgerun.runtime.repository import Repository

log = logging.getLogger(__name__)

STATUS = {InvalidInput: 400, BundleError: 400, ModelNotFound: 404, ModelNotReady: 503,
          Overloaded: 503, DeadlineExceeded: 504, Cancelled: 499, InferenceError: 500}
TIMEOUT_HEADER = "x-request-timeout-ms"
JSON = "application/json"
BINARY = "application/octet-stream"
Header = Callable[[str], "str | None"]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyTooLarge(Exception):
    pass


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(content: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(content))


def error_reply(exc: Exception) -> Reply:
    """The core's error vocabulary on HTTP: a status code and `{"error": message}`."""
    if isinstance(exc, BodyTooLarge):
        return json_reply({"error": str(exc)}, 413)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    reply = json_reply({"error": str(exc) if isinstance(exc, EdgerunError)
                        else f"internal error: {exc}"}, status)
    if isinstance(exc, Overloaded):
        reply.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return reply


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The whole request body from ASGI messages, refused once it passes `limit` bytes."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BodyTooLarge(f"request body of {content_length} bytes is over the {limit}-byte "
                           "limit")
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def timeout_of(header: Header, timeout_us: float | None = None) -> float | None:
    """The queueing budget in seconds: the timeout header (ms) or OIP parameters.timeout (us)."""
    value = header(TIMEOUT_HEADER)
    if value is not None:
        try:
            milliseconds = float(value)
        except ValueError:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
        if milliseconds <= 0:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be positive")
        return milliseconds / 1000
    return None if timeout_us is None else timeout_us / 1e6


class InferenceHandler:
    """OIP infer and TF Serving predict on the repository, with per-version HTTP metrics."""

    def __init__(self, repository: Repository, max_body_bytes: int) -> None:
        self.repository = repository
        self.max_body_bytes = max_body_bytes
        registry = repository.registry
        self._requests = registry.family(
            "edgerun_http_requests_total", "Inference requests by model, version and code",
            "counter", ("model", "version", "code"))
        self._latency = registry.family(
            "edgerun_http_request_duration_seconds",
            "Inference request latency, body read to response", "histogram",
            ("model", "version"), LATENCY_BUCKETS)

    async def infer(self, name: str, version: str | None, header: Header,
                    receive: Receive) -> Reply:
        """POST /v2/models/{name}[/versions/{version}]/infer."""
        started = time.perf_counter()
        try:
            body = await read_body(receive, header("content-length"), self.max_body_bytes)
            request = oip.decode_request(body, header(oip.HEADER_LENGTH))
            result = await self.repository.infer(
                name, version, request.inputs, key_source=header,
                timeout=timeout_of(header, request.timeout_us))
            content, headers = oip.encode_response(name, result.version, request,
                                                   result.outputs)
            reply = Reply(200, content, BINARY if headers else JSON, headers)
            version = result.version
        except Exception as exc:
            reply, version = self._failed(exc, version)
        self._record(name, version or "", reply.status, started)
        return reply

    async def predict(self, name: str, version: str | None, header: Header,
                      receive: Receive) -> Reply:
        """POST /v1/models/{name}[/versions/{version}]:predict (TF Serving REST)."""
        started = time.perf_counter()
        try:
            body = await read_body(receive, header("content-length"), self.max_body_bytes)
            signature = self.repository.get(name, version).signature
            inputs, rows = tfserving.decode_predict(body, signature)
            result = await self.repository.infer(name, version, inputs, key_source=header,
                                                 timeout=timeout_of(header))
            reply = Reply(200, tfserving.encode_predict(result.outputs, rows))
            version = result.version
        except Exception as exc:
            reply, version = self._failed(exc, version)
        self._record(name, version or "", reply.status, started)
        return reply

    @staticmethod
    def _failed(exc: Exception, version: str | None) -> tuple[Reply, str | None]:
        if not isinstance(exc, (EdgerunError, BodyTooLarge)):
            log.exception("inference request failed")
        return error_reply(exc), getattr(exc, "version", None) or version

    def _record(self, model: str, version: str, status: int, started: float) -> None:
        if status == 404 and model not in self.repository:
            model = ""  # arbitrary unknown names must not grow the series without bound
        self._requests.labels(model, version, str(status)).inc()
        self._latency.labels(model, version).observe(time.perf_counter() - started)
