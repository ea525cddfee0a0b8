"""Generated Mosquitto passwd/ACL/config files, against the real mosquitto_passwd and broker."""

from __future__ import annotations

import base64
import json
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.adapters.auth.mosquitto import (Device, InferenceClient, Orchestrator,
                                             hash_password, new_password, passwd_text,
                                             verify_password, write_broker_files)
from edgerun.runtime.errors import InvalidInput
from tests.mosquitto_broker import Peer, broker

SECRETS = {"dev-a": "secret-a", "dev-b": "secret-b", "client-c": "secret-c", "fleet": "secret-o"}


def fleet_files(directory: Path, devices: tuple[str, ...] = ("dev-a", "dev-b")):
    return write_broker_files(
        directory,
        [Device(d, hash_password(SECRETS[d]), groups=("line-1",)) for d in devices],
        [InferenceClient("client-c", hash_password(SECRETS["client-c"]),
                         targets=("dev-a", "line-1"))],
        Orchestrator("fleet", hash_password(SECRETS["fleet"])))


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "dev-a", "s3cret"], check=True)
    user, made = passwd.read_text().strip().split(":", 1)
    _, kind, iterations, salt, _ = made.split("$")
    assert (user, kind, iterations) == ("dev-a", "7", "101")
    assert hash_password("s3cret", salt=base64.b64decode(salt)) == made
    assert verify_password(made, "s3cret") and not verify_password(made, "s3cret!")
    secret, hashed = new_password()
    assert verify_password(hashed, secret) and secret not in hashed and len(secret) >= 43
    assert not verify_password("$6$old$format", secret) and not verify_password("junk", secret)


def test_names_that_would_break_isolation_are_refused(tmp_path: Path) -> None:
    hashed = hash_password("x")
    for bad in ("dev/a", "dev+", "#", "dev:a", ""):
        with pytest.raises(InvalidInput):
            write_broker_files(tmp_path, [Device(bad, hashed)])
    with pytest.raises(InvalidInput, match="also a username"):
        write_broker_files(tmp_path, [Device("a", hashed, groups=("b",)), Device("b", hashed)])
    with pytest.raises(InvalidInput, match="not secrets"):
        write_broker_files(tmp_path, [Device("a", "plain-secret")])
    assert not (tmp_path / "passwd").exists()


def test_a_hash_cannot_add_a_user_to_the_password_file(tmp_path: Path) -> None:
    """Hashes come from the registry (`fleet acl` fetches them): one holding a newline would
    add a passwd line of its own, here a user named like a group, who would then read the
    group's requests and answer for it."""
    injected = hash_password("a") + "\nline-1:" + hash_password("attacker")
    group = Device("dev-b", hash_password("b"), groups=("line-1",))
    for bad in (injected, hash_password("a") + "\n", "$7$101$c2FsdA==$ZGln\rline-1:x",
                "$7$101$salt$digest$extra"):
        with pytest.raises(InvalidInput, match="password hash of 'dev-a' is not one \\$7\\$"):
            write_broker_files(tmp_path, [Device("dev-a", bad), group])
        with pytest.raises(InvalidInput):
            passwd_text([Device("dev-a", bad)])
    with pytest.raises(InvalidInput, match="username 'a\\\\nb'"):
        passwd_text([Device("a\nb", hash_password("x"))])
    assert not (tmp_path / "passwd").exists()


def test_config_has_no_listener_and_absolute_paths(tmp_path: Path) -> None:
    files = fleet_files(tmp_path / "broker")
    conf = files.conf.read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert f"password_file {files.passwd.resolve()}" in conf
    assert f"acl_file {files.acl.resolve()}" in conf
    assert not any(line.startswith(("listener", "port")) for line in conf)
    assert files.passwd.stat().st_mode & 0o777 == 0o600
    assert "secret-a" not in files.passwd.read_text() + files.acl.read_text()


def test_files_are_never_written_through_a_link_left_in_the_folder(tmp_path: Path) -> None:
    """A broker folder others could write (made in /tmp beforehand, say): links planted where
    the files are staged must not make an operator (or root) overwrite what they point at."""
    directory, victim = tmp_path / "broker", tmp_path / "victim"
    directory.mkdir()
    victim.write_text("precious\n")
    for name in ("passwd", "acl", "mosquitto.conf"):
        (directory / f".{name}.tmp").symlink_to(victim)
    files = fleet_files(directory)
    assert victim.read_text() == "precious\n"
    assert files.passwd.read_text().startswith("dev-a:$7$") and not files.passwd.is_symlink()
    assert files.passwd.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in directory.iterdir() if not p.is_symlink()) == [
        "acl", "mosquitto.conf", "passwd"]  # no staging file left behind


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[Path, int, subprocess.Popen, dict[str, Peer]]]:
    directory = tmp_path / "broker"
    fleet_files(directory)
    with broker(directory) as (port, process):
        peers = {name: Peer(port, name, secret) for name, secret in SECRETS.items()}
        try:
            yield directory, port, process, peers
        finally:
            for peer in peers.values():
                peer.close()


def test_a_device_cannot_reach_another_devices_requests_or_replies(fleet) -> None:
    _, port, _, peers = fleet
    a, b, c = peers["dev-a"], peers["dev-b"], peers["client-c"]
    assert all(peer.accepted for peer in peers.values())
    b.subscribe("edgerun/dev-b/infer/#")
    a.subscribe("edgerun/dev-a/infer/#")
    c.subscribe("edgerun/+/replies/client-c/#")
    # the client reaches its target; dev-a reaches nobody's inference topic but its own
    c.publish("edgerun/dev-a/infer/mlp", b"request")
    assert a.received() == ("edgerun/dev-a/infer/mlp", b"request")
    a.publish("edgerun/dev-b/infer/mlp", b"forged request")
    c.publish("edgerun/dev-b/infer/mlp", b"not granted")
    assert b.nothing()
    # dev-a answers under its own name; it can neither forge dev-b's answers nor read them
    a.subscribe("edgerun/dev-b/replies/#")
    a.subscribe("edgerun/+/replies/client-c/#")
    a.publish("edgerun/dev-a/replies/client-c/1", b"answer from a")
    assert c.received() == ("edgerun/dev-a/replies/client-c/1", b"answer from a")
    a.publish("edgerun/dev-b/replies/client-c/2", b"forged answer")
    b.publish("edgerun/dev-b/replies/client-c/3", b"answer from b")
    assert c.received() == ("edgerun/dev-b/replies/client-c/3", b"answer from b")
    assert c.nothing() and a.nothing()


def test_groups_share_requests_and_the_orchestrator_sees_the_fleet(fleet) -> None:
    _, _, _, peers = fleet
    a, b, c, o = peers["dev-a"], peers["dev-b"], peers["client-c"], peers["fleet"]
    a.subscribe("$share/line-1/edgerun/line-1/infer/#")
    b.subscribe("$share/line-1/edgerun/line-1/infer/#")
    for n in range(6):
        c.publish("edgerun/line-1/infer/mlp", str(n).encode())
    got = []
    for peer in (a, b):
        while not peer.inbox.empty() or len(got) < 6:
            try:
                got.append(peer.received(timeout=2)[1])
            except queue.Empty:
                break
    assert sorted(got) == [str(n).encode() for n in range(6)]  # each request once, in all
    o.subscribe("edgerun/+/ota/report")
    o.subscribe("edgerun/+/status")
    a.subscribe("edgerun/dev-a/ota")
    b.subscribe("edgerun/dev-a/ota")
    o.publish("edgerun/dev-a/ota", b"job")
    assert a.received() == ("edgerun/dev-a/ota", b"job")
    a.publish("edgerun/dev-a/ota/report", b"active")
    a.publish("edgerun/dev-a/status", b"online")
    assert {o.received(), o.received()} == {("edgerun/dev-a/ota/report", b"active"),
                                             ("edgerun/dev-a/status", b"online")}
    c.publish("edgerun/dev-a/ota", b"forged job")  # only the orchestrator sends jobs
    b.publish("edgerun/dev-b/ota/report", b"b's own report")
    assert o.received() == ("edgerun/dev-b/ota/report", b"b's own report")
    assert a.nothing() and b.nothing()


def test_wrong_password_and_removed_device_are_refused(fleet) -> None:
    directory, port, process, peers = fleet
    wrong = Peer(port, "dev-a", "not-the-secret")
    assert not wrong.accepted
    wrong.close()
    assert not Peer(port, "nobody", "secret-a").accepted
    dropped: queue.Queue = queue.Queue()
    peers["dev-b"].client.on_disconnect = lambda *args: dropped.put(args)
    fleet_files(directory, devices=("dev-a",))  # dev-b is revoked
    process.send_signal(signal.SIGHUP)
    dropped.get(timeout=5)  # Mosquitto drops dev-b's open session on reload...
    deadline = time.monotonic() + 5
    while True:
        again = Peer(port, "dev-b", SECRETS["dev-b"])
        again.close()
        if not again.accepted or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not again.accepted  # ...and refuses it from then on
    still = Peer(port, "dev-a", SECRETS["dev-a"])
    assert still.accepted
    still.close()


def test_the_daemon_logs_in_with_a_password_file_kept_out_of_ps(fleet, tmp_path: Path) -> None:
    """`--password` shows in every user's `ps`; `--password-file` keeps the secret off the
    command line, and the daemon still logs in with it (its retained status reaches the fleet)."""
    from tests.cli import edgerun, edgerun_command

    _, port, _, peers = fleet
    secret = tmp_path / "dev-a.password"
    secret.write_text(SECRETS["dev-a"] + "\n")
    secret.chmod(0o600)
    models = tmp_path / "models"
    models.mkdir()
    peers["fleet"].subscribe("edgerun/dev-a/status")
    command = [*edgerun_command(), "daemon", "--repository", str(models), "--broker",
               f"mqtt://127.0.0.1:{port}", "--device-id", "dev-a", "--username", "dev-a",
               "--password-file", str(secret)]
    daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        topic, payload = peers["fleet"].received(timeout=30)
        assert topic == "edgerun/dev-a/status" and json.loads(payload)["state"] == "online"
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
        assert SECRETS["dev-a"].encode() not in cmdline
    finally:
        daemon.terminate()
        daemon.wait(30)
    both = edgerun("daemon", "--repository", str(models), "--broker", f"mqtt://127.0.0.1:{port}",
                   "--device-id", "dev-a", "--password", "x", "--password-file", str(secret),
                   timeout=60)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    missing = edgerun("daemon", "--repository", str(models), "--broker",
                      f"mqtt://127.0.0.1:{port}", "--device-id", "dev-a", "--password-file",
                      str(tmp_path / "nowhere"), timeout=60)
    assert missing.returncode == 2 and "nowhere" in missing.stderr, missing.stderr
