"""Staging folders a killed process leaves behind, and the sweep that removes them.

Work that is renamed into place once complete (an optimized bundle, a downloaded model), or
that lives only as long as its process (an unpacked model), is written in a staging folder
`.partial-<pid>-<random>[-<name>]`. A process killed by a signal (SIGKILL, the OOM killer,
Lambda ending an init or a timed-out start) runs no cleanup, so its folder stays; the next
process staging in the same folder calls `sweep`.

Whether a folder's process still lives is not read from its pid (containers sharing a volume
each have their own pid 1, and cannot see each other's): its process holds a lock (`flock`)
on the folder for as long as it uses it, and the kernel lets that lock go when the process
ends, however it ends. A sweep removes the folders whose lock it can take, and nothing else:
not a folder still held (this process's or another's, in any container), not one it cannot
lock (a filesystem without `flock`), not a link, not a name `reserve` would not give. The
pid in the name is for whoever reads a listing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = ".partial-"
_STAGED = re.compile(r"\.partial-[1-9][0-9]*-[0-9a-f]{8}(?:-.+)?", re.ASCII)  # as `reserve` names
#: The locks this process holds, by staging folder.
_held: dict[Path, int] = {}
_guard = threading.Lock()


def reserve(parent: Path, name: str = "") -> Path:
    """A new empty staging folder in `parent`, held by this process until `discard` (or its
    end). The caller writes in it, then renames what it wrote into place."""
    parent = Path(parent)
    # made and locked under a name no sweep looks at, then renamed (the lock goes with it):
    # a sweep in between would otherwise find it unlocked, and take it for a dead one
    fresh = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    fd = -1
    try:  # a `.staging-*` left here is never swept: removed on any failure, the open's too
        fd = os.open(fresh, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # no flock here: no sweep can take it either, so it is never removed
            pass
        path = parent / (f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                         + (f"-{name}" if name else ""))
        os.rename(fresh, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):  # still empty; and rmtree needs descriptors
            os.rmdir(fresh)
        raise
    with _guard:
        _held[path] = fd
    return path


def discard(path: Path) -> None:
    """Remove the staging folder `path` with what is left in it, and let its lock go. Never
    raises: it runs while another error is on its way."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    with _guard:
        fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


@contextmanager
def staged(parent: Path, name: str = "") -> Iterator[Path]:
    """`reserve`, then `discard` on leaving: whatever was not renamed out of the folder is
    removed with it, also on error."""
    path = reserve(parent, name)
    try:
        yield path
    finally:
        discard(path)


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Where to write `target` (a file, or a folder) so that it appears whole or not at all: a
    path in a staging folder beside it, renamed onto `target` when the block completes. That
    replaces a file there (as `tar -cf` would, but never with half an archive) or an empty
    folder, never one with files in it. What the block leaves goes with its staging folder,
    also on error or Ctrl-C; what a killed process left there is swept first. Missing parent
    folders are made."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)
    with staged(target.parent, target.name) as hidden:
        temporary = hidden / target.name
        yield temporary
        os.replace(temporary, target)


def unwritable(target: Path) -> str | None:
    """Why `replacing(target)` would fail to stage beside `target` (a file in the way of its
    folder, no permission, a read-only filesystem), or None: checked before long work, whose
    end would otherwise be an errno naming a hidden staging folder. The nearest folder that
    exists is tried for real (a folder staged there and removed): `access()` says yes to root
    where the filesystem still refuses (/proc, say)."""
    target = Path(target).absolute()
    existing = next(p for p in target.parents if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        discard(reserve(existing))
    except OSError as exc:
        return f"{existing} cannot be written ({exc.strerror or exc})"
    return None


def sweep(parent: Path) -> list[Path]:
    """Remove the staging folders in `parent` that no process holds; the ones removed."""
    try:
        entries = [entry for entry in Path(parent).iterdir() if _STAGED.fullmatch(entry.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        try:  # a link is not followed (never ours, and what it names is not ours to remove),
            # and a FIFO named like one does not block the sweep
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (a live process's), or not lockable here: kept
            os.close(fd)
            continue
        try:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed
