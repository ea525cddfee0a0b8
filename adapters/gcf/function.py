"""The two Cloud Functions entry points over one data plane.

- `http(request)`: the fleet server's routes (OIP v2 JSON and binary, TF Serving, health,
  metadata, metrics; all but the repository's load and unload: the function's model is fixed
  when it is deployed, and any caller could unload it), matched with the HTTP adapter's route
  table and answered with its status mapping, so a client cannot tell the function from
  `edgerun serve`.
- `pubsub(event)`: a Pub/Sub message (CloudEvent `google.cloud.pubsub.topic.v1.messagePublished`)
  whose data is an OIP v2 JSON request; the message attribute `model` (and `version`) picks
  the model, else the function's default. The answer, all JSON, goes to `on_result` (by
  default one JSON log line). A request that cannot succeed (bad input, unknown model) is logged and
  acknowledged; one that may succeed later (overloaded, deadline, not ready, a failed forward
  pass) is raised, so Pub/Sub delivers it again when the function has retries enabled.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Call, DataPlane, InferResult, Reply
from edgerun.adapters.dataplane.call import INFER, JSON
from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.encoding import decode_body, read_limited
from edgerun.adapters.http.routes import READ_ONLY_ROUTES, match
from edgerun.adapters.http.status import error_headers, status_of
from edgerun.adapters.single_bundle import MODEL_VARIABLE, serve_bundle, unpacked
from edgerun.runtime import archive, staging
from edgerun.runtime.errors import RETRYABLE, EdgerunError, InvalidInput, PayloadTooLarge

log = logging.getLogger(__name__)

#: Cloud Functions (2nd gen) takes HTTP requests of up to 32 MiB ...
MAX_BODY_BYTES = 32 << 20
#: ... and answers (not streamed) of up to 32 MiB: Cloud Run's front end refuses a larger one
#: over HTTP/1 with a bare 500, which tells the caller nothing and which a retry meets again.
MAX_RESPONSE_BYTES = 32 << 20

#: Receives (Pub/Sub message id, OIP v2 response JSON) for each answered message.
ResultSink = Callable[[str, bytes], None]


def log_result(message_id: str, body: bytes) -> None:
    """One JSON line for Cloud Logging, which takes strict JSON: a result holding NaN or an
    infinity (tokens JSON lacks) goes in as its text."""
    entry = {"message": "inference result", "pubsub_message": message_id,
             "result": json.loads(body)}
    try:
        line = json.dumps(entry, allow_nan=False)
    except ValueError:
        line = json.dumps({**entry, "result": body.decode()})
    sys.stdout.write(line + "\n")


class CloudFunction:
    def __init__(self, plane: DataPlane, *, default_model: str = "",
                 on_result: ResultSink = log_result,
                 max_body_bytes: int = MAX_BODY_BYTES,
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.plane = plane
        self.default_model = default_model
        self.on_result = on_result
        self.max_body_bytes = max_body_bytes
        self.max_response_bytes = max_response_bytes
        plane.limit_answers(self._answer_size)

    def http(self, request: Any) -> tuple[bytes, int, dict[str, str]]:
        """A Flask request in, a (body, status, headers) answer out."""
        route, params, allowed = match(request.method, request.path, READ_ONLY_ROUTES)
        if route is None:  # answered before the data plane: the id its hook would give, as
            # the Lambda (and the fleet server) answer it
            given = {"X-Request-Id": request_id(request.headers.get("x-request-id"))}
            if allowed:
                return _error(405, f"method {request.method} is not allowed on {request.path}",
                              {"Allow": ", ".join(allowed), **given})
            return _error(404, f"no route {request.path}", given)
        headers = request.headers
        call = Call(route.route, params.get("name", ""), params.get("version"),
                    attributes=headers.get, transport="gcf")
        try:
            call.body = self._body(request) if request.method == "POST" else b""
        except InvalidInput as exc:
            reply = self.plane.refuse(call, exc)
        else:
            reply = self.plane.handle(call)
        answer = {"Content-Type": reply.content_type, **reply.headers}
        if reply.error is not None:
            answer.update(error_headers(reply.error))
        return reply.body, status_of(reply.error), answer

    def _answer_size(self, call: Call, reply: Reply) -> tuple[int, int] | None:
        """An HTTP answer's bytes against what Cloud Functions passes on: the data plane
        answers a larger one with a 413 naming the limit (and counts it so), where the platform
        would send a bare error that a retry meets again."""
        return (len(reply.body), self.max_response_bytes) if call.transport == "gcf" else None

    def _body(self, request: Any) -> bytes:
        """The body, refused past `max_body_bytes` holding no more than that + 1 bytes of it.

        A chunked body declares no length: it is read up to the limit. One refused is then
        read to its end and dropped, a piece at a time: functions-framework reads what is left
        of every request before it answers (`read_request`), into memory."""
        try:
            length = request.content_length
            if length is not None and length > self.max_body_bytes:
                raise PayloadTooLarge(f"request body of {length} bytes is over the "
                                      f"{self.max_body_bytes}-byte limit")
            body = read_limited(request.stream.read, self.max_body_bytes)
            return decode_body(body, request.headers.get("content-encoding"),
                               self.max_body_bytes)
        except PayloadTooLarge:
            while request.stream.read(1 << 16):
                pass
            raise

    def pubsub(self, event: Any) -> None:
        """A Pub/Sub CloudEvent: infer, hand the result on; raise only what a retry may fix."""
        data = event.data
        message = data.get("message") if isinstance(data, dict) else None
        message = message if isinstance(message, dict) else {}
        message_id = str(message.get("messageId") or event["id"])
        # anything but the envelope Pub/Sub writes (a CloudEvent POSTed by hand) is logged and
        # acknowledged: an AttributeError or TypeError here was a 500, delivered again forever
        attributes = message.get("attributes") or {}
        if not isinstance(attributes, dict):
            _log_failure(message_id, InvalidInput("message attributes must be an object, got "
                                                  f"{type(attributes).__name__}"), None)
            return
        attributes = {str(k).lower(): str(v) for k, v in attributes.items()}
        try:
            body = base64.b64decode(message.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            _log_failure(message_id, InvalidInput(f"message data is not base64 ({exc})"),
                         attributes.get("x-request-id"))
            return
        call = Call(INFER, attributes.get("model") or self.default_model,
                    attributes.get("version"), body, attributes.get, "pubsub")
        try:  # encoded inside the counted call: an output JSON cannot carry is this message's
            # failure, counted as its error (not `ok`), and its time is the call's
            answer = self.plane.infer(call, lambda: oip.decode_request(
                body, attributes.get(oip.HEADER_LENGTH)), InferResult.json)
        except EdgerunError as error:
            _log_failure(message_id, error, call.request_id)
            if isinstance(error, RETRYABLE):
                raise
            return
        self.on_result(message_id, answer)


_current: tuple[int, CloudFunction] | None = None
_current_lock = threading.Lock()


def current() -> CloudFunction:
    """This process's function, loaded on first use.

    functions-framework imports the entry module in gunicorn's master process and serves from
    a forked worker, where threads started before the fork (the batcher's) do not run: loading
    at import would leave every request waiting. So the model loads in the process that
    serves, once (and again in a process forked after that)."""
    global _current
    with _current_lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), from_environment())
        return _current[1]


def answer_http(request: Any) -> tuple[bytes, int, dict[str, str]]:
    """`current().http(request)`; a model that does not load is a JSON 500 naming
    EDGERUN_MODEL and why, where functions-framework would answer an HTML page."""
    try:
        function = current()
    except Exception as exc:  # loaded again on the next request: a redeploy may fix it
        log.exception("the function's model did not load")
        return _error(500, str(exc) if isinstance(exc, EdgerunError) else
                      f"{MODEL_VARIABLE}: the model did not load: {type(exc).__name__}: {exc}")
    return function.http(request)


def from_environment(environ: Mapping[str, str] | None = None) -> CloudFunction:
    """The function for EDGERUN_MODEL (a bundle folder or .tar.gz in the source), loaded now.

    An archive is unpacked into a staging folder of this process in EDGERUN_CACHE_DIR
    (`$TMPDIR/edgerun`), which the next load sweeps once its process is gone: /tmp is the
    instance's memory, and a gunicorn worker killed (past its timeout, out of memory) left its
    copy there for good while the next worker unpacked another."""
    environ = os.environ if environ is None else environ
    cache = Path(environ.get("EDGERUN_CACHE_DIR") or Path(tempfile.gettempdir()) / "edgerun")
    copies: list[Path] = []

    def local(spec: str) -> Path:
        path = Path(spec)
        if path.is_file() and archive.is_archive_name(path.name):
            copies.append(unpacked(path, cache))
            return copies[-1]
        return path

    try:
        repository, source = serve_bundle(environ.get(MODEL_VARIABLE, ""), local)
    except BaseException:  # the next request loads again: one copy at a time, not one each
        for copy in copies:
            staging.discard(copy.parent)
        raise
    return CloudFunction(DataPlane(repository), default_model=source.name)


def _error(status: int, message: str,
           headers: dict[str, str] | None = None) -> tuple[bytes, int, dict[str, str]]:
    return json.dumps({"error": message}).encode(), status, {"Content-Type": JSON,
                                                             **(headers or {})}


def _log_failure(message_id: str, error: EdgerunError, request_id: str | None) -> None:
    """One JSON line per failed message, with the request id its publisher gave (the
    `x-request-id` attribute) or the data plane made, as the Lambda adapter logs a record's."""
    log.error(json.dumps({"message": "pubsub message failed", "pubsub_message": message_id,
                          "request_id": request_id, "kind": error.kind, "error": str(error)}))
