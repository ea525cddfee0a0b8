"""Finding NVIDIA's CUDA tools: the paths a caller names first, then the `nvidia-*` wheels
installed in this environment (namespace package `nvidia`, one folder per wheel)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path


def in_nvidia_wheels(pattern: str) -> list[str]:
    """Files matching `pattern` (e.g. "*/bin/nvcc") under each `nvidia` wheel root, sorted."""
    spec = importlib.util.find_spec("nvidia")
    roots = (spec.submodule_search_locations or []) if spec else []
    return [str(path) for root in roots for path in sorted(Path(root).glob(pattern))]


def distinct(paths: Iterable[str | None], usable: Callable[[str], bool]) -> list[str]:
    """The usable paths in order, each real file once (a link and its target are one)."""
    found, seen = [], set()
    for path in paths:
        if path and usable(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append(path)
    return found
