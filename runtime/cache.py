"""Where edgerun keeps what it makes once and reuses: TensorRT engines, TVM tuning records,
Lambda wheels."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EDGERUN_CACHE"


def cache_dir() -> Path:
    """$EDGERUN_CACHE, else ~/.cache/edgerun. Empty is unset (`EDGERUN_CACHE=` in a unit or
    compose file): read as a path, it was the current folder for some readers and the home
    cache for others, so engines and records were made twice, in whichever folder it ran."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgerun")
