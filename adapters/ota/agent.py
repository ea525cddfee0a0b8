"""The device side of fleet updates: take a job, download, verify, stage, switch, report.

The agent owns no connection: it is given a `publish` callable, the daemon's `Repository`, its
device id and data folder, and the fleet's public keys. Jobs come in through `handle_job`
(from a paho callback: it only queues) and run one at a time on the agent's thread. An install
never touches the serving slot: the bundle is unpacked beside it, verified (sha256 of the
download, every file's hash, the signature, a version newer than the active one), renamed
into the inactive slot, and only then is the pointer flipped and the repository asked to load,
which runs the golden sample and hot-swaps (the old version drains). If that load fails the
pointer is put back and the old version never stopped serving.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgerun.adapters.ota.download import (DownloadInterrupted, DownloadStopped, SpeedLimit,
                                           Stop, download)
from edgerun.adapters.ota.messages import (ACTIVE, DOWNLOADING, FAILED, INSTALL, QUEUED,
                                           ROLLBACK, ROLLED_BACK, STAGED, TERMINAL, VERIFYING,
                                           Job, Report, job_topic, report_topic)
from edgerun.adapters.ota.slots import SlotSource, SlotState, SlotStore, fsync_dir
from edgerun.runtime import archive, signing
from edgerun.runtime.bundle import NAME_RE, Bundle, version_key
from edgerun.runtime.errors import BundleError, EdgerunError, InvalidInput, ModelNotReady
from edgerun.runtime.repository import Repository

log = logging.getLogger(__name__)

Publish = Callable[..., Any]
#: How long closing waits for a running job to reach a safe point. A download (or its retry's
#: wait) stops at once, its part kept for the job's redo at the next start; a verification or
#: switch may run on, and is cut off after this: recovery at the next start handles what it
#: leaves, as after a power cut.
CLOSE_WAIT_S = 30.0
#: How long a download broken off, or too slow, is retried before its job fails: long enough
#: to ride out a registry's restart or a device's lost coverage, short enough that a fleet's
#: rollout hears of a registry that is gone for good.
DOWNLOAD_PATIENCE_S = 600.0


class OtaAgent:
    def __init__(self, *, publish: Publish, repository: Repository, device_id: str,
                 data_dir: str | Path, trusted: Iterable[signing.PublicKey],
                 group: str | None = None,
                 on_change: Callable[[], None] | None = None,
                 download_patience: float = DOWNLOAD_PATIENCE_S, credential: str | None = None,
                 speed_limit: SpeedLimit = SpeedLimit()) -> None:
        self.publish = publish
        # the device's own secret (edgerun fleet enroll): registry downloads as HTTP Basic
        self._download_headers = {} if credential is None else {
            "Authorization": "Basic " + base64.b64encode(
                f"{device_id}:{credential}".encode()).decode()}
        self.on_change = on_change
        self.download_patience = download_patience  # seconds of retrying an unreachable registry
        # a transfer slower than this is cut off and retried (resumed) like one broken off, so
        # a stalled registry or proxy fails the job once the patience is spent, not never
        self.speed_limit = speed_limit
        self.repository = repository
        self.device_id = device_id
        self.group = group
        self.trusted = list(trusted)
        if not self.trusted:
            raise BundleError("the OTA agent needs at least one trusted public key (--trust)")
        self.slots = SlotStore(Path(data_dir) / "ota")
        self.downloads = self.slots.root / ".downloads"
        self.downloads.mkdir(exist_ok=True)
        source = repository.source
        if isinstance(source, SlotSource) and source.store.root == self.slots.root:
            source.trusted = self.trusted
        else:
            repository.source = SlotSource(self.slots, source, self.trusted)
        self.bytes_downloaded = 0
        self._stop = Stop()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"edgerun-ota-{device_id}",
                                        daemon=True)
        self._worker.start()

    @property
    def topic(self) -> str:
        return job_topic(self.device_id)

    # ------------------------------------------------------------------ start-up
    def recover(self) -> None:
        """After a restart (or a power cut): serve a verified model, drop half-done work.

        Staging folders are removed; the active slot is re-verified (hashes and signature)
        and, if it fails, the previous slot (or the fallback folder) takes its place; then each
        model is loaded and its last job's report published again, with the version that now
        serves.
        """
        for leftover in self.slots.root.glob("*/.staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for model in self.slots.models():
            state = self.slots.read(model)
            for slot in (state.active, state.inactive):
                if slot and state.slots.get(slot) and not self._intact(model, slot, state):
                    log.error("%s slot %s failed verification; dropping it", model, slot)
                    if slot == state.active:
                        state.step_back()
                    else:
                        state.slots[slot] = None
            self.slots.write(model, state)
            self._load_or_step_back(model, state)
            if state.last:  # naming what serves now: a slot that failed above serves no more
                last = {**state.last, "active": self.active_version(model)}
                self.publish(report_topic(self.device_id), Report(**last).encode(), qos=1,
                             retain=True)

    def _load_or_step_back(self, model: str, state: SlotState) -> None:
        """Load the model; an active slot that does not load (the power went between the
        pointer's flip and the smoke test, which now fails) is dropped as a failed switch
        would have been, and the previous slot, else the daemon's folder, serves again."""
        while True:
            try:
                self.repository.refresh(model)  # none, after a rollback to no version
                return
            except EdgerunError as exc:
                failed = state.active
                if failed is None:
                    log.error("model %s did not load after recovery: %s", model, exc)
                    return
                log.error("%s version %s (slot %s) does not load after recovery, back to the "
                          "previous one: %s", model, state.slots.get(failed), failed, exc)
                state.step_back()
                state.switching = {}
                self.slots.write(model, state)
                shutil.rmtree(self.slots.folder(model, failed), ignore_errors=True)

    def _intact(self, model: str, slot: str, state: SlotState) -> bool:
        try:
            with Bundle.open(self.slots.folder(model, slot)) as bundle:
                signing.verify_folder(bundle, self.trusted)
                return (bundle.manifest.name, bundle.manifest.version) == \
                    (model, state.slots[slot])
        except EdgerunError:
            return False

    # --------------------------------------------------------------------- jobs
    def handle_job(self, payload: bytes) -> None:
        """A message on `edgerun/<device>/ota`: queue it (an empty one clears: ignored)."""
        if not payload:
            return
        try:
            self._jobs.put(Job.decode(payload))
        except InvalidInput as exc:
            log.error("refused an OTA job: %s", exc)
            self._refused(payload, exc)

    def _refused(self, payload: bytes, error: InvalidInput) -> None:
        """A failed report for a job refused as malformed, if it has an id to answer to: the
        fleet hears why at once, not as a job timed out long after. Nothing else of it is
        trusted: a model that is no bundle name touches no slot, and a job refused as nested
        too deep is read for its id and names alone (as text: a nested one's text recursed)."""
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
            return
        job_id = data.get("job_id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not job_id:
            return
        model, version = ("" if isinstance(value := data.get(k, ""), (dict, list))
                          else str(value)[:128] for k in ("model", "version"))
        serving = self.active_version(model) if NAME_RE.fullmatch(model) else None
        report = Report(job_id, self.device_id, FAILED, model, version, serving, serving,
                        f"refused: {error}")
        self.publish(report_topic(self.device_id), report.encode(), qos=1, retain=True)

    def close(self) -> None:
        """Stop: a download ends now, and no further job starts (a job's retained message
        brings it back at the next start); another step may finish, up to CLOSE_WAIT_S."""
        self._stop.set()
        self._jobs.put(None)
        self._worker.join(CLOSE_WAIT_S)

    def wait_idle(self) -> None:
        self._jobs.join()

    def describe(self) -> dict[str, Any]:
        """What the daemon adds to its status and telemetry: the group and the slots."""
        ota = {}
        for model in self.slots.models():
            state = self.slots.read(model)
            ota[model] = {"active": state.active_version,
                          "previous": state.slots.get(state.inactive)}
        return {"group": self.group, "ota": ota}

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if not self._stop.is_set():  # else left for its redelivery at the next start
                    self._do(job)
            except Exception:  # one job's surprise must not stop the agent
                log.exception("OTA job failed unexpectedly")
            finally:
                self._jobs.task_done()

    def _report(self, job: Job, state: str, previous: str | None, detail: str = "") -> None:
        active = self.active_version(job.model)
        report = Report(job.job_id, self.device_id, state, job.model, job.version, previous,
                        active, detail)
        if state in TERMINAL:
            slots = self.slots.read(job.model)
            slots.last = {k: v for k, v in report.__dict__.items() if k != "extra"}
            slots.switching = {}
            try:
                self.slots.write(job.model, slots)
            except OSError as exc:  # a full or read-only disk: the fleet still hears the end
                log.error("could not record the end of OTA job %s: %s", job.job_id, exc)
            if self.on_change is not None:
                self.on_change()  # e.g. the daemon's status, which names the served versions
        log.info("OTA %s %s %s: %s %s", self.device_id, job.model, job.version, state, detail)
        self.publish(report_topic(self.device_id), report.encode(), qos=1, retain=True)

    def active_version(self, model: str) -> str | None:
        """The version serving now: the active slot's, else the fallback's latest."""
        state = self.slots.read(model)
        if state.active_version:
            return state.active_version
        try:
            return self.repository.versions(model)[-1]
        except EdgerunError:
            return None

    def _do(self, job: Job) -> None:
        state = self.slots.read(job.model)
        if state.last.get("job_id") == job.job_id:  # done before a restart: say so again
            self.publish(report_topic(self.device_id), Report(**state.last).encode(), qos=1,
                         retain=True)
            return
        switched = state.switching
        if switched.get("job_id") == job.job_id and self._reached(job, state):
            # the pointer flipped, then the daemon restarted before the job's end: recovery
            # loaded (smoke-tested) it, so the job is done, and `previous` is what served before
            # (a rollback to the daemon's folder leaves no slot active: the folder's version)
            self._report(job, ROLLED_BACK if job.kind == ROLLBACK else ACTIVE,
                         switched.get("previous"), "switched before a restart")
            return
        previous = self.active_version(job.model)
        self._report(job, QUEUED, previous)
        try:
            if job.kind == INSTALL:
                self._install(job, previous)
            else:
                self._rollback(job, previous)
        except DownloadStopped as exc:  # no end to record: redone, its download resumed
            log.info("OTA job %s stopped (redone at the next start): %s", job.job_id, exc)
        except EdgerunError as exc:
            self._report(job, FAILED, previous, str(exc))
        except Exception as exc:  # a full disk, a permission: still a failed job, reported
            log.exception("OTA job %s failed", job.job_id)
            self._report(job, FAILED, previous, f"{type(exc).__name__}: {exc}")

    def _install(self, job: Job, previous: str | None, *, final: str = ACTIVE) -> None:
        if previous is not None and final == ACTIVE:
            if job.version == previous:
                self._report(job, ACTIVE, previous, "already active")
                return
            if version_key(job.version) < version_key(previous):
                raise BundleError(f"version {job.version} is older than the active "
                                  f"{previous}; refused (anti-rollback: only a rollback job "
                                  "goes back)")
        self._report(job, DOWNLOADING, previous)
        archive_path = self.downloads / f"{job.model}-{job.version}-{job.sha256[:16]}.tar.gz"
        self._drop_other_downloads(archive_path)
        self._download(job, archive_path, previous)
        self._report(job, VERIFYING, previous)
        try:
            staging = self._stage(job, archive_path)
        except DownloadStopped:  # the download stays whole for the job's redo
            raise
        except BaseException:
            archive_path.unlink(missing_ok=True)
            raise
        archive_path.unlink(missing_ok=True)
        self._report(job, STAGED, previous)
        try:
            self._switch(job, staging, previous)
        finally:  # renamed into its slot, else (a full disk at the pointer's write) removed
            shutil.rmtree(staging, ignore_errors=True)
        self._report(job, final, previous)

    def _drop_other_downloads(self, keep: Path) -> None:
        """Jobs run one at a time: a file of another bundle is a part kept for a job that
        failed or was superseded, and would otherwise hold its space for good."""
        for path in self.downloads.iterdir():
            if path.is_file() and path.name not in (keep.name, keep.name + ".part"):
                path.unlink(missing_ok=True)

    def _download(self, job: Job, archive_path: Path, previous: str | None) -> None:
        """Download, resuming; an unreachable registry (or a stalled transfer) is retried with
        backoff until the patience is spent, a bad file is not."""
        delay, deadline = 0.5, time.monotonic() + self.download_patience
        while True:
            try:
                self.bytes_downloaded += download(job.url, archive_path, job.sha256, job.size,
                                                  headers=self._download_headers,
                                                  stop=self._stop,
                                                  speed_limit=self.speed_limit)
                return
            except DownloadStopped:
                raise
            except DownloadInterrupted as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self._report(job, DOWNLOADING, previous, f"retrying in {delay:g} s: {exc}")
                if self._stop.wait(delay):
                    raise DownloadStopped(f"download of {job.url} stopped") from exc
                delay = min(delay * 2, 30.0)

    def _stage(self, job: Job, archive_path: Path) -> Path:
        """Unpack beside the slots and verify everything; nothing in a slot changes yet.

        The signature is checked first, on the manifest and signature members alone, so an
        archive no trusted key vouches for (or of another model or version) is refused before
        a byte of it is written; then only the files the signed manifest lists are extracted,
        each no further than its listed size and checked against its listed hash."""
        self._unless_stopped("its signature check")
        signed = signing.verify_archive(archive_path, self.trusted)
        found = (signed.manifest.name, signed.manifest.version)
        if found != (job.model, job.version):
            raise BundleError(f"the bundle holds {found[0]} version {found[1]}, the job "
                              f"names {job.model} version {job.version}")
        folder = self.slots.folder(job.model)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            self._unless_stopped("unpacking")
            archive.unpack(archive_path, staging, expected=signed.files)
            self._unless_stopped("hashing its files")
            with Bundle.open(staging) as bundle:  # every file's hash
                signing.verify_folder(bundle, self.trusted)
                found = (bundle.manifest.name, bundle.manifest.version)
            if found != (job.model, job.version):
                raise BundleError(f"the bundle holds {found[0]} version {found[1]}, the job "
                                  f"names {job.model} version {job.version}")
            self._unless_stopped("storing it")
            for path in staging.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
            return staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _unless_stopped(self, step: str) -> None:
        """A stop between staging's steps (each reads the whole bundle: seconds for a large
        one on an SD card) ends the job there, unreported: it is redone at the next start,
        from the download kept whole."""
        if self._stop.is_set():
            raise DownloadStopped(f"stopped before {step}")

    def _switch(self, job: Job, staging: Path, previous: str | None) -> None:
        """Staging -> inactive slot -> pointer flip -> hot swap; the pointer goes back on error."""
        model = job.model
        state = self.slots.read(model)
        before = SlotState(state.active, dict(state.slots), state.last)
        target = state.inactive
        # forget the slot before rewriting it, so the pointer never names a half-written one
        state.slots[target] = None
        self.slots.write(model, state)
        shutil.rmtree(self.slots.folder(model, target), ignore_errors=True)
        staging.rename(self.slots.folder(model, target))
        fsync_dir(self.slots.folder(model))
        state.slots[target], state.active = job.version, target
        state.switching = {"job_id": job.job_id, "previous": previous}
        self.slots.write(model, state)  # the switch: one rename
        try:
            self.repository.load(model)  # loads beside the old, golden sample, hot swap
        except EdgerunError as exc:
            _unless_closing(exc, f"version {job.version} was loaded")
            before.slots[target] = None
            self.slots.write(model, before)
            shutil.rmtree(self.slots.folder(model, target), ignore_errors=True)
            serving = before.active_version or self.active_version(model)
            raise BundleError(f"smoke test failed, still serving version {serving}: {exc}") \
                from exc

    def _rollback(self, job: Job, previous: str | None) -> None:
        """Back to `job.version` from a slot, the daemon's folder, or a download; or, with no
        version, to what served before the first install: the folder's own, else nothing."""
        state = self.slots.read(job.model)
        if self._reached(job, state):
            self._report(job, ROLLED_BACK, previous, "already on this version")
            return
        slot = state.slot_of(job.version) if job.version else None
        if slot is not None and self._intact(job.model, slot, state):
            before = SlotState(state.active, dict(state.slots), state.last)
            state.active = slot
        elif slot is None and state.active and (
                not job.version or self._fallback_has(job.model, job.version)):
            before = SlotState(state.active, dict(state.slots), state.last)
            state.active = None
        elif job.url:
            self._install(job, previous, final=ROLLED_BACK)
            return
        else:
            raise BundleError(f"no slot holds version {job.version} and the job has no url")
        self._report(job, VERIFYING, previous)
        # as an install's switch: a power cut before the job's end must not lose `previous`
        state.switching = {"job_id": job.job_id, "previous": previous}
        self.slots.write(job.model, state)
        try:
            self.repository.refresh(job.model)
        except EdgerunError as exc:
            _unless_closing(exc, f"version {job.version or 'none'} was loaded")
            self.slots.write(job.model, before)
            raise BundleError(f"rollback to {job.version or 'no version'} failed to load: "
                              f"{exc}") from exc
        self._report(job, ROLLED_BACK, previous)

    def _reached(self, job: Job, state: SlotState) -> bool:
        """Whether the device is where `job` takes it: on its version, or for a rollback to no
        version, on no slot (the daemon's folder serves the model, if it has it)."""
        if not job.version:
            return state.active is None
        return self.active_version(job.model) == job.version

    def _fallback_has(self, model: str, version: str) -> bool:
        fallback = self.repository.source.fallback if isinstance(
            self.repository.source, SlotSource) else None
        try:
            return fallback is not None and version in fallback.wanted(
                model, fallback.config(model))
        except EdgerunError:
            return False


def _unless_closing(error: EdgerunError, step: str) -> None:
    """A load the repository refused because it is closing (the daemon stops) is no failed
    smoke test: the job ends there, unreported, its pointer flipped as a power cut there
    leaves it; the next start's recovery loads (smoke-tests) that slot, and the job, delivered
    again, reports how that went. Reported failed, it stayed failed at every later start."""
    if isinstance(error, ModelNotReady):
        raise DownloadStopped(f"stopped before {step}: {error}") from error
