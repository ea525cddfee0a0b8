"""The core's error kinds as HTTP status codes: one mapping for every HTTP-speaking adapter."""

from __future__ import annotations

import json
import logging
import math

from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InferenceError, InvalidInput, ModelNotFound, ModelNotReady,
                                    Overloaded, PayloadTooLarge, PermissionDenied,
                                    Unauthenticated, UnsupportedMediaType)

log = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[EdgerunError], int], ...] = (
    (PayloadTooLarge, 413), (UnsupportedMediaType, 415), (InvalidInput, 400), (BundleError, 400),
    (ModelNotFound, 404), (ModelNotReady, 503), (Overloaded, 503), (DeadlineExceeded, 504), (Cancelled, 499),
    (Unauthenticated, 401), (PermissionDenied, 403), (InferenceError, 500))


def status_of(error: EdgerunError | None) -> int:
    if error is None:
        return 200
    return next((code for kind, code in _STATUS if isinstance(error, kind)), 500)


def error_headers(error: EdgerunError | None) -> dict[str, str]:
    """Headers an error status carries: when to retry a full queue, how to authenticate."""
    if isinstance(error, Overloaded):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    if isinstance(error, Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def answer_too_large(size: int, limit: int, request_id: str | None) -> str:
    """The message of the 413 a serverless function answers with in place of an answer larger
    than its platform passes on (which would be a bare 5xx, met again at every retry), logged
    with the request id."""
    log.error(json.dumps({"message": "answer too large", "request_id": request_id,
                          "bytes": size, "limit": limit}))
    return (f"the answer of {size} bytes is over the {limit}-byte limit on what this function "
            "can answer; send fewer rows a request, or ask for binary outputs")
