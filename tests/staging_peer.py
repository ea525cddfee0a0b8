"""Another process's staging folder (a concurrent optimize, another container's Lambda start
sharing the folder): held by a live process while the block runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Stages a folder in argv[1], renamed to argv[2] when given (its lock goes with it), says
#: where, and holds it until killed.
PEER = """
import os, sys, time
from pathlib import Path
from edgerun.runtime import staging
path = staging.reserve(Path(sys.argv[1]), "peer")
if len(sys.argv) > 2:
    os.rename(path, path.with_name(sys.argv[2]))
    path = path.with_name(sys.argv[2])
print(path, flush=True)
time.sleep(300)
"""


@contextmanager
def held_elsewhere(parent: Path, name: str | None = None) -> Iterator[Path]:
    """A staging folder in `parent` held by another live process (named `name`, say one with
    a pid this process cannot see, as from another container); that process ends after."""
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(parent), *([name] if name else [])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        line = peer.stdout.readline().strip()
        assert line, f"the peer process staged nothing (exit {peer.poll()})"
        yield Path(line)
    finally:
        peer.kill()
        peer.wait()
        if peer.stdout is not None:
            peer.stdout.close()
