"""The CPUs this process may use: a container's CPU limit (its cgroup quota) and its affinity.

ONNX Runtime sizes its default intra-op pool to the host's physical cores, LiteRT to
`os.cpu_count()`: in a pod limited to 2 CPUs on a 64-core node that is dozens of threads
sharing 2 CPUs of quota, throttled by the kernel in every period, and tail latency with them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def cpu_limit(root: Path = CGROUP_ROOT, cgroup: Path = SELF_CGROUP) -> int | None:
    """Whole CPUs the quota and affinity leave (at least 1), when fewer than the machine has;
    None when nothing limits the process. A fraction is rounded down: 2.5 CPUs of quota run 2
    threads unthrottled, where 3 would be stopped for part of every period."""
    machine = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    quota = cgroup_quota(root, cgroup)
    if quota is not None:
        allowed = min(allowed, max(1, math.floor(quota)))
    return allowed if allowed < machine else None


def cgroup_quota(root: Path = CGROUP_ROOT, cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, v2
    (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when there is none."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:  # v2: one hierarchy
            quotas += [_v2(folder / "cpu.max") for folder in _upwards(root, path)]
        elif "cpu" in controllers.split(","):
            for base in {root / controllers, root / "cpu"}:
                quotas += [_v1(folder) for folder in _upwards(base, path)]
    limits = [quota for quota in quotas if quota is not None]
    return min(limits) if limits else None


def _upwards(base: Path, path: str) -> Iterator[Path]:
    """The cgroup's folder and its ancestors' under `base`; in a cgroup namespace (a container)
    the path is `/` and `base` is the cgroup itself."""
    folder = base / path.lstrip("/")
    while True:
        if folder.is_dir():
            yield folder
        if folder == base or base not in folder.parents:
            return
        folder = folder.parent


def _v2(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
