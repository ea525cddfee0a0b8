"""The core's metrics registry in the Prometheus text exposition format (0.0.4)."""

from __future__ import annotations

import math

from edgerun.runtime.metrics import Counter, Family, Gauge, Histogram, Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(registry: Registry) -> str:
    lines: list[str] = []
    for family in registry.collect():
        lines.extend(_family(family))
    return "\n".join(lines) + "\n"


def _family(family: Family) -> list[str]:
    lines = [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
    names = family.labelnames
    for values, child in sorted(family.children(), key=lambda item: item[0]):
        if isinstance(child, Histogram):
            buckets, total, count = child.snapshot()
            for bound, observed in buckets:
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{family.name}_bucket{_labels(names, values, le)} {observed}")
            lines.append(f"{family.name}_sum{_labels(names, values)} {_number(total)}")
            lines.append(f"{family.name}_count{_labels(names, values)} {count}")
        else:
            assert isinstance(child, (Counter, Gauge))
            lines.append(f"{family.name}{_labels(names, values)} {_number(child.value)}")
    return lines
