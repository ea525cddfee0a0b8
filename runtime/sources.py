"""Where a repository's versions come from.

A `Repository` asks its source which models exist, which of their versions to serve, and where
each version's bundle lies; it never walks a folder itself. `FolderSource` is the model
repository folder of `edgerun serve` (`ROOT/<name>/<version>/` with an optional config.toml).
Other sources plug in through the same four questions: a single KServe-mounted model, or an OTA
agent's A/B slots, where "wanted" is whichever slot the agent has activated.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from edgerun.devices import DeviceProfile
from edgerun.runtime import archive
from edgerun.runtime.backends import backend_for_file
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.bundle import (MANIFEST, NAME_RE, SIGNATURE_FILE, VERSION_RE, Manifest,
                                    check_name, create_bundle, parse_manifest, read_manifest,
                                    version_key, write_manifest)
from edgerun.runtime.errors import BundleError, ModelNotFound
from edgerun.runtime.model_config import ModelConfig

log = logging.getLogger(__name__)


class VersionSource(Protocol):
    """The questions a Repository asks about the models it may serve."""

    def models(self) -> list[str]:
        """Names of the models this source offers."""

    def config(self, name: str) -> ModelConfig:
        """The model's serving config; ModelNotFound if the source has no such model."""

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        """The versions to serve now, oldest first (empty: none can be served)."""

    def bundle_path(self, name: str, version: str) -> Path:
        """The bundle folder (or archive) of one version."""

    def fingerprint(self, name: str, version: str) -> tuple:
        """Changes whenever the version's files change: a failed load is retried only then."""

    # Optional: `check(bundle)`, run on each opened bundle before it loads (BundleError to
    # refuse it), e.g. a signature check that must hold for the very files that serve.


class FolderSource:
    """`ROOT/<name>/<version>/` bundle folders, each model with an optional config.toml."""

    def __init__(self, root: str | Path, default_batching: BatchingConfig | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():  # it was said not to exist
            raise BundleError(f"{self.root}: a model repository must be a folder, not a file")
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: model repository folder does not exist")
        self.default_batching = default_batching

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name))

    def config(self, name: str) -> ModelConfig:
        folder = self.root / name
        if not NAME_RE.fullmatch(name) or not folder.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
        return ModelConfig.load(folder, self.default_batching)

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir()
                       if p.is_dir() and VERSION_RE.fullmatch(p.name)), key=version_key)

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        return config.version_policy.select(self.versions(name))

    def bundle_path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def fingerprint(self, name: str, version: str) -> tuple:
        return folder_fingerprint(self.bundle_path(name, version))


#: How long after a file changed its mtime cannot yet tell that change from the next one
#: (FAT keeps mtimes in 2 s steps, HFS+ and some network filesystems in 1 s), with a margin.
SETTLE_NS = 3_000_000_000


def folder_fingerprint(folder: Path) -> tuple:
    """Paths, sizes, mtimes and change times of a folder's files at any depth (or of one file).

    Files a manifest lists may lie in subfolders, whose own mtime does not change when a file
    in them is rewritten. The change time moves on any write, where `rsync -t`, `cp -p` or
    `tar -x` set the mtime back to the source's. A file modified within `SETTLE_NS` makes the
    fingerprint equal to no other: a same-size rewrite in the same mtime step (FAT keeps 2 s
    steps, and no change time of its own) would otherwise look like no change, and a failed
    load would never be retried.
    """
    try:
        if folder.is_file():
            entries = [(folder.name, folder.stat())]
        else:
            entries = [(p.relative_to(folder).as_posix(), p.stat())
                       for p in folder.rglob("*") if p.is_file()]
    except OSError:
        return ()
    fingerprint = tuple(sorted((name, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                               for name, s in entries))
    now = time.time_ns()
    if any(now - s.st_mtime_ns < SETTLE_NS for _, s in entries):
        return (*fingerprint, ("unsettled", object()))
    return fingerprint


class BundleSource:
    """One bundle at a path (a folder or an archive): a function's or a device's only model.

    The bundle's manifest names the model and its version, so nothing is laid out around it.
    """

    def __init__(self, path: str | Path, config: ModelConfig | None = None) -> None:
        self.path = Path(path)
        self.manifest = _read_bundle_manifest(self.path)
        self._config = config or ModelConfig()

    def __repr__(self) -> str:
        return f"BundleSource({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def models(self) -> list[str]:
        return [self.manifest.name]

    def config(self, name: str) -> ModelConfig:
        if name != self.manifest.name:
            raise ModelNotFound(f"model {name!r} is not served here; only "
                                f"{self.manifest.name!r} is")
        return self._config

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        return [self.manifest.version]

    def bundle_path(self, name: str, version: str) -> Path:
        return self.path

    def fingerprint(self, name: str, version: str) -> tuple:
        return folder_fingerprint(self.path)


def _is_archive(path: Path) -> bool:
    return path.is_file() and archive.is_archive_name(path.name)


def _is_model_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        backend_for_file(path)
    except BundleError:
        return False
    return True


def _holds_a_model(path: Path) -> bool:
    """Whether `path` is a bundle folder, bundle archive or model file. An entry this user may
    not look into (a filesystem's root-owned 0700 `lost+found`) is none: it was the error."""
    try:
        return (path / MANIFEST).is_file() or _is_archive(path) or _is_model_file(path)
    except PermissionError:
        return False


def _single_model(path: Path) -> Path:
    """The bundle folder, archive or model file at `path` or, if it is the only one, in it."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise BundleError(f"{path}: no such model folder or file")
    if (path / MANIFEST).is_file():
        return path
    # a PVC mounted at /mnt/models holds its filesystem's lost+found
    entries = [p for p in sorted(path.iterdir())
               if not p.name.startswith(".") and p.name != "lost+found"]
    found = [p for p in entries if _holds_a_model(p)]
    if len(found) == 1:
        return found[0]
    if not found and len(entries) == 1 and entries[0].is_dir():
        return _single_model(entries[0])
    listed = ", ".join(p.name for p in (found or entries)) or "nothing"
    raise BundleError(f"{path}: expected one bundle folder, bundle archive (.tar.gz, .zip) or "
                      f"model file that a backend runs (.onnx, ...); found {listed}")


class SingleModelSource(BundleSource):
    """The one model KServe's storage initializer mounts (`/mnt/models`), under one name.

    The folder (or file) holds a bundle folder (manifest.json), a bundle archive (`.tar.gz`,
    `.zip`) or a bare model file some backend runs (`.onnx`, ...), itself or as its only entry
    one level down. A bare file is bundled once, here, as version "1" (its golden sample is made
    and checked like any bundle's); a bundle serves as its own version. A bundle built under
    another name is served from a copy whose manifest carries the served name: the name is
    what clients call, and every file's hash is still verified when it loads.
    """

    def __init__(self, path: str | Path, name: str | None = None,
                 default_batching: BatchingConfig | None = None, *,
                 device: str | DeviceProfile | None = None) -> None:
        found = _single_model(Path(path))
        # Lives as long as the source: an unpacked, relabelled or freshly made bundle.
        self._workdir = tempfile.TemporaryDirectory(prefix="edgerun-model-")
        work = Path(self._workdir.name) / "bundle"
        if found.is_dir() or _is_archive(found):
            if found.is_file():
                archive.unpack(found, work)
                found = work
            manifest = read_manifest(found)
            # "" is a name given, and refused: it served under the bundle's own name
            served = check_name(manifest.name if name is None else name)
            if manifest.name != served:
                if found != work:  # links copied as links, refused by the load's checks
                    shutil.copytree(found, work, symlinks=True,
                                    ignore=shutil.ignore_patterns(SIGNATURE_FILE))
                (work / SIGNATURE_FILE).unlink(missing_ok=True)  # it signed the old name
                write_manifest(work, dataclasses.replace(manifest, name=served))
                found = work
        else:
            backend_for_file(found)  # a clear error for a file no backend runs
            stem = found.name.split(".")[0]
            served = check_name(name if name is not None else
                                stem if NAME_RE.fullmatch(stem) else "model")
            found = create_bundle(found, work, name=served, version="1", device=device).path
        super().__init__(found, ModelConfig(batching=default_batching or BatchingConfig()))
        log.info("serving %s as %s version %s", path, self.name, self.version)

    def __repr__(self) -> str:
        return f"SingleModelSource({str(self.path)!r}, name={self.name!r})"


def _read_bundle_manifest(path: Path) -> Manifest:
    """The manifest of a bundle folder, or of an archive without extracting the rest."""
    if path.is_dir():
        return read_manifest(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle folder or archive")
    raw = archive.read_member(path, MANIFEST)
    if raw is None:
        raise BundleError(f"{path}: the archive holds no {MANIFEST}; not a bundle")
    return parse_manifest(raw, f"{path}: {MANIFEST}")
