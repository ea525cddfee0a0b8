"""The one inference core every adapter shares: bundles, backends, validation, batching."""

from edgerun.runtime.batcher import BatchingConfig, MicroBatcher, Pending
from edgerun.runtime.bundle import Bundle, Manifest, create_bundle
from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InferenceError, InvalidInput, ModelNotFound, ModelNotReady,
                                    Overloaded, PayloadTooLarge, PermissionDenied,
                                    Unauthenticated, UnsupportedMediaType)
from edgerun.runtime.model import Model
from edgerun.runtime.signature import Signature, TensorSpec

__all__ = [
    "BatchingConfig", "Bundle", "BundleError", "Cancelled", "DeadlineExceeded", "EdgerunError",
    "InferenceError", "InvalidInput", "Manifest", "MicroBatcher", "Model", "ModelNotFound",
    "ModelNotReady", "Overloaded", "PayloadTooLarge", "Pending", "PermissionDenied", "Signature",
    "TensorSpec", "Unauthenticated", "UnsupportedMediaType", "create_bundle",
]
