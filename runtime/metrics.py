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
#: Labels that name a model version beside a "model" label: a retired version's series go.
VERSION_LABELS = ("version", "shadow_version")


class Counter:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount


class Gauge:
    """The sum, read at collection time, of the functions added to it (queue depth, requests
    in flight). Two copies of one version, the one taking requests and the one a reload of it
    is still draining, share their series, and each adds its own count until it is gone.
    """

    __slots__ = ("_lock", "_added")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # replaced whole under the lock, never changed in place: a scrape reads it unlocked
        self._added: tuple[Callable[[], float], ...] = ()

    def add_function(self, function: Callable[[], float]) -> Callable[[], None]:
        """Count `function` too, until the function this returns is called."""
        with self._lock:
            self._added = (*self._added, function)

        def remove() -> None:
            with self._lock:
                added = list(self._added)
                for index, each in enumerate(added):
                    if each is function:
                        del added[index]
                        self._added = tuple(added)
                        return
        return remove

    @property
    def value(self) -> float:
        return float(sum(each() for each in self._added))


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
        # where this family names a model version (its own, or the one it shadows)
        names = self.labelnames
        self._model_at = names.index("model") if "model" in names else None
        self._versions_at = tuple(i for i, n in enumerate(names) if n in VERSION_LABELS)
        self._retired: set[tuple[str, str]] = set()  # the registry's, once registered

    def labels(self, *values: str) -> Counter | Gauge | Histogram:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            with self._lock:
                child = self._children.get(values)
                if child is None:
                    child = self._make()
                    if not self._names_retired(values):
                        self._children[values] = child
                    # else: a late count for a version no longer served (a request answered
                    # after its drain, a shadow copy compared after it): not a series again
        return child

    def remove(self, *values: str) -> None:
        with self._lock:
            self._children.pop(values, None)

    def forget(self, model: str, version: str) -> None:
        """Drop every series naming this model version (in any version label)."""
        if self._model_at is None or not self._versions_at:
            return
        with self._lock:
            for values in list(self._children):
                if values[self._model_at] == model and \
                        any(values[i] == version for i in self._versions_at):
                    del self._children[values]

    def _names_retired(self, values: tuple[str, ...]) -> bool:
        retired, at = self._retired, self._model_at
        return bool(retired) and at is not None and \
            any((values[at], values[i]) in retired for i in self._versions_at)

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
        self._retired: set[tuple[str, str]] = set()  # (model, version) no longer served

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
            family._retired = self._retired
            self._families[name] = family
            return family

    def forget_version(self, model: str, version: str) -> None:
        """A version is no longer served: every series naming it goes, in every family (its
        batcher's, the data plane's request counters, shadow comparisons), and a count that
        comes after (a request answered while it drained) makes none again."""
        with self._lock:
            self._retired.add((model, version))
            families = list(self._families.values())
        for family in families:
            family.forget(model, version)

    def serve_version(self, model: str, version: str) -> None:
        """A version is (again) loaded: its series may be made anew."""
        with self._lock:
            self._retired.discard((model, version))

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
