"""The model repository: models by name and version, served from a source, hot-swapped.

The repository keeps the routing table and the state index; the rest is delegated: its source
says which versions to serve (`sources.py`), `serving.py` loads and drains a version, and
`router.py` picks the version for each request. Loading is a hot swap: new versions load and
pass their golden sample beside the old ones, the routing table is replaced in one step, and
only then are retired versions drained, so a swap never fails a request.

Callers route, run and release:

    with repository.route("digits", None, headers.get) as routed:
        outputs = routed.run(inputs)            # from a thread
        outputs = await routed.run_async(inputs)  # from an event loop
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from edgerun.devices import DeviceProfile, load_profile
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.bundle import version_key
from edgerun.runtime.errors import BundleError, EdgerunError, ModelNotFound, ModelNotReady
from edgerun.runtime.metrics import REGISTRY, Registry
from edgerun.runtime.model_config import ModelConfig
from edgerun.runtime.router import Attributes, Routed, ServedModel
from edgerun.runtime.serving import ServedVersion, load_version
from edgerun.runtime.sources import FolderSource, VersionSource

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"
#: `start_loading`'s thread; a process stopped while it runs ends without waiting for it
LOADING_THREAD = "edgerun-repository-load"
#: threads inside `Repository.load` now (a hot swap: polling, POST .../load, an OTA switch)
_LOADERS: set[threading.Thread] = set()
#: errnos of a resource run out (memory, file descriptors, disk space): a load that failed so
#: fails for what the process or the machine lacks now, not for the version's files
_EXHAUSTED = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC})


def exit_if_still_loading(status: int = 0) -> None:
    """End the process with `status` now, without the interpreter's shutdown, if a
    `start_loading` thread still runs (a server or daemon stopped mid-load).

    That thread is inside ONNX Runtime (or a TensorRT engine build); when it came back during
    the interpreter's shutdown, the process aborted ("terminate called without an active
    exception", SIGABRT) instead of exiting with `status`. Call it once nothing else is left.
    """
    if any(t.name == LOADING_THREAD and t.is_alive() for t in threading.enumerate()) or any(
            t.is_alive() for t in tuple(_LOADERS)):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


@dataclass(frozen=True)
class VersionState:
    name: str
    version: str
    state: str
    reason: str = ""


class Repository:
    """Models by name and version from a source (a folder by default); hot swap; routing."""

    def __init__(self, source: VersionSource | str | Path,
                 device: str | Path | DeviceProfile | None = None, *,
                 default_batching: BatchingConfig | None = None,
                 registry: Registry = REGISTRY, drain_timeout: float = 60.0) -> None:
        self.source: VersionSource = FolderSource(source, default_batching) \
            if isinstance(source, (str, Path)) else source
        self.device = load_profile(device)
        self.registry = registry
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()  # guards the routing table
        self._load_lock = threading.RLock()  # one load or unload at a time
        self._models: dict[str, ServedModel] = {}
        self._states: dict[tuple[str, str], VersionState] = {}
        # (model, version) -> (files' fingerprint, config, why) of its last failed load
        self._failed: dict[tuple[str, str], tuple[tuple, ModelConfig, str]] = {}
        self._unloaded: set[str] = set()
        self._attempted: set[str] = set()  # models this repository was meant to serve
        self._loaded_once = False
        self._shadow_total = registry.family(
            "edgerun_shadow_requests_total",
            "Shadow copies by outcome (match, mismatch, error, dropped)", "counter",
            ("model", "version", "shadow_version", "outcome"))
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._loading = 0  # loads under way, and poll passes about to start one (under _lock)
        self._flushing = False  # set by `flush`: the process is stopping

    # -------------------------------------------------------------- lifecycle
    def load_all(self) -> None:
        """Load every model the source offers; a model that fails is reported, not fatal."""
        for name in self.source.models():
            if self._stop.is_set():  # closed meanwhile: the rest would be refused (`load`)
                break
            try:
                self.load(name)
            except EdgerunError as exc:
                log.error("model %s: %s", name, exc)
            except Exception:  # whatever one model hit, the others still load
                log.exception("model %s failed to load", name)
        self._loaded_once = True

    def start_loading(self, poll_interval: float | None = None) -> threading.Thread:
        """`load_all` (then polling, if asked) on a background thread; `ready` says when done."""
        def load() -> None:
            self.load_all()
            if poll_interval:
                self.start_polling(poll_interval)

        thread = threading.Thread(target=load, name=LOADING_THREAD, daemon=True)
        thread.start()
        return thread

    def load(self, name: str, *, retry_failed: bool = True) -> list[str]:
        """(Re)load a model as its source wants it; returns the versions now served.

        Versions that fail to load never replace working ones; if any wanted version failed,
        BundleError says which and why, after the ones that loaded have been swapped in.
        A version that failed before is tried again, as Triton's explicit load does: the
        operator asking (POST .../load, an OTA job) may have fixed a cause outside its files
        (memory freed, a library installed). Polling passes `retry_failed=False`: it tries
        such a version again only once its files or config change, not at every pass.
        Once `close` has begun, a load is refused with ModelNotReady: one that waited for
        another load or unload to end would otherwise load after `close` had released every
        model, and its sessions and threads were never released.
        """
        with self._load_lock:
            thread = threading.current_thread()
            with self._lock:  # a loader in the step `close` sees it loading in
                if self._stop.is_set():
                    raise ModelNotReady(f"model {name!r} was not loaded: the repository is "
                                        "closing (the server is stopping)")
                self._loading += 1
                _LOADERS.add(thread)
            self._unloaded.discard(name)
            try:
                return self._load(name, retry_failed)
            finally:
                _LOADERS.discard(thread)
                with self._lock:
                    self._loading -= 1

    def _load(self, name: str, retry_failed: bool) -> list[str]:
        config = self.source.config(name)
        wanted = self.source.wanted(name, config)
        if not wanted:  # a folder still being filled, say: not a model yet, nor unready
            self._attempted.discard(name)
            raise BundleError(f"model {name!r}: {self.source!r} offers no version to serve")
        self._attempted.add(name)  # a model the source has: readiness waits for it now
        current = self._models.get(name)
        # judged per version: one kept after a failed reload still runs an older config
        reusable = {version: served for version, served in current.versions.items()
                    if _same_serving(served.config, config)} if current is not None else {}
        versions: dict[str, ServedVersion] = {}
        errors = []
        for version in wanted:
            if version in reusable:
                versions[version] = reusable[version]
                continue
            try:
                versions[version] = self._load_version(name, version, config, retry_failed)
            except EdgerunError as exc:
                errors.append(f"version {version}: {exc}")
                if current is not None and version in current.versions:
                    versions[version] = current.versions[version]  # keep serving the old one
        if not versions:
            raise BundleError(f"model {name!r}: no version could be loaded; "
                              + "; ".join(errors))
        with self._lock:
            if self._flushing:  # swapped in after `flush`: its batchers wait for nothing too
                for served in versions.values():
                    served.batcher.flush()
            old = self._models.get(name)
            self._models[name] = ServedModel(name, config, versions)
        for version in versions:
            self._states[(name, version)] = VersionState(name, version, READY)
        self._retire(old, keep=versions)
        if errors:
            raise BundleError(f"model {name!r}: " + "; ".join(errors))
        return sorted(versions, key=version_key)

    def _load_version(self, name: str, version: str, config: ModelConfig,
                      retry_failed: bool) -> ServedVersion:
        try:
            fingerprint = self.source.fingerprint(name, version)
        except Exception as exc:  # unknown, so not recorded: tried again at the next poll
            self._fail(name, version, None, config, exc)
        known = self._known_failure(name, version, fingerprint, config)
        if known is not None and not retry_failed:
            raise BundleError(known)  # nothing changed since it failed: it would again
        self._states[(name, version)] = VersionState(name, version, LOADING)
        try:
            served = load_version(self.source.bundle_path(name, version), name, version,
                                  config, self.device, self.registry,
                                  getattr(self.source, "check", None))
        except Exception as exc:
            self._fail(name, version, fingerprint, config, exc)
        self._failed.pop((name, version), None)
        return served

    def _fail(self, name: str, version: str, fingerprint: tuple | None, config: ModelConfig,
              exc: Exception) -> NoReturn:
        """End a version's load as failed, with the reason: UNAVAILABLE, never left LOADING
        (which answers 503 for good). A source's own error (an OSError from a folder removed
        since it was listed) becomes a BundleError, so the model's other versions still load.
        A failure for want of memory, file descriptors or disk space is not remembered: the
        next poll tries again, where a remembered one waits for the files or config to change
        (until a restart, for a version whose files were never at fault)."""
        error = exc if isinstance(exc, EdgerunError) else BundleError(
            f"{name} version {version} failed to load: {type(exc).__name__}: {exc}")
        if fingerprint is None or _exhausted(exc):
            self._failed.pop((name, version), None)
        else:
            self._failed[(name, version)] = (fingerprint, config, str(error))
        self._states[(name, version)] = VersionState(name, version, UNAVAILABLE, str(error))
        if error is exc:
            raise exc
        raise error from exc

    def _known_failure(self, name: str, version: str, fingerprint: tuple,
                       config: ModelConfig) -> str | None:
        """Why this version last failed to load, if neither its files nor its config changed
        since (polling tries a version that failed again only then; a `load` always does)."""
        known = self._failed.get((name, version))
        return known[2] if known is not None and known[:2] == (fingerprint, config) else None

    def unload(self, name: str) -> None:
        """Stop routing to every version of a model, drain them, release them."""
        with self._load_lock:
            with self._lock:
                old = self._models.pop(name, None)
            if old is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._unloaded.add(name)
            self._attempted.discard(name)
            self._retire(old, keep={})

    def refresh(self, name: str) -> list[str]:
        """Serve a model as its source offers it now, not at the next poll (an updater that
        changed the source, as OTA's slots, reports only once it serves); the versions served.
        A model the source no longer offers is unloaded, and loads again once offered (an
        `unload` holds it off until a `load`)."""
        with self._load_lock:
            if self._offers_a_version(name):
                return self.load(name)
            if name in self._models:
                self.unload(name)
            self._unloaded.discard(name)
            return []

    def _offers_a_version(self, name: str) -> bool:
        """Whether the source offers a version of `name` to serve now (a folder with a
        config.toml and no version offers none)."""
        try:
            return bool(self.source.wanted(name, self.source.config(name)))
        except ModelNotFound:
            return False

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
        """Bring the served set in line with the source: new versions, configs, removals."""
        offered = set(self.source.models())
        for name in sorted(offered - self._unloaded):
            try:
                if not self._stale(name):
                    continue
                with self._load_lock:
                    # unloaded since this pass listed it (the repository API, which `_stale`
                    # then saw as missing): it stays unloaded until a `load` asks for it
                    if name in self._unloaded:
                        continue
                    with self._lock:  # one step with `close`'s look: once closing, no swap
                        if self._stop.is_set():
                            return
                        self._loading += 1
                        # counted, so a loader too (`load` lists it only on its way in): a
                        # process that stops now ends without this load (`exit_if_still_loading`)
                        _LOADERS.add(threading.current_thread())
                    try:
                        self.load(name, retry_failed=False)
                    finally:
                        with self._lock:
                            self._loading -= 1
                            _LOADERS.discard(threading.current_thread())
            except EdgerunError as exc:
                log.error("model %s: %s", name, exc)
            except Exception:  # one model's surprise must not stop the others' updates
                log.exception("model %s: reload failed", name)
        if self._stop.is_set():
            return
        for name in sorted(set(self._models) - offered):
            with self._load_lock:
                # loaded since this pass listed the source (an OTA switch's first install of
                # a model, POST .../load): offered now, so not gone
                if name in self.source.models():
                    continue
                try:
                    self.unload(name)
                except ModelNotFound:  # unloaded since (`refresh`, the repository API): gone
                    pass
                self._unloaded.discard(name)
        with self._load_lock:  # a model that never loaded and is gone is no longer due
            # judged on the source now: one loaded since this pass listed it (POST .../load,
            # an OTA switch) is due, whether its load succeeded or not
            self._attempted &= set(self.source.models())

    def _stale(self, name: str) -> bool:
        served = self._models.get(name)
        try:
            config = self.source.config(name)
        except EdgerunError as exc:
            log.error("model %s: %s", name, exc)
            return False
        wanted = self.source.wanted(name, config)
        if served is None and not wanted:  # as in `_load`: no version, so nothing to wait for
            with self._load_lock:
                # read again: a version may have come, and a load tried it, since
                if not self._offers_a_version(name):
                    self._attempted.discard(name)
            return False
        if served is not None and served.config != config:
            return True
        missing = [v for v in wanted if served is None or v not in served.versions]
        if served is not None:
            # versions no longer wanted go once a wanted one serves; while none can (the
            # newest broken under `latest = 1`), they stay, and a reload would only fail again
            if (any(v not in wanted for v in served.versions)
                    and any(v in served.versions for v in wanted)):
                return True
            # kept after a failed reload: due again once its files change
            missing += [v for v, version in served.versions.items()
                        if not _same_serving(version.config, config)]
        return any(self._known_failure(name, v, self.source.fingerprint(name, v), config)
                   is None for v in missing)

    def start_polling(self, interval: float) -> None:
        """Watch the source every `interval` seconds in a background thread."""
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:  # keep watching whatever one pass hit
                    log.exception("repository poll failed")

        self._poller = threading.Thread(target=loop, name="edgerun-repository-poll",
                                        daemon=True)
        self._poller.start()

    def flush(self) -> None:
        """Shutting down: every served version's batcher runs what it holds at once, and each
        later request too, without waiting out its batching delay (`MicroBatcher.flush`); so
        do those of versions a hot swap brings in later."""
        with self._lock:
            self._flushing = True
            served = [v for model in self._models.values() for v in model.versions.values()]
        for version in served:
            version.batcher.flush()

    def close(self, *, wait_for_loads: bool = True, drain: bool = True) -> bool:
        """Stop polling, then drain and release every model; True once done. A load asked
        for from now on is refused (ModelNotReady), so nothing is loaded that is never released.

        With `wait_for_loads=False`, a load under way (a hot swap: polling, POST .../load, an
        OTA switch; minutes for a TensorRT engine build) is not waited for: nothing is
        released, False comes back, and the process should end without it
        (`exit_if_still_loading`), as one stopped during its start-up load does. With
        `drain=False` (a caller whose own drain ran out), requests still queued are answered
        ModelNotReady at once rather than run; only the forward passes running finish.
        """
        with self._lock:
            self._stop.set()
            loading = self._loading > 0
            served = [v for model in self._models.values() for v in model.versions.values()]
        if loading and not wait_for_loads:
            return False
        if not drain:
            for version in served:
                version.batcher.close(drain=False)
        if self._poller is not None:
            self._poller.join()
        with self._load_lock:  # listed once a load under way is done: a model it adds goes too
            for name in list(self._models):
                self.unload(name)
        return True

    # ---------------------------------------------------------------- queries
    def __contains__(self, name: object) -> bool:
        return name in self._models

    @property
    def ready(self) -> bool:
        """Initial load done and every model this repository tried to serve is served.

        Judged on what was loaded or asked for, never on a fresh listing of the source: a
        folder created later (and never polled) must not take every replica out of service.
        """
        if not self._loaded_once:
            return False
        return all(name in self._models for name in tuple(self._attempted))

    def index(self) -> list[VersionState]:
        # a copy (taken at once under the GIL): a loader thread may add a version meanwhile
        known = list(self._states.items())
        names = set(self.source.models()) | {n for (n, _), _ in known}
        states = []
        for name in sorted(names):
            seen = [state for (model, _), state in known if model == name]
            states.extend(sorted(seen, key=lambda s: version_key(s.version))
                          or [VersionState(name, "", UNLOADED)])
        return states

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        """A served version for metadata: the named one, or the one that stands for the
        model when a request names none (where unnamed requests go; under a split, the
        version with the largest weight, ties to the newest)."""
        with self._lock:
            model = self._model(name)
            if not version:
                return model.primary
            served = model.versions.get(version)
            if served is None:
                raise self._no_version(model, version)
            return served

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._model(name).versions, key=version_key)

    def _model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is not None:
            return model
        if any(n == name and s.state == LOADING for (n, _), s in list(self._states.items())) or (
                not self._loaded_once and name in self.source.models()):
            raise ModelNotReady(f"model {name!r} is loading")
        loaded = ", ".join(sorted(self._models)) or "none"
        raise ModelNotFound(f"model {name!r} is not loaded (loaded: {loaded})")

    def _no_version(self, model: ServedModel, version: str) -> EdgerunError:
        """Why a served model has no such version: one loading now (not served before) is
        ModelNotReady (503, gRPC UNAVAILABLE), as for a model still loading and as Triton
        answers for a version "not at ready state"; any other is ModelNotFound (404)."""
        ready = ", ".join(sorted(model.versions, key=version_key))
        state = self._states.get((model.name, version))
        if state is not None and state.state == LOADING:
            return ModelNotReady(f"model {model.name!r} version {version!r} is loading "
                                 f"(ready: {ready})")
        return ModelNotFound(f"model {model.name!r} has no version {version!r} loaded "
                             f"(loaded: {ready})")

    # ---------------------------------------------------------------- routing
    def route(self, name: str, version: str | None = None,
              attributes: Attributes | None = None) -> Routed:
        """Hold the version that will answer this request (and its shadow, if any).

        `attributes` looks up the request attribute a sticky traffic policy names. The caller
        must `release()` the result (or use it as a context manager) once answered.
        """
        with self._lock:
            model = self._model(name)
            if version is None:
                served = model.pick(attributes)
            else:
                served = model.versions.get(version)
                if served is None:
                    raise self._no_version(model, version)
            served.acquire()
            shadow = model.shadow if model.shadow is not served else None
            if shadow is not None:
                shadow.acquire()
            return Routed(served, shadow, self._shadow_total)


def _exhausted(exc: BaseException) -> bool:
    """Whether a load failed for want of a resource (MemoryError, or an OSError whose errno
    says memory, file descriptors or disk space ran out), the error itself or one it was
    raised from or while handling (a BundleError says what it was doing, its cause why)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError) or (
                isinstance(cause, OSError) and cause.errno in _EXHAUSTED):
            return True
        cause = cause.__cause__ if cause.__cause__ is not None or \
            cause.__suppress_context__ else cause.__context__
    return False


def _same_serving(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether loaded versions can be kept: batching and instances unchanged."""
    return old.batching == new.batching and old.instances == new.instances
