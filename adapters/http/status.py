"""The core's error kinds as HTTP status codes: one mapping for every HTTP-speaking adapter."""

from __future__ import annotations

import math

from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InferenceError, InvalidInput, ModelNotFound, ModelNotReady,
                                    Overloaded, PayloadTooLarge, PermissionDenied,
                                    Unauthenticated, UnsupportedMediaType)

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
