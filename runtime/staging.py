"""Staging entries named by the process that made them, and the sweep that removes the ones
whose process is gone.

Work that is renamed into place once complete (an optimized bundle, a downloaded model), or
that lives only as long as its process (an unpacked model), is written under
`.partial-<pid>-<random>[-<name>]`. A process killed by a signal (SIGKILL, the OOM killer,
Lambda ending an init or a timed-out start) runs no cleanup, so its entry stays; the next
process staging in the same folder calls `sweep`, which removes the entries whose process no
longer exists. Kept: an entry whose pid is alive (another process at work, or a reused pid:
then kept until that process is gone too), one this process staged (another thread's work),
and any name that is not exactly `.partial-<digits>-<something>`. An entry named by this
process's pid that this process did not stage was left by an earlier process with the same
pid (a restarted container or Lambda runtime), so it goes.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = ".partial-"
_STAGED = re.compile(r"\.partial-([1-9][0-9]*)-.+", re.ASCII)  # as `reserve` names them
#: Names of the entries this process staged and has not discarded.
_mine: set[str] = set()
_lock = threading.Lock()


def reserve(parent: Path, name: str = "") -> Path:
    """A fresh staging path in `parent`, tagged with this process's pid; nothing is created.
    The caller writes a file or folder there, then renames it into place or `discard`s it."""
    staged = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}" + (f"-{name}" if name else "")
    with _lock:
        _mine.add(staged)
    return Path(parent) / staged


def discard(path: Path) -> None:
    """Remove what is at `path` (a folder, a file, or nothing once renamed away), and forget
    it. Never raises: it runs while another error is on its way."""
    _remove(Path(path))
    with _lock:
        _mine.discard(Path(path).name)


@contextmanager
def staged(parent: Path, name: str = "", *, folder: bool = False) -> Iterator[Path]:
    """`reserve` (a folder made there with `folder`), then `discard` on leaving: whatever
    was not renamed into place is removed, also on error."""
    path = reserve(parent, name)
    try:
        if folder:
            path.mkdir()
        yield path
    finally:
        discard(path)


def sweep(parent: Path) -> list[Path]:
    """Remove the staging entries in `parent` whose process is gone; the ones removed."""
    try:
        entries = list(Path(parent).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    me, removed = os.getpid(), []
    for entry in entries:
        match = _STAGED.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match[1])
        if pid == me:
            with _lock:
                if entry.name in _mine:
                    continue
        elif _alive(pid):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (a pid no kernel gives counts as alive: kept)."""
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; no such pid number
        pass
    return True


def _remove(path: Path) -> None:
    """A folder with what it holds; a file or a link itself (never what a link points to)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
