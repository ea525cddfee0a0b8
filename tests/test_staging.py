"""Staging folders: a sweep removes those no process holds, and never another's work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgerun.runtime import staging
from tests.staging_peer import held_elsewhere


def dead_pid() -> int:
    """The pid of a process that ran and was reaped: no process has it now."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    return gone.pid


def test_a_sweep_removes_only_staging_folders_no_process_holds(tmp_path):
    """A killed process's folder goes, as does a stray file. Kept: one a live process holds,
    whatever pid its name has (containers sharing a volume each have their own pid 1: a pid
    read from the name removed another container's work in progress), this process's own, a
    link (never followed: no staging folder is one), and any name `reserve` would not give."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("not staging")
    with held_elsewhere(tmp_path) as killed:
        (killed / "model.onnx").write_bytes(b"\0" * 64)
    gone = [killed.name, f".partial-{dead_pid()}-0123abcd-m.tar.gz"]
    (tmp_path / gone[1]).write_bytes(b"\0" * 64)
    kept = [".partial-1-0123abcd-link", ".partial-1-x", ".partial-01-0123abcd",
            ".partial-1-0123ABCD", "partial-1-0123abcd", "target", ".staging-abc"]
    (tmp_path / kept[0]).symlink_to(target)
    for name in kept[1:5]:
        (tmp_path / name).write_text("")
    (tmp_path / kept[-1]).mkdir()
    mine = staging.reserve(tmp_path, "being-written")  # this process's (another thread's)
    try:
        with held_elsewhere(tmp_path, f".partial-{os.getpid()}-0a0a0a0a-container") as other, \
                held_elsewhere(tmp_path, f".partial-{dead_pid()}-0b0b0b0b-namespace") as far:
            assert sorted(p.name for p in staging.sweep(tmp_path)) == sorted(gone)
            assert sorted(p.name for p in tmp_path.iterdir()) == \
                sorted([*kept, mine.name, other.name, far.name])
            assert (target / "precious").read_text() == "not staging"
        assert {p.name for p in staging.sweep(tmp_path)} == {other.name, far.name}
    finally:
        staging.discard(mine)
    assert not mine.exists()
    assert staging.sweep(tmp_path / "absent") == []


def test_a_staged_folder_is_named_by_this_process_and_gone_after_an_error(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        with staging.staged(tmp_path, "m.tar.gz") as path:
            assert path.is_dir() and path.name.startswith(f".partial-{os.getpid()}-")
            assert path.name.endswith("-m.tar.gz")
            (path / "part").write_bytes(b"\0" * 64)
            assert staging.sweep(tmp_path) == []  # this process's, still being written
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from pathlib import Path
from edgerun.runtime import staging
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, soft), hard))
taken = []
try:
    while True:
        taken.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    staging.reserve(Path(sys.argv[1]), "m")
except OSError as exc:
    print(exc.errno)
"""


def test_a_reserve_that_cannot_open_its_folder_leaves_nothing(tmp_path):
    """Out of descriptors (EMFILE), the folder was made but not opened: it stayed as a
    `.staging-*`, a name no sweep removes, for good. Run in a child, whose fd limit is
    lowered and filled so that the folder's own open is the one that fails."""
    import errno

    done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.EMFILE)]
    assert list(tmp_path.iterdir()) == []
