"""What every backend provides to the core."""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerun.devices import DeviceProfile
from edgerun.runtime.signature import Signature

if TYPE_CHECKING:
    from edgerun.runtime.bundle import Bundle


class Verified:
    """A bundle file's verified bytes, as backends that keep them hold them (`shared_file`)."""

    __slots__ = ("data", "__weakref__")

    def __init__(self, data: bytes) -> None:
        self.data = data


_SHARED: weakref.WeakValueDictionary[tuple[str, int], Verified] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_file(bundle: Bundle, name: str) -> Verified:
    """`bundle.read_file(name)` (read and checked on every call), as the one copy that every
    holder alive of bytes with the same sha256 shares: serving loads a version once per
    instance, and a backend that keeps its model's bytes (LiteRT, which runs them in place;
    an accelerated ONNX Runtime session, to fall back to the CPU) would otherwise keep them
    once per instance. Hold the result for as long as its bytes are used."""
    data = bundle.read_file(name)
    entry = bundle.manifest.files[name]
    with _SHARED_LOCK:
        held = _SHARED.get((entry.sha256, entry.size))
        if held is None:
            held = _SHARED[(entry.sha256, entry.size)] = Verified(data)
    return held


class Backend(ABC):
    """One loaded model file on one device; `run` takes and returns validated arrays."""

    #: The name in the manifest's `backend` field.
    name: str = ""

    @classmethod
    @abstractmethod
    def inspect(cls, model_path: Path) -> Signature:
        """Read the io signature from a model file (used when a bundle is created)."""

    @classmethod
    def data_files(cls, model_path: Path) -> list[str]:
        """Files the model reads from beside it (ONNX external data), as it names them,
        relative to its folder: a bundle made from it must carry them. None by default."""
        return []

    @classmethod
    @abstractmethod
    def load(cls, model_path: Path, device: DeviceProfile) -> Backend:
        """Load a model file for a device (a file this process made: `create_bundle`)."""

    @classmethod
    @abstractmethod
    def from_bundle(cls, bundle: Bundle, device: DeviceProfile) -> Backend:
        """Load a bundle's model for a device from the bytes `bundle.read_file` returns (read
        once and checked against the manifest), never from its path: a repository folder can
        change after it was verified, and what runs must be what was verified."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass; inputs are already validated against the signature."""

    def conform(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What this backend cannot take, refused (InvalidInput) or converted at validation,
        before a request is queued: a bad one must never fail the batch it would join."""
        return inputs

    def unbatch(self) -> None:
        """Axis 0 is no batch (a batching config's `max_batch_size = 0`), whatever the bundle
        says: a backend that treats a request of no rows as an empty batch stops. Nothing by
        default."""

    def describe(self) -> dict[str, Any]:
        """What this backend runs on, for metadata endpoints and logs."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release the model; the default leaves it to the garbage collector."""
