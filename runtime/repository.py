"""The model repository: a folder `ROOT/<name>/<version>/` of bundles, served by name.

Each served version is a set of model instances behind one MicroBatcher. Loading is a hot
swap: new versions load (and pass their golden sample) beside the old ones, the routing
table is replaced in one step, and only then are retired versions drained: every request
that was routed to them finishes before their sessions are released, so a swap never fails
a request. Requests that name no version are spread by the model's traffic policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.devices import DeviceProfile, load_profile
from edgerun.runtime.batcher import BatchingConfig, MicroBatcher
from edgerun.runtime.bundle import NAME_RE, VERSION_RE, Bundle, version_key
from edgerun.runtime.errors import (BundleError, EdgerunError, ModelNotFound, ModelNotReady,
                                    Overloaded)
from edgerun.runtime.metrics import REGISTRY, Registry
from edgerun.runtime.model import Model
from edgerun.runtime.model_config import ModelConfig, TrafficPolicy

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"
KeySource = Callable[[str], "str | None"]


class ServedVersion:
    """One loaded version: its instances, their batcher, and the requests routed to it."""

    def __init__(self, models: list[Model], config: ModelConfig, registry: Registry) -> None:
        self.models = models
        self.model = models[0]
        self.name, self.version = self.model.name, self.model.version
        self.signature = self.model.signature
        self.batcher = MicroBatcher(models, config.batching, registry=registry)
        self.in_flight = 0
        self._idle = threading.Condition()
        gauge = registry.family("edgerun_inflight_requests",
                                "Requests routed to a version and not yet answered", "gauge",
                                ("model", "version"))
        gauge.labels(self.name, self.version).set_function(lambda: self.in_flight)
        self._gauge = gauge

    def acquire(self) -> None:
        with self._idle:
            self.in_flight += 1

    def release(self) -> None:
        with self._idle:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait for routed requests to finish, then release the sessions."""
        with self._idle:
            if not self._idle.wait_for(lambda: self.in_flight == 0, timeout):
                log.warning("%s version %s: %d requests still running after %.0f s drain",
                            self.name, self.version, self.in_flight, timeout)
        self.batcher.close(drain=True)
        for model in self.models:
            model.close()

    def forget_metrics(self) -> None:
        self.batcher.metrics.forget()
        self._gauge.remove(self.name, self.version)


class ServedModel:
    """A routing-table entry: the ready versions of one model and how traffic reaches them."""

    def __init__(self, name: str, config: ModelConfig,
                 versions: dict[str, ServedVersion]) -> None:
        self.name = name
        self.config = config
        self.versions = versions
        self.latest = max(versions, key=version_key)
        self._weighted = [(v, w) for v, w in sorted(config.traffic.weights.items())
                          if v in versions and w > 0]
        self._total = sum(w for _, w in self._weighted)

    def pick(self, key_source: KeySource | None) -> ServedVersion:
        """The version for a request that names none: canary weights, sticky by key hash."""
        if not self._weighted:
            return self.versions[self.latest]
        traffic: TrafficPolicy = self.config.traffic
        key = key_source(traffic.sticky_key) if traffic.sticky_key and key_source else None
        point = (_unit_hash(f"{self.name}\0{key}") if key is not None
                 else random.random()) * self._total
        for version, weight in self._weighted:
            point -= weight
            if point < 0:
                return self.versions[version]
        return self.versions[self._weighted[-1][0]]


def _unit_hash(text: str) -> float:
    """A stable hash in [0, 1): the same key lands on the same version on every replica."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class VersionState:
    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]


class Repository:
    """Models by name and version, loaded from a folder; hot swap; traffic policies."""

    def __init__(self, root: str | Path, device: str | Path | DeviceProfile | None = None, *,
                 default_batching: BatchingConfig | None = None,
                 registry: Registry = REGISTRY, drain_timeout: float = 60.0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: model repository folder does not exist")
        self.device = load_profile(device)
        self.default_batching = default_batching
        self.registry = registry
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()  # guards the routing table
        self._load_lock = threading.Lock()  # one load or unload at a time
        self._models: dict[str, ServedModel] = {}
        self._states: dict[tuple[str, str], VersionState] = {}
        self._failed: dict[tuple[str, str], tuple] = {}
        self._unloaded: set[str] = set()
        self._loaded_once = False
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_total = registry.family(
            "edgerun_shadow_requests_total",
            "Shadow copies by outcome (match, mismatch, error, dropped)", "counter",
            ("model", "version", "shadow_version", "outcome"))
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ------------------------------------------------------------------ disk
    def models_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name))

    def versions_on_disk(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir()
                       if p.is_dir() and VERSION_RE.match(p.name)), key=version_key)

    # -------------------------------------------------------------- lifecycle
    def load_all(self) -> None:
        """Load every model in the folder; a model that fails is reported, not fatal."""
        for name in self.models_on_disk():
            try:
                self.load(name)
            except EdgerunError as exc:
                log.error("model %s: %s", name, exc)
        self._loaded_once = True

    def load(self, name: str) -> list[str]:
        """(Re)load a model by its config and version policy; returns the versions served."""
        with self._load_lock:
            self._unloaded.discard(name)
            return self._load(name)

    def _load(self, name: str) -> list[str]:
        model_dir = self.root / name
        if not NAME_RE.match(name) or not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root}")
        config = ModelConfig.load(model_dir, self.default_batching)
        wanted = config.version_policy.select(self.versions_on_disk(name))
        if not wanted:
            raise BundleError(f"model {name!r}: no version folder matches its version policy "
                              f"in {model_dir}")
        current = self._models.get(name)
        reusable = current.versions if current is not None and _same_serving(
            current.config, config) else {}
        versions: dict[str, ServedVersion] = {}
        errors = []
        for version in wanted:
            if version in reusable:
                versions[version] = reusable[version]
                continue
            try:
                versions[version] = self._load_version(name, version, config)
            except EdgerunError as exc:
                errors.append(f"version {version}: {exc}")
                if current is not None and version in current.versions:
                    versions[version] = current.versions[version]  # keep serving the old one
        if not versions:
            raise BundleError(f"model {name!r}: no version could be loaded; "
                              + "; ".join(errors))
        with self._lock:
            old = self._models.get(name)
            self._models[name] = ServedModel(name, config, versions)
        self._retire(old, keep=versions)
        for version in versions:
            self._states[(name, version)] = VersionState(name, version, READY)
        if errors:
            log.error("model %s: %s", name, "; ".join(errors))
        return sorted(versions, key=version_key)

    def _load_version(self, name: str, version: str, config: ModelConfig) -> ServedVersion:
        folder = self.root / name / version
        fingerprint = _fingerprint(folder)
        if self._failed.get((name, version)) == fingerprint:
            raise BundleError(self._states[(name, version)].reason)
        self._states[(name, version)] = VersionState(name, version, LOADING)
        instances: list[Model] = []
        try:
            bundle = Bundle.open(folder)
            manifest = bundle.manifest
            if (manifest.name, manifest.version) != (name, version):
                raise BundleError(f"{folder} holds {manifest.name} version {manifest.version}; "
                                  f"the folder names {name} version {version}")
            for _ in range(config.instances or self.device.instances):
                instances.append(Model.load(bundle, self.device))
            instances[0].check_golden()
            served = ServedVersion(instances, config, self.registry)
        except EdgerunError as exc:
            for model in instances:
                model.close()
            self._failed[(name, version)] = fingerprint
            self._states[(name, version)] = VersionState(name, version, UNAVAILABLE, str(exc))
            raise
        self._failed.pop((name, version), None)
        log.info("loaded %s version %s on %s", name, version, instances[0].describe())
        return served

    def unload(self, name: str) -> None:
        """Stop routing to every version of a model, drain them, release them."""
        with self._load_lock:
            with self._lock:
                old = self._models.pop(name, None)
            if old is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._unloaded.add(name)
            self._retire(old, keep={})

    def _retire(self, old: ServedModel | None, keep: Mapping[str, ServedVersion]) -> None:
        if old is None:
            return
        for version, served in old.versions.items():
            if keep.get(version) is served:
                continue
            served.drain(self.drain_timeout)
            if version not in keep:  # a reload of the same version keeps its series
                served.forget_metrics()
                self._states[(old.name, version)] = VersionState(old.name, version, UNLOADED)
            log.info("retired %s version %s", old.name, version)

    def poll_once(self) -> None:
        """Bring the served set in line with the folder: new versions, configs, removals."""
        on_disk = set(self.models_on_disk())
        for name in sorted(on_disk - self._unloaded):
            if self._stale(name):
                try:
                    self.load(name)
                except EdgerunError as exc:
                    log.error("model %s: %s", name, exc)
        for name in sorted(set(self._models) - on_disk):
            self.unload(name)
            self._unloaded.discard(name)

    def _stale(self, name: str) -> bool:
        served = self._models.get(name)
        try:
            config = ModelConfig.load(self.root / name, self.default_batching)
        except BundleError as exc:
            log.error("model %s: %s", name, exc)
            return False
        wanted = config.version_policy.select(self.versions_on_disk(name))
        if served is not None and (served.config != config
                                   or any(v not in wanted for v in served.versions)):
            return True
        missing = [v for v in wanted if served is None or v not in served.versions]
        # a version that failed is tried again only once its folder changes
        return any(self._failed.get((name, v)) != _fingerprint(self.root / name / v)
                   for v in missing)

    def start_polling(self, interval: float) -> None:
        """Watch the folder every `interval` seconds in a background thread."""
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:  # keep watching whatever one pass hit
                    log.exception("repository poll failed")

        self._poller = threading.Thread(target=loop, name="edgerun-repository-poll",
                                        daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        for name in list(self._models):
            self.unload(name)

    # ---------------------------------------------------------------- queries
    def __contains__(self, name: object) -> bool:
        return name in self._models

    @property
    def ready(self) -> bool:
        """Initial load done and every model in the folder (not unloaded) is served."""
        if not self._loaded_once:
            return False
        return all(name in self._models for name in self.models_on_disk()
                   if name not in self._unloaded)

    def index(self) -> list[VersionState]:
        names = set(self.models_on_disk()) | {n for n, _ in self._states}
        states = []
        for name in sorted(names):
            seen = set()
            for (model, version), state in sorted(self._states.items(),
                                                  key=lambda i: version_key(i[0][1])):
                if model == name:
                    states.append(state)
                    seen.add(version)
            if not seen:
                states.append(VersionState(name, "", UNLOADED))
        return states

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        """A served version for metadata: the named one, or the latest."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise self._not_found(name)
            served = model.versions.get(version or model.latest)
            if served is None:
                raise self._no_version(model, version or "")
            return served

    def versions(self, name: str) -> list[str]:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise self._not_found(name)
            return sorted(model.versions, key=version_key)

    def _not_found(self, name: str) -> EdgerunError:
        if any(n == name and s.state == LOADING for (n, _), s in self._states.items()):
            return ModelNotReady(f"model {name!r} is loading")
        loaded = ", ".join(sorted(self._models)) or "none"
        return ModelNotFound(f"model {name!r} is not loaded (loaded: {loaded})")

    @staticmethod
    def _no_version(model: ServedModel, version: str) -> ModelNotFound:
        ready = ", ".join(sorted(model.versions, key=version_key))
        return ModelNotFound(f"model {model.name!r} has no version {version!r} loaded "
                             f"(loaded: {ready})")

    # -------------------------------------------------------------- inference
    def _route(self, name: str, version: str | None,
               key_source: KeySource | None) -> tuple[ServedVersion, str | None]:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise self._not_found(name)
            if version is None:
                served = model.pick(key_source)
            else:
                served = model.versions.get(version)
                if served is None:
                    raise self._no_version(model, version)
            served.acquire()
            shadow = model.config.traffic.shadow
            return served, shadow if shadow != served.version else None

    async def infer(self, name: str, version: str | None, inputs: Mapping[str, Any], *,
                    key_source: KeySource | None = None,
                    timeout: float | None = None) -> InferResult:
        """Route, run through the version's batcher, and send a shadow copy if configured.

        `key_source` looks up the request attribute (an HTTP header, an MQTT user property)
        that a sticky traffic policy names.
        """
        served, shadow = self._route(name, version, key_source)
        try:
            outputs = await served.batcher.predict_async(inputs, timeout=timeout)
        except EdgerunError as exc:
            exc.version = served.version
            raise
        finally:
            served.release()
        result = InferResult(name, served.version, outputs)
        if shadow is not None:
            self._send_shadow(shadow, inputs, result)
        return result

    def _send_shadow(self, version: str, inputs: Mapping[str, Any], primary: InferResult) -> None:
        counter = self._shadow_total
        try:
            served, _ = self._route(primary.model, version, None)
        except EdgerunError:
            counter.labels(primary.model, primary.version, version, "dropped").inc()
            return
        task = asyncio.ensure_future(self._shadow(served, inputs, primary))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, served: ServedVersion, inputs: Mapping[str, Any],
                      primary: InferResult) -> None:
        try:
            outputs = await served.batcher.predict_async(inputs)
            outcome = "match" if _same_outputs(primary.outputs, outputs) else "mismatch"
        except Overloaded:
            outcome = "dropped"
        except EdgerunError:
            outcome = "error"
        finally:
            served.release()
        self._shadow_total.labels(primary.model, primary.version, served.version,
                                  outcome).inc()


def _same_serving(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether loaded versions can be kept: batching and instances unchanged."""
    return old.batching == new.batching and old.instances == new.instances


def _same_outputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" and y.dtype.kind in "fc":
            if not np.allclose(x, y, rtol=1e-3, atol=1e-5, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def _fingerprint(folder: Path) -> tuple:
    """Names, sizes and mtimes of a version folder: a failed load is retried once it changes."""
    try:
        return tuple(sorted((p.name, s.st_size, s.st_mtime_ns)
                            for p in folder.iterdir() for s in [p.stat()]))
    except OSError:
        return ()
