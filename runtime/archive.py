"""Bundles in transit: deterministic `.tar.gz` packing and an extractor that trusts nothing.

Extraction is written out by hand rather than through `tarfile.extractall` so the same checks
hold on every supported Python: only regular files and folders, no absolute paths, no `..`,
no links or devices, no duplicate names, and caps on member size, total size and count.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from edgerun.runtime.errors import BundleError

MAX_MEMBER_BYTES = 4 * 1024**3
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_MEMBERS = 1000
_CHUNK = 1 << 20


def pack(directory: Path, archive: Path) -> Path:
    """Write `directory`'s files to a `.tar.gz`; the same files give the same bytes."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if not p.is_dir())
    with archive.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            if path.is_symlink() or not path.is_file():
                raise BundleError(f"{path}: only regular files can be packed (no links)")
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return archive


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (name[1:2] == ":"):
        raise BundleError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts) or "\\" in name:
        raise BundleError(f"archive member {name!r} escapes the bundle folder")
    parts = [part for part in path.parts if part not in ("", ".")]
    if not parts:
        raise BundleError(f"archive member {name!r} has no name")
    return PurePosixPath(*parts)


def unpack(archive: Path, destination: Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
           max_total_bytes: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS) -> Path:
    """Extract a bundle archive into `destination` (created; must be empty if it exists)."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()):
        raise BundleError(f"{destination}: extraction folder is not empty")
    root = destination.resolve()
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive}: not a readable tar archive ({exc})") from exc
    with tar:
        try:
            _extract(tar, archive, root, max_member_bytes, max_total_bytes, max_members)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise BundleError(f"{archive}: corrupt archive ({exc})") from exc
    return destination


def _extract(tar: tarfile.TarFile, archive: Path, root: Path, max_member_bytes: int,
             max_total_bytes: int, max_members: int) -> None:
    seen: set[PurePosixPath] = set()
    total = 0
    for count, member in enumerate(tar, start=1):
        if count > max_members:
            raise BundleError(f"{archive}: more than {max_members} members")
        relative = _safe_name(member.name)
        if member.issym() or member.islnk():
            raise BundleError(f"archive member {member.name!r} is a link")
        if not (member.isfile() or member.isdir()):
            raise BundleError(f"archive member {member.name!r} is not a regular file")
        if relative in seen:
            raise BundleError(f"archive member {member.name!r} appears twice")
        seen.add(relative)
        target = root.joinpath(*relative.parts)
        if root not in target.resolve().parents and target.resolve() != root:
            raise BundleError(f"archive member {member.name!r} escapes the bundle folder")
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if member.size > max_member_bytes:
            raise BundleError(f"archive member {member.name!r} is {member.size} bytes, over "
                              f"the {max_member_bytes}-byte cap")
        total += member.size
        if total > max_total_bytes:
            raise BundleError(f"{archive}: members total over {max_total_bytes} bytes")
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_member(tar, member, target, max_member_bytes)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, cap: int) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise BundleError(f"archive member {member.name!r} has no data")
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with source, io.FileIO(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > cap:
                raise BundleError(f"archive member {member.name!r} is over the {cap}-byte cap")
            out.write(chunk)
