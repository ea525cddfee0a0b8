"""Reading `.npy`/`.npz` files that users hand in (calibration, eval data, request tensors).

numpy reports a truncated or corrupt file with whatever its layers raise (zipfile, zlib, EOF,
ValueError, a refusal to unpickle); callers want one typed error that names the file instead
of a traceback, so every reader of user arrays goes through `load_arrays`.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edgerun.optimizers.errors import OptimizeError

#: What numpy and the layers under it raise for a file that is not a sound .npy/.npz.
UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, ValueError,
              NotImplementedError, pickle.UnpicklingError)


def load_arrays(path: Path, error: type[Exception] = OptimizeError
                ) -> np.ndarray | dict[str, np.ndarray]:
    """The array of an .npy file, or the arrays of an .npz file by key, read in full.

    A file that cannot be read raises `error` naming the path: every member of an .npz is
    read here, since numpy decompresses lazily and a corrupt member fails only when read.
    """
    path = Path(path)
    archive = path.suffix.lower() == ".npz"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays: np.ndarray | dict[str, np.ndarray] = {
                    key: loaded[key] for key in loaded.files}
        else:
            arrays = loaded
    except UNREADABLE as exc:
        raise error(f"{path}: not a readable {'.npz' if archive else '.npy'} file "
                    f"({_reason(exc)})") from exc
    if archive != isinstance(arrays, dict):
        held = "an .npz archive" if isinstance(arrays, dict) else "a single .npy array"
        raise error(f"{path}: holds {held}; its name should end in "
                    f"{'.npz' if isinstance(arrays, dict) else '.npy'}")
    return arrays


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "Object arrays" in text:
        return "it holds object arrays (pickled Python objects), which are never loaded: " \
               "save plain numeric or string arrays"
    if "pickle" in text:
        return "neither .npy nor .npz data, and pickles are never loaded"
    if isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError)):
        return f"truncated or corrupt: {text}"
    return text
