"""The daemon under systemd: real `edgerun daemon` processes tell a real AF_UNIX datagram socket,
bound here as systemd binds its own ($NOTIFY_SOCKET, SO_PASSCRED for the sender's PID), that
they are ready and how long their stop may take.

The unit said Type=simple and TimeoutStopSec=60: systemd learnt nothing from the daemon, so a
drain_timeout above about 23 s got it SIGKILLed in the middle of its drain.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.adapters.mqtt import systemd_notify
from edgerun.adapters.mqtt.daemon import OFFLINE_WAIT_S
from edgerun.adapters.ota.agent import CLOSE_WAIT_S
from edgerun.devices import load_profile
from edgerun.devices.daemon_build import systemd_unit
from edgerun.examples import mlp_onnx
from tests.cli import edgerun_command
from tests.mqtt import DaemonProcess, ask_once_then_stop, running_broker
from tests.serving import add_version, free_port

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ServiceManager:
    """The notification end of systemd: one datagram per sd_notify call, with its sender."""

    def __init__(self, address: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[tuple[int, dict[str, str]]] = []

    def wait_for(self, field: str, timeout: float = 60,
                 value: str | None = None) -> tuple[int, dict[str, str]]:
        """The first message (sender PID, fields) holding `field` ("READY", ...), with `value`
        if given."""
        deadline = time.monotonic() + timeout
        while True:
            for pid, fields in self.received:
                if field in fields and value in (None, fields[field]):
                    return pid, fields
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except TimeoutError:
                raise TimeoutError(f"no {field} in {self.received}") from None
            pid = next(UCRED.unpack(payload[:UCRED.size])[0]
                       for level, kind, payload in ancillary
                       if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
            self.received.append((pid, dict(line.split("=", 1)
                                            for line in data.decode().splitlines() if line)))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager() -> Iterator[ServiceManager]:
    folder = tempfile.mkdtemp(prefix="sdn")  # a socket's path must fit in 108 bytes
    listener = ServiceManager(f"{folder}/notify")
    try:
        yield listener
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)


class Daemon(DaemonProcess):
    """`edgerun daemon --config ...` with the environment systemd would give it."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        super().__init__([*edgerun_command(), "daemon", "--config", str(config)],
                         config.with_suffix(".log"))
        self.env = env

    def start(self) -> Daemon:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT,
                                            env=self.env)
        return self


def _config(folder: Path, broker_url: str, device_id: str, extra: str = "") -> Path:
    config = folder / f"{device_id}.toml"
    config.write_text(f'repository = "{folder / "repo"}"\nbroker = "{broker_url}"\n'
                      f'device_id = "{device_id}"\npoll_interval = 0\n{extra}')
    return config


def _environment(manager: ServiceManager | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    if manager is not None:
        env["NOTIFY_SOCKET"] = manager.address
    return env


def _unit_stop_timeout() -> float:
    unit = systemd_unit(load_profile("cpu"))
    return float(next(line.split("=", 1)[1] for line in unit.splitlines()
                      if line.startswith("TimeoutStopSec=")))


def test_a_long_drain_timeout_extends_systemds_stop_timeout(tmp_path, manager):
    """READY=1 once the config holds, STATUS=serving once the models are loaded; at SIGTERM,
    STOPPING=1 and EXTEND_TIMEOUT_USEC covering device.toml's drain_timeout (300 s, far past
    the unit's TimeoutStopSec), the "offline" status and an OTA job's stop."""
    add_version(tmp_path / "repo", "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        config = _config(tmp_path, broker.url, "notified", "drain_timeout = 300\n")
        daemon = Daemon(config, _environment(manager)).start()
        try:
            pid, fields = manager.wait_for("READY")
            assert pid == daemon.process.pid  # sent by the main process itself
            assert fields["STATUS"] == "loading the models"
            manager.wait_for("STATUS", value="serving")
            assert "loaded mlp version 1" in daemon.output()  # serving: the model loaded
            assert ask_once_then_stop(broker, "notified", daemon)["model_name"] == "mlp"
        finally:
            daemon.kill()
    _, fields = manager.wait_for("STOPPING", timeout=1)
    assert fields["STOPPING"] == "1"
    extension = int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6
    assert extension >= 300 + OFFLINE_WAIT_S + CLOSE_WAIT_S
    assert extension > _unit_stop_timeout()  # without it systemd would SIGKILL mid-drain
    assert [f["READY"] for _, f in manager.received if "READY" in f] == ["1"]  # once


def test_ready_does_not_wait_for_the_broker(tmp_path, manager):
    """A broker out of reach at boot (nothing listens on its port) must not hold the start:
    systemd would keep the unit activating, or kill it at a start timeout."""
    (tmp_path / "repo").mkdir()  # no model yet, as on a fresh device
    config = _config(tmp_path, f"mqtt://127.0.0.1:{free_port()}", "unreachable",
                     "reconnect_min_s = 0.2\nreconnect_max_s = 0.5\n")
    daemon = Daemon(config, _environment(manager)).start()
    try:
        manager.wait_for("READY")
        time.sleep(1)  # it keeps retrying: running, not failed
        assert daemon.process.poll() is None, daemon.output()
        assert "cannot reach" in daemon.output()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    _, fields = manager.wait_for("STOPPING", timeout=1)
    assert int(fields["EXTEND_TIMEOUT_USEC"]) >= (10 + OFFLINE_WAIT_S + CLOSE_WAIT_S) * 1e6


def test_without_notify_socket_the_daemon_runs_as_before(tmp_path):
    add_version(tmp_path / "repo", "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        daemon = Daemon(_config(tmp_path, broker.url, "plain"), _environment(None)).start()
        try:
            answer = ask_once_then_stop(broker, "plain", daemon)
        finally:
            daemon.kill()
    assert answer["model_name"] == "mlp"
    assert "systemd" not in daemon.output()  # no warning about a manager it cannot reach


# ------------------------------------------------------------------ the protocol on its own
def test_an_abstract_socket_is_addressed_by_its_name(monkeypatch):
    """'@name' is Linux's abstract namespace (systemd in containers, user managers)."""
    listener = ServiceManager(f"@edgerun-test-{uuid.uuid4().hex}")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        assert systemd_notify.stopping(12.5)
        pid, fields = listener.wait_for("STOPPING", timeout=5)
    finally:
        listener.close()
    assert pid == os.getpid()
    assert fields == {"STOPPING": "1", "EXTEND_TIMEOUT_USEC": "12500000"}


def test_no_manager_no_message_and_no_error(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd_notify.ready()
    assert not caplog.records
    # a manager that went away, or an address that is no Unix socket: warned, never raised
    for address in (str(tmp_path / "gone"), "vsock:2:1234"):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert not systemd_notify.ready()
    assert len(caplog.records) == 2
