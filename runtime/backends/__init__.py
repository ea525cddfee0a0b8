"""Backends by name, imported only when first needed so a process pays for the one it uses."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgerun.runtime.backends.base import Backend
from edgerun.runtime.errors import BundleError

_BACKENDS = {
    "onnxruntime": ("edgerun.runtime.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tflite": ("edgerun.runtime.backends.tflite", "TFLiteBackend"),
    "tvm": ("edgerun.runtime.backends.tvm", "TvmBackend"),
}
_SUFFIXES = {".onnx": "onnxruntime", ".tflite": "tflite"}


def backend_class(name: str) -> type[Backend]:
    """The Backend class registered under `name`."""
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        raise BundleError(f"unknown backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return getattr(importlib.import_module(module_name), class_name)


def backend_for_file(path: Path) -> str:
    """The backend that runs a model file, by its suffix."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise BundleError(f"{path.name}: no backend runs {path.suffix or 'suffix-less'} files; "
                          f"supported: {', '.join(sorted(_SUFFIXES))}") from None


__all__ = ["Backend", "backend_class", "backend_for_file"]
