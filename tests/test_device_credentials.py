"""Device credentials in the fleet database (SQLite and PostgreSQL): enrol, verify, rotate,
revoke; the broker's files come from the same rows and a revoked device is refused at once."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import pytest

from edgerun.adapters.auth.devices import DeviceCredentials
from edgerun.adapters.auth.mosquitto import Orchestrator, hash_password, write_broker_files
from edgerun.adapters.fleetdb import connect
from edgerun.runtime.errors import InvalidInput, Unauthenticated
from tests.mosquitto_broker import Peer, broker
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (the fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return fresh_database(request.getfixturevalue("postgres_url"))


def basic(device_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()


def test_enrol_verify_rotate_revoke(url: str) -> None:
    credentials = DeviceCredentials(connect(url))
    secret = credentials.enroll("dev-a", groups=("line-1",))
    other = credentials.enroll("dev-b")
    assert credentials.verify("dev-a", secret) and not credentials.verify("dev-a", other)
    assert not credentials.verify("dev-c", secret)
    assert credentials.authenticate(basic("dev-b", other)) == "dev-b"
    with pytest.raises(Unauthenticated):
        credentials.authenticate(basic("dev-b", secret))  # a device cannot speak as another
    with pytest.raises(Unauthenticated):
        credentials.authenticate(None)
    rows = connect(url).query("SELECT * FROM device_credentials")
    assert all(secret not in str(row) and other not in str(row) for row in rows)
    assert [(d.device_id, d.groups) for d in credentials.devices()] == [
        ("dev-a", ("line-1",)), ("dev-b", ())]
    assert credentials.groups() == {"dev-a": ("line-1",), "dev-b": ()}
    assert credentials.groups("dev-a") == {"dev-a": ("line-1",)}
    assert credentials.groups("dev-z") == {}
    rotated = credentials.enroll("dev-a", groups=("line-1",))
    assert credentials.verify("dev-a", rotated) and not credentials.verify("dev-a", secret)
    credentials.revoke("dev-b")
    assert not credentials.verify("dev-b", other)
    assert [d.device_id for d in credentials.devices()] == ["dev-a"]
    assert credentials.groups("dev-b") == {}, "a revoked device is granted nothing"
    with pytest.raises(InvalidInput, match="no enrolled device"):
        credentials.revoke("dev-b")
    with pytest.raises(InvalidInput):
        credentials.enroll("dev/evil")
    with pytest.raises(InvalidInput):
        credentials.enroll("dev-c", groups=("#",))
    assert DeviceCredentials(connect(url)).verify("dev-a", rotated)  # a second process agrees


def test_revoked_device_is_dropped_by_the_broker(tmp_path: Path) -> None:
    credentials = DeviceCredentials(connect(tmp_path / "fleet.db"))
    secrets = {name: credentials.enroll(name, groups=("line-1",)) for name in ("dev-a", "dev-b")}
    orchestrator = Orchestrator("fleet", hash_password("fleet-secret"))
    directory = tmp_path / "broker"
    write_broker_files(directory, credentials.devices(), orchestrator=orchestrator)
    with broker(directory) as (port, process):
        peers = {name: Peer(port, name, secret) for name, secret in secrets.items()}
        try:
            assert all(peer.accepted for peer in peers.values())
            credentials.revoke("dev-b")
            write_broker_files(directory, credentials.devices(), orchestrator=orchestrator)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while peers["dev-b"].client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not peers["dev-b"].client.is_connected()
            again = Peer(port, "dev-b", secrets["dev-b"])
            again.close()
            assert not again.accepted and peers["dev-a"].client.is_connected()
        finally:
            for peer in peers.values():
                peer.close()


def test_a_name_cannot_be_both_a_device_and_a_group(url: str, tmp_path: Path) -> None:
    """Both would own edgerun/<name>/; refused at enrolment, so the broker files can always be
    made again, and a revocation always reaches the broker."""
    credentials = DeviceCredentials(connect(url))
    credentials.enroll("dev-a", groups=("line-1",))
    credentials.enroll("dev-b")
    with pytest.raises(InvalidInput, match="device id 'line-1' is already a group's name"):
        credentials.enroll("line-1")
    with pytest.raises(InvalidInput, match="group 'dev-b' is already a device id"):
        credentials.enroll("dev-c", groups=("dev-b",))
    with pytest.raises(InvalidInput, match="group 'dev-d' is already a device id"):
        credentials.enroll("dev-d", groups=("dev-d",))
    credentials.enroll("dev-a", groups=("line-1", "line-2"))  # its own groups, again: fine
    credentials.revoke("dev-b")
    files = write_broker_files(tmp_path / "broker", credentials.devices())
    assert "dev-b:" not in files.passwd.read_text()


def test_concurrent_enrolments_cannot_make_a_device_and_a_group_of_one_name(url: str,
                                                                            tmp_path: Path) -> None:
    """Two registries on one database enrol at once: device x in group y, and device y. Were
    both let through, no broker files could be made again, so no revocation would reach the
    broker. One of the two must be refused."""
    import threading

    registries = [DeviceCredentials(connect(url)), DeviceCredentials(connect(url))]
    for attempt in range(30):
        barrier, enrolled = threading.Barrier(2), []

        def enrol(credentials: DeviceCredentials, device: str, groups: tuple[str, ...]) -> None:
            barrier.wait()
            try:
                credentials.enroll(device, groups)
                enrolled.append(device)
            except InvalidInput:
                pass

        threads = [threading.Thread(target=enrol, args=(registries[0], f"dev-{attempt}",
                                                         (f"name-{attempt}",))),
                   threading.Thread(target=enrol, args=(registries[1], f"name-{attempt}", ()))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(enrolled) == 1, (attempt, enrolled)
    write_broker_files(tmp_path / "broker", registries[0].devices())  # still possible
