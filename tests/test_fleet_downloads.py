"""Which jobs let a device download a bundle: only those the fleet sent it and did not withdraw.

The real store (a SQLite file, or a fresh database on the real PostgreSQL), registry and
orchestrator (publishing into a list, as no broker is needed to see what it sent), and the
registry's HTTP app behind `FleetAccess` on loopback: every download here is a real GET with a
device's own credential.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgerun.adapters.fleet.orchestrator import Orchestrator
from edgerun.adapters.fleet.registry import BundleRegistry
from edgerun.adapters.fleet.store import Store
from edgerun.adapters.ota.download import DownloadInterrupted, download
from edgerun.adapters.ota.messages import Job, Report
from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, signing
from edgerun.runtime.errors import BundleError
from tests.fleet_sim import make_bundle, registry_downloads
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (the fixture)

DEVICES = ("a", "b")


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet(request, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """m:1 and m:2 in the registry, devices a and b enrolled and heard from, the registry's
    HTTP app serving on a free loopback port."""
    url = (tmp_path / "fleet.db" if request.param == "sqlite"
           else fresh_database(request.getfixturevalue("postgres_url")))
    store = Store.open(url)
    key, pub = signing.generate_keys(tmp_path / "keys")
    registry = BundleRegistry(tmp_path / "data", store, [signing.load_public_key(pub)])
    for version in ("1", "2"):
        folder = make_bundle(tmp_path / "bundles", mlp_onnx([8, 16, 4], seed=int(version)),
                             "m", version, key)
        with Bundle.open(folder) as bundle:
            archive = bundle.pack(tmp_path / f"m-{version}.tar.gz")
        with archive.open("rb") as stream:
            registry.push(stream)
    sent: list[tuple[str, bytes, bool]] = []
    orchestrator = Orchestrator(store, registry, "http://registry",
                                publish=lambda *message: sent.append(message))
    for device in DEVICES:
        orchestrator.on_message(f"edgerun/{device}/status",
                                json.dumps({"state": "online", "group": "g"}).encode())
    try:
        with registry_downloads(tmp_path, store, registry, orchestrator, DEVICES) as downloads:
            yield SimpleNamespace(orchestrator=orchestrator, registry=registry, sent=sent,
                                  fetch=downloads.fetch, base=downloads.base,
                                  secrets=downloads.secrets)
    finally:
        store.close()


def report(fleet: SimpleNamespace, job_id: str, device: str, state: str, version: str,
           previous: str | None) -> None:
    fleet.orchestrator.on_message(f"edgerun/{device}/ota/report", Report(
        job_id, device, state, "m", version, previous).encode())


def states(fleet: SimpleNamespace, rollout_id: str) -> dict[str, str]:
    return {job["device_id"]: job["state"]
            for job in fleet.orchestrator.status(rollout_id)["jobs"]}


def test_a_job_not_yet_sent_authorises_no_download_until_its_wave_sends_it(fleet):
    """b's job waits for the second wave: the fleet has sent b nothing, yet b could fetch m:2."""
    rollout = fleet.orchestrator.deploy("m", "2", devices=list(DEVICES), waves=[0.5, 1.0])
    assert states(fleet, rollout["id"]) == {"a": "queued", "b": "pending"}
    assert [fleet.fetch("a", "2"), fleet.fetch("b", "2")] == [200, 403]
    job_a = next(job["job_id"] for job in rollout["jobs"] if job["device_id"] == "a")
    report(fleet, job_a, "a", "active", "2", "1")  # wave 1 done: wave 2 sends b its job
    assert states(fleet, rollout["id"]) == {"a": "active", "b": "queued"}
    assert fleet.fetch("b", "2") == 200


def test_a_job_an_abort_cancelled_before_it_was_sent_authorises_no_download(fleet):
    rollout = fleet.orchestrator.deploy("m", "2", devices=list(DEVICES), waves=[0.5, 1.0])
    job_a = next(job["job_id"] for job in rollout["jobs"] if job["device_id"] == "a")
    report(fleet, job_a, "a", "failed", "2", "1")  # over max-failures 0 %: aborted
    status = fleet.orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and states(fleet, rollout["id"]) == {
        "a": "failed", "b": "cancelled"}
    # a's job was sent: it still counts (a download may come late); b's never was
    assert [fleet.fetch("a", "2"), fleet.fetch("b", "2")] == [200, 403]


def test_a_sent_job_the_abort_withdrew_authorises_no_download_any_more(fleet, tmp_path):
    """The abort clears b's job from the broker before b said a word: b must not install the
    version the operator stopped, even if it got the job and began its download."""
    rollout = fleet.orchestrator.deploy("m", "2", devices=list(DEVICES))
    jobs = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    assert fleet.fetch("b", "2") == 200  # sent: b may start its download
    report(fleet, jobs["a"], "a", "failed", "2", "1")
    job_b = next(job for job in fleet.orchestrator.status(rollout["id"])["jobs"]
                 if job["device_id"] == "b")
    assert (job_b["state"], job_b["job_id"]) == ("cancelled", jobs["b"])  # sent, withdrawn
    assert fleet.sent[-1] == ("edgerun/b/ota", b"", True)
    assert fleet.fetch("b", "2") == 403
    # b's agent, resuming the download it began, is refused for good (no retry)
    stored = fleet.registry.get("m", "2")
    dest = tmp_path / "b-downloads" / "m-2.tar.gz"
    dest.parent.mkdir()
    dest.with_name(dest.name + ".part").write_bytes(stored.path.read_bytes()[:100])
    with pytest.raises(BundleError, match="403") as refused:
        download(f"{fleet.base}/bundles/m/2", dest, stored.sha256, stored.size,
                 headers={"Authorization": "Basic " + base64.b64encode(
                     f"b:{fleet.secrets['b']}".encode()).decode()})
    assert not isinstance(refused.value, DownloadInterrupted) and not dest.exists()
    # b's reports of the job it picked up before the abort: queued, downloading, then the
    # refusal. A rollback job answered the first, and its job id granted m:2 again.
    published = len(fleet.sent)
    for state in ("queued", "downloading", "failed"):
        report(fleet, jobs["b"], "b", state, "2", "1")
        assert fleet.fetch("b", "2") == 403, state
    assert states(fleet, rollout["id"])["b"] == "cancelled"
    assert len(fleet.sent) == published  # no rollback job: b stays on what it runs


def test_a_withdrawn_job_the_device_had_downloaded_is_rolled_back(fleet):
    """A device whose download was done before the abort withdrew its job installs it: its
    report past the download gets it a rollback job."""
    rollout = fleet.orchestrator.deploy("m", "2", devices=list(DEVICES))
    jobs = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    report(fleet, jobs["a"], "a", "failed", "2", "1")
    report(fleet, jobs["b"], "b", "staged", "2", "1")
    rollback = Job.decode(fleet.sent[-1][1])
    assert (fleet.sent[-1][0], rollback.kind, rollback.version) == ("edgerun/b/ota",
                                                                   "rollback", "1")


def test_a_rollback_offers_no_download_of_a_version_only_an_unsent_job_named(fleet):
    """The rollback rule is the download rule: b's job for m:1 was never sent, so b's word
    that it ran m:1 before gets its rollback no m:1 bundle (the same check, not a second)."""
    first = fleet.orchestrator.deploy("m", "1", devices=list(DEVICES), waves=[0.5, 1.0])
    job_a = next(job["job_id"] for job in first["jobs"] if job["device_id"] == "a")
    report(fleet, job_a, "a", "failed", "1", "0")  # aborted: b's m:1 job is never sent
    assert states(fleet, first["id"])["b"] == "cancelled"
    second = fleet.orchestrator.deploy("m", "2", devices=["b"])
    report(fleet, second["jobs"][0]["job_id"], "b", "active", "2", "1")
    fleet.orchestrator.rollback(second["id"])
    topic, payload, _ = fleet.sent[-1]
    rollback = Job.decode(payload)
    assert (topic, rollback.kind, rollback.version) == ("edgerun/b/ota", "rollback", "1")
    assert (rollback.url, rollback.sha256) == ("", "")  # from b's own slots only
    detail = fleet.orchestrator.status(second["id"])["jobs"][0]["detail"]
    assert "the fleet never sent it that one" in detail
    assert [fleet.fetch("b", "1"), fleet.fetch("b", "2")] == [403, 200]


def test_a_job_that_timed_out_with_no_report_authorises_no_download_after_the_abort(fleet):
    """Both jobs time out and the rollout aborts. a reported on its job: a download of it may
    still come late, and a report past it gets a rollback. b never said a word: its job was
    cleared from the broker at the time-out, so the abort withdraws it, as it does a job no
    report came for, and b's download of the version the rollout stopped is refused."""
    rollout = fleet.orchestrator.deploy("m", "2", devices=list(DEVICES), job_timeout=0.2,
                                        max_failures=0.5)
    jobs = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    report(fleet, jobs["a"], "a", "downloading", "2", "1")
    time.sleep(0.3)
    fleet.orchestrator.tick()  # 2 of 2 timed out, over max-failures 50 %
    status = fleet.orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and states(fleet, rollout["id"]) == {
        "a": "failed", "b": "cancelled"}
    job_b = next(job for job in status["jobs"] if job["device_id"] == "b")
    assert job_b["detail"] == ("timed out in state queued with no report, then withdrawn by "
                               "the abort")
    assert [fleet.fetch("a", "2"), fleet.fetch("b", "2")] == [200, 403]
    published = len(fleet.sent)
    report(fleet, jobs["b"], "b", "queued", "2", "1")  # b got the job late: still refused
    assert fleet.fetch("b", "2") == 403 and len(fleet.sent) == published
    report(fleet, jobs["b"], "b", "active", "2", "1")  # it had the bundle: take it back
    rollback = Job.decode(fleet.sent[-1][1])
    assert (fleet.sent[-1][0], rollback.kind, rollback.version) == ("edgerun/b/ota",
                                                                   "rollback", "1")
