"""Generated Mosquitto passwd/ACL/config files, against the real mosquitto_passwd and broker."""

from __future__ import annotations

import base64
import json
import os
import pwd
import queue
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.adapters.auth.mosquitto import (Device, InferenceClient, Listener, Orchestrator,
                                             hash_password, new_password, passwd_text,
                                             verify_password, write_broker_files)
from edgerun.runtime.errors import InvalidInput, PermissionDenied
from tests.mosquitto_broker import Peer, broker
from tests.serving import free_port

SECRETS = {"dev-a": "secret-a", "dev-b": "secret-b", "client-c": "secret-c", "fleet": "secret-o"}


def fleet_files(directory: Path, devices: tuple[str, ...] = ("dev-a", "dev-b"),
                listeners: tuple[Listener, Listener] | None = None):
    return write_broker_files(
        directory,
        [Device(d, hash_password(SECRETS[d]), groups=("line-1",)) for d in devices],
        [InferenceClient("client-c", hash_password(SECRETS["client-c"]),
                         targets=("dev-a", "line-1"))],
        Orchestrator("fleet", hash_password(SECRETS["fleet"])), listeners)


def refused_soon(port: int, name: str) -> bool:
    """Whether the broker refuses `name`'s login within 5 s (a SIGHUP's reload is not instant)."""
    deadline = time.monotonic() + 5
    while True:
        attempt = Peer(port, name, SECRETS[name])
        attempt.close()
        if not attempt.accepted or time.monotonic() > deadline:
            return not attempt.accepted
        time.sleep(0.1)


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
def shared_folder() -> Iterator[Path]:
    """A folder the broker's own user can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="edgerun-broker-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start Mosquitto as its own user")
def test_a_regeneration_keeps_the_files_the_brokers_user_reads(shared_folder: Path) -> None:
    """Mosquitto run as `mosquitto` reads the files chowned to it once; written again by root
    (a revocation), they keep that owner, so its reload still reads them: new root-owned files
    made it refuse every login ("Unable to open pwfile")."""
    broker_user = pwd.getpwnam("mosquitto")
    directory = shared_folder / "broker"
    files = fleet_files(directory)
    directory.chmod(0o755)
    files.acl.chmod(0o640)
    for path in (files.passwd, files.acl, files.conf):
        os.chown(path, broker_user.pw_uid, broker_user.pw_gid)
    with broker(directory, user="mosquitto") as (port, process):
        fleet_files(directory, devices=("dev-a",))  # dev-b is revoked
        for path, mode in ((files.passwd, 0o600), (files.acl, 0o640), (files.conf, 0o644)):
            status = path.stat()
            assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (
                broker_user.pw_uid, broker_user.pw_gid, mode), path
        process.send_signal(signal.SIGHUP)
        assert refused_soon(port, "dev-b"), "the reload never happened"
        kept = Peer(port, "dev-a", SECRETS["dev-a"])
        kept.close()
        assert kept.accepted, (directory / "mosquitto.log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start Mosquitto as its own user")
def test_a_first_split_gives_fleet_passwd_the_owner_of_passwd(shared_folder: Path) -> None:
    """Files chowned to the broker's user once, then split onto two listeners: the new
    fleet.passwd was root's alone, so the broker, restarted as its own user, could not read
    it and never started ("Unable to open pwfile"); it takes passwd's owner and mode."""
    broker_user = pwd.getpwnam("mosquitto")
    directory = shared_folder / "broker"
    files = fleet_files(directory)
    directory.chmod(0o755)
    for path in (files.passwd, files.acl, files.conf):
        os.chown(path, broker_user.pw_uid, broker_user.pw_gid)
    devices, fleet = free_port(), free_port()
    split = fleet_files(directory, listeners=(Listener(devices, "127.0.0.1"),
                                              Listener(fleet, "127.0.0.1")))
    assert split.fleet_passwd is not None
    status = split.fleet_passwd.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (
        broker_user.pw_uid, broker_user.pw_gid, 0o600)
    with broker(directory, fleet, listening=True, user="mosquitto"):
        registry = Peer(fleet, "fleet", SECRETS["fleet"])
        registry.close()
        assert registry.accepted, (directory / "mosquitto.log").read_text()


def test_files_written_again_through_links_take_the_modes_of_what_they_name(tmp_path: Path
                                                                           ) -> None:
    """A link's own mode is 0777: kept, it made a regenerated acl writable by every local user
    and the passwd file readable by the link's group."""
    directory, real = tmp_path / "broker", tmp_path / "real"
    files = fleet_files(directory)
    real.mkdir()
    for path in (files.passwd, files.acl):
        path.rename(real / path.name)
        path.symlink_to(real / path.name)
    (real / "acl").chmod(0o646)  # a write bit for others is never kept
    fleet_files(directory, devices=("dev-a",))
    assert not files.passwd.is_symlink() and files.passwd.stat().st_mode & 0o777 == 0o600
    assert not files.acl.is_symlink() and files.acl.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_file_whose_owner_cannot_be_kept_is_refused_before_anything_is_written(
        shared_folder: Path) -> None:
    """A user who cannot give the new files the old owner (root's, say) gets a clear refusal
    naming the file, and every file stays as it was: a half-written set, or files the broker
    can no longer read, would lock the fleet out at the next reload."""
    nobody = pwd.getpwnam("nobody")
    directory = shared_folder / "broker"
    files = fleet_files(directory)
    for path in (directory, files.passwd, files.acl):  # these it could keep; root keeps conf
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    before = {path: path.read_bytes() for path in (files.passwd, files.acl, files.conf)}
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            fleet_files(directory, devices=("dev-a",))
            message = "written"
        except PermissionDenied as exc:
            message = f"refused: {exc}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"other: {exc!r}"
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode()
    assert message.startswith("refused: ") and str(files.conf) in message, message
    assert "owned by uid 0" in message, message
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in directory.iterdir()) == ["acl", "mosquitto.conf", "passwd"]


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
    assert refused_soon(port, "dev-b")  # ...and refuses it from then on
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


def test_listeners_parse_and_split_the_users(tmp_path: Path) -> None:
    assert Listener.parse("1883") == Listener(1883)
    assert Listener.parse("10.0.0.5:8883").lines() == ["listener 8883 10.0.0.5"]
    assert Listener.parse("[::1]:1884").lines() == ["listener 1884 ::1"]
    for bad in ("", "host:", "host:port", "99999", "a b:1883", "::1", "fe80::1", "[::1",
                "::1]:1883", ":1883"):
        with pytest.raises(InvalidInput, match="is not \\[HOST:\\]PORT"):
            Listener.parse(bad)
    for same in (("1883", "1883"), ("1883", "127.0.0.1:1883"), ("[::1]:1883", "1883")):
        with pytest.raises(InvalidInput, match="both bind port 1883 of one address"):
            fleet_files(tmp_path / "same", listeners=tuple(map(Listener.parse, same)))
    assert Listener(1883, "127.0.0.1").overlaps(Listener(1883, "127.0.0.2")) is False
    tls = Listener(8883, certfile="server.crt", keyfile="server.key")
    files = fleet_files(tmp_path / "broker", listeners=(tls, Listener(1884, "::1")))
    # devices and inference clients: each its username's session alone; the fleet's users
    assert [line.split(":")[0] for line in files.passwd.read_text().splitlines()] == [
        "dev-a", "dev-b", "client-c"]
    assert files.fleet_passwd is not None
    assert files.fleet_passwd.read_text().startswith("fleet:$7$")
    assert len(files.fleet_passwd.read_text().splitlines()) == 1
    assert files.fleet_passwd.stat().st_mode & 0o777 == 0o600
    conf = files.conf.read_text().splitlines()
    fleet, devices = conf.index("listener 1884 ::1"), conf.index("listener 8883")
    assert fleet < devices  # each listener's lines follow it
    assert conf[devices + 1:devices + 3] == [f"certfile {Path('server.crt').resolve()}",
                                             f"keyfile {Path('server.key').resolve()}"]
    assert conf[devices:].count("use_username_as_clientid true") == 1
    assert "use_username_as_clientid true" not in conf[:devices]
    assert f"password_file {files.passwd.resolve()}" in conf[devices:]
    assert f"password_file {files.fleet_passwd.resolve()}" in conf[fleet:devices]


def test_on_the_devices_listener_nobody_can_take_another_users_session(
        tmp_path: Path) -> None:
    """dev-b logs in with its own secret and dev-a's client id. On one listener for all users
    (the files' other layout, as control) that takes dev-a's session over: dev-a is
    disconnected. On the devices' own listener dev-b gets its own session and dev-a goes on;
    so does an inference client that sends dev-a's bare username as its client id (sessions
    are the broker's, not a listener's). Nobody but the fleet's user logs in on the fleet's
    listener, and two registries of that user coexist there."""
    control = tmp_path / "one-listener"
    fleet_files(control)
    with broker(control) as (port, _):
        victim = Peer(port, "dev-a", SECRETS["dev-a"], client_id="edgerun-dev-a")
        taker = Peer(port, "dev-b", SECRETS["dev-b"], client_id="edgerun-dev-a")
        assert taker.accepted and victim.dropped.get(timeout=5).is_failure
        taker.close()
        victim.close()

    devices, fleet = free_port(), free_port()
    directory = tmp_path / "broker"
    fleet_files(directory, listeners=(Listener(devices, "127.0.0.1"),
                                      Listener(fleet, "127.0.0.1")))
    with broker(directory, devices, listening=True) as _:
        a = Peer(devices, "dev-a", SECRETS["dev-a"], client_id="edgerun-dev-a")
        a.subscribe("edgerun/dev-a/infer/#")
        b = Peer(devices, "dev-b", SECRETS["dev-b"], client_id="edgerun-dev-a")
        c = Peer(devices, "client-c", SECRETS["client-c"], client_id="dev-a")
        registries = [Peer(fleet, "fleet", SECRETS["fleet"], client_id=f"fleet-{n}")
                      for n in (1, 2)]
        try:
            assert a.accepted and b.accepted and c.accepted
            assert all(registry.accepted for registry in registries)
            c.publish("edgerun/dev-a/infer/mlp", b"request")
            assert a.received() == ("edgerun/dev-a/infer/mlp", b"request")
            for registry in registries:  # across the two listeners
                registry.subscribe("edgerun/+/status")
            b.publish("edgerun/dev-b/status", b"online")
            assert all(r.received() == ("edgerun/dev-b/status", b"online") for r in registries)
            assert a.dropped.empty() and all(r.dropped.empty() for r in registries)
            for user in ("dev-a", "client-c"):
                assert not Peer(fleet, user, SECRETS[user]).accepted
            assert not Peer(devices, "fleet", SECRETS["fleet"]).accepted
        finally:
            for peer in (a, b, c, *registries):
                peer.close()


def test_fleet_acl_refuses_half_a_listener_pair_or_a_bad_one_before_asking_the_server(
        tmp_path: Path) -> None:
    from tests.cli import edgerun

    base = ["fleet", "acl", "--server", "http://127.0.0.1:9", "-o", str(tmp_path / "b")]
    half = edgerun(*base, "--device-listener", "1883")
    assert half.returncode != 0
    assert "--device-listener and --fleet-listener go together" in half.stderr
    bad = edgerun(*base, "--device-listener", "1883", "--fleet-listener", "localhost")
    assert bad.returncode != 0 and "listener 'localhost' is not [HOST:]PORT" in bad.stderr
    tls = edgerun(*base, "--device-certfile", "server.crt", "--device-keyfile", "server.key")
    assert tls.returncode != 0 and "--device-certfile needs --device-listener" in tls.stderr
    assert not (tmp_path / "b").exists()
