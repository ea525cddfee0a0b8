"""Counters, gauges and histograms the core records; each adapter exposes them its own way.

Kept free of any exporter library so a Lambda or a device pays nothing for it; the HTTP
adapter renders `Registry.collect()` as Prometheus text, the MQTT daemon as telemetry.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Counter:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount


class Gauge:
    """A value read at collection time from a function (queue depth, requests in flight)."""

    __slots__ = ("_function",)

    def __init__(self) -> None:
        self._function: Callable[[], float] | None = None

    def set_function(self, function: Callable[[], float]) -> None:
        self._function = function

    @property
    def value(self) -> float:
        return float(self._function()) if self._function is not None else 0.0


class Histogram:
    __slots__ = ("_lock", "bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._lock = threading.Lock()
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[index] += 1
            self.sum += value
            self.count += 1

    def observe_many(self, values: list[float]) -> None:
        """Observe a batch of values under one lock acquisition."""
        bounds, counts = self.bounds, self.counts
        indices = [bisect.bisect_left(bounds, value) for value in values]
        with self._lock:
            for index in indices:
                counts[index] += 1
            self.sum += sum(values)
            self.count += len(values)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, ending with +Inf."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """The cumulative buckets, sum and count read together, so that a scrape's +Inf
        bucket always equals its count."""
        with self._lock:
            counts, total_sum, count = list(self.counts), self.sum, self.count
        total, out = 0, []
        for bound, bucket in zip((*self.bounds, math.inf), counts):
            total += bucket
            out.append((bound, total))
        return out, total_sum, count


@dataclass
class Family:
    """One metric name with its label names; children per label values."""

    name: str
    help: str
    kind: str  # "counter", "gauge" or "histogram"
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self._children: dict[tuple[str, ...], Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> Counter | Gauge | Histogram:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            with self._lock:
                child = self._children.get(values)
                if child is None:
                    child = self._make()
                    self._children[values] = child
        return child

    def remove(self, *values: str) -> None:
        with self._lock:
            self._children.pop(values, None)

    def children(self) -> list[tuple[tuple[str, ...], Counter | Gauge | Histogram]]:
        with self._lock:
            return list(self._children.items())

    def _make(self) -> Counter | Gauge | Histogram:
        if self.kind == "counter":
            return Counter()
        if self.kind == "gauge":
            return Gauge()
        return Histogram(self.buckets)


class Registry:
    """A set of metric families; `family()` returns the existing one when names repeat."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._lock = threading.Lock()

    def family(self, name: str, help: str, kind: str, labelnames: Sequence[str] = (),
               buckets: Sequence[float] = LATENCY_BUCKETS) -> Family:
        with self._lock:
            existing = self._families.get(name)
            if existing is not None:
                if existing.kind != kind or existing.labelnames != tuple(labelnames):
                    raise ValueError(f"metric {name} already registered differently")
                return existing
            family = Family(name, help, kind, tuple(labelnames),
                            tuple(buckets) if kind == "histogram" else ())
            self._families[name] = family
            return family

    def collect(self) -> Iterator[Family]:
        with self._lock:
            families = list(self._families.values())
        yield from families


#: The process-wide registry that the core and the adapters record into by default.
REGISTRY = Registry()


class ModelMetrics:
    """The core's metrics for one model version, bound to its labels once."""

    LABELS = ("model", "version")

    def __init__(self, model: str, version: str, registry: Registry = REGISTRY) -> None:
        labels = (model, version)
        self._labels = labels
        self._families = [
            registry.family("edgerun_queue_wait_seconds",
                            "Time requests waited in the batcher queue", "histogram",
                            self.LABELS),
            registry.family("edgerun_batch_size", "Rows per forward pass", "histogram",
                            self.LABELS, BATCH_BUCKETS),
            registry.family("edgerun_inference_seconds", "Duration of one forward pass",
                            "histogram", self.LABELS),
            registry.family("edgerun_queue_depth", "Requests waiting in the batcher queue",
                            "gauge", self.LABELS),
            registry.family("edgerun_batcher_errors_total",
                            "Requests the batcher ended with an error, by kind", "counter",
                            (*self.LABELS, "kind")),
        ]
        queue_wait, batch_size, inference, queue_depth, self._errors = self._families
        self.queue_wait: Histogram = queue_wait.labels(*labels)  # type: ignore[assignment]
        self.batch_size: Histogram = batch_size.labels(*labels)  # type: ignore[assignment]
        self.inference: Histogram = inference.labels(*labels)  # type: ignore[assignment]
        self.queue_depth: Gauge = queue_depth.labels(*labels)  # type: ignore[assignment]

    def error(self, kind: str) -> None:
        self._errors.labels(*self._labels, kind).inc()

    def forget(self) -> None:
        """Drop this version's series once it is unloaded, so /metrics stops showing it."""
        for family in self._families:
            if family.labelnames == self.LABELS:
                family.remove(*self._labels)
        for labels, _ in self._errors.children():
            if labels[:2] == self._labels:
                self._errors.remove(*labels)
