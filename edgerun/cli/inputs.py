"""Reading request tensors from files: `.npy`, `.npz`, or JSON `{"name": [[...]]}`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.optimizers.arrays import load_arrays
from edgerun.runtime.errors import InvalidInput


def load_inputs(path: Path, input_names: Sequence[str]) -> dict[str, Any]:
    """Tensors by name; a bare array (.npy or a JSON list) feeds a single-input model."""
    if not path.is_file():  # a folder was said not to exist
        raise InvalidInput(f"{path}: {'not a file' if path.exists() else 'no such input file'}")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        arrays = load_arrays(path, InvalidInput)  # a corrupt file: one line naming it
        return arrays if isinstance(arrays, dict) else _single(arrays, input_names, path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            return data
        return _single(data, input_names, path)
    raise InvalidInput(f"{path}: input files are .npy, .npz or .json")


def _single(value: Any, input_names: Sequence[str], path: Path) -> dict[str, Any]:
    if len(input_names) != 1:
        raise InvalidInput(f"{path}: holds one unnamed tensor but the model takes "
                           f"{', '.join(map(repr, input_names))}; name them in .npz or JSON")
    return {input_names[0]: value}


def outputs_to_json(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Outputs as JSON-ready {name: {dtype, shape, data}}."""
    result = {}
    for name, array in outputs.items():
        data = array.astype(str).tolist() if array.dtype.kind in "OSU" else array.tolist()
        result[name] = {"dtype": array.dtype.name if array.dtype.kind not in "OSU" else "string",
                        "shape": list(array.shape), "data": data}
    return result
