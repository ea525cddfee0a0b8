"""A request as every transport hands it to the data plane, and the answer it gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgerun.runtime.errors import EdgerunError

JSON = "application/json"
BINARY = "application/octet-stream"

#: Looks up a request attribute by lower-case name: an HTTP header, an MQTT v5 user property,
#: gRPC metadata, a Lambda event header.
Attributes = Callable[[str], "str | None"]

# Routes: what a call asks for. Transports map their paths, topics or RPCs onto these.
INFER = "infer"                      # OIP v2 inference (JSON or the binary extension)
PREDICT = "predict"                  # TF Serving REST predict
LIVE = "live"
READY = "ready"
SERVER_METADATA = "server_metadata"
MODEL_METADATA = "model_metadata"
MODEL_READY = "model_ready"
MODEL_STATUS = "model_status"        # TF Serving model status
REPOSITORY_INDEX = "repository_index"
LOAD = "load"
UNLOAD = "unload"
METRICS = "metrics"
INFERENCE_ROUTES = frozenset({INFER, PREDICT})


def no_attributes(name: str) -> None:
    return None


@dataclass(slots=True)
class Call:
    """One request: the route it asks for, its body, and how to read its attributes."""

    route: str
    model: str = ""
    version: str | None = None
    body: bytes = b""
    attributes: Attributes = no_attributes
    #: Which way in ("http", "grpc", "mqtt", "lambda", "sqs", ...): a bounded metrics label.
    transport: str = "http"
    #: A queueing budget the transport imposes (a gRPC deadline, a Lambda's remaining time).
    timeout: float | None = None
    #: When the transport's caller stops waiting (`time.monotonic()`, a gRPC deadline): a
    #: call cancelled past it is counted `deadline_exceeded`, the status its caller got.
    deadline: float | None = None
    #: Set by hooks: the request id, who is calling, and headers for the answer.
    request_id: str | None = None
    identity: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    #: The version routed to answer, once known: a call cancelled before its reply (the
    #: client went away) is counted against it.
    routed_version: str = ""
    #: Top-level members of an OIP request the transport needs for its answer, by name: the
    #: decode fills their values once it has read the request (see `oip.decode_request`).
    kept: dict[str, Any] | None = None


@dataclass(slots=True)
class Reply:
    """The answer: the body to send, and the core's error when it is one."""

    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    error: EdgerunError | None = None
    #: The version that answered (or failed), once the request was routed to one.
    version: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None
