"""Where a repository's versions come from.

A `Repository` asks its source which models exist, which of their versions to serve, and where
each version's bundle lies; it never walks a folder itself. `FolderSource` is the model
repository folder of `edgerun serve` (`ROOT/<name>/<version>/` with an optional config.toml).
Other sources plug in through the same four questions: a single KServe-mounted model, or an OTA
agent's A/B slots, where "wanted" is whichever slot the agent has activated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.bundle import NAME_RE, VERSION_RE, version_key
from edgerun.runtime.errors import BundleError, ModelNotFound
from edgerun.runtime.model_config import ModelConfig


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


class FolderSource:
    """`ROOT/<name>/<version>/` bundle folders, each model with an optional config.toml."""

    def __init__(self, root: str | Path, default_batching: BatchingConfig | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: model repository folder does not exist")
        self.default_batching = default_batching

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def config(self, name: str) -> ModelConfig:
        folder = self.root / name
        if not NAME_RE.match(name) or not folder.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
        return ModelConfig.load(folder, self.default_batching)

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir()
                       if p.is_dir() and VERSION_RE.match(p.name)), key=version_key)

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        return config.version_policy.select(self.versions(name))

    def bundle_path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def fingerprint(self, name: str, version: str) -> tuple:
        return folder_fingerprint(self.bundle_path(name, version))


def folder_fingerprint(folder: Path) -> tuple:
    """Names, sizes and mtimes of a folder's files (or of one file)."""
    try:
        if folder.is_file():
            stat = folder.stat()
            return ((folder.name, stat.st_size, stat.st_mtime_ns),)
        return tuple(sorted((p.name, s.st_size, s.st_mtime_ns)
                            for p in folder.iterdir() for s in [p.stat()]))
    except OSError:
        return ()
