"""The fleet end to end: registry, rollouts in waves, gates, aborts, restarts, on a real broker.

Devices are `tests.fleet_sim.SimDevice`s (real agents, repositories and data planes in threads,
each with its own data folder and paho connection) under a steady request load; the registry
and orchestrator are a real `edgerun fleet serve` process.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgerun.adapters.fleet.gate import assign_waves, check_gate, parse_gate
from edgerun.adapters.fleet.store import MIGRATIONS, Store
from edgerun.adapters.ota.download import download
from edgerun.examples import mlp_onnx
from edgerun.runtime import signing
from edgerun.runtime.bundle import GOLDEN, FileEntry, read_manifest, sha256_file, write_manifest
from edgerun.runtime.errors import BundleError, InvalidInput
from tests.cli import edgerun
from tests.fleet_sim import (Broker, FleetServer, SimDevice, SteadyLoad, infer_body, make_bundle,
                             mqtt_client, registry_downloads, wait_for)
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (the fixture)
from tests.serving import free_port

WIDTH = 8


def model(seed: int) -> bytes:
    return mlp_onnx([WIDTH, 16, 4], seed=seed)


def push_signed(orchestrator, tmp_path, keys, name: str, version: str) -> None:
    """A signed bundle of `name` `version` (another model than m's 2) into the registry."""
    from edgerun.runtime import Bundle

    folder = tmp_path / f"{name}-{version}"
    with Bundle.open(make_bundle(folder, model(3), name, version, keys["key"])) as bundle:
        archive = bundle.pack(tmp_path / f"{name}-{version}.tar.gz")
    with archive.open("rb") as stream:
        orchestrator.registry.push(stream)


@pytest.fixture
def keys(tmp_path):
    fleet_key, fleet_pub = signing.generate_keys(tmp_path / "keys")
    other_key, other_pub = signing.generate_keys(tmp_path / "other")
    return {"key": fleet_key, "pub": fleet_pub, "other_key": other_key,
            "other_pub": other_pub, "trusted": [signing.load_public_key(fleet_pub)],
            "both": [signing.load_public_key(fleet_pub), signing.load_public_key(other_pub)]}


@pytest.fixture
def broker(tmp_path):
    broker = Broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request) -> str | None:
    """The fleet database: SQLite in the data folder (None), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return fresh_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def server(tmp_path, broker, keys, fleet_db):
    extra = ["--db", fleet_db] if fleet_db else []
    server = FleetServer(tmp_path / "fleet", broker, [keys["pub"], keys["other_pub"]],
                         extra).start()
    yield server
    server.stop()


@pytest.fixture
def v1(tmp_path, keys):
    return make_bundle(tmp_path / "bundles", model(1), "m", "1", keys["key"])


@pytest.fixture
def fleet(tmp_path, broker, server, keys, v1):
    devices: list[SimDevice] = []

    def make(count: int, trusted=None, prefix="dev") -> list[SimDevice]:
        made = [SimDevice(f"{prefix}{i:02d}", tmp_path / f"{prefix}{i:02d}", broker,
                          trusted or keys["trusted"], v1).start() for i in range(count)]
        devices.extend(made)
        wait_for(lambda: {d.device_id for d in made} <= {d["device_id"] for d in
                                                         server.get("/devices")},
                 30, "devices to report")
        return made

    yield make
    for device in devices:
        device.close()


def push(server: FleetServer, bundle) -> None:
    result = edgerun("fleet", "push", str(bundle), "--server", server.url)
    assert result.returncode == 0, result.stderr


def job_states(status: dict) -> dict[str, str]:
    return {job["device_id"]: job["state"] for job in status["jobs"]}


# ----------------------------------------------------------------- pure parts
def test_gate_and_waves_arithmetic():
    conditions = parse_gate("p99<50ms,errors<1%,p50<=0.01s")
    assert [str(c) for c in conditions] == ["p99<50ms", "errors<1%", "p50<=10ms"]
    assert check_gate(conditions, {"p99_ms": 20, "p50_ms": 5, "requests": 200, "errors": 1}) == []
    assert check_gate(conditions, {"latency_ms": {"p50": 5, "p99": 80}, "requests": 10,
                                   "errors": 1}) == ["p99 80 breaks p99<50ms",
                                                     "errors 10 breaks errors<1%"]
    # counts since start: only what came after the update (the baseline) is judged
    assert check_gate(conditions[1:2], {"requests": 1100, "errors": 50},
                      {"requests": 1000, "errors": 50}) == []
    with pytest.raises(InvalidInput, match="p99<50ms"):
        parse_gate("latency<5")
    waves = assign_waves([f"d{i}" for i in range(20)], [0.05, 0.25, 1.0])
    assert [w for _, w in waves].count(0) == 1 and [w for _, w in waves].count(1) == 4
    assert len(waves) == 20 and [w for _, w in waves].count(2) == 15


def test_store_schema_is_versioned_and_portable(tmp_path):
    store = Store.sqlite(tmp_path / "fleet.db")
    store.migrate()  # idempotent
    assert store.query("SELECT version FROM schema_migrations WHERE component = 'registry'") \
        == [{"version": 1}]
    store.close()
    schema = " ".join(s for migration in MIGRATIONS for s in migration.statements).upper()
    for sqlite_only in ("AUTOINCREMENT", "INSERT OR ", "ROWID", "WITHOUT", "STRICT", "PRAGMA"):
        assert sqlite_only not in schema


def test_a_fleet_db_from_before_schema_migrations_is_adopted(tmp_path):
    store = Store.sqlite(tmp_path / "fleet.db")  # then made to look like issue 10's files
    store.execute("DELETE FROM schema_migrations WHERE component = 'registry'")
    store.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
    store.execute("INSERT INTO schema_version (version) VALUES (1)")
    store.add_version("m", "1", "0" * 64, 1, "k", "m/1.tar.gz")
    store.close()
    store = Store.sqlite(tmp_path / "fleet.db")  # no "table models already exists"
    assert store.version("m", "1")["sha256"] == "0" * 64
    assert not store.query("SELECT name FROM sqlite_master WHERE name = 'schema_version'")
    store.close()


# ------------------------------------------------------------------- registry
def test_registry_verifies_pushes_and_serves_resumable_downloads(tmp_path, server, keys):
    unsigned = make_bundle(tmp_path / "u", model(2), "m", "2", None)
    result = edgerun("fleet", "push", str(unsigned), "--server", server.url)
    assert result.returncode == 2 and "unsigned" in result.stderr
    junk = httpx.post(f"{server.url}/bundles", content=b"\0" * 600)
    assert junk.status_code == 400 and "the pushed bundle: no manifest.json" in junk.json()["error"]
    assert str(tmp_path) not in junk.text, "no path of the registry's host in the answer"
    stranger_key, _ = signing.generate_keys(tmp_path / "stranger")
    foreign = make_bundle(tmp_path / "f", model(2), "m", "2", stranger_key)
    result = edgerun("fleet", "push", str(foreign), "--server", server.url)
    assert result.returncode == 2 and "key id unknown" in result.stderr
    v2 = make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"])
    push(server, v2)
    result = edgerun("fleet", "push", str(v2), "--server", server.url)
    assert result.returncode == 0 and "already held" in result.stdout
    other = make_bundle(tmp_path / "o", model(3), "m", "2", keys["key"])
    result = edgerun("fleet", "push", str(other), "--server", server.url)
    assert result.returncode == 2 and "immutable" in result.stderr
    (held,) = server.get("/bundles")
    url = f"{server.url}/bundles/m/2"
    whole = httpx.get(url)
    assert whole.headers["etag"] == f'"{held["sha256"]}"' and len(whole.content) == held["size"]
    part = httpx.get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == whole.content[100:]
    assert part.headers["content-range"] == f"bytes 100-{held['size'] - 1}/{held['size']}"
    # a download that broke off resumes from where it stopped
    dest = tmp_path / "dl" / "m-2.tar.gz"
    dest.parent.mkdir()
    (dest.parent / "m-2.tar.gz.part").write_bytes(whole.content[:700])
    assert download(url, dest, held["sha256"], held["size"]) == held["size"] - 700
    assert dest.read_bytes() == whole.content
    # a part that does not belong to this file is caught by the sha256 and thrown away
    (dest.parent / "x.tar.gz.part").write_bytes(b"\0" * 700)
    with pytest.raises(BundleError, match="corrupt or tampered"):
        download(url, dest.parent / "x.tar.gz", held["sha256"], held["size"])
    assert not (dest.parent / "x.tar.gz.part").exists()
    # a stale part (If-Range names another ETag) gets the whole file again
    (dest.parent / "y.tar.gz.part").write_bytes(b"\0" * 700)
    request = urllib.request.Request(url, headers={"Range": "bytes=700-",
                                                   "If-Range": '"other"'})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    # a push over the limit is refused from its Content-Length, before a byte is stored
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /bundles HTTP/1.1\r\nHost: x\r\nContent-Length: 5368709120\r\n"
                    b"Content-Type: application/gzip\r\n\r\n" + b"\0" * 1024)
        answer = b""
        while b"}" not in answer and (chunk := raw.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"5368709120 bytes is over" in answer


def test_concurrent_pushes_of_one_version_leave_one_recorded_file(tmp_path, keys):
    # check, rename and insert raced: the loser overwrote the winner's file, then got a 500
    from edgerun.adapters.fleet.registry import BundleRegistry, VersionConflict
    from edgerun.runtime import Bundle

    registry = BundleRegistry(tmp_path / "fleet", Store.open(tmp_path / "fleet.db"),
                              keys["trusted"])
    for version in ("10", "11", "12"):
        archives = []
        for seed in (1, 2):
            folder = make_bundle(tmp_path / f"b{version}-{seed}", model(seed), "m", version,
                                 keys["key"])
            with Bundle.open(folder) as bundle:
                archives.append(bundle.pack(tmp_path / f"m-{version}-{seed}.tar.gz"))
        start, outcomes = threading.Barrier(2), []

        def push_one(archive):
            start.wait()
            with archive.open("rb") as stream:
                try:
                    outcomes.append(registry.push(stream)[1])
                except VersionConflict:
                    outcomes.append("conflict")

        threads = [threading.Thread(target=push_one, args=(a,)) for a in archives]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(map(str, outcomes)) == ["True", "conflict"]
        held = registry.get("m", version)
        assert sha256_file(held.path) == held.sha256, "the file is the recorded bytes"
        assert len(list((tmp_path / "fleet" / "bundles" / "m").glob(f"{version}-*"))) == 1
    registry.store.close()


def test_the_registry_refuses_a_push_that_every_device_would_refuse(tmp_path, keys):
    # the registry unpacked the whole archive and checked it as a folder, where devices unpack
    # only what the signed manifest lists: an empty folder in a hand-made tar was accepted,
    # recorded as an immutable version, and refused by every device the rollout reached
    import tarfile

    from edgerun.adapters.fleet.registry import BundleRegistry
    from edgerun.runtime import Bundle

    registry = BundleRegistry(tmp_path / "fleet", Store.open(tmp_path / "fleet.db"),
                              keys["trusted"])
    folder = make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"])
    fine, odd = tmp_path / "fine.tar.gz", tmp_path / "odd.tar.gz"
    with tarfile.open(fine, "w:gz") as tar:  # as `tar -C m-2 -czf m-2.tar.gz .` writes
        tar.add(folder, arcname=".")
    (folder / "notes").mkdir()
    with tarfile.open(odd, "w:gz") as tar:
        tar.add(folder, arcname=".")
    with pytest.raises(BundleError, match="'./notes' is a folder the signed manifest has no "
                                          "file in") as refused:
        signed = signing.verify_archive(odd, keys["trusted"])  # what a device does
        Bundle.open(odd, expected=signed.files).close()
    with odd.open("rb") as stream, pytest.raises(BundleError) as pushed:
        registry.push(stream)
    assert str(pushed.value) == str(refused.value)
    assert registry.store.version("m", "2") is None
    assert not list((tmp_path / "fleet" / "bundles").rglob("*.tar.gz")), "nothing stored"
    with fine.open("rb") as stream:
        stored, created = registry.push(stream)
    assert created and stored.version == "2"
    registry.store.close()


def test_a_push_the_registry_has_no_room_for_says_why_and_it_serves_on(tmp_path, broker, keys):
    """A push onto a full disk got a bare "500 Internal Server Error", so `fleet push` could
    not tell a full registry from a broken one. Its files may not grow past 300 kB here
    (RLIMIT_FSIZE: its write fails with EFBIG midway, where a full disk fails with ENOSPC);
    the big bundle's archive is ~380 kB, fleet.db and the small bundle stay under it."""
    import resource

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    server = FleetServer(tmp_path / "fleet", broker, [keys["pub"]], preexec=capped).start()
    try:
        big = make_bundle(tmp_path / "big", mlp_onnx([16, 4096, 8]), "m", "2", keys["key"])
        result = edgerun("fleet", "push", str(big), "--server", server.url)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().endswith(
            "/bundles: HTTP 500: the registry cannot store the pushed bundle: File too large"), \
            result.stderr
        assert str(tmp_path) not in result.stderr, "no path of the registry's host in it"
        assert not list((tmp_path / "fleet" / "bundles").iterdir()), "nothing half-written"
        push(server, make_bundle(tmp_path / "small", model(2), "m", "2", keys["key"]))
        assert [(b["model"], b["version"]) for b in server.get("/bundles")] == [("m", "2")]
    finally:
        server.stop()


def test_a_pushed_zip_whose_directory_offset_is_wrong_is_a_400_not_a_500(tmp_path, server,
                                                                         keys):
    # zipfile places every entry before byte 0 when the end record names the directory past
    # where it is; the registry's check then seeked there: OSError, a 500 for a bad upload
    from edgerun.runtime import archive

    zipped = archive.pack(make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]),
                          tmp_path / "m-2.zip")
    data = bytearray(zipped.read_bytes())
    data[data.rfind(b"PK\x05\x06") + 19] ^= 0xED  # the top byte of the directory's offset
    refused = httpx.post(f"{server.url}/bundles", content=bytes(data))
    assert refused.status_code == 400, refused.text
    assert "the pushed bundle: corrupt archive" in refused.json()["error"]
    assert server.get("/bundles") == []
    push(server, zipped)  # the archive as packed is taken
    assert [held["version"] for held in server.get("/bundles")] == ["2"]


# ------------------------------------------------------------------- rollouts
def test_canary_then_full_rollout_under_load_fails_no_request(tmp_path, server, fleet, keys):
    devices = fleet(20)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    violations, snapshots = [], []
    done = threading.Event()

    def watch() -> None:  # the canary wave must be active before wave 2 is published
        while not done.is_set():
            status = server.get("/rollouts")
            for rollout in status["rollouts"]:
                detail = server.get(f"/rollouts/{rollout['id']}")
                canary = [j for j in detail["jobs"] if j["wave"] == 0]
                rest = [j for j in detail["jobs"] if j["wave"] == 1]
                snapshots.append((len(canary), any(j["state"] != "pending" for j in canary),
                                  all(j["state"] == "pending" for j in rest)))
                if any(j["state"] != "pending" for j in rest) and \
                        any(j["state"] != "active" for j in canary):
                    violations.append(detail)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    with SteadyLoad(devices, infer_body(WIDTH)) as load:
        watcher.start()
        result = edgerun("fleet", "deploy", "m:2", "--server", server.url, "--group", "fleet",
                         "--waves", "10%,100%", "--gate", "p99<2000ms,errors<1%", "--wait")
        time.sleep(0.5)  # traffic after the switch, too
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout
    assert not violations
    # the canary (2 of 20) was seen updating while the other 18 waited
    assert any(size == 2 and started and waiting for size, started, waiting in snapshots)
    assert load.total > 200 and load.failures == []
    assert all(d.served("m") == ["2"] for d in devices)
    result = edgerun("fleet", "status", "--server", server.url, "--json")
    (rollout,) = json.loads(result.stdout)["rollouts"]
    assert rollout["state"] == "completed" and rollout["counts"] == {"active": 20}
    result = edgerun("fleet", "status", rollout["id"], "--server", server.url)
    assert result.returncode == 0 and "20/20" in result.stdout
    result = edgerun("fleet", "status", "--server", server.url)
    assert result.returncode == 0 and "completed" in result.stdout
    assert all(d.device_id in result.stdout for d in devices)


def test_fleet_status_shows_what_devices_say_as_text(broker, server):
    """A device's status is its own to write: a group or state that reads as console markup
    ("[/x]") or models of another shape ended `fleet status` with a traceback, for every
    device of the fleet; markup that did parse restyled the table."""
    device = mqtt_client("odd")
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        for name, status in (("odd", {"state": "[/x]", "group": "[/lab]",
                                      "models": {"m": ["[bold]1"]}}),
                             ("odder", {"state": "online", "models": ["m"]}),
                             ("oddest", {"state": "online", "models": {"m": [1, None]}})):
            device.publish(f"edgerun/{name}/status", json.dumps(status), qos=1,
                           retain=True).wait_for_publish(10)
        wait_for(lambda: len(server.get("/devices")) == 3, 30, "the statuses")
    finally:
        device.loop_stop()
        device.disconnect()
    result = edgerun("fleet", "status", "--server", server.url)
    assert result.returncode == 0, result.stderr
    for text in ("[/x]", "[/lab]", "m [bold]1", "odder", "m 1,None"):
        assert text in result.stdout, result.stdout


def test_telemetry_nested_past_what_a_reader_can_parse_is_ignored(broker, server):
    """Python parses JSON recursively, as deep as the reader's stack allows: telemetry one
    device nested ~990 deep was parsed and stored by the server's MQTT thread, after which
    every read of the devices (GET /devices, `fleet status`, the gate of every rollout) was a
    RecursionError, a 500 for the whole fleet. Such a message is ignored, with a warning."""
    device = mqtt_client("rogue")
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        for depth in range(940, 1000, 4):  # a window: where it falls depends on the stacks
            nested = "[" * depth + "]" * depth
            device.publish("edgerun/rogue/telemetry", f'{{"requests": 1, "x": {nested}}}',
                           qos=1).wait_for_publish(10)
        device.publish("edgerun/honest/telemetry", json.dumps({"requests": 2}),
                       qos=1).wait_for_publish(10)
        wait_for(lambda: (answer := httpx.get(server.url + "/devices", timeout=10))
                 .status_code != 200 or answer.json(), 30, "the telemetry")
    finally:
        device.loop_stop()
        device.disconnect()
    answer = httpx.get(server.url + "/devices", timeout=10)
    assert answer.status_code == 200, answer.text
    assert [(d["device_id"], d["telemetry"]) for d in answer.json()] == \
        [("honest", {"requests": 2})]
    assert "nested deeper than 32 levels" in (server.data / "server.log").read_text()


def smoke_failing(tmp_path, keys, version: str):
    """A validly signed bundle whose golden output is wrong: it fails its smoke test."""
    folder = make_bundle(tmp_path / "s", model(5), "m", version, None)
    with np.load(folder / GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["output_0"] = arrays["output_0"] + 1.0
    np.savez(folder / GOLDEN, **arrays)
    manifest = read_manifest(folder)
    files = {**manifest.files, GOLDEN: FileEntry(sha256_file(folder / GOLDEN),
                                                 (folder / GOLDEN).stat().st_size)}
    write_manifest(folder, type(manifest)(**{**manifest.__dict__, "files": files}))
    signing.sign_folder(folder, keys["key"])
    return folder


def test_bad_updates_are_refused_reported_and_the_old_model_serves(tmp_path, server, fleet,
                                                                   keys, v1):
    devices = fleet(4)
    push(server, v1)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    push(server, make_bundle(tmp_path / "b", model(3), "m", "3", keys["key"]))
    push(server, make_bundle(tmp_path / "b", model(4), "m", "4", keys["other_key"]))
    push(server, smoke_failing(tmp_path, keys, "5"))
    (stored,) = (tmp_path / "fleet" / "bundles" / "m").glob("3-*.tar.gz")  # bit rot on disk
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    def deploy(version: str, device: SimDevice) -> dict:
        status = server.deploy(model="m", version=version, devices=[device.device_id],
                               max_failures=1.0)
        return server.wait_rollout(status["id"])

    with SteadyLoad(devices, infer_body(WIDTH)) as load:
        assert job_states(deploy("2", devices[3])) == {"dev03": "active"}
        cases = {"3": (devices[0], "corrupt or tampered"),
                 "4": (devices[1], "key id unknown"),
                 "5": (devices[2], "smoke test failed, still serving version 1"),
                 "1": (devices[3], "older than the active 2")}
        for version, (device, reason) in cases.items():
            status = deploy(version, device)
            (job,) = status["jobs"]
            assert status["state"] == "completed" and job["state"] == "failed", status
            assert reason in job["detail"]
    assert load.failures == []
    assert [d.served("m") for d in devices] == [["1"], ["1"], ["1"], ["2"]]


def test_failures_over_the_threshold_abort_and_roll_back(tmp_path, server, fleet, keys):
    updated = fleet(3, trusted=keys["both"], prefix="a")
    refusing = fleet(3, prefix="b")  # trust only the fleet key
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["other_key"]))
    with SteadyLoad(updated + refusing, infer_body(WIDTH)) as load:
        status = server.deploy(model="m", version="2", devices=[
            d.device_id for d in updated + refusing], waves=[0.5, 1.0], max_failures=0.2)
        status = server.wait_rollout(status["id"])
    assert status["state"] == "aborted" and "over max-failures 20%" in status["reason"]
    states = job_states(status)
    jobs = {j["device_id"]: (j["state"], j.get("kind"), j.get("detail")) for j in status["jobs"]}
    # as text: pytest cuts a dict's repr short, and the detail is what names the cause
    assert [states[d.device_id] for d in updated] == ["rolled_back"] * 3, json.dumps(jobs)
    # the abort may catch the last refusing device mid-job: it then gets a rollback too; or
    # before its first report: its job is withdrawn (cancelled) and its download refused
    refused = [states[d.device_id] for d in refusing]
    assert refused.count("failed") >= 2, json.dumps(jobs)
    assert set(refused) <= {"failed", "rolled_back", "cancelled"}, json.dumps(jobs)
    assert all(d.served("m") == ["1"] for d in updated + refusing)
    assert load.failures == []


def test_a_failing_health_gate_aborts_and_rolls_back(tmp_path, server, fleet, keys):
    devices = fleet(4)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    with SteadyLoad(devices, infer_body(WIDTH)) as load:
        status = server.deploy(model="m", version="2", group="fleet", waves=[0.5, 1.0],
                               gate="p99<0.0001ms", gate_timeout=1.0)
        status = server.wait_rollout(status["id"])
        assert status["state"] == "aborted" and "health gate failed" in status["reason"]
        assert sorted(job_states(status).values()) == ["cancelled", "cancelled",
                                                       "rolled_back", "rolled_back"]
        assert all(d.served("m") == ["1"] for d in devices)
        # the operator stops a rollout that waits at its gate
        push(server, make_bundle(tmp_path / "b", model(3), "m", "3", keys["key"]))
        status = server.deploy(model="m", version="3", group="fleet", waves=[0.5, 1.0],
                               gate="p99<0.0001ms", gate_timeout=600)
        wait_for(lambda: "active" in job_states(server.get(f"/rollouts/{status['id']}"))
                 .values(), 30, "the first wave")
        result = edgerun("fleet", "abort", status["id"], "--server", server.url)
        assert result.returncode == 0 and "aborted by the operator" in result.stdout
        status = server.wait_rollout(status["id"])
    assert status["state"] == "aborted" and "rolled_back" in job_states(status).values()
    assert all(d.served("m") == ["1"] for d in devices) and load.failures == []


def test_offline_device_broker_restart_and_orchestrator_restart(tmp_path, broker, server,
                                                                fleet, keys):
    devices = fleet(6)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    late, gone = devices[4], devices[5]
    late.go_offline()
    gone.go_offline()
    online = devices[:4]
    with SteadyLoad(online, infer_body(WIDTH)) as load:
        status = server.deploy(model="m", version="2", group="fleet", waves=[0.5, 1.0],
                               max_failures=0.2, job_timeout=25)
        wait_for(lambda: job_states(server.get(f"/rollouts/{status['id']}"))["dev00"]
                 == "active", 30, "the first wave")
        server.kill()           # kill -9 of the orchestrator mid-rollout
        broker.stop()           # and the broker
        broker.start()
        server.start()
        late.come_back()        # the offline device returns: its retained job is waiting
        final = server.wait_rollout(status["id"], timeout=60)
    states = job_states(final)
    assert final["state"] == "completed", final
    assert states.pop("dev05") == "failed" and "timed out" in [
        j for j in final["jobs"] if j["device_id"] == "dev05"][0]["detail"]
    assert set(states.values()) == {"active"}
    assert all(d.served("m") == ["2"] for d in devices[:5]) and gone.served("m") == ["1"]
    assert load.failures == []


def test_a_device_offline_through_its_rollback_rolls_back_when_it_returns(
        tmp_path, server, fleet, keys):
    """dev00 took m:2, then went offline; the operator rolled the rollout back. Its rollback
    job timed out (the rollout then ends, aborted) and was cleared from the broker with it:
    dev00 came back to no job and served the version the operator rolled back, for good (an
    aborted rollout cannot be rolled back again, and an install of m:1 is refused as older)."""
    devices = fleet(2)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    away, other = devices
    status = server.deploy(model="m", version="2", devices=[away.device_id], job_timeout=20)
    wait_for(lambda: away.served("m") == ["2"], 30, "the install")
    assert server.wait_rollout(status["id"])["state"] == "completed"
    away.go_offline()
    answer = httpx.post(f"{server.url}/rollouts/{status['id']}/rollback", timeout=30)
    assert answer.status_code == 200, answer.text
    final = server.wait_rollout(status["id"], ("aborted",), timeout=60)  # it timed out
    assert "timed out" in final["jobs"][0]["detail"], final
    away.come_back()
    wait_for(lambda: away.served("m") == ["1"], 30, "the rollback once the device is back")
    (job,) = wait_for(lambda: [j for j in server.get(f"/rollouts/{status['id']}")["jobs"]
                               if j["state"] == "rolled_back"], 30, "its report")
    assert (job["device_id"], job["kind"]) == (away.device_id, "rollback")
    assert other.served("m") == ["1"]


def test_a_rollback_waits_for_another_rollouts_job_the_device_has_not_picked_up(
        tmp_path, broker, server, fleet, keys):
    """dev00 took m:2 (rollout A), went offline, and rollout B sent it n:1. Rolling A back
    replaced B's job on the device's one retained job topic: dev00 came back to the rollback
    alone, and B's job sat queued, reported as under way, until it timed out and failed B.
    A's rollback now waits for B's job to end, and both reach the device."""
    from tests.mqtt import read_retained

    (device,) = fleet(1)
    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    push(server, make_bundle(tmp_path / "n", model(3), "n", "1", keys["key"]))
    first = server.deploy(model="m", version="2", devices=[device.device_id])
    assert server.wait_rollout(first["id"])["state"] == "completed"
    device.go_offline()
    second = server.deploy(model="n", version="1", devices=[device.device_id])
    assert job_states(second) == {device.device_id: "queued"}
    answer = httpx.post(f"{server.url}/rollouts/{first['id']}/rollback", timeout=30)
    assert answer.status_code == 200, answer.text
    (waiting,) = answer.json()["jobs"]
    assert (waiting["kind"], waiting["state"]) == ("install", "active"), waiting
    assert f"waits for rollout {second['id']}" in waiting["detail"], waiting
    job = read_retained(broker, f"edgerun/{device.device_id}/ota")
    assert job is not None and job["rollout"] == second["id"], job  # B's job is still there
    device.come_back()
    assert server.wait_rollout(second["id"], timeout=60)["state"] == "completed"
    final = server.wait_rollout(first["id"], ("aborted",), timeout=60)
    assert [(j["kind"], j["state"]) for j in final["jobs"]] == [("rollback", "rolled_back")]
    assert device.served("m") == ["1"] and device.served("n") == ["1"]


def test_a_stored_job_no_topic_can_hold_fails_and_the_fleet_goes_on(tmp_path, broker, keys,
                                                                    v1):
    """A store written before device ids were checked can hold a job under way to an id no MQTT
    topic can hold. Every (re)connect republished it: at a NUL or control character Mosquitto
    dropped the fleet's connection, at a wildcard paho refused it and the republish stopped
    there; no device was heard, no rollout moved, for good. Such a job now fails, its detail
    naming why, and the fleet goes on."""
    data = tmp_path / "fleet"
    data.mkdir()
    store = Store.sqlite(data / "fleet.db")
    spec = {"waves": [1.0], "max_failures": 0.0, "gate": "", "gate_conditions": [],
            "job_timeout": 3600.0, "gate_timeout": 300.0, "group": None, "sha256": "",
            "size": 0, "wave_done_at": None}
    poisoned = {"old-nul": "dev\x00a", "old-ctl": "dev\x85", "old-plus": "+"}
    for rollout_id in poisoned:
        store.add_rollout(rollout_id, "m", "0", spec, [("stand-in", 0)])
        store.update_rollout(rollout_id, wave=0)
        store.update_job(rollout_id, "stand-in", state="queued", deadline=store.now() + 3600)
    store.close()
    with sqlite3.connect(data / "fleet.db") as raw:  # as the registry stored them then
        for rollout_id, device_id in poisoned.items():
            raw.execute("UPDATE jobs SET device_id = ?, job_id = ? WHERE rollout_id = ?",
                        (device_id, f"{rollout_id}.{device_id}.install", rollout_id))
    server = FleetServer(data, broker, [keys["pub"]]).start()
    device = SimDevice("dev00", tmp_path / "dev00", broker, keys["trusted"], v1).start()
    try:
        push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
        status = server.deploy(model="m", version="2", devices=[device.device_id])
        assert server.wait_rollout(status["id"], timeout=60)["state"] == "completed"
        assert device.served("m") == ["2"]
        for rollout_id, device_id in poisoned.items():
            (job,) = server.get(f"/rollouts/{rollout_id}")["jobs"]
            assert job["state"] == "failed", job
            assert f"device id {device_id!r}" in job["detail"], job
            assert "no MQTT topic" in job["detail"], job
            # as any failed device, over max-failures 0 %: their rollouts end
            assert server.wait_rollout(rollout_id, timeout=30)["state"] == "aborted"
    finally:
        device.close()
        server.stop()
    assert "Traceback" not in (data / "server.log").read_text()


def test_rollout_to_real_daemons_and_kill_9_of_one(tmp_path, broker, server, keys, v1):
    """`edgerun daemon --trust --group` processes: the agent wired into the real daemon."""
    from tests.mqtt import DaemonProcess, daemon_command, read_retained

    push(server, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
    daemons = []
    for i in range(2):
        repo = tmp_path / f"daemon{i}" / "models"
        shutil.copytree(v1, repo / "m" / "1")
        command = daemon_command(repo, broker, f"pi{i}", "--group", "field", "--trust",
                                 str(keys["pub"]), "--telemetry-interval", "0.5")
        daemons.append(DaemonProcess(command, tmp_path / f"daemon{i}.log").start())
    try:
        wait_for(lambda: {"pi0", "pi1"} <= {d["device_id"] for d in server.get("/devices")
                                            if d["grp"] == "field"}, 60, "daemons online")
        result = edgerun("fleet", "deploy", "m:2", "--server", server.url, "--group", "field",
                         "--waves", "50%,100%", "--gate", "p99<1000ms,errors<1%", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr + daemons[0].output()
        for i in range(2):
            status = wait_for(lambda: (s := read_retained(broker, f"edgerun/pi{i}/status"))
                              and s["models"] == {"m": ["2"]} and s, 30, "status with v2")
            assert status["group"] == "field" and status["ota"]["m"] == {"active": "2",
                                                                         "previous": None}
        daemons[0].kill()  # kill -9, then the same daemon again: it recovers to version 2
        daemons[0].start()
        status = wait_for(lambda: (s := read_retained(broker, "edgerun/pi0/status"))
                          and s["state"] == "online" and s["models"] == {"m": ["2"]} and s,
                          60, "restarted daemon serving v2")
        assert status["ota"]["m"]["active"] == "2"
    finally:
        for daemon in daemons:
            daemon.kill()


def test_readme_fleet_example_runs(tmp_path):
    """The README's OTA example, as written, on free ports (its pip line is CI's job), over
    the demo/ folder its Bundles section makes."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.serving import free_port

    from edgerun.runtime import create_bundle
    from tests.test_mqtt import digits_like_onnx

    (tmp_path / "demo").mkdir()  # what `edgerun demo --workdir demo` leaves, minus a minute
    (tmp_path / "demo" / "digits.onnx").write_bytes(digits_like_onnx())
    create_bundle(tmp_path / "demo" / "digits.onnx", tmp_path / "demo" / "digits",
                  name="digits", version="1")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S)
                if "fleet deploy" in b]
    script = "\n".join(line for line in block.splitlines() if "/pip " not in line)
    script = script.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    script = script.replace("1883", str(free_port())).replace("8700", str(free_port()))
    result = subprocess.run(["bash", "-ec", script + "\nwait\n"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240,
                            env={"PATH": "/usr/sbin:/usr/bin:/bin", "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted digits version 2" in result.stdout
    assert "completed: 1 of 1 devices active" in result.stdout
    state = json.loads((tmp_path / "pi" / "models" / ".edgerun" / "ota" / "digits" /
                        "state.json").read_text())
    assert state["slots"][state["active"]] == "2"


def make_orchestrator(tmp_path, keys, fleet_db, leader=None, push_bundle: bool = True):
    """An orchestrator over a store and registry holding m:2, publishing into a list."""
    from edgerun.adapters.fleet.orchestrator import Orchestrator
    from edgerun.adapters.fleet.registry import BundleRegistry
    from edgerun.runtime import Bundle

    store = Store.open(fleet_db or tmp_path / "fleet.db")
    registry = BundleRegistry(tmp_path, store, keys["trusted"])
    if push_bundle:
        with Bundle.open(make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"])) as bundle:
            archive = bundle.pack(tmp_path / "m-2.tar.gz")
        with archive.open("rb") as stream:
            registry.push(stream)
    sent: list[tuple[str, bytes, bool]] = []
    orchestrator = Orchestrator(store, registry, "http://registry", leader=leader,
                                publish=lambda *message: sent.append(message))
    orchestrator.sent = sent
    for device in ("a", "b"):
        orchestrator.on_message(f"edgerun/{device}/status",
                                json.dumps({"state": "online", "group": "g"}).encode())
    return orchestrator


@pytest.fixture
def orchestrator(tmp_path, keys, fleet_db):
    orchestrator = make_orchestrator(tmp_path, keys, fleet_db)
    yield orchestrator
    orchestrator.store.close()


def test_orchestrator_takes_back_a_withdrawn_job_the_device_had_picked_up(orchestrator):
    """An abort withdraws jobs no device has reported on; a late report past the download (one
    under way may finish: the registry refuses only new ones) brings a rollback."""
    from edgerun.adapters.ota.messages import Job, Report

    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", group="g")
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    published = Job.decode(sent[-1][1])
    assert published.url == "http://registry/bundles/m/2" and sent[-1][2] is True
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "failed", "m", "2", "1").encode())
    orchestrator.tick()  # what the ticker thread does every 0.25 s
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and job_states(status) == {"a": "failed",
                                                                   "b": "cancelled"}
    assert sent[-1] == ("edgerun/b/ota", b"", True)  # withdrawn
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "downloading", "m", "2", "1").encode())
    assert sent[-1] == ("edgerun/b/ota", b"", True)  # its download is refused from now on
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "staged", "m", "2", "1").encode())
    rollback = Job.decode(sent[-1][1])
    assert (rollback.kind, rollback.version, sent[-1][0]) == ("rollback", "1", "edgerun/b/ota")
    assert orchestrator.status(rollout["id"])["state"] == "rolling_back"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(rollback.job_id, "b", "rolled_back", "m", "1", "2").encode())
    orchestrator.tick()
    assert orchestrator.status(rollout["id"])["state"] == "aborted"


def test_a_report_in_no_state_of_the_agents_is_ignored(orchestrator):
    """A device's report names its job's state; one the agent never sends must not become the
    job's. "pending" made the orchestrator start the job again, a fresh deadline each time, so
    one device (buggy, or taken over) held every rollout it was in, and each wave behind it,
    for good; "cancelled" ended its job as if the fleet had withdrawn it, out of the count of
    failures."""
    from edgerun.adapters.ota.messages import Report

    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", group="g")
    jobs = {job["device_id"]: job for job in rollout["jobs"]}
    published = len(sent)
    for state in ("pending", "cancelled", "hacked", 7):
        orchestrator.on_message("edgerun/a/ota/report", json.dumps(
            {**Report(jobs["a"]["job_id"], "a", "x", "m", "2", "1").__dict__,
             "state": state}).encode())
        orchestrator.tick()
        job = {j["device_id"]: j for j in orchestrator.status(rollout["id"])["jobs"]}["a"]
        assert (job["state"], job["deadline"]) == ("queued", jobs["a"]["deadline"]), state
        assert len(sent) == published, state  # the job was not sent again
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(jobs["a"]["job_id"], "a", "downloading", "m", "2",
                                   "1").encode())
    assert job_states(orchestrator.status(rollout["id"]))["a"] == "downloading"


@pytest.mark.parametrize("field", ["job_id", "device", "state", "model", "version", "previous",
                                   "active"])
def test_a_report_whose_fields_are_no_strings_is_ignored_in_one_line(orchestrator, caplog,
                                                                    field):
    """A job id that was a table or a list reached the database's lookup, whose binding error
    was logged as a message the orchestrator failed to handle, with a traceback; a report is
    malformed, and said so in one line, like any other."""
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g")
    job_id = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}["a"]
    good = Report(job_id, "a", "downloading", "m", "2", "1")
    for value in ({"$ne": ""}, [job_id], 7, 1.5, True):
        orchestrator.on_message("edgerun/a/ota/report",
                                json.dumps({**good.__dict__, field: value}).encode())
    assert "failed to handle" not in caplog.text and "Traceback" not in caplog.text
    assert caplog.text.count("ignored a malformed message on edgerun/a/ota/report") == 5
    assert f"{field} " in caplog.text, caplog.text
    assert job_states(orchestrator.status(rollout["id"]))["a"] == "queued"
    orchestrator.on_message("edgerun/a/ota/report", good.encode())
    assert job_states(orchestrator.status(rollout["id"]))["a"] == "downloading"


def test_a_device_that_served_no_version_before_is_rolled_back_to_none(orchestrator):
    """b ran no version of m before the rollout (its reports say previous None). Rolling the
    completed rollout back takes m:2 off b with a rollback to no version: its active job was
    marked "withdrawn before the device picked it up", b kept m:2, and the fleet no longer
    counted b's job as sent, so later rollbacks to m:2 offered b no download of it."""
    from edgerun.adapters.ota.messages import Job, Report

    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", group="g")
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "active", "m", "2", "1").encode())
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "active", "m", "2", None).encode())
    orchestrator.tick()
    assert orchestrator.status(rollout["id"])["state"] == "completed"
    orchestrator.rollback(rollout["id"])
    to_b = [Job.decode(payload) for topic, payload, _ in sent
            if topic == "edgerun/b/ota" and payload]
    assert (to_b[-1].kind, to_b[-1].version, to_b[-1].url) == ("rollback", "", "")
    job_b = next(j for j in orchestrator.status(rollout["id"])["jobs"] if j["device_id"] == "b")
    assert (job_b["state"], job_b["kind"]) == ("queued", "rollback")
    assert "to no version" in job_b["detail"]
    assert orchestrator.store.device_has_job("b", "m", "2")  # sent it, never withdrawn
    orchestrator.on_message("edgerun/b/ota/report", Report(
        to_b[-1].job_id, "b", "rolled_back", "m", "", "2").encode())
    orchestrator.on_message("edgerun/a/ota/report", Report(
        f"{rollout['id']}.a.rollback", "a", "rolled_back", "m", "1", "2").encode())
    orchestrator.tick()
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and job_states(status) == {"a": "rolled_back",
                                                                   "b": "rolled_back"}


def test_a_withdrawn_job_a_device_with_no_version_went_on_with_is_taken_back(orchestrator):
    """As for any device, but b served no version before: its late report past the download
    (previous None) was ignored, and b kept serving the version the abort stopped."""
    from edgerun.adapters.ota.messages import Job, Report

    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", group="g")
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "failed", "m", "2", "1").encode())
    orchestrator.tick()
    assert job_states(orchestrator.status(rollout["id"]))["b"] == "cancelled"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "downloading", "m", "2", None).encode())
    assert sent[-1] == ("edgerun/b/ota", b"", True)  # its download is refused: nothing more
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "active", "m", "2", None).encode())
    rollback = Job.decode(sent[-1][1])
    assert (sent[-1][0], rollback.kind, rollback.version) == ("edgerun/b/ota", "rollback", "")
    assert orchestrator.status(rollout["id"])["state"] == "rolling_back"


def test_a_device_that_finishes_after_its_job_timed_out_is_rolled_back(orchestrator):
    """The orchestrator gave up on b and aborted; b went on and installed: it must not be left
    serving the version the rollout withdrew."""
    from edgerun.adapters.ota.messages import Job, Report

    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", group="g", job_timeout=0.2)
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "active", "m", "2", "1").encode())
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "downloading", "m", "2", "1").encode())
    time.sleep(0.3)
    orchestrator.tick()  # b timed out: over max-failures 0 %, the rollout rolls back
    assert orchestrator.status(rollout["id"])["state"] == "rolling_back"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "active", "m", "2", "1").encode())
    rollback = Job.decode(sent[-1][1])
    assert (sent[-1][0], rollback.kind, rollback.version) == ("edgerun/b/ota", "rollback", "1")
    status = orchestrator.status(rollout["id"])
    assert job_states(status)["b"] == "queued" and status["state"] == "rolling_back"


def test_a_late_devices_rollback_that_times_out_is_not_taken_for_a_withdrawn_install(
        orchestrator):
    """b's install timed out unreported and the abort withdrew it; b then said it had
    installed m:2 and was sent a rollback, which timed out too. That rollback job is no
    install never reported on: it stays failed, and b's job still counts as sent."""
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g", job_timeout=0.2)
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "active", "m", "2", "1").encode())
    time.sleep(0.3)
    orchestrator.tick()
    assert job_states(orchestrator.status(rollout["id"]))["b"] == "cancelled"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "active", "m", "2", "1").encode())
    time.sleep(0.3)
    orchestrator.tick()  # b's rollback timed out
    orchestrator.tick()
    job_b = next(j for j in orchestrator.status(rollout["id"])["jobs"] if j["device_id"] == "b")
    assert (job_b["kind"], job_b["state"], job_b["detail"]) == (
        "rollback", "failed", "timed out in state queued"), job_b
    assert job_b["previous_version"] == "1"
    assert orchestrator.store.device_has_job("b", "m", "2")


def test_max_failures_is_a_share_of_the_devices_reached_so_far(orchestrator):
    """Both devices of the first wave failed, 100 % of those tried, over max-failures 30 %;
    counted against all ten the rollout's 20 % was within it, and the next wave went to the
    other eight: the first wave guarded nothing."""
    from edgerun.adapters.ota.messages import Report

    devices = [f"d{i}" for i in range(10)]
    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", devices=devices, waves=[0.2, 1.0], max_failures=0.3)
    first = [job for job in rollout["jobs"] if job["state"] == "queued"]
    assert [job["device_id"] for job in first] == ["d0", "d1"]
    for job in first:
        orchestrator.on_message(f"edgerun/{job['device_id']}/ota/report", Report(
            job["job_id"], job["device_id"], "failed", "m", "2", "1",
            detail="smoke test failed").encode())
        orchestrator.tick()
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "aborted", status
    assert "of 2 devices failed, over max-failures 30%" in status["reason"]
    assert {job_states(status)[device] for device in devices[2:]} == {"cancelled"}
    assert {topic for topic, payload, _ in sent if payload} == {"edgerun/d0/ota",
                                                                "edgerun/d1/ota"}


def test_a_rollback_that_timed_out_stays_for_the_device_and_its_late_end_counts(
        orchestrator, tmp_path, keys):
    """A rollback job that times out is left on the broker for its device (offline, say), and
    the end it reports later is recorded; that report clears no job another rollout has sent
    the device since."""
    from edgerun.adapters.ota.messages import Job, Report

    push_signed(orchestrator, tmp_path, keys, "n", "1")
    sent = orchestrator.sent
    rollout = orchestrator.deploy("m", "2", devices=["a"], job_timeout=0.2)
    orchestrator.on_message("edgerun/a/ota/report", Report(
        rollout["jobs"][0]["job_id"], "a", "active", "m", "2", "1").encode())
    orchestrator.rollback(rollout["id"])
    rollback = Job.decode(sent[-1][1])
    assert (sent[-1][0], rollback.kind, rollback.version) == ("edgerun/a/ota", "rollback", "1")
    time.sleep(0.3)
    orchestrator.tick()  # the rollback timed out: the rollout ends, the job stays for a
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and "timed out" in status["jobs"][0]["detail"]
    assert sent[-1][1] == rollback.encode()
    newer = orchestrator.deploy("n", "1", devices=["a"])  # a is free for the next rollout
    assert job_states(newer) == {"a": "queued"} and Job.decode(sent[-1][1]).model == "n"
    orchestrator.on_message("edgerun/a/ota/report", Report(
        rollback.job_id, "a", "rolled_back", "m", "1", "2").encode())
    assert job_states(orchestrator.status(rollout["id"])) == {"a": "rolled_back"}
    assert Job.decode(sent[-1][1]).model == "n"  # n's job is not cleared from the broker


def test_a_job_that_timed_out_counts_again_when_the_device_finishes_it(orchestrator):
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g", job_timeout=0.2, max_failures=0.5)
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "active", "m", "2", "1").encode())
    time.sleep(0.3)
    orchestrator.tick()  # b timed out; one failure in two is within max-failures 50 %
    assert job_states(orchestrator.status(rollout["id"]))["b"] == "failed"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "active", "m", "2", "1").encode())
    status = orchestrator.status(rollout["id"])
    assert job_states(status) == {"a": "active", "b": "active"}
    assert status["state"] == "completed"


def test_a_rollout_spec_a_tick_could_not_follow_is_refused_and_stores_nothing(orchestrator):
    """A rollout API call's fields go to the store as sent: one that a tick could not read
    (a string timeout) stopped every tick for good, so every rollout; others (waves that
    end short of 100 %) left devices out of a rollout that then said it completed."""
    bad = {"job_timeout": "600", "gate_timeout": -1, "max_failures": float("nan"),
           "waves": [0.5], "devices": "a", "group": ["g"], "gate": 5}
    for field, value in bad.items():
        spec = {"group": "g", field: value}
        with pytest.raises(InvalidInput, match=field):
            orchestrator.deploy("m", "2", **spec)
    for waves in ([0.5, 0.25, 1.0], [0, 1.0], [True], "100%", [float("inf")]):
        with pytest.raises(InvalidInput, match="waves"):
            orchestrator.deploy("m", "2", group="g", waves=waves)
    assert orchestrator.status()["rollouts"] == []
    orchestrator.tick()
    rollout = orchestrator.deploy("m", "2", group="g", waves=[0.5, 1], max_failures=1,
                                  job_timeout=5)
    assert job_states(rollout) == {"a": "queued", "b": "pending"}


def test_a_rollout_that_cannot_move_holds_no_other(orchestrator, caplog):
    """A stored rollout a tick cannot follow (written by an older edgerun, say) is logged and
    its step undone; the other rollouts go on."""
    spec = {"waves": [1.0], "max_failures": 0.0, "gate": "", "gate_conditions": [],
            "job_timeout": "600", "gate_timeout": 300, "group": "g", "wave_done_at": None}
    orchestrator.store.add_rollout("broken", "m", "2", spec, [("a", 0)])
    rollout = orchestrator.deploy("m", "2", devices=["b"])
    assert job_states(rollout) == {"b": "queued"}
    assert [topic for topic, _, _ in orchestrator.sent] == ["edgerun/b/ota"]
    assert "rollout broken: this step failed and was undone" in caplog.text
    broken = orchestrator.status("broken")
    assert broken["state"] == "running" and job_states(broken) == {"a": "pending"}


def test_malformed_device_messages_are_ignored(orchestrator, caplog):
    """Any device may publish on its own topics: nothing it sends may stop the orchestrator."""
    for topic, payload in (("edgerun/a/ota/report", b"[]"),
                           ("edgerun/a/status", b'{"state": "online", "group": ["x"]}'),
                           ("edgerun/a/telemetry", b'{"group": {"x": 1}}')):
        orchestrator.on_message(topic, payload)  # must not raise into paho's thread
    orchestrator.on_message("edgerun/c/status", b'{"state": "online", "group": "g"}')
    assert [d["device_id"] for d in orchestrator.store.devices("g")] == ["a", "b", "c"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=10) | st.sampled_from([10 ** 400, "active", "failed", "1", "g"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["job_id", "state", "previous", "requests", "errors", "p99_ms",
                         "latency_ms", "group", "extra", "detail"]) | st.text(max_size=5),
        inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ota/report", "status", "telemetry"]),
       payload=_JSON.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=40)
       | st.integers(30, 3000).map(lambda depth: b"[" * depth + b"]" * depth))
@example(kind="telemetry", payload=b'{"requests": 1' + b"0" * 400 + b', "errors": 0}')
@example(kind="telemetry", payload=b'{"requests": 5, "errors": 0, "p99_ms": [1]}')
def test_any_device_message_is_ignored_or_recorded_and_the_gate_reads_it(orchestrator, kind,
                                                                         payload):
    """Whatever a device publishes on its topics, the orchestrator neither raises into paho's
    thread nor stores what a later read or a tick cannot take."""
    orchestrator.on_message(f"edgerun/a/{kind}", payload)
    orchestrator.store.devices()
    telemetry = (orchestrator.store.device("a") or {}).get("telemetry") or {}
    check_gate(parse_gate("p99<50ms,errors<1%"), telemetry, telemetry)


def test_a_report_whose_previous_is_no_version_stalls_no_rollback(orchestrator, caplog):
    """A report's `previous` became the version of the device's rollback job: one that is no
    bundle version made every tick's step for the rollout fail and be undone, so the rollout
    neither aborted nor rolled any other device back, for good."""
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g")
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_ids["a"], "a", "active", "m", "2", "../1").encode())
    assert "ignored a malformed message on edgerun/a/ota/report" in caplog.text
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(job_ids["b"], "b", "failed", "m", "2", "1").encode())
    orchestrator.tick()
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "aborted" and job_states(status) == {"a": "cancelled",
                                                                   "b": "failed"}
    assert "this step failed" not in caplog.text


@pytest.mark.parametrize("at_update, later, state", [
    # counts past any float: no count at all, so the gate fails and the rollout aborts
    ({"requests": 0, "errors": 0}, f'{{"requests": 1{"0" * 400}, "errors": 0}}', "aborted"),
    # a count that was no number when the device went active: no baseline, the rest counts
    ({"requests": "lots", "errors": [1]}, '{"requests": 100, "errors": 0}', "running"),
], ids=["a count past any float", "a baseline that is no number"])
def test_telemetry_whose_counts_are_no_numbers_stalls_no_rollout(orchestrator, caplog, at_update,
                                                                  later, state):
    """A device publishes what it likes: a 400-digit count (OverflowError) or a count that
    was a string when its update ended (kept as the gate's baseline: ValueError) failed the
    gate, so every tick's step for the rollout, for good: it neither went on to the next wave
    nor aborted at the gate timeout."""
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g", waves=[0.5, 1.0], gate="errors<1%",
                                  gate_timeout=0.001)
    assert job_states(rollout) == {"a": "queued", "b": "pending"}
    orchestrator.on_message("edgerun/a/telemetry", json.dumps(at_update).encode())
    orchestrator.on_message("edgerun/a/ota/report", Report(
        f"{rollout['id']}.a.install", "a", "active", "m", "2", "1").encode())
    orchestrator.on_message("edgerun/a/telemetry", later.encode())
    orchestrator.tick()  # the gate's wait starts (or, healthy, the next wave)
    time.sleep(0.01)  # past the gate timeout
    orchestrator.tick()
    status = orchestrator.status(rollout["id"])
    assert "this step failed" not in caplog.text
    if state == "aborted":
        assert status["state"] in ("rolling_back", "aborted")
        assert "health gate failed: a: no errors in telemetry" in status["reason"]
    else:
        assert status["state"] == "running" and job_states(status) == {"a": "active",
                                                                       "b": "queued"}


def test_a_device_that_lies_about_its_previous_version_is_sent_no_other_bundle(
        orchestrator, tmp_path, keys):
    """A rollback job names the version the device's report gave as `previous`, and a job
    authorises its version's download: a device that named a version the registry holds but
    never sent it (m:3) had a rollback job with that bundle's URL and could fetch it. Now only
    versions the fleet sent the device come with a download; a rollback to another one is
    done from what the device holds, or fails there. Restart-safe: it is all in the store."""
    from edgerun.adapters.fleet.orchestrator import Orchestrator
    from edgerun.adapters.ota.messages import Job, Report
    from edgerun.runtime import Bundle

    registry, store = orchestrator.registry, orchestrator.store
    for version in ("1", "3"):
        with Bundle.open(make_bundle(tmp_path / f"v{version}", model(int(version)), "m",
                                     version, keys["key"])) as bundle:
            packed = bundle.pack(tmp_path / f"m-{version}.tar.gz")
        with packed.open("rb") as stream:
            registry.push(stream)
    first = orchestrator.deploy("m", "1", devices=["b"])  # b gets m:1 from the fleet
    orchestrator.on_message("edgerun/b/ota/report", Report(
        first["jobs"][0]["job_id"], "b", "active", "m", "1", "0").encode())
    rollout = orchestrator.deploy("m", "2", devices=["a", "b"])
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    # a never had m:3 (nobody sent it); b had m:1, which the fleet sent it
    for device, previous in (("a", "3"), ("b", "1")):
        orchestrator.on_message(f"edgerun/{device}/ota/report", Report(
            job_ids[device], device, "active", "m", "2", previous).encode())
    orchestrator.rollback(rollout["id"])
    rollbacks = {topic.split("/")[1]: Job.decode(payload)
                 for topic, payload, _ in orchestrator.sent[-2:]}
    assert {d: (j.kind, j.version) for d, j in rollbacks.items()} == {
        "a": ("rollback", "3"), "b": ("rollback", "1")}
    assert (rollbacks["a"].url, rollbacks["a"].sha256) == ("", "")  # from its own slots only
    assert rollbacks["b"].url == "http://registry/bundles/m/1"
    assert rollbacks["b"].sha256 == registry.get("m", "1").sha256
    detail = {job["device_id"]: job["detail"] for job in orchestrator.status(rollout["id"])[
        "jobs"]}
    assert "the fleet never sent it that one" in detail["a"] and detail["b"] == "rolling back"

    # the same after a restart: a new orchestrator on the store sends the same jobs again
    resent: list[tuple[str, bytes, bool]] = []
    again = Orchestrator(store, registry, "http://registry",
                         publish=lambda *message: resent.append(message))
    again.republish()
    assert {topic.split("/")[1]: Job.decode(payload).url for topic, payload, _ in resent} == {
        "a": "", "b": "http://registry/bundles/m/1"}

    # and the registry, behind device credentials, refuses a the bundle its lie named
    with registry_downloads(tmp_path, store, registry, orchestrator, ("a", "b")) as downloads:
        fetch = downloads.fetch
        assert [fetch("a", "2"), fetch("a", "3"), fetch("a", "1")] == [200, 403, 403]
        assert [fetch("b", "1"), fetch("b", "2"), fetch("b", "3")] == [200, 200, 403]


def test_a_device_busy_with_another_rollouts_job_gets_the_next_one_once_it_ends(
        orchestrator, tmp_path, keys):
    """A device has one retained job topic: a second rollout's job replaced the first's there,
    so a device that subscribed afresh (back after its broker session expired) saw only the
    second, and the first timed out as a failure. A device's next job now waits its turn."""
    from edgerun.adapters.ota.messages import Job, Report

    push_signed(orchestrator, tmp_path, keys, "n", "1")
    sent = orchestrator.sent
    first = orchestrator.deploy("m", "2", group="g")
    jobs = {job["device_id"]: job["job_id"] for job in first["jobs"]}
    published = len(sent)
    second = orchestrator.deploy("n", "1", devices=["a", "b"])
    assert job_states(second) == {"a": "pending", "b": "pending"} and len(sent) == published
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(jobs["a"], "a", "active", "m", "2", "1").encode())
    orchestrator.tick()
    assert job_states(orchestrator.status(second["id"])) == {"a": "queued", "b": "pending"}
    topic, payload, retained = sent[-1]
    assert (topic, Job.decode(payload).model, retained) == ("edgerun/a/ota", "n", True)
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(jobs["b"], "b", "active", "m", "2", "1").encode())
    orchestrator.tick()
    assert job_states(orchestrator.status(second["id"])) == {"a": "queued", "b": "queued"}
    assert orchestrator.status(first["id"])["state"] == "completed"


def test_a_republish_sends_each_device_the_job_sent_it_last(orchestrator, tmp_path, keys):
    """b's job of a newer rollout timed out, so an older rollout's next wave sent b its own;
    then b reported on the first after all, which was under way again. A republish (a broker
    restart, a new leader) sent every job under way, oldest rollout first: the newer rollout's
    went last and replaced the older's on b's one retained job topic, so b, back afresh, never
    saw that one. A device is sent again only the job sent it last: the one its topic holds."""
    from edgerun.adapters.ota.messages import Job, Report

    push_signed(orchestrator, tmp_path, keys, "n", "1")
    sent = orchestrator.sent
    older = orchestrator.deploy("m", "2", group="g", waves=[0.5, 1.0])
    assert job_states(older) == {"a": "queued", "b": "pending"}
    newer = orchestrator.deploy("n", "1", devices=["b"], job_timeout=0.2, max_failures=1.0)
    (late,) = newer["jobs"]
    time.sleep(0.3)
    orchestrator.tick()  # b's job timed out: b is free for the older rollout's next wave
    assert job_states(orchestrator.status(newer["id"])) == {"b": "failed"}
    job_a = next(j["job_id"] for j in older["jobs"] if j["device_id"] == "a")
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(job_a, "a", "active", "m", "2", "1").encode())
    assert job_states(orchestrator.status(older["id"])) == {"a": "active", "b": "queued"}
    topic, payload, _ = sent[-1]
    assert (topic, Job.decode(payload).rollout) == ("edgerun/b/ota", older["id"])
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(late["job_id"], "b", "downloading", "n", "1", None).encode())
    assert job_states(orchestrator.status(newer["id"])) == {"b": "downloading"}
    del sent[:]
    orchestrator.republish()
    assert [(topic, Job.decode(payload).rollout) for topic, payload, _ in sent] == [
        ("edgerun/b/ota", older["id"])]


def test_a_late_devices_rollback_waits_for_the_next_rollouts_job(orchestrator, tmp_path, keys):
    """The abort withdrew b's job, and the next rollout sent b its own; b then said it had
    installed the withdrawn m:2 after all. Its rollback replaced the next rollout's job on b's
    one retained job topic; it now waits for that job to end."""
    from edgerun.adapters.ota.messages import Job, Report

    push_signed(orchestrator, tmp_path, keys, "n", "1")
    sent = orchestrator.sent
    first = orchestrator.deploy("m", "2", group="g")
    jobs = {job["device_id"]: job["job_id"] for job in first["jobs"]}
    orchestrator.on_message("edgerun/a/ota/report",
                            Report(jobs["a"], "a", "failed", "m", "2", "1").encode())
    orchestrator.tick()
    assert job_states(orchestrator.status(first["id"])) == {"a": "failed", "b": "cancelled"}
    second = orchestrator.deploy("n", "1", devices=["b"])
    assert job_states(second) == {"b": "queued"}
    published = len(sent)
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(jobs["b"], "b", "staged", "m", "2", "1").encode())
    orchestrator.tick()  # b is still on it: its end decides
    assert job_states(orchestrator.status(first["id"]))["b"] == "cancelled"
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(jobs["b"], "b", "active", "m", "2", "1").encode())
    orchestrator.tick()
    assert [m for m in sent[published:] if m[0] == "edgerun/b/ota"] == []  # n:1's job stays
    status = orchestrator.status(first["id"])
    job_b = next(j for j in status["jobs"] if j["device_id"] == "b")
    assert status["state"] == "rolling_back" and (job_b["kind"], job_b["state"]) == (
        "install", "active")
    assert job_b["detail"] == f"its rollback waits for rollout {second['id']}'s job on this device"
    orchestrator.on_message("edgerun/b/ota/report", Report(
        second["jobs"][0]["job_id"], "b", "active", "n", "1", None).encode())
    assert orchestrator.status(second["id"])["state"] == "completed"
    rollback = Job.decode(sent[-1][1])
    assert (sent[-1][0], rollback.kind, rollback.model, rollback.version) == (
        "edgerun/b/ota", "rollback", "m", "1")
    orchestrator.on_message("edgerun/b/ota/report",
                            Report(rollback.job_id, "b", "rolled_back", "m", "1", "2").encode())
    orchestrator.tick()
    assert orchestrator.status(first["id"])["state"] == "aborted"


def test_a_waiting_rollback_does_not_undo_the_install_it_waited_for(orchestrator):
    """The operator aborted m:2 at once and deployed it again. The device had already got the
    first job and went on with it (the second rollout's job grants the download), then did the
    second ("already active"). The first rollout's rollback, which waited for the second's job,
    was then sent and took the device back to m:1, while the second said it completed with the
    device active on m:2."""
    from edgerun.adapters.ota.messages import Job, Report

    sent = orchestrator.sent
    first = orchestrator.deploy("m", "2", devices=["a"])
    orchestrator.abort(first["id"])
    assert job_states(orchestrator.status(first["id"])) == {"a": "cancelled"}
    second = orchestrator.deploy("m", "2", devices=["a"])
    assert job_states(second) == {"a": "queued"}
    old, new = first["jobs"][0]["job_id"], second["jobs"][0]["job_id"]
    for state in ("queued", "downloading", "verifying", "staged", "active"):
        orchestrator.on_message("edgerun/a/ota/report",
                                Report(old, "a", state, "m", "2", "1").encode())
        orchestrator.tick()
    published = len(sent)
    for state, previous in (("queued", "2"), ("active", "2")):
        orchestrator.on_message("edgerun/a/ota/report",
                                Report(new, "a", state, "m", "2", previous).encode())
        orchestrator.tick()
    assert orchestrator.status(second["id"])["state"] == "completed"
    assert [Job.decode(payload) for topic, payload, _ in sent[published:] if payload] == []
    status = orchestrator.status(first["id"])
    assert status["state"] == "aborted"
    assert (status["jobs"][0]["kind"], status["jobs"][0]["state"]) == ("install", "rolled_back")
    assert second["id"] in status["jobs"][0]["detail"]


def test_rolling_back_a_rollout_leaves_a_later_rollouts_version_alone(orchestrator, tmp_path,
                                                                      keys):
    """m:3 was rolled out over m:2; rolling the m:2 rollout back sent the device to m:1, under
    the m:3 rollout that still said it completed with the device active on m:3."""
    from edgerun.adapters.ota.messages import Report

    push_signed(orchestrator, tmp_path, keys, "m", "3")
    sent = orchestrator.sent
    older = orchestrator.deploy("m", "2", devices=["a"])
    orchestrator.on_message("edgerun/a/ota/report", Report(
        older["jobs"][0]["job_id"], "a", "active", "m", "2", "1").encode())
    newer = orchestrator.deploy("m", "3", devices=["a"])
    orchestrator.on_message("edgerun/a/ota/report", Report(
        newer["jobs"][0]["job_id"], "a", "active", "m", "3", "2").encode())
    assert orchestrator.status(newer["id"])["state"] == "completed"
    published = len(sent)
    orchestrator.rollback(older["id"])
    assert sent[published:] == []
    status = orchestrator.status(older["id"])
    assert status["state"] == "aborted" and job_states(status) == {"a": "rolled_back"}
    assert newer["id"] in status["jobs"][0]["detail"]


def test_a_report_without_a_job_id_touches_no_job_not_yet_sent(orchestrator):
    """Jobs not yet sent have no id yet: a report with an empty one matched the device's
    pending job, and a "failed" from a device of a later wave aborted the rollout."""
    from edgerun.adapters.ota.messages import Report

    rollout = orchestrator.deploy("m", "2", group="g", waves=[0.5, 1.0])
    pending = [job["device_id"] for job in rollout["jobs"] if job["state"] == "pending"]
    assert len(pending) == 1
    orchestrator.on_message(f"edgerun/{pending[0]}/ota/report",
                            Report("", pending[0], "failed", "m", "2", "1").encode())
    orchestrator.tick()
    status = orchestrator.status(rollout["id"])
    assert status["state"] == "running" and job_states(status)[pending[0]] == "pending"


def test_rollout_groups_come_from_enrolment_not_from_what_devices_claim(orchestrator, caplog):
    # a device claiming another group received that group's rollouts (and their bundles), and
    # one claiming no group dodged its own
    enrolment = {"a": ("g",), "b": ("lab",), "c": ("g",)}
    orchestrator.enrolled = lambda device_id: (
        enrolment if device_id is None else {device_id: enrolment[device_id]})
    orchestrator.on_message("edgerun/b/status", b'{"state": "online", "group": "g"}')
    orchestrator.on_message("edgerun/c/status", b'{"state": "online", "group": "lab"}')
    assert "device b reports group 'g'; it is enrolled in lab" in caplog.text
    rollout = orchestrator.deploy("m", "2", group="g")
    assert sorted(job_states(rollout)) == ["a", "c"]
    assert {d["device_id"]: d["grp"] for d in orchestrator.store.devices()}["b"] == "lab"
    orchestrator.enrolled = lambda device_id: {}  # an open fleet: what devices report
    assert orchestrator._members("lab") == ["b"] and orchestrator._members(None) == ["a", "b", "c"]


def test_a_wave_start_cut_short_by_a_restart_is_completed(orchestrator):
    rollout = orchestrator.deploy("m", "2", group="g", waves=[0.5, 1.0])
    assert job_states(rollout) == {"a": "queued", "b": "pending"}
    # as if the process died after recording wave 2 but before publishing its jobs
    orchestrator.store.update_rollout(rollout["id"], wave=1)
    orchestrator.tick()
    assert job_states(orchestrator.status(rollout["id"]))["b"] == "queued"
    assert orchestrator.sent[-1][0] == "edgerun/b/ota"


class StalledLeader:
    """A leader that found itself leading just before a pause (a GC or VM pause) and acts
    after it, whatever happened meanwhile: only the database's fence can stop it."""

    leading = True

    def __init__(self, lease) -> None:
        self.lease = lease

    def fence(self) -> bool:
        return self.lease.fence()


def test_a_leader_that_stalled_past_its_lease_writes_and_sends_nothing(tmp_path, keys,
                                                                        fleet_db):
    from edgerun.adapters.fleetdb import Leadership, Lease
    from edgerun.adapters.ota.messages import Job, Report

    url = fleet_db or tmp_path / "fleet.db"
    a_lease = Lease(Store.open(url).db, "rollouts", "registry-a", ttl=1.0)
    b_lease = Lease(Store.open(url).db, "rollouts", "registry-b", ttl=30.0)
    assert a_lease.acquire()
    a = make_orchestrator(tmp_path, keys, fleet_db, leader=StalledLeader(a_lease))
    b = make_orchestrator(tmp_path, keys, fleet_db, leader=Leadership(b_lease),
                          push_bundle=False)
    rollout = a.deploy("m", "2", group="g", waves=[0.5, 1.0])
    job_ids = {job["device_id"]: job["job_id"] for job in rollout["jobs"]}
    assert [topic for topic, _, _ in a.sent] == ["edgerun/a/ota"]

    # a follower acts on nothing: reports, ticks and republishing are the leader's
    queued = Report(job_ids["a"], "a", "queued", "m", "2", "1").encode()
    b.on_message("edgerun/a/ota/report", queued)
    b.tick()
    b.republish()
    assert b.sent == [] and b.status(rollout["id"])["jobs"][0]["previous_version"] is None

    time.sleep(1.1)  # a pauses past its lease, and b takes it over
    assert b_lease.acquire() and b_lease.epoch == 2
    active = Report(job_ids["a"], "a", "active", "m", "2", "1").encode()
    a.on_message("edgerun/a/ota/report", active)  # would start the next wave
    a.tick()
    a.republish()
    assert job_states(a.status(rollout["id"])) == {"a": "queued", "b": "pending"}
    assert [topic for topic, _, _ in a.sent] == ["edgerun/a/ota"]  # nothing more from a

    b.on_message("edgerun/a/ota/report", active)  # the new leader acts on the same report
    assert job_states(b.status(rollout["id"])) == {"a": "active", "b": "queued"}
    assert [(topic, Job.decode(payload).kind) for topic, payload, _ in b.sent if payload] == \
        [("edgerun/b/ota", "install")]

    a.abort(rollout["id"])  # an operator's abort may land on any process
    assert b.status(rollout["id"])["state"] == "rolling_back" and len(a.sent) == 1
    b.tick()  # the leader sends the rollback and withdraws the job b never picked up
    status = b.status(rollout["id"])
    assert job_states(status) == {"a": "queued", "b": "cancelled"}
    assert Job.decode(b.sent[-2][1]).kind == "rollback" and b.sent[-1] == ("edgerun/b/ota",
                                                                          b"", True)
    assert len(a.sent) == 1
    for orchestrator in (a, b):
        orchestrator.store.close()


# ------------------------------------------------ replicas whose clocks disagree
class Follower:
    """A replica that does not hold the rollouts lease: it records what devices say, and
    acts on no rollout."""

    leading = False

    def fence(self) -> bool:
        return False


@contextmanager
def clock_behind(seconds: float) -> Iterator[None]:
    """This process's clock (the replica acting inside the block) runs `seconds` behind: as a
    replica on a host whose clock drifted would. The database's clock is left alone."""
    real = time.time
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: real() - seconds)
        yield


def two_replicas(tmp_path, keys, postgres_url, leading: str):
    """Orchestrators "fast" and "slow" on one PostgreSQL database; `leading` drives rollouts
    (its gate sees devices a and b), the other only records what devices report."""
    url = fresh_database(postgres_url)
    return {name: make_orchestrator(tmp_path, keys, url, push_bundle=name == leading,
                                    leader=None if name == leading else Follower())
            for name in ("fast", "slow")}


HEALTHY = json.dumps({"p99_ms": 5.0}).encode()


def test_telemetry_a_slow_replica_records_after_the_update_counts_as_fresh(
        tmp_path, keys, postgres_url):
    """a's update was recorded by the leader, its first telemetry after it by a replica whose
    clock runs 5 s behind: the gate took it for older than the update and held the wave (and
    would have failed it at the gate timeout) while a was healthy on the new version."""
    from edgerun.adapters.ota.messages import Report

    replicas = two_replicas(tmp_path, keys, postgres_url, leading="fast")
    fast, slow = replicas["fast"], replicas["slow"]
    try:
        rollout = fast.deploy("m", "2", group="g", waves=[0.5, 1.0], gate="p99<50ms")
        assert job_states(rollout) == {"a": "queued", "b": "pending"}
        fast.on_message("edgerun/a/ota/report", Report(
            f"{rollout['id']}.a.install", "a", "active", "m", "2", "1").encode())
        with clock_behind(5.0):
            slow.on_message("edgerun/a/telemetry", HEALTHY)  # sent after the update
        fast.tick()
        assert job_states(fast.status(rollout["id"])) == {"a": "active", "b": "queued"}
    finally:
        for replica in replicas.values():
            replica.store.close()


def test_telemetry_a_fast_replica_recorded_before_the_update_is_not_taken_for_fresh(
        tmp_path, keys, postgres_url):
    """a's telemetry from the old version was recorded by one replica, then its update by the
    leader, whose clock runs 5 s behind: the old telemetry looked newer than the update, and
    the gate let the new version through on what the old one had measured."""
    from edgerun.adapters.ota.messages import Report

    replicas = two_replicas(tmp_path, keys, postgres_url, leading="slow")
    fast, slow = replicas["fast"], replicas["slow"]
    try:
        with clock_behind(5.0):
            rollout = slow.deploy("m", "2", group="g", waves=[0.5, 1.0], gate="p99<50ms")
        assert job_states(rollout) == {"a": "queued", "b": "pending"}
        fast.on_message("edgerun/a/telemetry", HEALTHY)  # still the old version's
        with clock_behind(5.0):
            slow.on_message("edgerun/a/ota/report", Report(
                f"{rollout['id']}.a.install", "a", "active", "m", "2", "1").encode())
            slow.tick()
        status = slow.status(rollout["id"])
        assert job_states(status) == {"a": "active", "b": "pending"}, status
        with clock_behind(5.0):
            slow.on_message("edgerun/a/telemetry", HEALTHY)  # the new version's: it holds
            slow.tick()
        assert job_states(slow.status(rollout["id"])) == {"a": "active", "b": "queued"}
    finally:
        for replica in replicas.values():
            replica.store.close()


def test_timeouts_one_replica_started_are_judged_by_the_database_clock(
        tmp_path, keys, postgres_url):
    """A leader whose clock ran 60 s behind started a wave and then the gate's wait, and
    another replica took the lease over: it took a job deadline and a gate timeout set by the
    old leader's clock for passed 60 s early, and aborted a healthy rollout."""
    from edgerun.adapters.ota.messages import Report

    url = fresh_database(postgres_url)
    with clock_behind(60.0):
        old = make_orchestrator(tmp_path, keys, url)
    new = make_orchestrator(tmp_path, keys, url, push_bundle=False)
    try:
        with clock_behind(60.0):
            rollout = old.deploy("m", "2", group="g", waves=[0.5, 1.0], gate="p99<50ms",
                                 job_timeout=30, gate_timeout=30)
        new.tick()  # the old leader is gone; a's job has 30 s left
        status = new.status(rollout["id"])
        assert status["state"] == "running", status["reason"]
        assert job_states(status) == {"a": "queued", "b": "pending"}
        with clock_behind(60.0):  # back for a moment: the gate waits for a's telemetry
            old.on_message("edgerun/a/ota/report", Report(
                f"{rollout['id']}.a.install", "a", "active", "m", "2", "1").encode())
        new.tick()  # the gate's wait has 30 s left
        status = new.status(rollout["id"])
        assert status["state"] == "running", status["reason"]
        assert job_states(status) == {"a": "active", "b": "pending"}
    finally:
        old.store.close()
        new.store.close()


def test_a_new_leader_hears_the_reports_it_ignored_as_a_follower(tmp_path, broker, keys):
    """Reports that came while another process led (and died before acting on them) are
    retained by the broker: the process that takes the lease over hears them again."""
    from edgerun.adapters.fleet.orchestrator import MqttLink
    from edgerun.adapters.fleetdb import Leadership, Lease
    from edgerun.adapters.ota.messages import Report

    store = Store.open(tmp_path / "fleet.db")
    dead_leader = Lease(store.db, "rollouts", "registry-dead", ttl=30.0)
    assert dead_leader.acquire()
    leadership = Leadership(Lease(store.db, "rollouts", "registry-b", ttl=2.0), renew_every=0.1)
    orchestrator = make_orchestrator(tmp_path, keys, None, leader=leadership)
    rollout = orchestrator.deploy("m", "2", group="g")  # a follower: the jobs wait
    job_id = f"{rollout['id']}.a.install"  # as the dead leader published it
    orchestrator.store.update_job(rollout["id"], "a", job_id=job_id, state="queued")
    link = MqttLink(broker.url, orchestrator)
    leadership.on_change = link.on_leadership
    link.start()
    device = mqtt_client("device-a")
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        assert link.connected.wait(10)
        device.publish("edgerun/a/ota/report", Report(job_id, "a", "active", "m", "2",
                                                      "1").encode(), qos=1, retain=True)
        time.sleep(1.0)  # heard, and ignored: another process leads
        assert job_states(orchestrator.status(rollout["id"]))["a"] == "queued"
        dead_leader.release()
        leadership.start()
        wait_for(lambda: job_states(orchestrator.status(rollout["id"]))["a"] == "active", 20,
                 "the new leader to hear the retained report")
    finally:
        device.loop_stop()
        device.disconnect()
        leadership.stop()
        link.stop()
        orchestrator.store.close()
        store.close()


def lease_holder(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as connection:
        return connection.execute("SELECT holder FROM leases WHERE name = 'rollouts'"
                                  ).fetchone()[0]


def test_two_registries_on_one_postgresql_one_killed_mid_rollout(tmp_path, broker, keys, v1,
                                                                 postgres_url):
    """Both serve the fleet; the lease holder drives the rollout; kill -9 it once it has
    started the last wave and the other takes the lease over and completes the rollout. A
    device of that wave is offline until after the kill, so the rollout cannot end before it
    (it ended in about 2 s, and a test thread starved that long killed a leader with nothing
    left to do)."""
    url = fresh_database(postgres_url)
    data = tmp_path / "fleet"  # the bundles folder both serve (shared storage in production)
    survivor_port = free_port()
    common = ["--db", url, "--lease-ttl", "2",
              "--public-url", f"http://127.0.0.1:{survivor_port}"]  # a load balancer's job
    leader = FleetServer(data, broker, [keys["pub"]], common).start()  # takes the lease
    other = FleetServer(data, broker, [keys["pub"]], common)
    other.port, other.url = survivor_port, f"http://127.0.0.1:{survivor_port}"
    other.start()
    devices = [SimDevice(f"dev{i:02d}", tmp_path / f"dev{i:02d}", broker, keys["trusted"],
                         v1).start() for i in range(6)]
    try:
        wait_for(lambda: len(other.get("/devices")) == 6, 30, "devices to report")
        push(leader, make_bundle(tmp_path / "b", model(2), "m", "2", keys["key"]))
        assert f":{leader.process.pid}:" in lease_holder(url)
        devices[5].go_offline()  # in the last wave
        rollout = other.deploy(model="m", version="2", group="fleet", waves=[0.34, 1.0],
                               gate="errors<1%")  # asked of the other; the leader drives it
        wait_for(lambda: any(j["state"] != "pending" and j["wave"] == 1 for j in
                             other.get(f"/rollouts/{rollout['id']}")["jobs"]),
                 60, "the leader to pass the gate and start the last wave")
        leader.kill()  # kill -9 of the lease holder mid-rollout
        assert other.get(f"/rollouts/{rollout['id']}")["state"] == "running"
        devices[5].come_back()  # its retained job: the new leader hears it through
        final = other.wait_rollout(rollout["id"], timeout=90)
        assert final["state"] == "completed", json.dumps(final)
        assert f":{other.process.pid}:" in lease_holder(url)
        assert final["counts"] == {"active": 6}
        assert all(d.served("m") == ["2"] for d in devices)
    finally:
        for device in devices:
            device.close()
        other.stop()
        leader.stop()
