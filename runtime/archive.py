"""Bundles in transit: deterministic `.tar.gz` or `.zip` packing and an extractor that trusts
nothing.

Extraction is written out by hand rather than through `tarfile.extractall` so the same checks
hold on every supported Python and for both formats: only regular files and folders, no
absolute paths, no `..`, no links or devices, no duplicate or clashing names, no negative
sizes, and caps on member size, total size and count. An archive's format is read from its first
bytes, not its name. A zip whose entries share bytes (an overlapping-entry zip bomb, which
Python before 3.12 reads without complaint) is refused. With `expected` (a signed manifest's
files), only the members it lists are extracted, each at most its listed size and checked
against its listed sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

try:
    from lzma import LZMAError
except ImportError:  # a Python built without it: tarfile cannot read xz then
    LZMAError = zlib.error  # type: ignore[misc,assignment]

from edgerun.runtime.errors import BundleError

MAX_MEMBER_BYTES = 4 * 1024**3
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_MEMBERS = 1000
#: A tar's extended header (pax attributes, a GNU long name) is read whole into memory before
#: any member is checked; real ones hold a path and a few attributes.
MAX_HEADER_BYTES = 1 << 20
#: File names `pack` writes as an archive (`.zip` as zip, the others as gzip'd tar).
SUFFIXES = (".tar.gz", ".tgz", ".zip")
_CHUNK = 1 << 20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time zip can record
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, LZMAError,
            NotImplementedError,
            RuntimeError,  # zipfile: unknown compression, encrypted member
            UnicodeDecodeError)  # zipfile: a name flagged UTF-8 that is not


def is_archive_name(name: str) -> bool:
    """Whether a path named `name` is meant as a bundle archive rather than a folder."""
    return name.lower().endswith(SUFFIXES)


def pack(directory: Path, archive: Path) -> Path:
    """Write `directory`'s files to a `.zip` or `.tar.gz` by `archive`'s name; the same files
    give the same bytes."""
    directory, archive = Path(directory), Path(archive)
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_symlink() or not p.is_dir()):
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{path}: only regular files can be packed (no links)")
        files.append((path.relative_to(directory).as_posix(), path))
    if archive.name.lower().endswith(".zip"):
        _pack_zip(files, archive)
    else:
        _pack_tar(files, archive)
    return archive


def _pack_tar(files: list[tuple[str, Path]], archive: Path) -> None:
    with archive.open("wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files:
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)


def _pack_zip(files: list[tuple[str, Path]], archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as zip_file:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = path.stat().st_size
            with path.open("rb") as source, \
                    zip_file.open(info, "w", force_zip64=info.file_size >= 1 << 31) as out:
                shutil.copyfileobj(source, out, _CHUNK)


@dataclass(frozen=True)
class _Member:
    """One archive entry, whatever the format."""

    name: str
    kind: str  # "file", "dir", "link" or "other"
    size: int
    open: Callable[[], IO[bytes] | None]


def _tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> _Member:
    if info.size < 0:  # base-256 or pax: tarfile steps back by it, into data it has passed
        raise BundleError(f"archive member {info.name!r} declares a negative size "
                          f"({info.size})")
    kind = ("link" if info.issym() or info.islnk() else "file" if info.isfile()
            else "dir" if info.isdir() else "other")
    return _Member(info.name, kind, info.size, lambda: tar.extractfile(info))


def _zip_member(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16  # no file type bits from many tools: a plain file
    kind = ("dir" if info.is_dir() else "link" if stat.S_ISLNK(mode)
            else "other" if stat.S_IFMT(mode) not in (0, stat.S_IFREG) else "file")
    return _Member(info.filename, kind, info.file_size, lambda: zip_file.open(info))


_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _CheckedTarInfo(tarfile.TarInfo):
    """Refuses what tarfile would read into memory unbounded while parsing headers, before
    any member check runs: an oversize extended header (a few kB of gzip can declare
    gigabytes) and GNU sparse maps (an unbounded list of numbers); a bundle needs neither."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise BundleError(f"archive header {self.name!r} is {self.size} bytes, over the "
                              f"{MAX_HEADER_BYTES}-byte cap for a name and attributes")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"archive member {self.name!r} is a sparse file, not a regular "
                              "file")
        return super()._proc_member(tar)

    def _proc_gnusparse_00(self, next: tarfile.TarInfo, *args: object) -> None:
        raise BundleError(f"archive member {next.name!r} is a sparse file, not a regular file")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


@contextmanager
def _members(archive: Path) -> Iterator[Iterator[_Member]]:
    """The entries of a zip or a tar (any compression); format errors become BundleError."""
    try:
        with archive.open("rb") as handle:
            head = handle.read(len(_XZ))
        opened = zipfile.ZipFile(archive) if head.startswith(b"PK") else \
            _open_tar(archive, head)
    except (*_CORRUPT, OSError) as exc:
        raise BundleError(f"{archive}: not a readable tar or zip archive ({exc})") from exc
    with opened:
        try:
            if isinstance(opened, zipfile.ZipFile):
                _check_zip_overlap(opened, archive)
                yield (_zip_member(opened, info) for info in opened.infolist())
            else:
                yield (_tar_member(opened, info) for info in opened)
        except (*_CORRUPT, OSError) as exc:
            # gzip's CRC or bzip2's stream checks fail as OSErrors with no errno; one with
            # an errno is the destination's (a full disk), not the archive's
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise BundleError(f"{archive}: corrupt archive ({exc})") from exc


_XZ = b"\xfd7zXZ\x00"
#: The compressions tarfile reads, by their first bytes.
_COMPRESSIONS = ((b"\x1f\x8b", "gz", "gzip"), (b"BZh", "bz2", "bzip2"), (_XZ, "xz", "xz"))


def _open_tar(archive: Path, head: bytes) -> tarfile.TarFile:
    """The tar, any compression. Where that fails, tarfile's error lists every compression it
    tried, one line each ("- method gz: ReadError('not a gzip file')" ...), a message that
    breaks a log line and buries its cause: the one line that counts is the failure of the
    compression the first bytes name, else of a plain tar."""
    try:
        return tarfile.open(archive, mode="r:*", tarinfo=_CheckedTarInfo)
    except tarfile.ReadError as exc:
        if "\n" not in str(exc):
            raise
        compression, what = next(((mode, name) for magic, mode, name in _COMPRESSIONS
                                  if head.startswith(magic)), ("", ""))
        try:
            tarfile.open(archive, mode=f"r:{compression}", tarinfo=_CheckedTarInfo).close()
        except (*_CORRUPT, OSError) as specific:
            where = f"read as a {what}-compressed tar" if what else \
                "not zip, gzip, bzip2 or xz; read as a plain tar"
            raise tarfile.ReadError(f"{where}: {specific}") from exc
        raise tarfile.ReadError(" ".join(str(exc).split())) from exc


_ZIP_LOCAL = struct.Struct("<4s22xHH")  # a local file header: signature ... name, extra lengths


def _check_zip_overlap(zip_file: zipfile.ZipFile, archive: Path) -> None:
    """Refuse entries whose data runs into the next entry's (or the central directory): a zip
    bomb's entries all point into one deflate stream, so a few kB decompress to gigabytes per
    entry. CPython checks this from 3.12 on; 3.11, which edgerun supports, does not."""
    end = zip_file.start_dir
    assert zip_file.fp is not None
    for info in sorted(zip_file.infolist(), key=lambda i: i.header_offset, reverse=True):
        if info.header_offset < 0:  # the end record names the directory past where it is:
            # zipfile shifts every entry back by the difference; a seek there is an OSError
            raise BundleError(f"{archive}: corrupt archive (entry {info.filename!r} starts "
                              "before the archive does)")
        zip_file.fp.seek(info.header_offset)
        header = zip_file.fp.read(_ZIP_LOCAL.size)
        if len(header) < _ZIP_LOCAL.size or header[:4] != b"PK\x03\x04":
            raise BundleError(f"{archive}: corrupt archive (entry {info.filename!r} has no "
                              "local header)")
        _, name_length, extra_length = _ZIP_LOCAL.unpack(header)
        data_end = (info.header_offset + _ZIP_LOCAL.size + name_length + extra_length
                    + info.compress_size)
        if data_end > end:
            raise BundleError(f"{archive}: zip entry {info.filename!r} overlaps the next "
                              "entry (entries that share bytes: a zip bomb)")
        end = info.header_offset


def _safe_name(name: str) -> PurePosixPath | None:
    """The member's path inside the bundle; None for the archive's root folder (`./`)."""
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (name[1:2] == ":"):
        raise BundleError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts) or "\\" in name:
        raise BundleError(f"archive member {name!r} escapes the bundle folder")
    parts = [part for part in path.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def read_member(archive: Path, name: str, *, max_bytes: int = 1 << 24,
                max_members: int = MAX_MEMBERS) -> bytes | None:
    """The bytes of the file `name` in `archive`, without extracting the rest; None if absent.

    Stops at `max_members` as `unpack` does: tarfile keeps every header it passes, so a small
    gzip of empty members would otherwise cost memory without bound."""
    return read_members(archive, (name,), max_bytes=max_bytes,
                        max_members=max_members).get(name)


def read_members(archive: Path, names: Collection[str], *, max_bytes: int = 1 << 24,
                 max_members: int = MAX_MEMBERS,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> dict[str, bytes]:
    """The bytes of the files `names` in `archive` (the first of each; those absent are not
    in the answer), in one pass that writes nothing and stops once it has them all.

    A tar is read in order, so members before the last wanted one are decompressed (not
    kept); like `unpack`, it stops at `max_members` and `max_total_bytes` of members passed."""
    wanted = {PurePosixPath(name): name for name in names}
    found: dict[str, bytes] = {}
    total = 0
    if not wanted:
        return found
    with _members(Path(archive)) as members:
        for count, member in enumerate(members, start=1):
            if count > max_members:
                raise BundleError(f"{archive}: more than {max_members} members")
            total += member.size  # any kind's: what tarfile skips of one is read through too
            if total > max_total_bytes:
                raise BundleError(f"{archive}: members total over {max_total_bytes} bytes")
            if member.kind != "file":
                continue
            relative = _safe_name(member.name)
            name = None if relative is None else wanted.get(relative)
            if name is None or name in found:
                continue
            if member.size > max_bytes:
                raise BundleError(f"archive member {member.name!r} is {member.size} bytes, "
                                  f"over the {max_bytes}-byte cap")
            source = member.open()
            if source is None:
                raise BundleError(f"archive member {member.name!r} has no data")
            with source:
                data = source.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise BundleError(f"archive member {member.name!r} is over the "
                                  f"{max_bytes}-byte cap")
            found[name] = data
            if len(found) == len(wanted):
                break
    return found


#: What a signed manifest lists of a file: its size in bytes and its sha256 (hex).
Listed = tuple[int, str]


def unpack(archive: Path, destination: Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
           max_total_bytes: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS,
           expected: Mapping[str, Listed] | None = None) -> Path:
    """Extract a bundle archive into `destination` (created; must be empty if it exists).

    With `expected` (path in the bundle -> size and sha256, from a manifest whose signature
    was checked), only those files are extracted, and every one of them must be there: a
    member it does not list, or one whose header gives another size, is refused before any of
    it is written; one whose bytes differ is written no further than its listed size, then
    refused."""
    archive, destination = Path(archive), Path(destination)
    listed = None if expected is None else _listed(expected)
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()):
        raise BundleError(f"{destination}: extraction folder is not empty")
    root = destination.resolve()
    with _members(archive) as members:
        _extract(members, archive, root, max_member_bytes, max_total_bytes, max_members,
                 listed)
    return destination


def _listed(expected: Mapping[str, Listed]) -> dict[PurePosixPath, Listed]:
    listed: dict[PurePosixPath, Listed] = {}
    for name, (size, sha256) in expected.items():
        try:
            path = _safe_name(name)
        except BundleError as exc:
            raise BundleError(f"the manifest lists an unsafe path: {exc}") from None
        if path is None or path in listed:
            raise BundleError(f"the manifest lists {name!r}, which is no file name or is "
                              "named twice")
        listed[path] = (size, sha256)
    return listed


def _extract(members: Iterator[_Member], archive: Path, root: Path, max_member_bytes: int,
             max_total_bytes: int, max_members: int,
             listed: dict[PurePosixPath, Listed] | None = None) -> None:
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    allowed_folders = None if listed is None else {p for path in listed for p in path.parents}
    total = 0
    for count, member in enumerate(members, start=1):
        if count > max_members:
            raise BundleError(f"{archive}: more than {max_members} members")
        relative = _safe_name(member.name)
        if member.kind == "link":
            raise BundleError(f"archive member {member.name!r} is a link")
        if member.kind == "other":
            raise BundleError(f"archive member {member.name!r} is not a regular file")
        if relative is None:
            if member.kind == "dir":
                continue  # the root folder itself, as `tar -C bundle -czf b.tar.gz .` writes
            raise BundleError(f"archive member {member.name!r} has no name")
        _check_clash(member.name, relative, member.kind, files, folders)
        entry = None
        if listed is not None:
            if member.kind == "dir" and relative not in (allowed_folders or ()):
                raise BundleError(f"archive member {member.name!r} is a folder the signed "
                                  "manifest has no file in")
            if member.kind == "file":
                entry = listed.get(relative)
                if entry is None:
                    raise BundleError(f"archive member {member.name!r} is not in the signed "
                                      "manifest")
                if member.size != entry[0]:
                    raise BundleError(f"archive member {member.name!r} is {member.size} bytes, "
                                      f"the signed manifest lists {entry[0]}")
        target = root.joinpath(*relative.parts)
        if root not in target.resolve().parents:
            raise BundleError(f"archive member {member.name!r} escapes the bundle folder")
        if member.kind == "dir":
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a name too long for this file system: as for a file's
                raise BundleError(f"archive member {member.name!r} cannot be written "
                                  f"({exc.strerror or exc})") from exc
            continue
        if member.size > max_member_bytes:
            raise BundleError(f"archive member {member.name!r} is {member.size} bytes, over "
                              f"the {max_member_bytes}-byte cap")
        total += member.size
        if total > max_total_bytes:
            raise BundleError(f"{archive}: members total over {max_total_bytes} bytes")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_member(member, target, max_member_bytes if entry is None else entry[0],
                         None if entry is None else entry[1])
        except OSError as exc:  # a name too long for this file system, a full disk
            raise BundleError(f"archive member {member.name!r} cannot be written "
                              f"({exc.strerror or exc})") from exc
    if listed is not None:
        missing = sorted(path.as_posix() for path in set(listed) - files)
        if missing:
            raise BundleError(f"{archive}: the signed manifest lists files the archive lacks: "
                              f"{', '.join(missing)}")


def _check_clash(name: str, relative: PurePosixPath, kind: str, files: set[PurePosixPath],
                 folders: set[PurePosixPath]) -> None:
    """Refuse a file named twice, or a member that needs a file to be a folder or the reverse."""
    if relative in files:
        raise BundleError(f"archive member {name!r} appears twice")
    if kind == "file" and relative in folders:
        raise BundleError(f"archive member {name!r} is a file where other members need a "
                          "folder")
    parent = next((p for p in relative.parents if p in files), None)
    if parent is not None:
        raise BundleError(f"archive member {name!r} is inside {parent.as_posix()!r}, which is "
                          "a file")
    (files if kind == "file" else folders).add(relative)
    folders.update(relative.parents)


def _copy_member(member: _Member, target: Path, cap: int, sha256: str | None = None) -> None:
    """Copy at most `cap` bytes; with `sha256`, the bytes copied must have it."""
    source = member.open()
    if source is None:
        raise BundleError(f"archive member {member.name!r} has no data")
    written = 0
    digest = hashlib.sha256() if sha256 is not None else None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with source, io.FileIO(fd, "wb") as out:
        while chunk := source.read(min(_CHUNK, cap - written + 1)):
            written += len(chunk)
            if written > cap:
                raise BundleError(f"archive member {member.name!r} is over the {cap}-byte cap")
            if digest is not None:
                digest.update(chunk)
            _write_all(out, chunk)
    if digest is not None and digest.hexdigest() != sha256:
        raise BundleError(f"archive member {member.name!r} does not match its sha256 in the "
                          "signed manifest (tampered or corrupt)")


def _write_all(out: io.FileIO, chunk: bytes) -> None:
    """Write all of `chunk`: a raw write that runs out of space (or into RLIMIT_FSIZE) writes
    what fits and says how much, and only the next write fails. Unchecked, a member's last
    chunk was cut short in silence, and the bundle was then called tampered or truncated on
    a disk that was only full."""
    view = memoryview(chunk)
    while view:
        view = view[out.write(view):]
