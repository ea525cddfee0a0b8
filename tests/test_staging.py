"""Pid-tagged staging entries: what a sweep removes, and what it must never touch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgerun.runtime import staging


def dead_pid() -> int:
    """The pid of a process that ran and was reaped: no process has it now."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    return gone.pid


def test_a_sweep_removes_only_staging_entries_whose_process_is_gone(tmp_path):
    pid = dead_pid()
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("not staging")
    gone = [f".partial-{pid}-folder", f".partial-{pid}-file.tar.gz",
            f".partial-{pid}-link", f".partial-{os.getpid()}-an-earlier-process-with-my-pid"]
    (tmp_path / gone[0]).mkdir()
    (tmp_path / gone[0] / "model.onnx").write_bytes(b"\0" * 64)
    (tmp_path / gone[1]).write_bytes(b"\0" * 64)
    (tmp_path / gone[2]).symlink_to(target)  # the link goes, never what it points to
    (tmp_path / gone[3]).mkdir()
    kept = [f".partial-{pid}", f".partial-{pid}-", f".partial--{pid}-x", f".partial-0{pid}-x",
            f".partial-{pid}x-y", f"partial-{pid}-x", f".Partial-{pid}-x", "target",
            f".partial-{'9' * 40}-too-large-for-a-pid"]
    for name in kept[:-2]:
        (tmp_path / name).write_text("")
    (tmp_path / kept[-1]).mkdir()
    mine = staging.reserve(tmp_path, "being-written")  # this process's, another thread's work
    mine.mkdir()
    try:
        assert sorted(p.name for p in staging.sweep(tmp_path)) == sorted(gone)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, mine.name])
        assert (target / "precious").read_text() == "not staging"
    finally:
        staging.discard(mine)
    assert not mine.exists()
    assert staging.sweep(tmp_path / "absent") == []


def test_a_staged_entry_is_named_by_this_process_and_gone_after_an_error(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        with staging.staged(tmp_path, "m.tar.gz", folder=True) as path:
            assert path.name.startswith(f".partial-{os.getpid()}-")
            assert path.name.endswith("-m.tar.gz")
            (path / "part").write_bytes(b"\0" * 64)
            assert staging.sweep(tmp_path) == []  # this process's, still being written
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
