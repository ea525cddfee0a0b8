"""One served version: loading it safely, counting what is routed to it, draining it.

A version is loaded beside whatever is live and must reproduce its golden sample before it can
take traffic; if anything at all goes wrong while loading, every session it opened is closed
and the caller gets a BundleError with the reason, so nothing leaks and nothing half-loaded is
served. Retiring a version waits until every request routed to it has been answered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from edgerun.devices import DeviceProfile
from edgerun.runtime.batcher import MicroBatcher
from edgerun.runtime.bundle import Bundle
from edgerun.runtime.errors import BundleError, EdgerunError
from edgerun.runtime.metrics import Gauge, Registry
from edgerun.runtime.model import Model
from edgerun.runtime.model_config import ModelConfig

log = logging.getLogger(__name__)


class ServedVersion:
    """One loaded version: its instances, their batcher, and the requests routed to it."""

    def __init__(self, models: list[Model], config: ModelConfig, registry: Registry) -> None:
        self.models = models
        self.model = models[0]
        self.name, self.version = self.model.name, self.model.version
        self.config = config  # what it was loaded with: a failed reload keeps an older one
        self._registry = registry
        registry.serve_version(self.name, self.version)  # before its series are made
        self.batcher = MicroBatcher(models, config.batching, registry=registry)
        self.signature = self.batcher.signature  # unbatched by a `max_batch_size = 0`
        self.in_flight = 0
        self._idle = threading.Condition()
        inflight: Gauge = registry.family(  # type: ignore[assignment]
            "edgerun_inflight_requests", "Requests routed to a version and not yet answered",
            "gauge", ("model", "version")).labels(self.name, self.version)
        # A reload of this version (a new config) shares its series with the copy it
        # replaces, which may still drain requests: each copy adds its own count until it is
        # released (the new copy's count replaced the old one's, which read 0 meanwhile).
        self._uncount = inflight.add_function(lambda: self.in_flight)

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
        self._uncount()  # this copy counts no more; a reload's copy still does

    def forget_metrics(self) -> None:
        """The version is no longer served: every series naming it goes (its batcher's, its
        requests', its shadow comparisons'); a reload of the same version keeps them."""
        self._registry.forget_version(self.name, self.version)


def load_version(path: Path, name: str, version: str, config: ModelConfig,
                 device: DeviceProfile, registry: Registry,
                 check: Callable[[Bundle], None] | None = None) -> ServedVersion:
    """Open, verify, load and smoke-test one version; BundleError with the reason otherwise.

    `check` (a source's, such as OTA slots' signature check) runs on the opened bundle, whose
    files the backends then read as the manifest it holds lists them: what it checked is
    what serves, whatever changes on disk after."""
    instances: list[Model] = []
    bundle = None
    try:
        bundle = Bundle.open(path)
        manifest = bundle.manifest
        if (manifest.name, manifest.version) != (name, version):
            raise BundleError(f"{path} holds {manifest.name} version {manifest.version}; "
                              f"the folder names {name} version {version}")
        if check is not None:
            check(bundle)
        for _ in range(config.instances or device.instances):
            instances.append(Model.load(bundle, device))
        instances[0].check_golden()
        served = ServedVersion(instances, config, registry)
    except BaseException as exc:
        for model in instances:
            model.close()
        if bundle is not None:
            bundle.close()
        if isinstance(exc, Exception) and not isinstance(exc, EdgerunError):
            raise BundleError(f"{name} version {version} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        raise
    log.info("loaded %s version %s on %s", name, version, instances[0].describe())
    return served
