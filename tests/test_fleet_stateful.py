"""The rollout orchestrator under any interleaving: a hypothesis state machine.

The real `Orchestrator` on a real SQLite store and registry, with a clock the test moves (the
store's `edgerun_now`) and a broker of its own (retained job topics, devices online or not);
devices behave as the OTA agent does: they take each job published on their topic (or, back
online or restarted, the retained one), report queued/downloading/verifying/staged and then
active, failed or rolled_back one step at a time, refuse an install older than what they run,
fail a download the registry would refuse (`Store.device_has_job`), and buffer reports while
offline. After every step: nothing the orchestrator logs as an error, a device's retained job is
one still under way (and one job at most is under way per device), status() counts its jobs; a
rollback a device starts finds it on the rollout's version (not a later rollout's); at the end,
once devices behave and time passes, every rollout ends, each device serves what the last job
that ended on it says, and an aborted rollout leaves no device on its version.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle as Rules, RuleBasedStateMachine, initialize, invariant,
                                 rule)

from edgerun.adapters.fleet.orchestrator import ENDED, TIMED_OUT, Orchestrator
from edgerun.adapters.fleet.registry import BundleRegistry
from edgerun.adapters.fleet.store import PENDING, Store
from edgerun.adapters.ota.messages import (ACTIVE, DOWNLOADING, FAILED, INSTALL, QUEUED,
                                           ROLLBACK, ROLLED_BACK, STAGED, VERIFYING, Job, Report,
                                           job_topic, report_topic)
from edgerun.runtime import Bundle, signing
from edgerun.runtime.bundle import version_key
from edgerun.runtime.errors import InvalidInput
from tests.fleet_sim import make_bundle

DEVICES = ("a", "b", "c")
RELEASES = (("m", "2"), ("m", "3"), ("n", "1"))
FALLBACK = {"m": "1", "n": None}  # what each device's own folder serves before any job


@functools.cache
def template() -> Path:
    """A fleet data folder whose registry holds RELEASES (made once: signing is slow)."""
    from tests.test_fleet import model

    root = Path(tempfile.mkdtemp(prefix="edgerun-fleet-sm-"))
    atexit.register(shutil.rmtree, root, True)
    key, pub = signing.generate_keys(root / "keys")
    store = Store.sqlite(root / "fleet" / "fleet.db")
    registry = BundleRegistry(root / "fleet", store, [signing.load_public_key(pub)])
    for seed, (name, version) in enumerate(RELEASES):
        with Bundle.open(make_bundle(root / "src", model(seed), name, version, key)) as bundle:
            archive = bundle.pack(root / f"{name}-{version}.tar.gz")
        with archive.open("rb") as stream:
            registry.push(stream)
    store.close()
    template.trusted = [signing.load_public_key(pub)]
    return root


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Device:
    name: str
    online: bool = True
    jobs: list[Job] = field(default_factory=list)  # received, not yet started
    current: Job | None = None
    steps: list[str] = field(default_factory=list)  # states still to report for `current`
    previous: str | None = None
    versions: dict[str, str | None] = field(default_factory=lambda: dict(FALLBACK))
    had: dict[str, set] = field(default_factory=lambda: {m: set() for m in FALLBACK})
    last: dict[str, dict] = field(default_factory=dict)  # the last ended job's report, per model
    outbox: list[bytes] = field(default_factory=list)  # reports while offline
    report: bytes = b""  # the retained one


class Fleet(RuleBasedStateMachine):
    rollouts = Rules("rollouts")

    @initialize()
    def start(self) -> None:
        root = template()
        self.dir = Path(tempfile.mkdtemp(prefix="edgerun-fleet-run-"))
        shutil.copytree(root / "fleet", self.dir / "fleet")
        self.clock = 1_000_000.0
        self.store = Store.sqlite(self.dir / "fleet" / "fleet.db")
        connection: sqlite3.Connection = self.store.db.connection
        connection.create_function("edgerun_now", 0, lambda: self.clock)
        registry = BundleRegistry(self.dir / "fleet", self.store, template.trusted)
        self.broker: dict[str, bytes] = {}
        self.devices = {name: Device(name) for name in DEVICES}
        self.errors = Errors()
        logging.getLogger("edgerun.adapters.fleet").addHandler(self.errors)
        self.orch = Orchestrator(self.store, registry, "http://registry", publish=self.publish)
        self.before: dict[tuple[str, str], str | None] = {}  # (rollout, device): version before
        self.touched: dict[tuple[str, str], list[str]] = {}  # (device, model): rollouts that sent
        for name in DEVICES:
            self.orch.on_message(f"edgerun/{name}/status",
                                 json.dumps({"state": "online", "group": "g"}).encode())

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        try:
            self.settle()
        finally:
            self.close()

    def close(self) -> None:
        logging.getLogger("edgerun.adapters.fleet").removeHandler(self.errors)
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- the broker
    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.broker[topic] = payload
            else:
                self.broker.pop(topic, None)
        device = self.devices[topic.split("/")[1]]
        if topic == job_topic(device.name) and payload and device.online:
            device.jobs.append(Job.decode(payload))

    def send(self, device: Device, report: Report) -> None:
        payload = report.encode()
        device.report = payload
        self.clock += 0.001  # each report heard a moment after the last
        if device.online:
            self.orch.on_message(report_topic(device.name), payload)
        else:
            device.outbox.append(payload)

    # ------------------------------------------------------------ the operator
    @rule(target=rollouts, release=st.sampled_from(RELEASES),
          devices=st.none() | st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3),
          waves=st.sampled_from([None, [0.34, 1.0], [0.34, 0.67, 1.0]]),
          max_failures=st.sampled_from([0.0, 0.5]), gate=st.sampled_from([None, "p99<50ms"]),
          job_timeout=st.sampled_from([10.0, 100.0]))
    def deploy(self, release, devices, waves, max_failures, gate, job_timeout):
        try:
            status = self.orch.deploy(*release, group=None if devices else "g", devices=devices,
                                      waves=waves, max_failures=max_failures, gate=gate,
                                      job_timeout=job_timeout, gate_timeout=50.0)
        except InvalidInput:
            return "none"
        return status["id"]

    @rule(rollout=rollouts)
    def abort(self, rollout):
        if rollout != "none":
            self.orch.abort(rollout)

    @rule(rollout=rollouts)
    def rollback(self, rollout):
        if rollout == "none":
            return
        try:
            self.orch.rollback(rollout)
        except InvalidInput:
            assert self.store.rollout(rollout)["state"] not in ("running", "completed")

    @rule(seconds=st.sampled_from([0.0, 1.0, 20.0, 200.0]))
    def tick(self, seconds):
        self.clock += seconds
        self.orch.tick()

    @rule()
    def republish(self):
        self.orch.republish()

    @rule(name=st.sampled_from(DEVICES), healthy=st.booleans())
    def telemetry(self, name, healthy):
        self.orch.on_message(f"edgerun/{name}/telemetry", json.dumps(
            {"p99_ms": 5.0 if healthy else 500.0, "requests": 10, "errors": 0}).encode())

    # --------------------------------------------------------------- devices
    @rule(name=st.sampled_from(DEVICES), ok=st.integers(0, 4))
    def device_step(self, name, ok):
        self.step(self.devices[name], ok != 0)

    @rule(name=st.sampled_from(DEVICES))
    def go_offline(self, name):
        self.devices[name].online = False

    @rule(name=st.sampled_from(DEVICES))
    def come_back(self, name):
        self.reconnect(self.devices[name])

    @rule(name=st.sampled_from(DEVICES))
    def restart(self, name):
        """Power cut: a job under way is dropped (redone from the retained job)."""
        device = self.devices[name]
        device.current, device.steps, device.jobs = None, [], []
        device.online = False
        self.reconnect(device)

    @rule(name=st.sampled_from(DEVICES))
    def hear_retained_report(self, name):
        """The retained report again (a resubscribe, a new leader)."""
        device = self.devices[name]
        if device.report and device.online:
            self.orch.on_message(report_topic(name), device.report)

    def reconnect(self, device: Device) -> None:
        if device.online:
            return
        device.online = True
        outbox, device.outbox = device.outbox, []
        for payload in outbox:
            self.orch.on_message(report_topic(device.name), payload)
        retained = self.broker.get(job_topic(device.name))
        if retained:
            device.jobs.append(Job.decode(retained))

    def step(self, device: Device, ok: bool) -> None:
        """One report of the agent's (`edgerun.adapters.ota.agent.Agent._do`)."""
        if device.current is None:
            if not device.jobs:
                return
            job = device.jobs.pop(0)
            last = device.last.get(job.model)
            if last and last["job_id"] == job.job_id:
                self.send(device, Report(**last))
                return
            device.current, device.previous = job, device.versions[job.model]
            previous = device.previous
            if job.kind == INSTALL:
                self.before.setdefault((job.rollout, device.name), previous)
                if previous == job.version:
                    device.steps = [ACTIVE]
                elif previous is not None and version_key(job.version) < version_key(previous):
                    device.steps = [FAILED]
                else:
                    device.steps = [DOWNLOADING, VERIFYING, STAGED, ACTIVE]
            else:
                # a rollback takes the rollout's version off the device: one that runs another
                # by now (a later rollout's) must not be sent back past it
                rollout = self.store.rollout(job.rollout)
                assert previous in (rollout["version"], job.version or None), (
                    device.name, previous, rollout["id"], job)
                device.steps = [VERIFYING, ROLLED_BACK]
                if (job.version or None) == previous:
                    device.steps = [ROLLED_BACK]
                elif not (job.version == "" or job.version == FALLBACK[job.model]
                          or job.version in device.had[job.model] or job.url):
                    device.steps = [FAILED]
            self.report(device, QUEUED)
            return
        job, state = device.current, device.steps.pop(0)
        if state == DOWNLOADING and not self.store.device_has_job(device.name, job.model,
                                                                   job.version):
            state = FAILED  # the registry refuses the download (403)
        elif state in (ACTIVE, ROLLED_BACK) and not ok and device.previous != (job.version or None):
            state = FAILED  # a smoke test, a load, a disk
        if state == ACTIVE:
            device.versions[job.model] = job.version
            device.had[job.model].add(job.version)
        elif state == ROLLED_BACK:
            device.versions[job.model] = job.version or None
        self.report(device, state)

    def report(self, device: Device, state: str) -> None:
        job = device.current
        assert job is not None
        report = Report(job.job_id, device.name, state, job.model, job.version, device.previous,
                        device.versions[job.model])
        if state in (ACTIVE, FAILED, ROLLED_BACK):
            device.last[job.model] = {k: v for k, v in report.__dict__.items() if k != "extra"}
            device.current, device.steps = None, []
        self.send(device, report)

    # ------------------------------------------------------------- invariants
    @invariant()
    def nothing_failed(self):
        if hasattr(self, "errors"):
            assert not self.errors.records, [r.getMessage() + str(r.exc_info)
                                             for r in self.errors.records]

    @invariant()
    def retained_jobs_are_under_way(self):
        if not hasattr(self, "store"):
            return
        for name in DEVICES:
            payload = self.broker.get(job_topic(name))
            if not payload:
                continue
            job_id = Job.decode(payload).job_id
            job = self.store.job_by_id(job_id)
            assert job is not None and job["device_id"] == name, job_id
            timed_out_rollback = job["kind"] != INSTALL and job["state"] == FAILED and \
                job["detail"].startswith(TIMED_OUT)
            assert job["state"] not in ENDED | {PENDING} or timed_out_rollback, (name, job)

    @invariant()
    def one_job_under_way_per_device(self):
        if not hasattr(self, "store"):
            return
        under_way: dict[str, list] = {}
        for rollout in self.store.rollouts():
            for job in self.store.jobs(rollout["id"]):
                if job["state"] not in ENDED | {PENDING}:
                    under_way.setdefault(job["device_id"], []).append(job["job_id"])
        for name, jobs in under_way.items():
            assert len(jobs) <= 1, (name, jobs)
            # and the device, subscribing afresh, would get it
            payload = self.broker.get(job_topic(name))
            assert payload and Job.decode(payload).job_id == jobs[0], (name, jobs, payload)

    @invariant()
    def status_counts_the_jobs(self):
        if not hasattr(self, "store"):
            return
        for summary in self.orch.status()["rollouts"]:
            detail = self.orch.status(summary["id"])
            assert sum(detail["counts"].values()) == detail["devices"] == len(detail["jobs"])

    # ---------------------------------------------------------------- the end
    def settle(self) -> None:
        """Devices behave, time passes: every rollout ends."""
        for _ in range(12):
            for device in self.devices.values():
                self.reconnect(device)
            for _ in range(40):
                for device in self.devices.values():
                    self.step(device, True)
            self.nothing_failed()
            self.retained_jobs_are_under_way()
            self.clock += 500.0
            for device in self.devices.values():
                self.orch.on_message(f"edgerun/{device.name}/telemetry", json.dumps(
                    {"p99_ms": 5.0, "requests": 10, "errors": 0}).encode())
            self.orch.tick()
        self.nothing_failed()
        states = {r["id"]: (r["state"], r["reason"]) for r in self.store.rollouts()}
        assert all(state in ("completed", "aborted") for state, _ in states.values()), \
            (states, [self.store.jobs(r) for r in states])
        rollouts = self.store.rollouts()
        # what status says a device serves, it serves: the last job that ended on it
        ended: dict[tuple[str, str], dict] = {}
        for rollout in rollouts:
            for job in self.store.jobs(rollout["id"]):
                if (job["kind"], job["state"]) in ((INSTALL, ACTIVE), (ROLLBACK, ROLLED_BACK)):
                    key = (job["device_id"], rollout["model"])
                    if key not in ended or ended[key]["updated_at"] < job["updated_at"]:
                        ended[key] = job
        for (name, model_name), job in ended.items():
            assert self.devices[name].versions[model_name] == (job["version"] or None), (
                job, self.devices[name].versions, states)
        # an aborted rollout leaves no device on its version (unless one sent later put it there)
        for index, rollout in enumerate(rollouts):
            if rollout["state"] != "aborted":
                continue
            for job in self.store.jobs(rollout["id"]):
                device = self.devices[job["device_id"]]
                later = [r for r in rollouts[index + 1:] if r["model"] == rollout["model"]
                         and any(j["job_id"] and j["device_id"] == device.name
                                 for j in self.store.jobs(r["id"]))]
                earlier_same = [r for r in rollouts[:index] if r["model"] == rollout["model"]
                                and r["version"] == rollout["version"]]
                if later or earlier_same:
                    continue
                serving = device.versions[rollout["model"]]
                before = self.before.get((rollout["id"], device.name), serving)
                if serving == rollout["version"]:
                    assert before == rollout["version"], (rollout["id"], device.name, job)


TestFleet = Fleet.TestCase
TestFleet.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                              suppress_health_check=list(HealthCheck))


def test_a_withdrawn_install_a_busy_device_ran_is_not_rolled_back_past_a_later_rollback():
    """Found by the machine above (HYPOTHESIS_PROFILE=explore): a slow device times out on a
    rollout of m 2, which is aborted; m 2 is deployed again and that rollout aborted while the
    device, still busy, has its job queued. The device ends the first install, then runs the
    withdrawn one ("already active"), then the first rollout's rollback to 1. The second
    rollout's rollback went back to what the device ran before its install: 2, the version
    both aborted rollouts took back."""
    fleet = Fleet()
    fleet.start()
    try:
        spec = dict(release=("m", "2"), devices=None, waves=None, max_failures=0.0, gate=None,
                    job_timeout=10.0)
        first = fleet.deploy(**spec)
        fleet.device_step(name="a", ok=0)  # picks it up: queued
        fleet.tick(seconds=20.0)  # every job timed out: the rollout is aborted
        second = fleet.deploy(**spec)
        fleet.abort(rollout=second)  # a's job withdrawn, but a has it queued
        fleet.settle()
        assert fleet.devices["a"].versions["m"] == "1"
        assert fleet.store.rollout(first)["state"] == fleet.store.rollout(second)["state"] == \
            "aborted"
        (taken,) = [j for j in fleet.store.jobs(second) if j["device_id"] == "a"]
        assert taken["detail"] == f"nothing to take back: rollout {first} rolled the device " \
                                  "back to 1 since"
    finally:
        fleet.close()
