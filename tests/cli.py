"""Run the installed `edgerun` console command as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def edgerun_command() -> list[str]:
    script = Path(sys.executable).with_name("edgerun")
    if script.exists():
        return [str(script)]
    found = shutil.which("edgerun")
    assert found, "the edgerun console command is not installed"
    return [found]


def edgerun(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*edgerun_command(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", **(env or {})})
