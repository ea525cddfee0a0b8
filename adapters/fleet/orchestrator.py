"""Rollouts in waves: publish jobs, follow reports, hold at health gates, abort and roll back.

All state lives in the store, so a restarted orchestrator picks every running rollout up where
it was: jobs already published are re-published (the agent ignores a job id it has done), and
the agents' retained reports give every device's latest state as soon as it subscribes.
One `tick` moves each rollout forward: time out late jobs, abort when failures pass the
threshold, start the next wave once the current one is done and the gate holds on every
updated device's telemetry (newer than its update).

When several registries share one database, one of them holds the rollouts lease and alone
acts on rollouts: every step it takes (a tick, a device's report) commits in one transaction
fenced by the lease, and the jobs it publishes go out after that commit. A leader that stalled
past its lease and woke after another took over writes and publishes nothing. Any process may
start a rollout or ask for an abort (a compare-and-set of the rollout's state); the leader
sends the rollback jobs.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from edgerun.adapters.fleet import gate as gates
from edgerun.adapters.fleet.registry import BundleRegistry
from edgerun.adapters.fleet.store import CANCELLED, PENDING, Store
from edgerun.adapters.fleetdb import redact
from edgerun.adapters.ota.messages import (ACTIVE, DOWNLOADING, FAILED, INSTALL, QUEUED, ROLLBACK,
                                           ROLLED_BACK, STATES, TERMINAL, Job, Report,
                                           decode_json, job_topic)
from edgerun.adapters.topics import topic_segment
from edgerun.runtime.bundle import VERSION_RE
from edgerun.runtime.errors import InvalidInput, ModelNotFound

log = logging.getLogger(__name__)

RUNNING, COMPLETED, ROLLING_BACK, ABORTED = "running", "completed", "rolling_back", "aborted"
ENDED = TERMINAL | {CANCELLED}
#: Job states that leave the device free for another rollout's job.
IDLE = tuple(sorted(ENDED | {PENDING}))
#: A job given up on by the orchestrator, which the device may still finish.
TIMED_OUT = "timed out in state"

Publish = Callable[[str, bytes, bool], None]


class Leader(Protocol):
    """Whether this process drives rollouts (`edgerun.adapters.fleetdb.Leadership`)."""

    @property
    def leading(self) -> bool: ...

    def fence(self) -> bool: ...


class Orchestrator:
    def __init__(self, store: Store, registry: BundleRegistry, base_url: str,
                 publish: Publish | None = None, leader: Leader | None = None,
                 enrolled: Callable[[str | None], Mapping[str, Sequence[str]]] =
                 lambda device_id: {}) -> None:
        """`leader` says whether this process drives rollouts now, and fences what it writes
        (a `Leadership` when several registries share one database; None: this one alone).

        `enrolled(device_id)` gives the groups the operator granted each enrolled device (None),
        or that one device; once any device is enrolled, a rollout's group is resolved from
        them alone, never from what devices report (a device could claim another group's
        rollouts, or dodge its own)."""
        self.store = store
        self.leader = leader
        self.enrolled = enrolled
        self.registry = registry
        self.base_url = base_url.rstrip("/")
        self.publish: Publish = publish or (lambda topic, payload, retain: None)
        self._lock = threading.RLock()
        self._outbox: list[tuple[str, bytes, bool]] | None = None

    # ------------------------------------------------------------------ commands
    def deploy(self, model: str, version: str, *, group: str | None = None,
               devices: list[str] | None = None, waves: list[float] | None = None,
               max_failures: float = 0.0, gate: str | None = None,
               job_timeout: float = 600.0, gate_timeout: float = 300.0) -> dict[str, Any]:
        # checked before anything is stored: a stored rollout that a tick cannot read would
        # stop every tick, so every rollout, for good
        waves = gates.check_waves(waves or [1.0])
        max_failures = gates.check_share(max_failures, "max_failures")
        job_timeout = gates.check_seconds(job_timeout, "job_timeout")
        gate_timeout = gates.check_seconds(gate_timeout, "gate_timeout")
        if group is not None and not isinstance(group, str):
            raise InvalidInput(f"group {group!r:.40} must be a string")
        # each becomes a topic: one the broker refuses drops the fleet's connection at every
        # (re)publish of its job, so no device is heard and no rollout moves
        if devices is not None and not (isinstance(devices, list) and all(
                isinstance(device, str) and topic_segment(device) for device in devices)):
            raise InvalidInput(f"devices {devices!r:.80} must be a list of device ids (no / + #, "
                               "control characters or over 64 KiB)")
        if gate is not None and not isinstance(gate, str):
            raise InvalidInput(f"gate {gate!r:.40} must be a string like p99<50ms,errors<1%")
        bundle = self.registry.get(model, version)
        conditions = gates.parse_gate(gate)
        if devices:
            targets = sorted(set(devices))
        else:
            targets = self._members(group)
        if not targets:
            raise InvalidInput(f"no devices to deploy to (group {group!r} has none)"
                               if group else "no devices to deploy to")
        rollout_id = f"{model}-{version}-{secrets.token_hex(3)}"
        spec = {"waves": waves, "max_failures": max_failures, "gate": gate or "",
                "gate_conditions": [[c.metric, c.op, c.threshold] for c in conditions],
                "job_timeout": job_timeout, "gate_timeout": gate_timeout, "group": group,
                "sha256": bundle.sha256, "size": bundle.size, "wave_done_at": None}
        self.store.add_rollout(rollout_id, model, version, spec,
                               gates.assign_waves(targets, waves))
        self.tick()
        return self.status(rollout_id)

    def _members(self, group: str | None) -> list[str]:
        """The devices that have reported, of `group` if one is given: by their enrolment
        where there is one, else (an open fleet) by what they report."""
        enrolled = self.enrolled(None)
        if group is None or not enrolled:
            return [d["device_id"] for d in self.store.devices(group)]
        return [d["device_id"] for d in self.store.devices()
                if group in enrolled.get(d["device_id"], ())]

    def abort(self, rollout_id: str, reason: str = "aborted by the operator") -> None:
        self._rollout(rollout_id)
        if self.store.move_rollout(rollout_id, (RUNNING,), state=ROLLING_BACK, reason=reason):
            log.warning("rollout %s aborted: %s", rollout_id, reason)
        self.tick()

    def rollback(self, rollout_id: str, reason: str = "rolled back by the operator") -> None:
        """Send every device a running or completed rollout updated back to its previous
        version (an explicit rollback job, the one way past the devices' anti-rollback); not
        one another rollout has installed the model on since (that rollout's version stays),
        nor one another rollout's rollback has taken off this version since."""
        self._rollout(rollout_id)
        if not self.store.move_rollout(rollout_id, (RUNNING, COMPLETED), state=ROLLING_BACK,
                                       reason=reason):
            raise InvalidInput(f"rollout {rollout_id} is {self._rollout(rollout_id)['state']}: "
                               "nothing to roll back")
        log.warning("rollout %s rolled back: %s", rollout_id, reason)
        self.tick()

    def status(self, rollout_id: str | None = None) -> dict[str, Any]:
        if rollout_id is None:
            return {"rollouts": [self._summary(r) for r in self.store.rollouts()],
                    "devices": self.store.devices()}
        rollout = self._rollout(rollout_id)
        jobs = self.store.jobs(rollout_id)
        return {**self._summary(rollout, jobs), "jobs": jobs}

    def _summary(self, rollout: dict[str, Any], jobs: list | None = None) -> dict[str, Any]:
        jobs = self.store.jobs(rollout["id"]) if jobs is None else jobs
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        spec = rollout["spec"]
        return {"id": rollout["id"], "model": rollout["model"], "version": rollout["version"],
                "state": rollout["state"], "reason": rollout["reason"],
                "wave": rollout["wave"], "waves": len(spec["waves"]), "gate": spec["gate"],
                "devices": len(jobs), "counts": counts, "created_at": rollout["created_at"],
                "updated_at": rollout["updated_at"]}

    def _rollout(self, rollout_id: str) -> dict[str, Any]:
        rollout = self.store.rollout(rollout_id)
        if rollout is None:
            raise ModelNotFound(f"no rollout {rollout_id!r}")
        return rollout

    # ------------------------------------------------------------------ messages
    def on_message(self, topic: str, payload: bytes) -> None:
        """Status, telemetry and OTA reports from devices (any thread)."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != "edgerun" or not payload:
            return
        device, kind = parts[1], "/".join(parts[2:])
        try:
            if kind == "ota/report":
                report = Report.decode(payload)
                if report.state not in STATES:
                    # "pending" started the job again (a fresh deadline: a device held its
                    # rollouts for good), "cancelled" ended it as the fleet's own withdrawal
                    raise ValueError(f"state {report.state!r:.40} is not an OTA job's state")
                if report.previous is not None and not (
                        isinstance(report.previous, str) and VERSION_RE.fullmatch(report.previous)):
                    # it becomes the version of the device's rollback job: one the registry
                    # cannot look up would fail every tick of the rollout, which then never ends
                    raise ValueError(f"previous version {report.previous!r:.40} is not a "
                                     "bundle version")
                self._as_leader(lambda: self._on_report(device, report))
                return
            data = decode_json(payload)
            if not isinstance(data, dict):
                return
            group = data.get("group")
            if group is not None and not isinstance(group, str):
                raise ValueError(f"group must be a string, got {group!r:.80}")
            granted = self.enrolled(device).get(device)
            if granted is not None:  # the operator's word, not the device's
                if group is not None and group not in granted:
                    log.warning("device %s reports group %r; it is enrolled in %s", device,
                                group, ", ".join(granted) or "none")
                group = ",".join(granted)
            if kind == "status":
                self.store.see_device(device, state=str(data.get("state", "online")),
                                      group=group, status=data)
            elif kind == "telemetry":
                self.store.see_device(device, group=group, telemetry=data)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignored a malformed message on %s: %s", topic, exc)
        except Exception:  # anything else must not end paho's thread: no device is heard then
            log.exception("failed to handle a message on %s", topic)

    def _on_report(self, device: str, report: Report) -> None:
        """A device's report on a job (as the leader: the reports every process hears are
        acted on once; a new leader hears each device's latest again, as it is retained)."""
        # jobs not yet sent have no id: an empty one would match one of them
        job = self.store.job_by_id(report.job_id) if report.job_id else None
        if job is None or job["device_id"] != device:
            return
        # what an install's rollback goes back to: "" once a device that served no version of
        # the model reports (None stays "no report yet", which an abort may withdraw)
        previous = "" if report.previous is None else report.previous
        given_up = job["state"] == CANCELLED or (
            job["state"] == FAILED and job["detail"].startswith(TIMED_OUT))
        if given_up and job["kind"] == INSTALL and report.state != FAILED:
            rollout = self._rollout(job["rollout_id"])
            if job["state"] == CANCELLED or rollout["state"] in (ROLLING_BACK, ABORTED):
                if job["state"] == CANCELLED and report.state in (QUEUED, DOWNLOADING):
                    # withdrawn before its download: the registry refuses that, so the job
                    # fails on the device, which keeps what it runs; a rollback job now would
                    # grant the download again (a job sent and not withdrawn)
                    return
                # withdrawn by an abort, or timed out and then aborted, but the device had
                # picked it up and went on: take it back (its rollback may wait its turn,
                # from the state the device reports)
                self._send_rollback(rollout, {**job, "previous_version": previous,
                                              "state": report.state})
                return
            # timed out, yet the device went on and the rollout goes on: its reports count
        elif given_up and job["kind"] == ROLLBACK and report.state in TERMINAL:
            pass  # a rollback that timed out (its job kept for the device) has ended after all
        elif job["state"] in ENDED:
            return
        elif (job["state"], job["detail"]) == (report.state, report.detail) and \
                (job["kind"] != INSTALL or previous == job["previous_version"]):
            return  # heard before (a retained report, again): nothing new
        fields: dict[str, Any] = {"state": report.state, "detail": report.detail}
        if job["kind"] == INSTALL:
            fields["previous_version"] = previous
        if report.state == ACTIVE:  # the gate counts errors from here on
            telemetry = (self.store.device(device) or {}).get("telemetry") or {}
            fields["baseline"] = json.dumps({k: telemetry.get(k)
                                             for k in ("requests", "errors", "since")})
        self.store.update_job(job["rollout_id"], device, **fields)
        if report.state in TERMINAL:  # done: clear the retained job
            self._clear(job["rollout_id"], device)
        rollout = self._rollout(job["rollout_id"])
        if rollout["state"] == ABORTED and job["kind"] == INSTALL and report.state != FAILED:
            # the device took the new version after the rollout was aborted
            self._send_rollback(rollout, {**job, **fields})
        self._tick()

    def republish(self) -> None:
        """Send every outstanding job again (after a broker restart, or on taking the lease):
        to each device, the one its retained job topic holds."""
        self._as_leader(self._republish)

    def _republish(self) -> None:
        # A job is sent only once no other is under way on its device, and only an install
        # that timed out (its deadline passed) is under way again after that, when the device
        # reports on it late: the job sent a device last has the latest deadline. Sent in
        # rollouts' order, an older rollout's job would be replaced by a newer one's.
        last: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for rollout in self.store.rollouts():
            for job in self.store.jobs(rollout["id"]):
                if job["job_id"] and job["state"] not in ENDED | {PENDING} and \
                        not self._unreachable(rollout["id"], job):
                    held = last.get(job["device_id"])
                    if held is None or (job["deadline"] or 0) > (held[1]["deadline"] or 0):
                        last[job["device_id"]] = (rollout, job)
        for rollout, job in last.values():
            self._publish_job(rollout, job)

    def _unreachable(self, rollout_id: str, job: dict[str, Any]) -> bool:
        """Fail a job not ended whose device id no MQTT topic can hold (stored before ids were
        checked at deploy); whether it did. Its job or clear sent would drop the fleet's broker
        connection (a NUL or control character) or stop the messages after it (a wildcard,
        which paho refuses), at every (re)connect's republish: no device heard, for good."""
        device = job["device_id"]
        if job["state"] in ENDED or topic_segment(device):
            return False
        fields = {"state": FAILED, "detail": f"device id {device!r:.80} can be no MQTT topic "
                  "level (no / + #, control characters or over 64 KiB): no job is sent to it"}
        self.store.update_job(rollout_id, device, **fields)
        job.update(fields)
        log.warning("rollout %s: %s", rollout_id, fields["detail"])
        return True

    # --------------------------------------------------------------------- ticks
    def tick(self) -> None:
        """Move every rollout on (the ticker thread, every 0.25 s, and after each change)."""
        self._as_leader(self._tick)

    def _leading(self) -> bool:
        return self.leader is None or self.leader.leading

    def _as_leader(self, step: Callable[[], None]) -> bool:
        """Run `step` as the leader, or not at all: its writes commit in one transaction that
        first checks the lease by the database (`Leader.fence`), and the messages it sends
        (`_send`) go out after that commit; whether it ran. A message left unsent because the
        lease lapsed right after the commit is sent by the next leader's `republish`."""
        with self._lock:
            if not self._leading():
                return False
            self._outbox = []
            try:
                with self.store.transaction():
                    if self.leader is not None and not self.leader.fence():
                        log.warning("the rollouts lease has passed to another process: "
                                    "this one no longer acts on rollouts")
                        return False
                    step()
                outbox = self._outbox
            finally:
                self._outbox = None
            if outbox and not self._leading():
                log.warning("the rollouts lease lapsed: %d message(s) left to the next leader",
                            len(outbox))
                return True
            for topic, payload, retain in outbox:
                self.publish(topic, payload, retain)
            return True

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        """Publish once the step commits (only inside `_as_leader`)."""
        assert self._outbox is not None, "messages are sent by steps run as the leader"
        self._outbox.append((topic, payload, retain))

    def _tick(self) -> None:
        # the database's clock, once a tick: deadlines and the gate's wait were set by
        # whichever replica led then, and are judged by whichever leads now
        now = self.store.now()
        for rollout in self.store.rollouts(RUNNING, ROLLING_BACK, lock=True):
            assert self._outbox is not None
            queued = len(self._outbox)
            try:
                with self.store.db.savepoint("rollout"):
                    self._tick_rollout(rollout, now)
            except Exception:  # one rollout that cannot move must not hold the others
                del self._outbox[queued:]
                log.exception("rollout %s: this step failed and was undone", rollout["id"])

    def _tick_rollout(self, rollout: dict[str, Any], now: float) -> None:
        jobs = self.store.jobs(rollout["id"])
        for job in jobs:
            if self._unreachable(rollout["id"], job):
                continue
            if job["state"] not in ENDED | {PENDING} and job["deadline"] \
                    and job["deadline"] < now:
                detail = f"{TIMED_OUT} {job['state']}"
                self.store.update_job(rollout["id"], job["device_id"], state=FAILED,
                                      detail=detail)
                if job["kind"] == INSTALL:
                    self._clear(rollout["id"], job["device_id"])
                # a rollback stays on the broker: a device offline now would otherwise come
                # back to no job and serve the version taken back for good (its end, when it
                # comes, is still recorded)
                job.update(state=FAILED, detail=detail)
        if rollout["state"] == RUNNING:
            reason = self._advance(rollout, jobs, now)
            if reason is None:
                return
            log.warning("rollout %s aborted: %s", rollout["id"], reason)
            self.store.update_rollout(rollout["id"], state=ROLLING_BACK, reason=reason)
            rollout = {**rollout, "state": ROLLING_BACK, "reason": reason}
        self._roll_back(rollout, jobs)

    def _roll_back(self, rollout: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        """An aborted rollout: cancel the jobs not yet started, take back every install a
        device may have made, and end once every job has."""
        for job in jobs:
            if job["state"] == PENDING:
                fields = {"state": CANCELLED, "detail": "rollout aborted before this wave"}
                self.store.update_job(rollout["id"], job["device_id"], **fields)
                job.update(fields)
            elif job["kind"] == INSTALL and job["state"] == FAILED and \
                    job["detail"].startswith(TIMED_OUT) and job["previous_version"] is None:
                # sent, never reported on, and cleared from the broker when it timed out: as
                # an abort withdraws a job no report came for, so that its download is refused
                fields = {"state": CANCELLED, "detail": f"{job['detail']} with no report, "
                          "then withdrawn by the abort"}
                self.store.update_job(rollout["id"], job["device_id"], **fields)
                job.update(fields)
            elif _to_take_back(job):
                newer = self.store.installed_since(rollout["id"], job["device_id"],
                                                   rollout["model"], job["updated_at"]) \
                    if job["state"] == ACTIVE else []
                back = self.store.rolled_back_since(rollout["id"], job["device_id"],
                                                    rollout["model"], job["updated_at"]) \
                    if job["state"] == ACTIVE and not newer else None
                if newer:
                    # another rollout installed the model over this one since (one this
                    # rollback waited for, say): the device no longer runs this rollout's
                    # version, and a rollback now would undo that rollout's install, which
                    # it still counts as active
                    fields = {"state": ROLLED_BACK, "detail": "nothing to take back: rollout "
                              f"{newer[0]} installed its version over this one since"}
                    self.store.update_job(rollout["id"], job["device_id"], **fields)
                    job.update(fields)
                elif back is not None and (back[1] or None) != rollout["version"]:
                    # another rollout's rollback (one this rollback waited for) ended after
                    # this install and took the device off this version: a rollback now would
                    # put back what was there before this install, the version that one took
                    # back (a withdrawn install a busy device ran anyway, "already active")
                    fields = {"state": ROLLED_BACK, "detail": "nothing to take back: rollout "
                              f"{back[0]} rolled the device back to "
                              f"{back[1] or 'no version'} since"}
                    self.store.update_job(rollout["id"], job["device_id"], **fields)
                    job.update(fields)
                else:
                    job.update(self._send_rollback(rollout, job))
        # an install still to take back: its rollback waits for another rollout's job
        if all(job["state"] in ENDED and not _to_take_back(job) for job in jobs):
            self.store.update_rollout(rollout["id"], state=ABORTED)

    def _advance(self, rollout: dict[str, Any], jobs: list[dict[str, Any]],
                 now: float) -> str | None:
        """Start, gate and finish waves; the reason to abort, if there is one."""
        spec = rollout["spec"]
        wave = rollout["wave"]
        # a share of the devices its waves so far reached, not of all: a first wave that
        # failed whole was else followed by the next (2 devices of 100 are under 5 %)
        reached = [job for job in jobs if job["wave"] <= wave]
        failed = [job for job in reached if job["state"] == FAILED]
        if reached and len(failed) / len(reached) > spec["max_failures"]:
            culprits = ", ".join(f"{_named(j['device_id'])}: {j['detail']}" for j in failed[:3])
            return (f"{len(failed)} of {len(reached)} devices failed, over max-failures "
                    f"{spec['max_failures']:.0%} ({culprits})")
        # jobs of a started wave still pending: a restart cut the wave's start short
        self._start([j for j in jobs if j["wave"] <= wave and j["state"] == PENDING], rollout,
                    now)
        if wave >= 0 and any(j["state"] not in ENDED for j in jobs if j["wave"] <= wave):
            return None
        if wave == len(spec["waves"]) - 1:
            self.store.update_rollout(rollout["id"], state=COMPLETED,
                                      reason=f"{sum(j['state'] == ACTIVE for j in jobs)} of "
                                             f"{len(jobs)} devices active")
            return None
        if wave >= 0 and spec["gate_conditions"]:
            broken = self._gate(spec, [j for j in jobs if j["wave"] <= wave
                                       and j["state"] == ACTIVE])
            if broken:
                if spec["wave_done_at"] is None:
                    spec["wave_done_at"] = now
                    self.store.update_rollout(rollout["id"], spec=json.dumps(spec))
                elif now - spec["wave_done_at"] > spec["gate_timeout"]:
                    return "health gate failed: " + "; ".join(broken[:3])
                return None
        spec["wave_done_at"] = None
        self.store.update_rollout(rollout["id"], wave=wave + 1, spec=json.dumps(spec))
        self._start([j for j in jobs if j["wave"] == wave + 1 and j["state"] == PENDING],
                    rollout, now)
        return None

    def _start(self, jobs: list[dict[str, Any]], rollout: dict[str, Any], now: float) -> None:
        # A device has one retained job topic: another rollout's job under way there would be
        # replaced, and a device subscribing afresh would never see it. Such a job stays
        # pending, and a later tick starts it once the other has ended.
        busy = self.store.busy_devices(rollout["id"], IDLE) if jobs else set()
        for job in jobs:
            if job["device_id"] in busy:
                continue
            job_id = f"{rollout['id']}.{job['device_id']}.install"
            deadline = now + rollout["spec"]["job_timeout"]
            self.store.update_job(rollout["id"], job["device_id"], job_id=job_id, state=QUEUED,
                                  deadline=deadline)
            job.update(job_id=job_id, state=QUEUED, deadline=deadline)
            self._publish_job(rollout, job)

    def _gate(self, spec: dict[str, Any], updated: list[dict[str, Any]]) -> list[str]:
        conditions = [gates.Condition(m, op, t) for m, op, t in spec["gate_conditions"]]
        broken = []
        for job in updated:
            device = self.store.device(job["device_id"]) or {}
            if not device.get("telemetry") or (device.get("telemetry_at") or 0) < job["updated_at"]:
                broken.append(f"{job['device_id']}: no telemetry since its update yet")
                continue
            baseline = json.loads(job["baseline"]) if job["baseline"] else None
            broken += [f"{job['device_id']}: {b}"
                       for b in gates.check_gate(conditions, device["telemetry"], baseline)]
        return broken

    def _send_rollback(self, rollout: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """Take an install back (or withdraw it if the device never reported on it); the job's
        fields as they now are. A device that served no version of the model before
        (`previous_version` "") gets a rollback to no version: the model is removed."""
        previous = job.get("previous_version")
        device = job["device_id"]
        if previous is None:  # no report yet: withdraw it
            self._clear(rollout["id"], device)
            fields = {"state": CANCELLED, "detail": "withdrawn before the device picked it up"}
            self.store.update_job(rollout["id"], device, **fields)
            return fields
        if rollout["state"] == ABORTED:  # follow this rollback to its end too
            self.store.update_rollout(rollout["id"], state=ROLLING_BACK)
        others = self.store.busy_with(rollout["id"], device, IDLE)
        if others:
            # the device's one retained job topic holds another rollout's job (sent once this
            # install had ended): a rollback sent now would replace it, and a device subscribing
            # afresh would never see it. The rollback waits its turn, as an install does
            # (`_start`): `_roll_back` sends it at a tick after that job has ended. An install
            # the device is still on is left as it is: its end comes back here.
            if job["state"] not in TERMINAL:
                return {}
            fields = {"state": job["state"], "previous_version": previous,
                      "detail": f"its rollback waits for rollout {others[0]}'s job on this "
                                "device"}
            self.store.update_job(rollout["id"], device, **fields)
            return fields
        detail = "rolling back"
        if not previous:
            detail += " (to no version: the device served none of this model before the install)"
        elif self.store.version(rollout["model"], previous) is not None and \
                not self.store.device_has_job(device, rollout["model"], previous):
            detail += (f" (to the version {previous} the device reported it served before: "
                       "the fleet never sent it that one, so the job offers no download)")
        fields = {"job_id": f"{rollout['id']}.{device}.rollback", "kind": ROLLBACK,
                  "version": previous, "previous_version": previous, "state": QUEUED,
                  "detail": detail,
                  "deadline": self.store.now() + rollout["spec"]["job_timeout"]}
        self.store.update_job(rollout["id"], device, **fields)
        self._publish_job(rollout, {**job, **fields})
        return fields

    def _clear(self, rollout_id: str, device: str) -> None:
        """Clear the device's retained job, unless it is another rollout's by now: one under
        way there was sent after this rollout's had ended (or timed out)."""
        if not self.store.busy_with(rollout_id, device, IDLE):
            self._send(job_topic(device), b"", True)

    def _publish_job(self, rollout: dict[str, Any], job: dict[str, Any]) -> None:
        model, version = rollout["model"], job["version"]
        url, sha256, size = "", "", 0  # a rollback from the device's slots or folder alone
        # A rollback's version is the `previous` the device reported: its download is offered
        # only if the fleet sent the device that version and did not withdraw it
        # (`Store.device_has_job`, the rule the registry's download check applies too), else
        # a device that lied about it would be handed (and allowed to fetch) a bundle it
        # never had.
        if job["kind"] == INSTALL or self.store.device_has_job(job["device_id"], model, version):
            try:
                stored = self.registry.get(model, version)
                url, sha256, size = (f"{self.base_url}/bundles/{model}/{version}",
                                     stored.sha256, stored.size)
            except ModelNotFound:  # a version the registry never had: slots only
                pass
        message = Job(job_id=job["job_id"], kind=job["kind"], model=model, version=version,
                      url=url, sha256=sha256, size=size, rollout=rollout["id"])
        self._send(job_topic(job["device_id"]), message.encode(), True)


def _named(device_id: str) -> str:
    """A device id as a rollout's reason names it: escaped if no topic can hold it (a NUL,
    which no stored text may hold, or a control character, which would break the line)."""
    return device_id if topic_segment(device_id) else repr(device_id)


def _to_take_back(job: dict[str, Any]) -> bool:
    """An install a rolling-back rollout has still to take back (or withdraw)."""
    return job["kind"] == INSTALL and job["state"] not in (FAILED, CANCELLED, ROLLED_BACK)


def broker_username(broker_url: str) -> str | None:
    """The MQTT username in `mqtt://USER[:PASS]@HOST:PORT`, if there is one."""
    address = urlsplit(broker_url if "://" in broker_url else f"mqtt://{broker_url}")
    return unquote(address.username) if address.username else None


class MqttLink:
    """The orchestrator's broker connection: paho, MQTT v5, reconnecting, re-subscribing."""

    TOPICS = ("edgerun/+/status", "edgerun/+/telemetry", "edgerun/+/ota/report")

    def __init__(self, broker_url: str, orchestrator: Orchestrator,
                 client_id: str = "", password: str | None = None) -> None:
        """`mqtt://USER:PASS@HOST:PORT`, or `mqtt://USER@HOST:PORT` and the `password`."""
        import paho.mqtt.client as mqtt

        address = urlsplit(broker_url if "://" in broker_url else f"mqtt://{broker_url}")
        if address.scheme not in ("mqtt", "tcp"):
            raise InvalidInput(f"broker {redact(broker_url)!r}: only mqtt://[USER[:PASS]@]"
                               "HOST:PORT is supported")
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 1883
        self.orchestrator = orchestrator
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"edgerun-fleet-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv5)
        if address.username:
            self.client.username_pw_set(unquote(address.username),
                                        password or unquote(address.password or ""))
        self.client.reconnect_delay_set(0.1, 2.0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = lambda c, u, m: orchestrator.on_message(m.topic, m.payload)
        orchestrator.publish = self.publish

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any = None) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        client.subscribe([(topic, 1) for topic in self.TOPICS])
        self.connected.set()
        threading.Thread(target=self.orchestrator.republish, daemon=True).start()

    def on_leadership(self, leading: bool) -> None:
        """On taking the rollouts lease over: hear every device's latest job report again
        (subscribing anew sends the retained ones; a follower ignored them) and send the
        outstanding jobs, some of which the last leader may not have sent."""
        if leading and self.connected.is_set():
            self.client.subscribe([(self.TOPICS[-1], 1)])
            self.orchestrator.republish()

    def start(self, tick_interval: float = 0.25) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self._stop = threading.Event()

        def ticker() -> None:
            while not self._stop.wait(tick_interval):
                try:
                    self.orchestrator.tick()
                except Exception:  # keep ticking whatever one pass hit
                    log.exception("rollout tick failed")

        self._ticker = threading.Thread(target=ticker, name="edgerun-fleet-tick", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.client.disconnect()
        self.client.loop_stop()
