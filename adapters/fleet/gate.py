"""Health gates and waves: the arithmetic of a rollout, kept apart from its messaging.

A gate is a comma-separated list of conditions on what updated devices report in their
telemetry, e.g. `p99<50ms,errors<1%`: `p50`/`p99` latency (ms or s) and `errors` (the share of
failed requests, in %). Telemetry is read as the MQTT daemon publishes it: `p50_ms`,
`p99_ms` (or `latency_ms: {p50, p99}`) over the last interval, and `requests`/`errors` counted
since the daemon started: the error share is taken over what a device served since its update
(the counts at that moment are the baseline), or an `error_rate` fraction when one is sent.
A device that served nothing in the last interval (`latency_ms` with no p99) holds latency
conditions: there is no slow request to hold against it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgerun.runtime.errors import InvalidInput
from edgerun.runtime.model_config import finite_number

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CONDITION = re.compile(r"^\s*(p50|p99|errors)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*(ms|s|%)?\s*$")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float  # ms for latency, percent for errors

    def __str__(self) -> str:
        unit = "%" if self.metric == "errors" else "ms"
        return f"{self.metric}{self.op}{self.threshold:g}{unit}"

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


def parse_gate(text: str | None) -> list[Condition]:
    if not text:
        return []
    conditions = []
    for part in text.split(","):
        match = _CONDITION.match(part)
        if match is None:
            raise InvalidInput(f"gate condition {part.strip()!r} is not like p99<50ms, "
                               "p50<=10ms or errors<1%")
        metric, op, number, unit = match.groups()
        value = float(number)
        if metric == "errors" and unit not in (None, "%"):
            raise InvalidInput(f"gate condition {part.strip()!r}: errors take a percentage")
        if metric != "errors":
            if unit == "%":
                raise InvalidInput(f"gate condition {part.strip()!r}: latency takes ms or s")
            # rounded: 1.001 * 1000 is 1000.9999999999999, and a p99 of 1001 ms must hold
            # p99<=1.001s (and break p99<1.001s)
            value = round(value * 1000, 9) if unit == "s" else value
        conditions.append(Condition(metric, op, value))
    return conditions


def parse_percentages(text: str) -> list[float]:
    """`5%,25%,100%` -> [0.05, 0.25, 1.0]; increasing, ending at 100 %."""
    try:
        values = [float(p.strip().rstrip("%")) / 100 for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidInput(f"waves {text!r} must be percentages like 5%,25%,100%") from None
    try:
        return check_waves(values)
    except InvalidInput:
        raise InvalidInput(f"waves {text!r} must increase and end at 100%") from None


def parse_percentage(text: str) -> float:
    try:
        value = float(str(text).strip().rstrip("%")) / 100
    except ValueError:
        raise InvalidInput(f"{text!r} is not a percentage") from None
    if not 0 <= value <= 1:
        raise InvalidInput(f"{text!r} must be between 0% and 100%")
    return value


def check_waves(values: Any) -> list[float]:
    """Cumulative shares of the devices, as a rollout's spec holds them: numbers that
    increase from above 0 to 1 (every device), e.g. [0.05, 0.25, 1.0]."""
    if not isinstance(values, list) or not values or not all(map(finite_number, values)) \
            or any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0 \
            or abs(values[-1] - 1.0) > 1e-9:
        raise InvalidInput(f"waves {values!r:.80} must be shares that increase and end at 1 "
                           "(100%), e.g. [0.05, 0.25, 1.0]")
    return [float(value) for value in values]


def check_share(value: Any, name: str) -> float:
    """A share between 0 and 1 (e.g. max_failures)."""
    if not finite_number(value) or not 0 <= value <= 1:
        raise InvalidInput(f"{name} {value!r:.40} must be a number between 0 and 1")
    return float(value)


def check_seconds(value: Any, name: str) -> float:
    """A timeout: a finite number of seconds above zero."""
    if not finite_number(value) or value <= 0:
        raise InvalidInput(f"{name} {value!r:.40} must be a number of seconds above 0")
    return float(value)


def assign_waves(devices: list[str], waves: list[float]) -> list[tuple[str, int]]:
    """Each device's wave: the first `ceil(share * n)` devices (at least one) by wave."""
    assigned, start = [], 0
    for index, share in enumerate(waves):
        end = max(start + (1 if index == 0 else 0), math.ceil(share * len(devices) - 1e-9))
        end = min(end, len(devices))
        assigned += [(device, index) for device in devices[start:end]]
        start = end
    return assigned


def _number(value: Any) -> float | None:
    """A count or latency a device sent, as a float; None for anything else. A device
    publishes what it likes: a 400-digit integer (OverflowError) or a string count kept as a
    baseline (ValueError) failed every tick of its rollout, which then neither advanced nor
    aborted at the gate timeout."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def health(telemetry: Mapping[str, Any],
           baseline: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The gate's metrics from one telemetry message (missing ones left out; so are values
    that are no number a float holds, and a baseline count that is none counts as 0)."""
    values: dict[str, float] = {}
    latency = telemetry.get("latency_ms") if isinstance(telemetry.get("latency_ms"), dict) \
        else {}
    for metric in ("p50", "p99"):
        value = _number(telemetry.get(f"{metric}_ms", latency.get(metric)))
        if value is not None:
            values[metric] = value
    error_rate = _number(telemetry.get("error_rate"))
    requests, errors = _number(telemetry.get("requests")), _number(telemetry.get("errors"))
    if error_rate is not None:
        values["errors"] = 100.0 * error_rate
    elif requests is not None and errors is not None:
        baseline = baseline or {}
        base_requests = _number(baseline.get("requests")) or 0.0
        base_errors = _number(baseline.get("errors")) or 0.0
        # a restarted daemon counts from zero again: its start time says so, and (from a
        # daemon that sends none) either count going down
        restarted = baseline.get("since") is not None and \
            telemetry.get("since") != baseline.get("since")
        if not restarted and base_requests <= requests and base_errors <= errors:
            requests -= base_requests
            errors -= base_errors
        values["errors"] = 100.0 * max(errors, 0.0) / requests if requests else 0.0
    return values


def check_gate(conditions: list[Condition], telemetry: Mapping[str, Any],
               baseline: Mapping[str, Any] | None = None) -> list[str]:
    """The conditions this telemetry breaks (or lacks), as readable strings; empty: it holds."""
    values = health(telemetry, baseline)
    latency = telemetry.get("latency_ms")
    idle = isinstance(latency, dict) and latency.get("p99") is None  # no request this window
    broken = []
    for condition in conditions:
        value = values.get(condition.metric)
        if value is None and idle and condition.metric in ("p50", "p99"):
            continue  # nothing was served: no latency to hold against the gate
        if value is None:
            broken.append(f"no {condition.metric} in telemetry")
        elif not condition.holds(value):
            broken.append(f"{condition.metric} {value:g} breaks {condition}")
    return broken
