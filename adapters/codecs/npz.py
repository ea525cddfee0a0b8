"""Tensors as a numpy `.npz` archive: compact, typed, and readable by any numpy user.

Object (string) arrays are refused both ways: loading them would need pickle, which runs code
from the payload. String tensors travel as OIP JSON or the OIP binary extension instead.
"""

from __future__ import annotations

import io
import zipfile
import zlib

try:
    import lzma
except ImportError:  # a Python built without it: zipfile refuses LZMA members with RuntimeError
    lzma = None  # type: ignore[assignment]

import numpy as np

from edgerun.runtime import npy_headers
from edgerun.runtime.errors import InvalidInput, PayloadTooLarge

CONTENT_TYPE = "application/x-npz"
#: The most bytes the members of an `.npz` payload may hold once decompressed: the largest MQTT
#: message (256 MiB), so only a compressed archive can pass it, and a zip bomb (a 400 KB
#: message of deflate inflated to 400 MB, on the daemon's event loop) is refused unread.
MAX_DECODED_BYTES = 256 << 20
#: What zipfile raises for a member it cannot inflate: corrupt deflate or LZMA data (bzip2's
#: is an OSError), a compression method or zip feature it lacks (NotImplementedError), an
#: encrypted member (RuntimeError). All the payload's fault, so never an internal error.
_ARCHIVE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) + (
    (lzma.LZMAError,) if lzma is not None else ())


def decode(payload: bytes, max_bytes: int = MAX_DECODED_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` payload by name; refused past `max_bytes` decompressed.

    Each member is inflated before the `.npy` header lock is taken: a big payload decoded on
    a worker thread held it through its inflating, and a small one decoded on the daemon's
    event loop meanwhile stopped the loop until then."""
    if not payload.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise InvalidInput("the payload is not an .npz archive (no zip header)")
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            members = archive.infolist()
            for info in members:  # np.load handed a member not named .npy over as raw bytes
                if not info.filename.endswith(".npy"):
                    raise InvalidInput(f"the .npz payload's member {info.filename[:200]!r} is "
                                       "not a .npy array; an .npz holds .npy members only")
            # zipfile reads no member past the size the archive declares for it
            declared = sum(info.file_size for info in members)
            if declared > max_bytes:
                raise PayloadTooLarge(f"the .npz payload holds {declared} bytes once "
                                      f"decompressed, over the {max_bytes}-byte limit")
            arrays = {}
            for info in members:
                member = io.BytesIO(archive.read(info))
                # headers are parsed by `ast`, one thread at a time on 3.11 (runtime.npy_headers)
                with npy_headers.LOCK:
                    array = np.lib.format.read_array(member, allow_pickle=False)
                arrays[info.filename.removesuffix(".npy")] = array  # np.load's names
            return arrays
    except MemoryError:  # numpy allocates the shape a member's header declares before reading
        raise InvalidInput("the .npz payload declares an array too large to hold") from None
    except ValueError as exc:
        if isinstance(exc, InvalidInput):
            raise
        if "Object arrays" in str(exc):
            raise InvalidInput("the .npz payload holds object arrays, which need pickle; send "
                               "strings as OIP JSON or the OIP binary extension") from None
        raise InvalidInput(f"the payload is not a valid .npz archive: {exc}") from None
    except _ARCHIVE_ERRORS as exc:
        raise InvalidInput(f"the payload is not a valid .npz archive: {exc}") from None


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed `.npz` of the arrays (tensors rarely compress; speed matters more)."""
    for name, array in arrays.items():
        if array.dtype.kind == "O":
            raise InvalidInput(f"output {name!r} holds strings, which .npz cannot carry without "
                               "pickle; ask for OIP JSON instead", name)
    # member by member, as np.savez writes them: savez takes the names as keyword arguments,
    # so an output named `file` raised TypeError and one named `allow_pickle` was read as
    # that flag and left out
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()
