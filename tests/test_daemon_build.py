"""`edgerun build daemon`: the one-file PyInstaller binary, built once per test session, answers
requests over a real Mosquitto; its systemd unit and device.toml are usable as shipped."""

from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import orjson
import pytest

from edgerun.adapters.mqtt.config import load_config
from edgerun.devices import load_profile
from edgerun.devices.daemon_build import DAEMON_MEMORY_MB, RECIPES, host_arch, systemd_unit
from edgerun.examples import mlp_onnx
from tests.cli import edgerun
from tests.mqtt import INFER_JSON, Requester, running_broker, running_daemon
from tests.serving import add_version


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("daemon-build") / "out"
    result = edgerun("build", "daemon", "--device", "cpu", "-o", str(output), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built" in result.stderr
    return output


@pytest.mark.timeout(900)
def test_binary_answers_a_request(built, tmp_path):
    binary = built / "edgerun-daemon"
    assert binary.stat().st_mode & 0o111
    assert binary.stat().st_size < 60 * 2**20  # onnxruntime + numpy + paho in one file
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        command = [str(binary), "--repository", str(repo), "--broker", broker.url,
                   "--device-id", "flashed", "--poll-interval", "0"]
        with running_daemon(repo, broker, "flashed", command=command) as daemon:
            requester = Requester(broker)
            payload, properties = requester.ask("edgerun/flashed/infer/mlp", INFER_JSON,
                                                correlation=b"bin")
            requester.close()
            assert daemon.terminate() == 0
    body = orjson.loads(payload)
    assert properties.CorrelationData == b"bin"
    assert body["model_name"] == "mlp"
    assert np.array(body["outputs"][0]["data"]).shape == (3,)


@pytest.mark.timeout(900)
def test_unit_and_sample_config(built):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive in systemd
    unit.read(built / "edgerun-daemon.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == "edgerun"
    assert service["StateDirectory"] == "edgerun edgerun/models edgerun/state"
    assert service["ExecStart"].startswith("/usr/local/bin/edgerun-daemon --config")
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"
    config = load_config(built / "device.toml")
    assert config.device == "cpu"
    assert config.repository == Path("/var/lib/edgerun/models")
    assert config.broker_address.tls


def _service(text: str) -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    return unit["Service"]


def test_systemd_waits_out_a_clean_stop():
    """SIGTERM drains requests, publishes "offline" and lets an OTA job stop: a shorter
    TimeoutStopSec killed the daemon in the middle of that."""
    from edgerun.adapters.mqtt.config import DaemonConfig
    from edgerun.adapters.mqtt.daemon import OFFLINE_WAIT_S
    from edgerun.adapters.ota.agent import CLOSE_WAIT_S

    text = systemd_unit(load_profile("raspberry-pi-5"))
    drain = DaemonConfig(repository=Path("m"), broker="mqtt://h", device_id="d").drain_timeout
    assert float(_service(text)["TimeoutStopSec"]) > drain + OFFLINE_WAIT_S + CLOSE_WAIT_S
    # a killed one-file binary leaves its unpacked copy in TMPDIR: emptied before each start
    assert text.index("ExecStartPre=/bin/rm -rf /var/lib/edgerun/.tmp\n") < text.index(
        "ExecStartPre=/bin/mkdir -p /var/lib/edgerun/.tmp\n")


def test_the_unit_follows_the_profile():
    # the shipped device.toml's folders exist before any model does: the daemon starts
    service = _service(systemd_unit(load_profile("raspberry-pi-4")))
    config = load_config(RECIPES / "device.toml")
    folders = {f"/var/lib/{d}" for d in service["StateDirectory"].split()}
    assert {str(config.repository), str(config.data_dir)} <= folders
    # two versions of a 1 GiB model during an update, and the daemon: not a fixed 512M
    assert service["MemoryMax"] == f"{2 * 1024 + DAEMON_MEMORY_MB}M"
    assert "MemoryMax" not in _service(systemd_unit(load_profile("cpu")))  # no budget, no cap
    assert "@" not in systemd_unit(load_profile("jetson-orin"))


def test_refuses_to_cross_compile(tmp_path):
    other = "x86-64" if host_arch() == "aarch64" else "raspberry-pi-5"
    result = edgerun("build", "daemon", "--device", other, "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not cross-compile" in result.stderr
