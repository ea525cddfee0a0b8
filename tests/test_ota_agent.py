"""The device agent: install, verify, refuse, roll back, and recover after a crash.

Bundles are served over real HTTP by the registry app (rows written straight into its store,
so bundles the registry itself would refuse can reach a device); the kill -9 test runs the
agent as its own process on a real Mosquitto.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgerun.adapters.fleet.orchestrator import Orchestrator
from edgerun.adapters.fleet.registry import BundleRegistry
from edgerun.adapters.fleet.store import Store
from edgerun.adapters.http.registry import create_registry_app
from edgerun.adapters.ota.agent import OtaAgent
from edgerun.adapters.ota.download import DownloadInterrupted, download
from edgerun.adapters.ota.messages import Job, Report
from edgerun.adapters.ota.slots import SlotState
from edgerun.examples import mlp_onnx
from edgerun.runtime import signing
from edgerun.runtime.bundle import Bundle, sha256_file
from edgerun.runtime.errors import BundleError, InvalidInput
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from tests.fleet_sim import PROFILE, make_bundle, mqtt_client, wait_for
from tests.mqtt import Broker
from tests.serving import free_port
from tests.test_fleet import smoke_failing


class BundleServer:
    """The registry app on uvicorn in a thread; `add` serves any archive, verified or not."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        root.mkdir(parents=True)
        self.store = Store.sqlite(root / "fleet.db")
        self.registry = BundleRegistry(root, self.store, [])
        app = create_registry_app(self.registry, Orchestrator(self.store, self.registry, ""))
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn")
        self.counter = 0

    def add(self, folder: Path, kind: str = "install", version: str | None = None) -> Job:
        manifest = json.loads((folder / "manifest.json").read_text())
        version = version or manifest["version"]
        target = self.registry.root / manifest["name"] / f"{version}.tar.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Bundle.open(folder, verify=False) as bundle:
            bundle.pack(target)
        digest = sha256_file(target)
        if self.store.version(manifest["name"], version) is None:
            self.store.add_version(manifest["name"], version, digest, target.stat().st_size,
                                   "", str(target.relative_to(self.registry.root)))
        self.counter += 1
        return Job(f"job-{self.counter}", kind, manifest["name"], version,
                   f"http://127.0.0.1:{self.port}/bundles/{manifest['name']}/{version}",
                   digest, target.stat().st_size)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def keys(tmp_path):
    key, pub = signing.generate_keys(tmp_path / "keys")
    other_key, _ = signing.generate_keys(tmp_path / "other")
    return {"key": key, "pub": pub, "other_key": other_key,
            "trusted": [signing.load_public_key(pub)]}


@pytest.fixture
def bundles(tmp_path, keys):
    def make(version: str, seed: int | None = None, key: str | None = "key") -> Path:
        return make_bundle(tmp_path / "bundles" / f"{version}-{key}", mlp_onnx(
            [8, 16, 4], seed=seed or int(version.split(".")[0])), "m", version,
            keys[key] if key else None)
    return make


@pytest.fixture
def server(tmp_path):
    server = BundleServer(tmp_path / "registry")
    yield server
    server.close()


class Device:
    """Repository (v1 in its folder) + agent, reports collected instead of published."""

    def __init__(self, folder: Path, trusted: list, initial: Path | None = None) -> None:
        self.folder = folder
        models = folder / "models"
        if initial is not None and not models.exists():
            shutil.copytree(initial, models / "m" / "1")
        models.mkdir(parents=True, exist_ok=True)
        self.reports: list[Report] = []
        self.repository = Repository(models, PROFILE, registry=Registry())
        self.agent = OtaAgent(publish=self._publish, repository=self.repository,
                              device_id="dev", data_dir=folder / "data", trusted=trusted)
        self.agent.recover()
        self.repository.load_all()

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert topic == "edgerun/dev/ota/report" and qos == 1 and retain
        self.reports.append(Report.decode(payload))

    def run(self, job: Job) -> Report:
        self.agent.handle_job(job.encode())
        self.agent.wait_idle()
        return self.reports[-1]

    def states(self, job: Job) -> list[str]:
        return [r.state for r in self.reports if r.job_id == job.job_id]

    def served(self) -> list[str]:
        return self.repository.versions("m")

    def close(self) -> None:
        self.agent.close()
        self.repository.close()


@pytest.fixture
def device(tmp_path, keys, bundles):
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    yield device
    device.close()


def test_install_switches_slots_and_rollback_goes_back(device, server, bundles):
    # the model's config.toml in the daemon's folder still applies to the versions OTA brings
    (device.folder / "models" / "m" / "config.toml").write_text("[batching]\nmax_batch_size = 3\n")
    job2 = server.add(bundles("2"))
    assert device.run(job2).state == "active"
    assert device.repository.get("m").batcher.config.max_batch_size == 3
    assert device.states(job2) == ["queued", "downloading", "verifying", "staged", "active"]
    assert device.reports[0].previous == "1" and device.served() == ["2"]
    job3 = server.add(bundles("3"))
    report = device.run(job3)
    assert (report.state, report.previous, report.active) == ("active", "2", "3")
    state = device.agent.slots.read("m")
    assert state.active_version == "3" and state.slots[state.inactive] == "2"
    # a job seen again (a retained message after a restart) is answered, not redone
    before = len(device.reports)
    assert device.run(job3).state == "active" and len(device.reports) == before + 1
    back = Job("rb-1", "rollback", "m", "2")
    report = device.run(back)
    assert report.state == "rolled_back" and device.served() == ["2"]
    # back to the version the daemon's own folder serves: the slots step aside
    assert device.run(Job("rb-2", "rollback", "m", "1")).state == "rolled_back"
    assert device.served() == ["1"]
    assert device.agent.describe()["ota"]["m"]["active"] is None


def test_a_rollback_sent_again_after_its_cause_is_fixed_is_tried_again(tmp_path, monkeypatch,
                                                                      device, server, bundles):
    """A rollback whose load failed for a cause outside the slot's files (here the temporary
    folder ONNX Runtime's load needs, gone) was remembered against those files: the job sent
    again once the cause was fixed failed with the remembered reason, without a try, until
    the daemon restarted. Each job is an operator's request: its load is tried."""
    import tempfile

    assert device.run(server.add(bundles("2"))).state == "active"
    assert device.run(server.add(bundles("3"))).state == "active"
    state = device.agent.slots.read("m")
    settled = time.time() - 60  # staged long ago: the same files at every look
    for path in device.agent.slots.folder("m", state.inactive).rglob("*"):
        os.utime(path, (settled, settled))
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # not there
    report = device.run(Job("rb-1", "rollback", "m", "2"))
    assert report.state == "failed" and "FileNotFoundError" in report.detail, report
    assert device.served() == ["3"]
    scratch.mkdir()  # the cause fixed, no file of the slot touched
    report = device.run(Job("rb-2", "rollback", "m", "2"))
    assert report.state == "rolled_back", report
    assert device.served() == ["2"]


def test_bad_bundles_are_refused_and_the_old_model_keeps_serving(tmp_path, device, server,
                                                                 bundles, keys):
    assert device.run(server.add(bundles("2"))).state == "active"
    tampered = bundles("5")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["created"]["note"] = "changed after signing"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    corrupt = server.add(bundles("6"))
    corrupt = Job(corrupt.job_id, "install", "m", "6", corrupt.url, "0" * 64, corrupt.size)
    cases = [
        (server.add(bundles("3", key=None)), "unsigned"),
        (server.add(bundles("4", key="other_key")), "key id unknown"),
        (server.add(tampered), "signature does not verify with any trusted key"),
        (corrupt, "corrupt or tampered artifact"),
        (server.add(bundles("7"), version="8"), "the job names m version 8"),
        (server.add(smoke_failing(tmp_path, keys, "9")), "smoke test failed"),
        (server.add(bundles("1.5.0")), "older than the active 2"),
    ]
    for job, reason in cases:
        report = device.run(job)
        assert report.state == "failed" and reason in report.detail, (reason, report)
        assert device.served() == ["2"] and report.active == "2"
    assert device.agent.slots.read("m").active_version == "2"
    assert not list((device.folder / "data" / "ota" / "m").glob(".staging-*"))
    with device.repository.route("m") as routed:  # and it answers
        assert routed.version == "2"


def test_a_slot_changed_after_its_install_does_not_serve_unsigned(device, server, bundles):
    """Staging checked the signature once; the slot is checked again each time it loads, on
    the very bundle that then serves, so a slot rewritten since (by whoever can write the
    data folder) cannot serve a model no trusted key signed."""
    assert device.run(server.add(bundles("2"))).state == "active"
    device.repository.unload("m")
    assert device.repository.load("m") == ["2"]  # signed: loads again
    slot = device.agent.slots.folder("m", device.agent.slots.read("m").active)
    shutil.rmtree(slot)
    shutil.copytree(bundles("2", seed=7, key=None), slot)  # same name and version, unsigned
    device.repository.unload("m")
    with pytest.raises(BundleError, match="unsigned"):
        device.repository.load("m")


def test_a_transfer_cut_short_is_resumed_not_failed(tmp_path):
    """The server announces the whole length and closes half way (http.client's
    IncompleteRead): worth another try, which asks for the rest."""
    content = os.urandom(200_000)
    ranges = []

    class CutShort(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            wanted = self.headers.get("Range")
            ranges.append(wanted)
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            self.wfile.write(content[start:] if wanted else content[:len(content) // 2])
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, dest = f"http://127.0.0.1:{server.server_port}/m-2.tar.gz", tmp_path / "m-2.tar.gz"
    sha256 = hashlib.sha256(content).hexdigest()
    try:
        with pytest.raises(DownloadInterrupted, match="broke off after"):
            download(url, dest, sha256, len(content))
        have = (tmp_path / "m-2.tar.gz.part").stat().st_size
        assert 0 < have <= len(content) // 2 and not dest.exists()
        assert download(url, dest, sha256, len(content)) == len(content) - have
    finally:
        server.shutdown()
    assert dest.read_bytes() == content and ranges == [None, f"bytes={have}-"]


def test_a_connection_dropped_after_a_416_is_retried_not_failed(tmp_path):
    """A part that is no prefix of the file gets 416; the fresh request that follows may meet
    a dropped connection like any other: worth another try (it once failed the job)."""
    content = os.urandom(5_000)
    answers = iter(["416", "drop", "200"])

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = next(answers)
            if answer == "drop":
                self.close_connection = True
                return
            self.send_response(int(answer))
            self.send_header("Content-Length", "0" if answer == "416" else str(len(content)))
            self.end_headers()
            if answer == "200":
                self.wfile.write(content)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, dest = f"http://127.0.0.1:{server.server_port}/m-2.tar.gz", tmp_path / "m-2.tar.gz"
    (tmp_path / "m-2.tar.gz.part").write_bytes(b"\0" * 100)
    try:
        with pytest.raises(DownloadInterrupted, match="failed"):
            download(url, dest, hashlib.sha256(content).hexdigest())
        assert download(url, dest, hashlib.sha256(content).hexdigest()) == len(content)
    finally:
        server.shutdown()
    assert dest.read_bytes() == content


def test_an_unreachable_registry_is_retried_until_it_answers(tmp_path, device, bundles):
    port = free_port()
    bundle = bundles("2")
    first = BundleServer(tmp_path / "elsewhere")
    job = first.add(bundle)
    first.close()
    job = Job(job.job_id, job.kind, job.model, job.version,
              job.url.replace(str(first.port), str(port)), job.sha256, job.size)
    device.agent.handle_job(job.encode())
    wait_for(lambda: any("retrying" in r.detail for r in device.reports), 30, "a retry")
    late = BundleServer(tmp_path / "late", port=port)  # the registry comes back
    try:
        late.add(bundle)
        device.agent.wait_idle()
    finally:
        late.close()
    assert device.reports[-1].state == "active" and device.served() == ["2"]


@pytest.mark.parametrize("code", [429, 408])
def test_a_busy_registry_is_retried_not_failed(tmp_path, device, server, bundles, code):
    """A CDN or proxy in front of the registry answers 429 Too Many Requests (a whole fleet
    downloading at once) or 408: the job failed at once, as for a 403, and a rollout counted
    every such device as failed and aborted."""
    job = server.add(bundles("2"))
    archive = (server.registry.root / "m" / "2.tar.gz").read_bytes()
    answers = [code, 200]

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = answers.pop(0)
            self.send_response(answer)
            body = archive if answer == 200 else b"slow down"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    busy = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        job = Job(job.job_id, job.kind, job.model, job.version,
                  f"http://127.0.0.1:{busy.server_port}/bundles/m/2", job.sha256, job.size)
        report = device.run(job)
    finally:
        busy.shutdown()
    assert (report.state, report.active) == ("active", "2"), report
    assert any(f"HTTP {code}" in r.detail and "retrying" in r.detail for r in device.reports)
    assert device.served() == ["2"] and not answers


#: Run in a child process whose files may not grow past `cap` bytes (RLIMIT_FSIZE; a write
#: past it fails with EFBIG, "File too large"): a device that runs the jobs and prints its
#: reports' states and details.
_CAPPED_DEVICE = r"""
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
args = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (args["cap"], args["cap"]))
from edgerun.adapters.ota.messages import Job
from edgerun.runtime import signing
from tests.test_ota_agent import Device
device = Device(Path(args["folder"]), [signing.load_public_key(args["pub"])])
reports = [device.run(Job.decode(job.encode())) for job in args["jobs"]]
print(json.dumps({"reports": [[r.state, r.detail] for r in reports],
                  "served": device.served()}))
device.close()
"""


def test_nothing_past_the_signed_manifest_is_written_before_its_signature_checks(
        tmp_path, server, bundles, keys):
    """The whole archive was extracted (up to the 8 GiB cap) before its signature was
    checked: a forged job (or a compromised registry: the download's sha256 comes from the
    job) could fill a device's disk with an archive no trusted key signed. Now the manifest
    and signature are checked first, and only what the signed manifest lists is written, no
    further than its listed size. Each archive here holds a 16 MiB member; the device's files
    may not grow past 4 MiB, so any attempt to write that member fails with "File too large"."""
    big = 16 << 20

    def with_big(folder: Path, name: str = "big.bin") -> Path:
        with open(folder / name, "r+b" if (folder / name).exists() else "wb") as handle:
            handle.truncate(big)  # zeros: a few kB of gzip
        return folder

    tampered = bundles("5")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["created"]["note"] = "changed after signing"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    overgrown = bundles("6")  # signed, but its model file is not what the manifest lists
    model_file = json.loads((overgrown / "manifest.json").read_text())["model_file"]
    cases = [
        (server.add(with_big(bundles("3", key=None))), "unsigned"),
        (server.add(with_big(bundles("4", key="other_key"))), "key id unknown"),
        (server.add(with_big(tampered)), "signature does not verify with any trusted key"),
        (server.add(with_big(overgrown, model_file)),
         f"'{model_file}' is {big} bytes, the signed manifest lists"),
        (server.add(with_big(bundles("7"))), "'big.bin' is not in the signed manifest"),
    ]
    good = server.add(bundles("8"))  # and a good one still installs under the cap
    args = {"cap": 4 << 20, "folder": str(tmp_path / "device"), "pub": str(keys["pub"]),
            "jobs": [job.encode().decode() for job, _ in cases] + [good.encode().decode()]}
    shutil.copytree(bundles("1"), tmp_path / "device" / "models" / "m" / "1")
    child = subprocess.run([sys.executable, "-c", _CAPPED_DEVICE, json.dumps(args)],
                           capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parent.parent)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    for (state, detail), (job, reason) in zip(result["reports"], cases):
        assert state == "failed" and reason in detail, (job.version, reason, detail)
    assert result["reports"][-1][0] == "active" and result["served"] == ["8"]
    assert not list((tmp_path / "device" / "data" / "ota" / "m").glob(".staging-*"))


def test_recover_from_what_a_crash_leaves(tmp_path, server, bundles, keys):
    folder = tmp_path / "device"
    device = Device(folder, keys["trusted"], bundles("1"))
    device.run(server.add(bundles("2")))
    device.run(server.add(bundles("3")))
    device.close()
    ota = folder / "data" / "ota"
    (ota / "m" / ".staging-abc").mkdir()
    (ota / "m" / ".staging-abc" / "model.onnx").write_bytes(b"half")
    state = json.loads((ota / "m" / "state.json").read_text())
    active = state["active"]
    # power cut after the pointer flipped to 3 but before anything loaded: 3 was verified
    device = Device(folder, keys["trusted"])
    assert device.served() == ["3"] and not (ota / "m" / ".staging-abc").exists()
    device.close()
    # the active slot's files are damaged (a bad flash block): back to the previous slot
    with open(ota / "m" / active / "model.onnx", "r+b") as handle:
        handle.truncate(10)
    device = Device(folder, keys["trusted"])
    assert device.served() == ["2"]
    assert device.agent.slots.read("m").active_version == "2"
    # the last job's report, published again (retained), names what serves now, not 3
    (report,) = device.reports
    assert (report.version, report.active) == ("3", "2"), report
    device.close()
    # both slots gone bad: the daemon's own folder (version 1) serves
    other = "a" if active == "b" else "b"
    shutil.rmtree(ota / "m" / other)
    (ota / "m" / other).mkdir()
    device = Device(folder, keys["trusted"])
    assert device.served() == ["1"]
    device.close()


SLOTS_OK = '"slots": {"a": "2", "b": "3"}'


@pytest.mark.parametrize("damage", [
    b"", b'{"active": "b", "slo', b"\xff\x00" * 8, b"[]",
    # JSON of the wrong shape (a bit flipped, a hand edit): recovery died on each, but "c"
    # and 7, which left the slots unused and the daemon's folder serving its older version
    b'{"active": "b", "slots": ["2", "3"]}', b'{"active": "b", "slots": "23"}',
    b'{"active": ["b"], %s}' % SLOTS_OK.encode(), b'{"active": "c", %s}' % SLOTS_OK.encode(),
    b'{"active": 7, %s}' % SLOTS_OK.encode(), b'{"active": "b", "slots": {"a": 2, "b": "3"}}',
    b'{"active": "b", %s, "last": [1]}' % SLOTS_OK.encode(),
    b'{"active": "b", %s, "last": {"state": "active"}}' % SLOTS_OK.encode(),
    b'{"active": "b", %s, "switching": "x"}' % SLOTS_OK.encode()])
def test_an_unreadable_pointer_is_rebuilt_from_the_slots(tmp_path, server, bundles, keys,
                                                         damage, caplog):
    """An SD card that lost the pointer's write in a power cut (empty, torn, garbage, or JSON
    of another shape): the agent's recovery died with a JSONDecodeError and the daemon with it,
    at every start, so the device served nothing. The slots' manifests name what they hold: the
    older serves (what served before the update the pointer broke in), and the job delivered
    again goes on."""
    folder = tmp_path / "device"
    device = Device(folder, keys["trusted"], bundles("1"))
    assert device.run(server.add(bundles("2"))).state == "active"
    job3 = server.add(bundles("3"))
    assert device.run(job3).state == "active"
    device.close()
    (folder / "data" / "ota" / "m" / "state.json").write_bytes(damage)
    device = Device(folder, keys["trusted"])
    try:
        assert f"{folder / 'data' / 'ota' / 'm' / 'state.json'} is unreadable" in caplog.text
        assert device.served() == ["2"]
        assert device.agent.describe()["ota"]["m"] == {"active": "2", "previous": "3"}
        report = device.run(job3)  # the retained job, delivered again: the pointer lost it
        assert (report.state, report.previous, report.active) == ("active", "2", "3"), report
        assert device.served() == ["3"]
    finally:
        device.close()


def test_slot_state_is_replaced_atomically(tmp_path, device):
    store = device.agent.slots
    store.write("m", SlotState("a", {"a": "2", "b": None}))
    assert not list((store.root / "m").glob(".state.json.tmp"))
    assert store.read("m").active_version == "2"


STEPS = ("queued", "downloading", "verifying", "staged", "active")


def test_kill_9_at_each_step_leaves_a_verified_model(tmp_path, keys, server):
    """A device process killed right as it reports each step serves a valid model after."""
    big = lambda version: make_bundle(  # noqa: E731 (about 5 MB: every step takes a while)
        tmp_path / "big" / version, mlp_onnx([256, 1024, 1024, 10], seed=int(version)), "m",
        version, keys["key"])
    models = tmp_path / "dev" / "models"
    shutil.copytree(big("1"), models / "m" / "1")
    broker = Broker(tmp_path / "broker")
    broker.start()
    reports: list[dict] = []
    statuses: list[dict] = []
    watcher = mqtt_client("test-watcher")
    watcher.on_message = lambda c, u, m: (reports if m.topic.endswith("report") else statuses
                                          ).append(json.loads(m.payload))
    watcher.on_connect = lambda c, *a: c.subscribe([("edgerun/dev/ota/report", 1),
                                                   ("edgerun/dev/status", 1)])
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    command = [sys.executable, "-m", "tests.ota_device", "--port", str(broker.port),
               "--device-id", "dev", "--models", str(models), "--data",
               str(tmp_path / "dev" / "data"), "--trust", str(keys["pub"])]
    root = Path(__file__).parents[1]

    def start() -> subprocess.Popen:
        statuses.clear()
        process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL,
                                   stderr=open(tmp_path / "device.log", "ab"))
        wait_for(lambda: statuses, 60, "the device's status after start-up")
        return process

    versions = iter(range(2, 100))
    serving = "1"
    process = start()
    try:
        for step in STEPS:
            version = str(next(versions))
            job = server.add(big(version))
            reports.clear()
            watcher.publish("edgerun/dev/ota", job.encode(), qos=1, retain=True)
            wait_for(lambda: any(r["job_id"] == job.job_id and r["state"] == step
                                 for r in reports), 60, f"step {step}")
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process = start()
            (status,) = statuses[:1]
            status = status["pid_status"]
            assert status["golden"] == "ok", (step, status)
            assert status["served"] in ([serving], [version]), (step, status)
            # the retained job is still there: the restarted agent finishes it
            wait_for(lambda: any(r["job_id"] == job.job_id and r["state"] == "active"
                                 for r in reports), 60, f"the job after a kill at {step}")
            serving = version
            watcher.publish("edgerun/dev/ota", b"", qos=1, retain=True).wait_for_publish(5)
        assert not list((tmp_path / "dev" / "data" / "ota" / "m").glob(".staging-*"))
    finally:
        process.kill()
        process.wait()
        watcher.loop_stop()
        watcher.disconnect()
        broker.stop()


@pytest.mark.parametrize("model, version", [("../../outside", "2"), ("m", "../2"),
                                            ("m/x", "2"), ("m", "2/../../x"),
                                            ("m\n", "2"), ("m", "2\n"), ("m", "")])
def test_a_job_naming_paths_outside_the_ota_folder_is_refused(model, version):
    """Model and version become parts of paths on the device; jobs are not signed. No version
    is a rollback's alone (to before the first install)."""
    job = Job(job_id="j1", kind="install", model=model, version=version,
              url="http://registry/bundles/m/2", sha256="0" * 64, size=1, rollout="r")
    with pytest.raises(InvalidInput, match="not a bundle name and version"):
        Job.decode(job.encode())
    assert Job.decode(Job("j2", "rollback", "m", "").encode()).version == ""


_GOOD_JOB = {"job_id": "j", "kind": "install", "model": "m", "version": "2",
             "url": "http://registry/bundles/m/2", "sha256": "0" * 64, "size": 1, "rollout": "r"}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=10) | st.sampled_from(["install", "rollback", "m", "", "../x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(changed=st.dictionaries(st.sampled_from(sorted(_GOOD_JOB)), _JSON),
       removed=st.sets(st.sampled_from(sorted(_GOOD_JOB))),
       raw=st.none() | st.binary(max_size=40))
@example(changed={}, removed=set(), raw=b"[" * 5000)
def test_any_job_or_report_payload_decodes_or_is_refused_typed(changed, removed, raw):
    """A job is decoded into one every field of which has its type, or refused as
    InvalidInput; a report is decoded or refused as ValueError (the orchestrator's "ignored a
    malformed message"): never another exception, which ended no thread but answered no job."""
    payload = raw if raw is not None else json.dumps(
        {**{k: v for k, v in _GOOD_JOB.items() if k not in removed}, **changed}).encode()
    try:
        job = Job.decode(payload)
    except InvalidInput:
        pass
    else:
        assert all(isinstance(getattr(job, name), str) for name in
                   ("job_id", "kind", "model", "version", "url", "sha256", "rollout"))
        assert type(job.size) is int and job.size >= 0
    try:
        Report.decode(payload)
    except (ValueError, TypeError):
        pass


def test_a_hostile_or_malformed_job_is_refused_with_a_report_and_the_agent_goes_on(
        tmp_path, device, server, bundles):
    """Jobs are not signed, and anyone who can write `edgerun/<id>/ota` (an open broker)
    writes them: a size of 1e400 escaped decoding as an untyped OverflowError, a sha256 that
    is no hash became part of a download's file name (`../`) and an If-Range header, and a
    negative size was taken, and JSON nested past what Python parses was a RecursionError out
    of `handle_job`. Each is refused before any download, with a failed report the fleet hears
    at once (not a job timed out ten minutes later), and the agent goes on."""
    job = server.add(bundles("2"))
    fields = {"job_id": "bad", "kind": "install", "model": "m", "version": "2",
              "url": job.url, "sha256": job.sha256, "size": job.size}
    hostile = [({"size": 1e400}, "size"), ({"size": -1}, "size"), ({"size": "12"}, "size"),
               ({"sha256": "../../../../x"}, "sha256"),
               ({"sha256": job.sha256 + "\r\n"}, "sha256"),
               ({"url": "file:///etc/shadow"}, "url"), ({"job_id": ["x"]}, "job_id")]
    for number, (changed, named) in enumerate(hostile):
        payload = {**fields, "job_id": f"bad-{number}", **changed}
        before = len(device.reports)
        device.agent.handle_job(json.dumps(payload).encode())
        device.agent.wait_idle()
        sent = device.reports[before:]
        if named == "job_id":  # nothing to answer to: logged only
            assert sent == []
            continue
        assert [(r.job_id, r.state) for r in sent] == [(f"bad-{number}", "failed")], changed
        assert "refused" in sent[0].detail and named in sent[0].detail, sent[0].detail
    before = len(device.reports)  # no id can be read from it: logged only
    device.agent.handle_job(b'{"job_id": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    device.agent.wait_idle()
    assert device.reports[before:] == []
    assert device.agent.bytes_downloaded == 0
    assert list((device.agent.downloads).iterdir()) == []
    assert device.run(job).state == "active" and device.served() == ["2"]


def test_a_rollback_to_no_version_removes_what_the_first_install_brought(tmp_path, keys,
                                                                         server, bundles):
    """A device that served no version of m installs m:2; the fleet takes it back to what
    served before: nothing. The model goes, the slots stay, and a later install serves again;
    the daemon's folder, once it has the model, serves after such a rollback."""
    device = Device(tmp_path / "device", keys["trusted"])
    try:
        install = server.add(bundles("2"))
        report = device.run(install)
        assert (report.state, report.previous, device.served()) == ("active", None, ["2"])
        back = Job("rb-1", "rollback", "m", "")
        report = device.run(back)
        assert (report.state, report.previous, report.active) == ("rolled_back", "2", None)
        assert "m" not in device.repository and device.agent.active_version("m") is None
        assert device.states(back) == ["queued", "verifying", "rolled_back"]
        again = device.run(back)  # the retained job, delivered again: answered, not redone
        assert (again.state, again.previous) == ("rolled_back", "2")
        device.repository.poll_once()  # what the daemon's poller does: nothing comes back
        assert "m" not in device.repository
        # removed as the source no longer offers it, not held unloaded as by an operator:
        # the daemon's folder, given the model later, serves it at the next poll
        shutil.copytree(bundles("1"), device.folder / "models" / "m" / "1")
        device.repository.poll_once()
        assert device.served() == ["1"]
        assert device.run(server.add(bundles("3"))).state == "active"
        assert device.served() == ["3"]
        report = device.run(Job("rb-2", "rollback", "m", ""))
        assert (report.state, report.previous) == ("rolled_back", "3")
        assert device.served() == ["1"]  # the folder's own again
    finally:
        device.close()



def test_a_first_install_during_a_poll_pass_keeps_serving(tmp_path, keys, server, device):
    """The daemon's poller listed the models, then the agent installed a model the device had
    never served and reported it active: the pass, not having listed it, unloaded it, and
    every request got "not loaded" until the next pass (5 s later by default)."""
    from tests.test_repository import HeldSource

    source = device.repository.source
    source.fallback = HeldSource(device.folder / "models", held="m")
    source.fallback.armed = True
    polling = threading.Thread(target=device.repository.poll_once)
    polling.start()
    assert source.fallback.entered.wait(30), "the poll pass never looked at m"
    job = server.add(make_bundle(tmp_path / "n2", mlp_onnx([8, 16, 4], seed=2), "n", "2",
                                 keys["key"]))
    assert device.run(job).state == "active"
    source.fallback.gate.set()
    polling.join(30)
    assert device.repository.versions("n") == ["2"], "the poll pass unloaded what OTA installed"
    assert device.served() == ["1"]


def test_a_rollback_to_no_version_with_a_config_only_folder_removes_the_model(
        tmp_path, keys, server, bundles):
    """The daemon's folder holds m/config.toml alone (batching for what OTA installs): it
    offers no version, so the rollback removes m; it failed, and m:2 kept serving."""
    device = Device(tmp_path / "device", keys["trusted"])
    try:
        (device.folder / "models" / "m").mkdir(parents=True)
        (device.folder / "models" / "m" / "config.toml").write_text(
            "[batching]\nmax_batch_size = 3\n")
        assert device.run(server.add(bundles("2"))).state == "active"
        report = device.run(Job("rb-1", "rollback", "m", ""))
        assert (report.state, report.previous) == ("rolled_back", "2"), report
        assert "m" not in device.repository
    finally:
        device.close()


def test_a_restart_after_a_rollback_to_no_version_loads_nothing_and_logs_no_error(
        tmp_path, keys, server, bundles, caplog):
    device = Device(tmp_path / "device", keys["trusted"])
    assert device.run(server.add(bundles("2"))).state == "active"
    assert device.run(Job("rb-1", "rollback", "m", "")).state == "rolled_back"
    device.close()
    caplog.clear()
    device = Device(tmp_path / "device", keys["trusted"])
    try:
        assert "m" not in device.repository
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    finally:
        device.close()


class PowerCut(BaseException):
    """The power goes: nothing after it runs (the agent catches Exception, not this)."""


def restarted_after_a_power_cut_in(device, job: Job, flipped_to: str, keys) -> Device:
    """Run `job` on `device` until its pointer flip, cut the power there, start it again."""
    cut_power_before_the_smoke_test(device)
    device.agent.handle_job(job.encode())
    wait_for(lambda: not device.agent._worker.is_alive(), 60, "the power cut")
    assert device.agent.slots.read(job.model).active_version == flipped_to  # it had flipped
    device.close()
    return Device(device.folder, keys["trusted"])


def cut_power_before_the_smoke_test(device: Device) -> None:
    """The agent's next `repository.load`, right after its pointer flip, never happens."""
    def load(name: str, *args, **kwargs):
        raise PowerCut(name)
    device.repository.load = load


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("smoke", ["passes", "fails"])
def test_power_cut_between_the_flip_and_the_smoke_test(tmp_path, server, bundles, keys, smoke):
    """The pointer names 3, then the power goes. At start-up 3 is smoke-tested: if it passes,
    the retained job (delivered again) is reported active with the version that served
    before (the fleet rolls back to it), not "already active" since 3; if it fails, the
    previous slot serves again and the job fails naming the smoke test."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    assert device.run(server.add(bundles("2"))).state == "active"
    job3 = server.add(bundles("3") if smoke == "passes" else smoke_failing(tmp_path, keys, "3"))
    device = restarted_after_a_power_cut_in(device, job3, "3", keys)
    try:
        served = ["3"] if smoke == "passes" else ["2"]
        assert device.served() == served
        report = device.run(job3)  # the retained job, delivered again
        if smoke == "passes":
            assert (report.state, report.previous, report.active) == ("active", "2", "3")
            assert device.agent.describe()["ota"]["m"] == {"active": "3", "previous": "2"}
        else:
            assert report.state == "failed" and "smoke test failed" in report.detail, report
            assert (report.previous, report.active) == ("2", "2")
        assert device.served() == served
    finally:
        device.close()


@pytest.mark.parametrize("kind", ["install", "rollback"])
def test_a_stop_as_the_pointer_flips_leaves_the_switch_to_the_next_start(tmp_path, server,
                                                                         bundles, keys, kind):
    """The daemon stops as a job flips its pointer (the agent's close waited its CLOSE_WAIT_S
    out, then the repository closed): the repository refuses the load that follows. The job
    was reported failed ("smoke test failed") and its slot dropped, and that failure, kept as
    the job's end, was reported again at every later start, for a bundle that was fine. It
    now ends there unreported, as a power cut at that step would leave it."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    assert device.run(server.add(bundles("2"))).state == "active"
    job = server.add(bundles("3")) if kind == "install" else Job("rb-1", "rollback", "m", "1")
    flipped_to = "3" if kind == "install" else None
    write = device.agent.slots.write

    def write_then_stop(model: str, state: SlotState) -> None:
        write(model, state)
        if state.switching:  # the pointer flipped: the daemon stops now
            device.agent._stop.set()
            device.repository.close()

    device.agent.slots.write = write_then_stop
    device.agent.handle_job(job.encode())
    device.agent.wait_idle()
    assert not {"failed", "active", "rolled_back"} & set(device.states(job)), device.reports
    assert device.agent.slots.read("m").active_version == flipped_to
    device.close()
    device = Device(device.folder, keys["trusted"])
    try:
        assert device.served() == [flipped_to or "1"]
        report = device.run(job)  # the retained job, delivered again
        assert (report.state, report.previous, report.active) == (
            "active" if kind == "install" else "rolled_back", "2", flipped_to or "1"), report
    finally:
        device.close()


def full_disk_at(path: Path) -> Path:
    """`path` made a link to /dev/full: every write there fails with "No space left on
    device", as on a full SD card (no mount needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/full")
    return path


def part_of(device, job: Job) -> Path:
    """Where the agent downloads `job`'s bundle to."""
    return device.agent.downloads / f"{job.model}-{job.version}-{job.sha256[:16]}.tar.gz.part"


def test_a_full_disk_mid_download_fails_the_job_and_frees_the_space(tmp_path, keys, server,
                                                                     bundles):
    """A write that fails for want of space is no broken connection: it was retried as one
    (the part left filling the disk, "retrying" reported for the whole download patience),
    and then the failure could not be recorded either, so no terminal report was sent."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    device.agent.download_patience = 3.0
    try:
        job = server.add(bundles("2"))
        full_disk_at(part_of(device, job))
        report = device.run(job)
        assert report.job_id == job.job_id and report.state == "failed", report
        assert "No space left on device" in report.detail, report
        assert not any("retrying" in r.detail for r in device.reports)
        assert not list(device.agent.downloads.iterdir())  # the part is gone
        assert device.served() == ["1"] and report.active == "1"
    finally:
        device.close()


def test_a_disk_full_of_something_else_still_gets_the_job_reported(tmp_path, keys, server,
                                                                    bundles):
    """When even state.json cannot be written (the disk is full of logs, say), the job's end
    is still reported; it once died with the write, and the fleet heard nothing more."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    try:
        job = server.add(bundles("2"))
        full = [full_disk_at(part_of(device, job)),
                full_disk_at(device.agent.slots.folder("m") / ".state.json.tmp")]
        report = device.run(job)
        assert (report.job_id, report.state) == (job.job_id, "failed"), report
        assert "No space left on device" in report.detail and report.active == "1"
        for path in full:  # space again: the next job goes through
            path.unlink(missing_ok=True)
        assert device.run(server.add(bundles("3"))).state == "active"
        assert device.served() == ["3"]
    finally:
        device.close()


def test_a_full_disk_at_the_switch_removes_the_staged_bundle(tmp_path, keys, server, bundles):
    """The unpacked bundle took the last free space and the pointer's write then failed: the
    job failed and 1 kept serving, but the staging folder (a whole bundle) stayed until the
    daemon restarted, keeping the disk full for everything else on the device."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    try:
        full = full_disk_at(device.agent.slots.folder("m") / ".state.json.tmp")
        report = device.run(server.add(bundles("2")))
        assert report.state == "failed" and "No space left on device" in report.detail, report
        assert device.served() == ["1"] and report.active == "1"
        assert not list(device.agent.slots.folder("m").glob(".staging-*"))
        assert not list(device.agent.downloads.iterdir())
        full.unlink()  # space again: the next job goes through
        assert device.run(server.add(bundles("3"))).state == "active"
        assert sorted(p.name for p in device.agent.slots.folder("m").iterdir()) == [
            "a", "state.json"]
    finally:
        device.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_power_cut_in_a_rollback_to_no_version_when_the_folder_gained_the_model(
        tmp_path, server, bundles, keys):
    """m:2 from a slot; the daemon's folder has since gained m:1. A rollback to no version
    flips the pointer to none, then the power goes: after the restart the folder's 1 serves,
    and the job delivered again is done (previous 2), not failed for want of a slot or url."""
    device = Device(tmp_path / "device", keys["trusted"])
    assert device.run(server.add(bundles("2"))).state == "active"
    shutil.copytree(bundles("1"), device.folder / "models" / "m" / "1")
    back = Job("rb-1", "rollback", "m", "")
    device = restarted_after_a_power_cut_in(device, back, None, keys)
    try:
        assert device.served() == ["1"]
        report = device.run(back)
        assert (report.state, report.previous, report.active) == ("rolled_back", "2", "1"), \
            report
    finally:
        device.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_power_cut_between_a_rollbacks_flip_and_its_load(tmp_path, server, bundles, keys):
    """A rollback job flips the pointer to the slot it goes back to, then the power goes:
    the job delivered again after the restart reports the version it rolled back from, as an
    install's does, not "already on this version" with itself as the previous one."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    assert device.run(server.add(bundles("2"))).state == "active"
    assert device.run(server.add(bundles("3"))).state == "active"
    back = Job("rb-1", "rollback", "m", "2")
    device = restarted_after_a_power_cut_in(device, back, "2", keys)
    try:
        assert device.served() == ["2"]
        report = device.run(back)  # the retained job, delivered again
        assert (report.state, report.previous, report.active) == ("rolled_back", "3", "2"), \
            report
    finally:
        device.close()


def test_a_download_left_by_an_abandoned_job_is_removed_by_the_next(tmp_path, device, server,
                                                                    bundles):
    """A part kept for resuming a job that never comes back (it failed, or the fleet sent a
    newer version) stayed in the downloads folder for good, a bundle's size each time."""
    content = os.urandom(300_000)

    class CutShort(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content[:1000])
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    flaky = ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    device.agent.download_patience = 1.0
    try:
        abandoned = Job("j-cut", "install", "m", "5",
                        f"http://127.0.0.1:{flaky.server_port}/bundles/m/5",
                        hashlib.sha256(content).hexdigest(), len(content))
        assert device.run(abandoned).state == "failed"
    finally:
        flaky.shutdown()
    downloads = device.folder / "data" / "ota" / ".downloads"
    assert list(downloads.iterdir())  # kept: a new job for this bundle resumes it
    assert device.run(server.add(bundles("2"))).state == "active"
    assert not list(downloads.iterdir())


def test_the_device_credential_never_follows_a_redirect_to_another_host(tmp_path):
    """urllib copies every header onto a redirect: a registry behind a CDN or an object store
    that it redirects to would have had every device's secret (its MQTT password too)."""
    content = os.urandom(50_000)
    seen: dict[str, str | None] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen[f"{self.server.server_port}{self.path}"] = self.headers.get("Authorization")
            if self.path == "/bundles/m/1":  # the registry: to its own mirror path first
                self.send_response(302)
                self.send_header("Location", "/mirror/m/1")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/mirror/m/1":  # then to another host (a CDN, say)
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{cdn.server_port}/blob")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        def log_message(self, *args) -> None:
            pass

    registry, cdn = (ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2))
    for server in (registry, cdn):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        download(f"http://127.0.0.1:{registry.server_port}/bundles/m/1", tmp_path / "m.tar.gz",
                 hashlib.sha256(content).hexdigest(), len(content),
                 headers={"Authorization": "Basic ZGV2LWE6c2VjcmV0"})
    finally:
        registry.shutdown()
        cdn.shutdown()
    assert (tmp_path / "m.tar.gz").read_bytes() == content
    assert seen == {f"{registry.server_port}/bundles/m/1": "Basic ZGV2LWE6c2VjcmV0",
                    f"{registry.server_port}/mirror/m/1": "Basic ZGV2LWE6c2VjcmV0",
                    f"{cdn.server_port}/blob": None}


def test_a_download_is_cut_off_at_the_jobs_size(tmp_path):
    """The part grew by whatever the registry sent until the connection ended, and only then
    was its sha256 compared: a registry (or a job's URL) that streams without end filled the
    device's disk. The job's size is where it stops now."""
    body, sent = 64 << 20, []

    class Endless(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(body))
            self.end_headers()
            chunk, total = b"\0" * (1 << 16), 0
            try:
                while total < body:
                    self.wfile.write(chunk)
                    total += len(chunk)
            except OSError:  # the device hung up
                pass
            sent.append(total)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = tmp_path / "m.tar.gz"
    try:
        with pytest.raises(BundleError, match="over the job's 100000 bytes") as refused:
            download(f"http://127.0.0.1:{server.server_port}/bundles/m/2", dest,
                     "0" * 64, 100_000)
        assert not isinstance(refused.value, DownloadInterrupted)  # no retry mends it
        wait_for(lambda: sent, 30, "the registry to see the device hang up")
    finally:
        server.shutdown()
    assert sent[0] < 16 << 20  # the device stopped reading early (socket buffers aside)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


class StallingRegistry:
    """Serves `content` (Range too) over real HTTP; until `release` is set, each answer stops
    after `first` bytes and the connection then stays open, silent (with `first` None, not
    even a status line is sent)."""

    def __init__(self, content: bytes, first: int | None, announce: bool = True) -> None:
        self.content, self.first, self.announce = content, first, announce
        self.ranges: list[str | None] = []
        self.asked, self.release = threading.Event(), threading.Event()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.serve(self)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/bundles/m/2"

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        wanted = handler.headers.get("Range")
        self.ranges.append(wanted)
        self.asked.set()
        stalling = not self.release.is_set()
        if stalling and self.first is None:
            self.release.wait()
            return
        body = self.content[int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0:]
        handler.send_response(206 if wanted else 200)
        if self.announce:  # else the body ends with the connection
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:self.first] if stalling else body)
        if stalling:
            self.release.wait()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def stops_at_once(device: Device) -> None:
    """`device.close()` returns within seconds (it took 30), its agent's thread ended."""
    started = time.monotonic()
    device.close()
    took = time.monotonic() - started
    assert took < 5 and not device.agent._worker.is_alive(), f"closed in {took:.1f} s"


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "until-close"])
def test_a_stop_mid_download_ends_it_at_once_and_the_next_start_resumes_it(tmp_path, keys,
                                                                           bundles, announce):
    """A stop waited the whole 30 s for a download (urllib cannot be interrupted), here one
    whose registry sent 200 kB and then nothing. Now it ends at once; its part stays, no end
    is recorded, so the job (its retained message, delivered again) is redone at the next
    start and asks for the rest. A connection shut down ends a body without a length as if
    it were whole: that must not fail the job's sha256 check (and lose the part)."""
    bundle = make_bundle(tmp_path / "big", mlp_onnx([256, 512, 256, 10], seed=2), "m", "2",
                         keys["key"])
    with Bundle.open(bundle) as opened:
        opened.pack(tmp_path / "m-2.tar.gz")
    content = (tmp_path / "m-2.tar.gz").read_bytes()
    registry = StallingRegistry(content, first=200_000, announce=announce)
    job = Job("j-stop", "install", "m", "2", registry.url, hashlib.sha256(content).hexdigest(),
              len(content))
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    part = part_of(device, job)
    try:
        device.agent.handle_job(job.encode())
        wait_for(lambda: part.exists() and part.stat().st_size, 30, "the download to start")
        stops_at_once(device)
        assert device.states(job) == ["queued", "downloading"]  # no end recorded
        have = part.stat().st_size
        assert 0 < have <= 200_000 and part.read_bytes() == content[:have]
        assert not part.with_name(part.name.removesuffix(".part")).exists()
        assert device.agent.slots.read("m").active_version is None  # no slot touched
        registry.release.set()
        device = Device(tmp_path / "device", keys["trusted"])
        assert device.served() == ["1"]
        report = device.run(job)  # the retained job, delivered again
        assert (report.state, report.previous, report.active) == ("active", "1", "2"), report
        assert registry.ranges == [None, f"bytes={have}-"] and device.served() == ["2"]
        assert not list(device.agent.downloads.iterdir())
    finally:
        device.close()
        registry.close()


def test_a_registry_that_sends_nothing_does_not_hold_a_stop(tmp_path, keys, bundles):
    """Connected, the request sent, no answer yet: a stop waited for the socket's timeout."""
    content = os.urandom(1000)
    registry = StallingRegistry(content, first=None)
    job = Job("j-silent", "install", "m", "2", registry.url,
              hashlib.sha256(content).hexdigest(), len(content))
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    try:
        device.agent.handle_job(job.encode())
        wait_for(registry.asked.is_set, 30, "the download's request")
        stops_at_once(device)
        assert device.states(job) == ["queued", "downloading"]
        assert device.agent.slots.read("m").active_version is None
    finally:
        device.close()
        registry.close()


def test_a_stop_between_retries_does_not_wait_them_out(tmp_path, keys, bundles):
    """An unreachable registry is retried for the download patience (10 minutes), waiting up
    to 30 s between tries: a stop waited 30 s while the retries went on, then left them
    running. Here it comes as the wait of 8 s begins."""
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    job = Job("j-away", "install", "m", "2", f"http://127.0.0.1:{free_port()}/bundles/m/2",
              "0" * 64, 1000)
    device.agent.handle_job(job.encode())
    wait_for(lambda: any("retrying in 8 s" in r.detail for r in device.reports), 30,
             "the fifth try")
    stops_at_once(device)
    assert "failed" not in device.states(job)
    assert device.agent.slots.read("m").active_version is None


def test_refused_downloads_close_their_connections_and_a_set_stop_sends_nothing(tmp_path):
    """An HTTP error raised from the download's opening thread held its connection in a
    reference cycle until the cycle collector ran (100 refusals, 100 open sockets); and a
    download given a stop already set still went to the registry."""
    import gc

    from edgerun.adapters.ota.download import DownloadStopped, Stop

    asked: list[str] = []

    class Refusing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"busy")

        def log_message(self, *args) -> None:
            pass

    registry = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{registry.server_port}/bundles/m/2"

    def open_sockets() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
                   for fd in os.listdir("/proc/self/fd") if fd.isdigit()
                   and os.path.exists(f"/proc/self/fd/{fd}"))
    try:
        before = open_sockets()
        gc.disable()
        try:
            for _ in range(20):
                with pytest.raises(DownloadInterrupted, match="503"):
                    download(url, tmp_path / "a.tar.gz", "0" * 64)
            assert open_sockets() - before <= 5  # the server's ends, closing: not 20
        finally:
            gc.enable()
        stop = Stop()
        stop.set()
        with pytest.raises(DownloadStopped):
            download(url, tmp_path / "a.tar.gz", "0" * 64, stop=stop)
        assert len(asked) == 20
    finally:
        registry.shutdown()
        registry.server_close()


@pytest.mark.parametrize("step", ["verify_archive", "unpack"])
def test_a_stop_while_staging_ends_the_job_there_and_the_next_start_downloads_nothing(
        tmp_path, keys, bundles, monkeypatch, step):
    """The stop comes while staging reads the bundle (here: its signature check, or its
    unpacking). The job ends at the next step, unreported, its download kept whole; redone at
    the next start (its retained message), it asks the registry for nothing: the download was
    thrown away and fetched again."""
    from edgerun.adapters.ota import agent as agent_module

    bundle = bundles("2")
    with Bundle.open(bundle) as opened:
        opened.pack(tmp_path / "m-2.tar.gz")
    content = (tmp_path / "m-2.tar.gz").read_bytes()
    registry = StallingRegistry(content, first=None)
    registry.release.set()  # serves at once
    job = Job("j-stage", "install", "m", "2", registry.url, hashlib.sha256(content).hexdigest(),
              len(content))
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    module = agent_module.signing if step == "verify_archive" else agent_module.archive
    real = getattr(module, step)

    def then_stop(*args, **kwargs):  # the daemon's SIGTERM arrives meanwhile
        result = real(*args, **kwargs)
        device.agent._stop.set()
        return result

    monkeypatch.setattr(module, step, then_stop)
    try:
        device.run(job)
        monkeypatch.setattr(module, step, real)
        assert device.states(job) == ["queued", "downloading", "verifying"]  # no end
        whole = part_of(device, job).with_name(part_of(device, job).name.removesuffix(".part"))
        assert whole.read_bytes() == content
        assert not list((device.folder / "data" / "ota" / "m").glob(".staging-*"))
        assert device.agent.slots.read("m").active_version is None and device.served() == ["1"]
        device.close()
        device = Device(tmp_path / "device", keys["trusted"])
        report = device.run(job)  # the retained job, delivered again
        assert (report.state, report.previous, report.active) == ("active", "1", "2"), report
        assert registry.ranges == [None]  # one download, the first job's
        assert device.agent.bytes_downloaded == 0 and not list(device.agent.downloads.iterdir())
    finally:
        device.close()
        registry.close()


class TricklingRegistry(StallingRegistry):
    """As StallingRegistry, but until `release` each answer (headers, Content-Length) trickles
    its body, one byte every `every` seconds: a registry, or a broken proxy before it, that
    keeps a connection barely alive. Once released it sends the rest at once."""

    def __init__(self, content: bytes, every: float = 0.05) -> None:
        self.every = every
        super().__init__(content, first=0)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        wanted = handler.headers.get("Range")
        self.ranges.append(wanted)
        self.asked.set()
        body = self.content[int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0:]
        handler.send_response(206 if wanted else 200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        sent = 0
        try:
            while sent < len(body) and not self.release.wait(self.every):
                handler.wfile.write(body[sent:sent + 1])
                sent += 1
            handler.wfile.write(body[sent:])
        except OSError:  # the device hung up
            pass


def test_a_trickling_download_fails_under_the_speed_limit_and_is_resumed_later(tmp_path):
    """The socket timeout bounds each read, not the download: a registry sending a byte every
    20 s held it (and the agent's job thread) for good. A body averaging under the speed limit
    over its window now fails, naming the URL and the rate, as a transfer worth another try:
    its part stays, and the next try, at full speed under the same limit, resumes it."""
    from edgerun.adapters.ota.download import DownloadTooSlow, SpeedLimit

    content = os.urandom(100_000)
    registry = TricklingRegistry(content)  # 20 bytes/s
    dest, sha256 = tmp_path / "m-2.tar.gz", hashlib.sha256(content).hexdigest()
    limit = SpeedLimit(bytes_per_s=1000, seconds=0.5)
    try:
        with pytest.raises(DownloadTooSlow, match=rf"download of {registry.url} stalled: "
                                                  r"[\d.]+ bytes/s over the last") as slow:
            download(registry.url, dest, sha256, len(content), speed_limit=limit)
        assert isinstance(slow.value, DownloadInterrupted)  # retried by the agent
        assert 0 < slow.value.rate < 1000 and f"{slow.value.rate:.1f} bytes/s" in str(slow.value)
        have = dest.with_name(dest.name + ".part").stat().st_size
        assert 0 < have < 1000 and not dest.exists()
        registry.release.set()  # a normal transfer: the limit does not touch it
        assert download(registry.url, dest, sha256, len(content),
                        speed_limit=limit) == len(content) - have
    finally:
        registry.close()
    assert dest.read_bytes() == content and registry.ranges == [None, f"bytes={have}-"]


class HeadTricklingRegistry:
    """Sends a status line, then its headers a byte every `every` seconds, never ending them:
    a registry, or a broken proxy before it, holding a connection open with a head that never
    completes. Records when each connection's sending failed (the device hung up)."""

    def __init__(self, every: float = 0.05, tls: ssl.SSLContext | None = None) -> None:
        self.asked, self.hung_up = threading.Event(), threading.Event()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.asked.set()
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.wfile.flush()
                    for _ in range(int(60 / every)):
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(every)
                except OSError:
                    registry.hung_up.set()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/bundles/m/2"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def opening_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edgerun-download-open"]


def test_a_head_trickled_past_the_speed_window_fails_and_its_connection_is_cut(tmp_path):
    """The speed limit watched the body only: an answer whose head came a byte at a time
    (each read inside the socket timeout) held the download, and the agent's job thread, for
    good. A head not whole within the speed limit's window is a stall, worth another try; a
    stop while the head trickles ends the download at once. Either way the connection is cut,
    so the thread that was opening it ends too, rather than holding it as long as the trickle
    lasts."""
    from edgerun.adapters.ota.download import DownloadTooSlow, SpeedLimit, Stop

    registry = HeadTricklingRegistry()
    dest, sha256 = tmp_path / "m-2.tar.gz", "0" * 64
    try:
        with pytest.raises(DownloadTooSlow, match=rf"download of {registry.url} stalled: no "
                                                  r"answer within 0\.5 s"):
            download(registry.url, dest, sha256, 100,
                     speed_limit=SpeedLimit(bytes_per_s=1000, seconds=0.5))
        wait_for(registry.hung_up.is_set, 10, "the registry to see the connection cut")
        wait_for(lambda: not opening_threads(), 10, "the opening thread to end")
        registry.asked.clear(), registry.hung_up.clear()
        stop = Stop()
        threading.Thread(target=lambda: registry.asked.wait(10) and stop.set(),
                         daemon=True).start()
        with pytest.raises(DownloadInterrupted, match="stopped"):
            download(registry.url, dest, sha256, 100, stop=stop,
                     speed_limit=SpeedLimit(bytes_per_s=0))  # no limit: only the stop ends it
        wait_for(registry.hung_up.is_set, 10, "the registry to see the connection cut")
        wait_for(lambda: not opening_threads(), 10, "the opening thread to end")
    finally:
        registry.close()
    assert not dest.exists()


def test_a_tls_handshake_or_head_that_stalls_is_cut_too(tmp_path, monkeypatch):
    """Over TLS the connection is watched from before its handshake: a registry that accepts
    and never answers the handshake, or that completes it and trickles its head, is a stall
    at the speed limit's window, and its connection is cut (the opening thread would
    otherwise wait out its socket timeout, or the trickle)."""

    from edgerun.adapters.ota.download import DownloadTooSlow, SpeedLimit
    from tests.test_mqtt import make_certificates

    certificates = make_certificates(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", certificates["ca"])  # the device trusts the test CA
    dest, limit = tmp_path / "m-2.tar.gz", SpeedLimit(bytes_per_s=1000, seconds=0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; no answer
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/bundles/m/2"
        with pytest.raises(DownloadTooSlow, match=rf"download of {url} stalled: no answer"):
            download(url, dest, "0" * 64, 100, timeout=30, speed_limit=limit)
        wait_for(lambda: not opening_threads(), 10, "the opening thread to end")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates["cert"], certificates["key"])
    registry = HeadTricklingRegistry(tls=context)
    try:
        with pytest.raises(DownloadTooSlow, match="stalled: no answer within 0.5 s"):
            download(registry.url, dest, "0" * 64, 100, timeout=30, speed_limit=limit)
        assert registry.asked.is_set()  # the handshake passed: its head is what stalled
        wait_for(registry.hung_up.is_set, 10, "the registry to see the connection cut")
        wait_for(lambda: not opening_threads(), 10, "the opening thread to end")
    finally:
        registry.close()


WITHOUT_SSL = """
import hashlib, sys, threading
sys.modules["ssl"] = sys.modules["_ssl"] = None  # as in a Python built without ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from edgerun.adapters.ota.download import download

BODY = b"bundle" * 1000

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
dest = Path(sys.argv[1])
download(f"http://127.0.0.1:{server.server_port}/b", dest, hashlib.sha256(BODY).hexdigest(),
         len(BODY))
print(dest.read_bytes() == BODY)
"""


def test_a_download_over_http_works_on_a_python_without_ssl(tmp_path):
    """Some device images build Python without ssl: urllib then has no HTTPSHandler, and
    watching the connections an open makes must not need one (importing the downloader
    failed with an AttributeError, for a registry on plain http too). In a child process,
    whose ssl is made unimportable before anything imports it."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_SSL, str(tmp_path / "b.tar.gz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]


def test_a_trickling_registry_fails_the_job_once_the_patience_is_spent(tmp_path, keys,
                                                                       bundles):
    """Such a registry held the job for good: the fleet heard "downloading" and nothing more.
    A stall is retried like a transfer broken off (resumed from its part), and once the
    download patience is spent the job fails with the stall as its reason; the old version
    serves throughout."""
    from edgerun.adapters.ota.download import SpeedLimit

    content = os.urandom(100_000)
    registry = TricklingRegistry(content)
    job = Job("j-trickle", "install", "m", "2", registry.url,
              hashlib.sha256(content).hexdigest(), len(content))
    device = Device(tmp_path / "device", keys["trusted"], bundles("1"))
    device.agent.speed_limit = SpeedLimit(bytes_per_s=1000, seconds=0.5)
    device.agent.download_patience = 2.0
    try:
        device.agent.handle_job(job.encode())
        wait_for(lambda: "failed" in device.states(job), 30, "the job to fail")
        report = device.reports[-1]
        assert report.state == "failed" and report.active == "1", report
        assert "stalled" in report.detail and "bytes/s" in report.detail, report
        assert any(r.detail.startswith("retrying") and "stalled" in r.detail
                   for r in device.reports), device.reports
        assert len(registry.ranges) >= 2 and registry.ranges[1].startswith("bytes=")  # resumed
        assert device.agent.slots.read("m").active_version is None and device.served() == ["1"]
        device.repository.get("m").model.check_golden()  # still answering
    finally:
        device.close()
        registry.close()


def test_the_daemon_takes_the_speed_limit_from_its_ota_table_and_flags(tmp_path, keys):
    """`[ota] speed_limit / speed_time / download_patience` in device.toml reach the agent, a
    flag overrides one, and a value of the wrong type is refused with its reason (status 2 at
    start-up). The patience was fixed at 10 minutes: a device on a link that drops for longer
    could not be given more, nor a test rig less."""
    import argparse

    from edgerun.adapters.mqtt import cli
    from edgerun.adapters.mqtt.config import load_config
    from edgerun.adapters.mqtt.daemon import Daemon
    from edgerun.adapters.ota.daemon import SPEC
    from edgerun.adapters.ota.download import SpeedLimit

    (tmp_path / "models").mkdir()
    config = tmp_path / "device.toml"
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)

    def agent_of(table: str, *flags: str) -> OtaAgent:
        config.write_text(f'repository = "{tmp_path / "models"}"\nbroker = "mqtt://127.0.0.1:1"'
                          f'\ndevice_id = "slow"\npoll_interval = 0\n[ota]\n'
                          f'trust = "{keys["pub"]}"\n{table}\n')
        args = parser.parse_args(["--config", str(config), *flags])
        loaded = load_config(config, **vars(args))
        daemon = Daemon(loaded)
        try:
            extension = SPEC.create(daemon, args, loaded.extensions["ota"])
            extension.agent.close()
            return extension.agent
        finally:
            daemon.repository.close()

    assert agent_of("").speed_limit == SpeedLimit()
    assert agent_of("speed_limit = 256\nspeed_time = 120").speed_limit == SpeedLimit(256, 120)
    assert agent_of("speed_limit = 256\nspeed_time = 120",
                    "--ota-speed-time", "30").speed_limit == SpeedLimit(256, 30)
    with pytest.raises(ValueError, match=r"\[ota\] speed_limit must be a number"):
        agent_of('speed_limit = "1k"')
    with pytest.raises(ValueError, match=r"\[ota\] speed_time must be a number of seconds "
                                         "above 0"):
        agent_of("speed_time = 0")
    assert agent_of("").download_patience == 600
    assert agent_of("download_patience = 3600").download_patience == 3600
    assert agent_of("download_patience = 3600",
                    "--ota-download-patience", "0").download_patience == 0
    for bad in ("-1", '"1h"', "true", "nan"):
        with pytest.raises(ValueError, match=r"\[ota\] download_patience must be a number of "
                                             "seconds of at least 0"):
            agent_of(f"download_patience = {bad}")
