"""The architecture a package was built for, checked against the one it runs on, first at init.

`sam build` runs functions/inference/Makefile without telling it the template's Architecture
(aws/aws-sam-cli#3349), so `--parameter-overrides Architecture=x86_64` without
`EDGERUN_ARCH=x86_64` deploys arm64 wheels: numpy's import then fails with an error about a
bad install, never naming the architecture. `edgerun package lambda` writes the architecture
into the package beside app.py, and app.py calls `check_architecture` before anything imports
numpy or ONNX Runtime. Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import platform
from pathlib import Path

#: Lambda's architecture names and what `platform.machine()` says on each.
MACHINES = {"arm64": "aarch64", "x86_64": "x86_64"}
#: Written by `edgerun package lambda` beside app.py: the architecture's name and a newline.
ARCHITECTURE_FILE = "edgerun-architecture.txt"


class ArchitectureMismatch(RuntimeError):
    """The package's wheels were built for another CPU architecture than the function's."""


def check_architecture(task_root: Path, machine: str | None = None) -> None:
    """Raise ArchitectureMismatch, one line naming both architectures and the fix, when the
    package in `task_root` was built for another architecture than `machine` (this one's). A
    package without the file (a container image, a checkout) is not checked."""
    try:
        built = (task_root / ARCHITECTURE_FILE).read_text().strip()
    except FileNotFoundError:
        return
    machine = machine or platform.machine()
    running = next((name for name, m in MACHINES.items() if m == machine), machine)
    if MACHINES.get(built) == machine:
        return
    raise ArchitectureMismatch(
        f"this package was built for {built} but the function runs on {running} ({machine}): "
        f"rebuild it for {running} (EDGERUN_ARCH={running} sam build ..., or edgerun package "
        f"lambda BUNDLE --arch {running} -o DIR) or deploy it with Architecture={built}")
