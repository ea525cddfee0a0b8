"""Tensors as a numpy `.npz` archive: compact, typed, and readable by any numpy user.

Object (string) arrays are refused both ways: loading them would need pickle, which runs code
from the payload. String tensors travel as OIP JSON or the OIP binary extension instead.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from edgerun.runtime.errors import InvalidInput

CONTENT_TYPE = "application/x-npz"


def decode(payload: bytes) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` payload by name."""
    if not payload.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise InvalidInput("the payload is not an .npz archive (no zip header)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise InvalidInput("the .npz payload holds object arrays, which need pickle; send "
                               "strings as OIP JSON or the OIP binary extension") from None
        raise InvalidInput(f"the payload is not a valid .npz archive: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"the payload is not a valid .npz archive: {exc}") from None


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed `.npz` of the arrays (tensors rarely compress; speed matters more)."""
    for name, array in arrays.items():
        if array.dtype.kind == "O":
            raise InvalidInput(f"output {name!r} holds strings, which .npz cannot carry without "
                               "pickle; ask for OIP JSON instead", name)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
