"""The registry of signed bundles: accepts a pushed archive only after verifying it.

A push is written to a temporary file, its signature checked against the fleet's trusted keys
from its manifest alone, only the files that manifest lists unpacked (each checked against its
hash), as every device does it, and only then moved to
`DATA/bundles/<name>/<version>-<sha256 prefix>.tar.gz` and recorded. A version, once accepted,
is immutable: the same bytes again are a no-op, different bytes under the same version are
refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgerun.adapters.fleet.store import Store
from edgerun.runtime import signing
from edgerun.runtime.bundle import Bundle, check_name, check_version
from edgerun.runtime.errors import (BundleError, EdgerunError, InvalidInput, ModelNotFound,
                                    PayloadTooLarge)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredBundle:
    model: str
    version: str
    sha256: str
    size: int
    key_id: str
    path: Path

    def to_json(self) -> dict:
        return {"model": self.model, "version": self.version, "sha256": self.sha256,
                "size": self.size, "key_id": self.key_id}


class VersionConflict(InvalidInput):
    """The version exists with other bytes: versions are immutable."""


class StorageError(EdgerunError):
    """The registry's own disk refused a push (full, read-only): no fault of the bundle."""

    kind = "storage_error"


def unstorable(exc: OSError, where: Path) -> StorageError:
    """What the pusher hears of a push its registry could not store: the reason (a full disk
    was a bare "500 Internal Server Error"); the path, of this host, goes to the log only."""
    log.error("cannot store a pushed bundle in %s: %s", where, exc)
    return StorageError(f"the registry cannot store the pushed bundle: {exc.strerror or exc}")


class BundleRegistry:
    def __init__(self, data_dir: str | Path, store: Store,
                 trusted: list[signing.PublicKey], max_bytes: int = 4 << 30) -> None:
        self.root = Path(data_dir) / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.trusted = trusted
        self.max_bytes = max_bytes

    def push(self, stream: BinaryIO) -> tuple[StoredBundle, bool]:
        """Verify and store an uploaded archive; returns it and whether it was new."""
        try:
            fd, temporary = tempfile.mkstemp(prefix=".push-", suffix=".tar.gz", dir=self.root)
        except OSError as exc:  # a read-only data folder, no inode left
            raise unstorable(exc, self.root) from exc
        digest, size = hashlib.sha256(), 0
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := stream.read(_CHUNK):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise PayloadTooLarge(f"bundle is over the {self.max_bytes}-byte "
                                                  "limit")
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise unstorable(exc, self.root) from exc
            try:
                # checked as every device checks it (`OtaAgent._stage`): a push a device would
                # refuse is refused here, not recorded as a version no device can install
                signed = signing.verify_archive(Path(temporary), self.trusted)
                with Bundle.open(Path(temporary), expected=signed.files) as bundle:
                    key_id = signing.verify_folder(bundle, self.trusted)
                    name, version = bundle.manifest.name, bundle.manifest.version
            except BundleError as exc:  # said to the pusher: no path of this host in it
                raise BundleError(str(exc).replace(temporary, "the pushed bundle")) from exc
            sha256 = digest.hexdigest()
            existing = self.store.version(name, version)
            if existing is not None:
                return self._same_or_conflict(existing, sha256), False
            # named by its bytes too: a concurrent push of other bytes under this version
            # writes its own file, and only the push recorded first keeps it
            path = self.root / name / f"{version}-{sha256[:16]}.tar.gz"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temporary, path)
            except OSError as exc:
                raise unstorable(exc, path.parent) from exc
            recorded = self.store.add_version(name, version, sha256, size, key_id,
                                              str(path.relative_to(self.root)))
            if recorded["sha256"] != sha256:
                path.unlink(missing_ok=True)
                self._same_or_conflict(recorded, sha256)
            return StoredBundle(name, version, sha256, size, key_id, path), True
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def _same_or_conflict(self, recorded: dict, sha256: str) -> StoredBundle:
        """The version already recorded, if it holds these bytes; else VersionConflict."""
        if recorded["sha256"] != sha256:
            raise VersionConflict(f"{recorded['model']} version {recorded['version']} exists "
                                  f"with other bytes (sha256 {recorded['sha256'][:12]}…); "
                                  "versions are immutable: bump the version")
        return self.get(recorded["model"], recorded["version"])

    def get(self, model: str, version: str) -> StoredBundle:
        check_name(model)
        check_version(version)
        row = self.store.version(model, version)
        if row is None:
            raise ModelNotFound(f"the registry has no {model} version {version}")
        return StoredBundle(model, version, row["sha256"], int(row["size"]), row["key_id"],
                            self.root / row["path"])
