"""The core's error kinds as gRPC status codes: the gRPC twin of `adapters.http.status`."""

from __future__ import annotations

import math

import grpc

from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InvalidInput, ModelNotFound, ModelNotReady, Overloaded,
                                    PayloadTooLarge, PermissionDenied, Unauthenticated)

_CODES: tuple[tuple[type[EdgerunError], grpc.StatusCode], ...] = (
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION))


def code_of(error: EdgerunError) -> grpc.StatusCode:
    """The status code of an error; anything unexpected (InferenceError too) is INTERNAL."""
    return next((code for kind, code in _CODES if isinstance(error, kind)),
                grpc.StatusCode.INTERNAL)


def error_metadata(error: EdgerunError) -> dict[str, str]:
    """Trailing metadata an error carries: when a full queue expects room again."""
    if isinstance(error, Overloaded):
        return {"retry-after": str(max(1, math.ceil(error.retry_after_s)))}
    return {}
