"""The one error vocabulary of the core; each adapter maps these onto its own wire."""

from __future__ import annotations


class EdgerunError(Exception):
    """Base of every error the core raises on purpose."""

    #: A stable machine-readable kind, used by adapters for status codes and metrics labels.
    kind = "internal"
    #: The model version that raised it, once a request was routed to one.
    version: str | None = None


class InvalidInput(EdgerunError, ValueError):
    """A request does not match the model's signature; nothing was run."""

    kind = "invalid_input"

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class ModelNotFound(EdgerunError, LookupError):
    """No such model, or no such version of it, is loaded."""

    kind = "model_not_found"


class ModelNotReady(EdgerunError):
    """The model exists but cannot take requests now (loading, draining, closed)."""

    kind = "model_not_ready"


class Overloaded(EdgerunError):
    """The queue is full; the request was refused at once so memory stays bounded."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EdgerunError, TimeoutError):
    """The request's deadline passed before it ran; it was dropped, never run."""

    kind = "deadline_exceeded"


class Cancelled(EdgerunError):
    """The caller cancelled the request while it waited."""

    kind = "cancelled"


class InferenceError(EdgerunError, RuntimeError):
    """The backend failed while running this request."""

    kind = "inference_error"


class BundleError(EdgerunError):
    """A bundle is malformed, tampered with, or unsafe to extract."""

    kind = "bundle_error"


class PayloadTooLarge(InvalidInput):
    """A request is over the size its transport accepts (it was not read further), or its
    answer over the size its transport passes on (a serverless platform's response limit)."""

    kind = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    """The request comes in an encoding the server does not read (an unknown content coding)."""

    kind = "unsupported_media_type"


class Unauthenticated(EdgerunError):
    """The caller did not prove who it is (no or an unknown credential)."""

    kind = "unauthenticated"


class PermissionDenied(EdgerunError):
    """The caller is known but may not do this."""

    kind = "permission_denied"


#: The errors a later try of the same request may not meet (the model busy, late, loading, or
#: its forward pass failed): a queue or stream redelivers these. Every other error is the
#: request's own (bad input, an unknown model) and would fail again at every delivery.
RETRYABLE = (Overloaded, DeadlineExceeded, ModelNotReady, InferenceError)
