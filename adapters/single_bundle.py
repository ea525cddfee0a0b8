"""A function's only model, loaded at init: what the serverless adapters share.

`EDGERUN_MODEL` names the bundle; any failure becomes one BundleError that names the variable,
its value and the reason, so a function's init error says what to fix.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path

from edgerun.devices import DeviceProfile
from edgerun.runtime import archive, staging
from edgerun.runtime.errors import BundleError, EdgerunError
from edgerun.runtime.model_config import ModelConfig
from edgerun.runtime.repository import Repository
from edgerun.runtime.sources import BundleSource

MODEL_VARIABLE = "EDGERUN_MODEL"


def serve_bundle(spec: str, locate: Callable[[str], Path] = Path, *,
                 device: DeviceProfile | None = None,
                 config: ModelConfig | None = None) -> tuple[Repository, BundleSource]:
    """A repository serving the bundle `spec` names, loaded and ready."""
    if not spec:
        raise BundleError(f"{MODEL_VARIABLE} is not set: give it a bundle folder or .tar.gz "
                          "(or, on Lambda, an s3:// URI)")
    try:
        source = BundleSource(locate(spec), config)
        repository = Repository(source, device)
        repository.load_all()
        if not repository.ready:
            reasons = [s.reason for s in repository.index() if s.reason]
            repository.close()
            raise BundleError("; ".join(reasons) or f"{source.name} did not load")
    except EdgerunError as exc:
        raise BundleError(f"{MODEL_VARIABLE}={spec!r}: {exc}") from exc
    return repository, source


def unpacked(path: Path, cache: Path) -> Path:
    """The archive `path` unpacked into a staging folder of this process in `cache`, which
    lives as long as the process (removed at a normal exit; after a kill, by the next load's
    sweep), rather than a temporary folder in /tmp that a killed process leaves for good: a
    Lambda start that timed out, a Cloud Functions worker killed past its timeout, each then
    followed by one more copy. On Cloud Functions /tmp is memory. A cache that cannot hold
    the copy is named (`EDGERUN_CACHE_DIR`), where its errno was blamed on the model."""
    why = staging.unwritable(cache / "bundle")
    if why:
        raise BundleError(f"EDGERUN_CACHE_DIR={str(cache)!r}: the archive cannot be unpacked "
                          f"there: {why}")
    cache.mkdir(parents=True, exist_ok=True)
    staging.sweep(cache)
    folder = staging.reserve(cache, "bundle")
    try:
        archive.unpack(path, folder / "bundle")
    except BaseException:
        staging.discard(folder)
        raise
    atexit.register(staging.discard, folder)
    return folder / "bundle"
