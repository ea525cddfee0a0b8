"""What a device reports every N seconds: its models, traffic and health.

Traffic comes from the core's metrics registry (the same numbers `/metrics` shows on the fleet
server); the machine's health from /proc and /sys, so no dependency is needed on a device.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edgerun.runtime.metrics import Histogram, Registry

THERMAL = Path("/sys/class/thermal")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def quantile(buckets: list[tuple[float, int]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated inside its bucket."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


class Telemetry:
    """Builds telemetry payloads; latency and CPU figures cover the time since the last one.

    Request counts are the process's own running totals, built from how much each series grew
    between reads: a retired version's series vanish from the registry and one loaded again
    starts from zero, so summing the registry's raw values would make the totals go down at
    every update, and the fleet's health gate would read an update as a restart.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._last: dict[tuple, float] = {}  # each series' (and bucket's) value at the last read
        self._outcomes: dict[str, float] = {}
        self._last_cpu = (_process_cpu_seconds(), time.monotonic())

    def traffic(self) -> dict[str, Any]:
        seen: dict[tuple, float] = {}

        def grown(key: tuple, value: float) -> float:
            last = self._last.get(key, 0.0)
            seen[key] = value
            return value - last if value >= last else value  # below: the series started again

        latency: dict[float, float] = {}
        queued = 0.0
        for family in self.registry.collect():
            if family.name == "edgerun_requests_total":
                for labels, child in family.children():
                    outcome = labels[-1]
                    self._outcomes[outcome] = self._outcomes.get(outcome, 0.0) + grown(
                        (family.name, labels), child.value)  # type: ignore[union-attr]
            elif family.name == "edgerun_request_duration_seconds":
                for labels, child in family.children():
                    assert isinstance(child, Histogram)
                    for bound, count in child.cumulative():
                        latency[bound] = latency.get(bound, 0.0) + grown(
                            (family.name, labels, bound), count)
            elif family.name == "edgerun_queue_depth":
                queued += sum(child.value for _, child in family.children())
        self._last = seen  # a vanished series is forgotten: back, it counts from zero
        window = [(bound, int(count)) for bound, count in sorted(latency.items())]
        p50, p99 = quantile(window, 0.5), quantile(window, 0.99)
        errors = sum(v for outcome, v in self._outcomes.items() if outcome != "ok")
        return {"requests": int(sum(self._outcomes.values())), "errors": int(errors),
                "outcomes": {k: int(v) for k, v in sorted(self._outcomes.items())},
                "latency_ms": {"p50": _ms(p50), "p99": _ms(p99),
                               "window_requests": window[-1][1] if window else 0},
                "batcher_queue_depth": int(queued)}

    def machine(self) -> dict[str, Any]:
        cpu_seconds, now = _process_cpu_seconds(), time.monotonic()
        last_cpu, last_now = self._last_cpu
        self._last_cpu = (cpu_seconds, now)
        elapsed = now - last_now
        return {"cpu_percent": round(100 * (cpu_seconds - last_cpu) / elapsed, 1)
                if elapsed > 0 else None,
                "load_1m": _loadavg(),
                "rss_mb": _rss_mb(),
                "mem_available_mb": _meminfo("MemAvailable"),
                "mem_total_mb": _meminfo("MemTotal"),
                "temperature_c": temperature()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _process_cpu_seconds() -> float:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return time.process_time()


def _rss_mb() -> float | None:
    try:
        return round(int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _meminfo(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    return None


def temperature(root: Path = THERMAL) -> float | None:
    """The hottest thermal zone in degrees Celsius, or None where the board reports none."""
    hottest = None
    for zone in root.glob("thermal_zone*/temp"):
        try:
            value = int(zone.read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
        hottest = value if hottest is None else max(hottest, value)
    return hottest
