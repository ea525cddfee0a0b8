"""`edgerun build daemon`: the one-file PyInstaller binary, built once per test session, answers
requests over a real Mosquitto; its systemd unit and device.toml are usable as shipped."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pytest

from edgerun.adapters.mqtt.config import load_config
from edgerun.devices import load_profile
from edgerun.devices.daemon_build import DAEMON_MEMORY_MB, RECIPES, host_arch, systemd_unit
from edgerun.examples import mlp_onnx
from edgerun.runtime.signing import generate_keys
from tests.cli import edgerun, edgerun_command
from tests.mqtt import (INFER_JSON, DaemonProcess, Requester, ask_once_then_stop,
                        running_broker, running_daemon)
from tests.serving import add_version, free_port
from tests.test_systemd_notify import ServiceManager


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
    assert service["RestartPreventExitStatus"] == "2"  # a bad setting: no restart every 2 s
    assert service["User"] == "edgerun"
    assert service["StateDirectory"] == "edgerun edgerun/models edgerun/state"
    assert service["ExecStart"].startswith("/usr/local/bin/edgerun-daemon --config")
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"
    config = load_config(built / "device.toml")
    assert config.device == "cpu"
    assert config.repository == Path("/var/lib/edgerun/models")
    assert config.broker_address.tls


@pytest.mark.timeout(900)
def test_the_binary_notifies_systemd_from_a_child_of_the_main_pid(built, tmp_path, monkeypatch):
    """The one-file binary is a bootloader (the main PID systemd sees) running Python in a
    child: READY=1 comes from the child, which NotifyAccess=main would drop."""
    folder = tempfile.mkdtemp(prefix="sdn")  # a socket's path must fit in 108 bytes
    manager = ServiceManager(f"{folder}/notify")
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    (tmp_path / "repo").mkdir()
    command = [str(built / "edgerun-daemon"), "--repository", str(tmp_path / "repo"), "--broker",
               f"mqtt://127.0.0.1:{free_port()}", "--device-id", "child", "--poll-interval", "0"]
    daemon = DaemonProcess(command, tmp_path / "daemon.log").start()
    try:
        sender, _ = manager.wait_for("READY")
        parent = int(Path(f"/proc/{sender}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert sender != daemon.process.pid and parent == daemon.process.pid
        manager.wait_for("STATUS", value="serving")  # a stop while loading sends nothing more
        assert daemon.terminate() == 0
        manager.wait_for("STOPPING", timeout=1)
    finally:
        daemon.kill()
        manager.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert _service(systemd_unit(load_profile("cpu")))["NotifyAccess"] == "all"


def _service(text: str) -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    return unit["Service"]


def test_systemd_waits_out_a_clean_stop():
    """SIGTERM drains requests, publishes "offline" and lets an OTA job stop: a shorter
    TimeoutStopSec killed the daemon in the middle of that. It is the budget of the default
    drain_timeout; a longer one the daemon asks for itself (tests/test_systemd_notify.py)."""
    from edgerun.adapters.mqtt.config import DaemonConfig
    from edgerun.adapters.mqtt.daemon import OFFLINE_WAIT_S, stop_budget
    from edgerun.adapters.ota.agent import CLOSE_WAIT_S

    text = systemd_unit(load_profile("raspberry-pi-5"))
    default = DaemonConfig(repository=Path("m"), broker="mqtt://h", device_id="d")
    drain = default.drain_timeout
    timeout = float(_service(text)["TimeoutStopSec"])
    assert timeout > drain + OFFLINE_WAIT_S + CLOSE_WAIT_S
    assert timeout >= stop_budget(default)
    # the comment above it states the waits the code has
    for wait in (f"up to drain_timeout, {drain:g} s by default", f"up to {OFFLINE_WAIT_S:g} s",
                 f"up to {CLOSE_WAIT_S:g} s"):
        assert wait in " ".join(text.replace("#", "").split()), wait
    # a killed one-file binary leaves its unpacked copy in TMPDIR: emptied before each start
    assert text.index("ExecStartPre=/bin/rm -rf /var/lib/edgerun/.tmp\n") < text.index(
        "ExecStartPre=/bin/mkdir -p /var/lib/edgerun/.tmp\n")


def test_the_unit_waits_for_the_daemons_ready_notification():
    """Type=simple gave the daemon no way to ask for a longer stop: systemd read no
    notification. The one-file binary's Python runs in a child of the bootloader, which is the
    main PID, so NotifyAccess=main would drop READY=1 (and the unit never start)."""
    service = _service(systemd_unit(load_profile("jetson-orin")))
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "all"
    # READY=1 comes before the models load: the default start timeout, no unbounded wait
    assert "TimeoutStartSec" not in service


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


# ------------------------------------------------------------- device.toml as the daemon reads it
class _DaemonIn(DaemonProcess):
    """The daemon started in another folder, as systemd starts it in /var/lib/edgerun."""

    def __init__(self, command: list[str], log: Path, cwd: Path) -> None:
        super().__init__(command, log)
        self.cwd = cwd

    def start(self) -> _DaemonIn:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT,
                                            cwd=self.cwd)
        return self


def test_relative_paths_in_device_toml_are_relative_to_the_file(tmp_path):
    """/etc/edgerun/device.toml naming `models` meant the folder beside it, not one in the
    daemon's working directory (/var/lib/edgerun under systemd): the daemon refused to start."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "var"
    add_version(etc / "models", "mlp", "1", mlp_onnx([4, 8, 3]))
    (etc / "board.toml").write_text('description = "a board of our own"\nintra_op_threads = 1\n')
    generate_keys(etc / "keys")  # and the OTA agent's trust key, in its [ota] table
    elsewhere.mkdir()
    with running_broker(tmp_path / "broker") as broker:
        (etc / "device.toml").write_text(
            f'repository = "models"\ndata_dir = "state"\nbroker = "{broker.url}"\n'
            'device_id = "rel"\npoll_interval = 0\ndevice = "board.toml"\n'
            '[ota]\ntrust = "keys/fleet.pub"\n')
        daemon = _DaemonIn([*edgerun_command(), "daemon", "--config", str(etc / "device.toml")],
                           tmp_path / "daemon.log", elsewhere).start()
        try:
            answer = ask_once_then_stop(broker, "rel", daemon)
        finally:
            daemon.kill()
    assert answer["model_name"] == "mlp"
    assert (etc / "state").is_dir() and not (elsewhere / "state").exists()
    assert "'device': 'board'" in daemon.output()  # the profile beside device.toml
    assert (etc / "state" / "ota").is_dir()  # the OTA agent is on, trusting keys/fleet.pub


@pytest.mark.parametrize("line, message", [
    ("session_expiry = 86400.0", "session_expiry must be an integer"),  # struct.error at connect
    ("keepalive = 30.5", "keepalive must be an integer"),               # struct.error at connect
    ("session_expiry = 5000000000", "session_expiry must be at most"),  # struct.error too
    ("qos = 1.0", "qos must be an integer"),            # stayed up, never subscribed nor online
    ("max_inbox = \"1024\"", "max_inbox must be an integer"),              # TypeError traceback
    ("username = 1234", "username must be a string"),            # AttributeError inside paho
    ('log_level = "loud"', "log_level must be one of"),
    ("[ota]\ntrust = 5", "trust must be a path"),                        # TypeError traceback
    ('[ota]\ntrust = "k.pub"\nspeed_limit = "1k"', "[ota] speed_limit must be a number"),
])
def test_device_toml_values_of_the_wrong_type_end_start_up_with_the_reason(tmp_path, line,
                                                                          message):
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        config = tmp_path / "device.toml"
        config.write_text(f'repository = "{repo}"\nbroker = "{broker.url}"\ndevice_id = "typed"\n'
                          f'poll_interval = 0\n{line}\n')
        result = edgerun("daemon", "--config", str(config), timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--ota-speed-limit", "-5", "--ota-speed-limit must be a number of bytes/s of at least 0"),
    ("--ota-speed-time", "0", "--ota-speed-time must be a number of seconds above 0"),
    ("--ota-download-patience", "-1",
     "--ota-download-patience must be a number of seconds of at least 0"),
])
def test_a_bad_ota_download_flag_is_named_as_the_flag(tmp_path, flag, value, message):
    """A bad --ota-speed-limit or --ota-speed-time was reported as an `[ota]` table's key, on
    a device whose device.toml has no such table (or that has no device.toml at all)."""
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        result = edgerun("daemon", "--repository", str(repo), "--broker", broker.url,
                         "--device-id", "flagged", "--poll-interval", "0",
                         "--trust", str(tmp_path / "k.pub"), f"{flag}={value}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "[ota]" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_device_toml_that_is_not_utf8_is_named(tmp_path):
    """tomllib decodes the whole file first: a Latin-1 comment (an editor's choice) ended
    start-up with a bare UnicodeDecodeError that named no file."""
    config = tmp_path / "device.toml"
    config.write_bytes(b'# r\xe9seau du site\ndevice_id = "pi"\n')
    with pytest.raises(ValueError, match=f"{config}: not UTF-8 text.*at byte 3"):
        load_config(config)


def test_device_toml_sets_the_log_level(tmp_path):
    """`log_level`, like every flag, is a device.toml key; it was refused as unknown, so a
    device under systemd could change its logging only by editing the unit."""
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 3]))
    with running_broker(tmp_path / "broker") as broker:
        config = tmp_path / "device.toml"
        config.write_text(f'repository = "{repo}"\nbroker = "{broker.url}"\ndevice_id = "quiet"\n'
                          'poll_interval = 0\nlog_level = "warning"\n')
        command = [*edgerun_command(), "daemon", "--config", str(config)]
        with running_daemon(repo, broker, "quiet", command=command) as daemon:
            assert daemon.terminate() == 0
    assert "INFO" not in daemon.output()  # "loaded mlp version 1" and "connected" are INFO
    loud = load_config(config, log_level="debug")  # the flag still wins
    assert loud.log_level == "debug"


@pytest.mark.timeout(900)
def test_the_binary_refuses_unusable_files_with_status_2(built, tmp_path):
    """A missing TLS CA or OTA trust key raised inside the one-file binary, which has no
    handler of its own: a traceback and status 1, and for the CA no file name at all."""
    binary = str(built / "edgerun-daemon")
    repo = tmp_path / "repo"
    repo.mkdir()
    base = ["--repository", str(repo), "--device-id", "bin", "--poll-interval", "0"]
    for args, named in ((["--broker", "mqtts://127.0.0.1:1", "--ca-file", "missing-ca.crt"],
                         "missing-ca.crt"),
                        (["--broker", "mqtt://127.0.0.1:1", "--trust", "missing.pub"],
                         "missing.pub")):
        result = subprocess.run([binary, *base, *args], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_misspelt_table_in_device_toml_is_refused(tmp_path):
    """Any table was kept for "the extensions": `[oat]` for `[ota]` started a daemon that
    took no updates, and said nothing."""
    repo = tmp_path / "repo"
    repo.mkdir()
    key = tmp_path / "fleet.pub"
    key.write_text("")
    config = tmp_path / "device.toml"
    config.write_text(f'repository = "{repo}"\nbroker = "mqtt://127.0.0.1:1"\ndevice_id = "t"\n'
                      f'[oat]\ntrust = "{key}"\n')
    result = edgerun("daemon", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "unknown table(s) oat; known: ota" in result.stderr, result.stderr


@pytest.mark.parametrize("tables, named", [
    ('["o\\nta"]\ntrust = "k"\n', "unknown table(s) 'o\\nta'; known: ota"),
    ('[ota]\n"trust\\ned" = "k"\n', "unknown key(s) 'trust\\ned' in [ota]; known: trust"),
])
def test_a_quoted_key_in_device_toml_is_named_on_one_line(tmp_path, tables, named):
    """A quoted key or table name holding a newline was named as it is, and the error took
    two lines (a log reader saw half of it): it is shown escaped."""
    repo = tmp_path / "repo"
    repo.mkdir()
    config = tmp_path / "device.toml"
    config.write_text(f'repository = "{repo}"\nbroker = "mqtt://127.0.0.1:1"\ndevice_id = "t"\n'
                      + tables)
    result = edgerun("daemon", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr, result.stderr


def test_a_misspelt_key_in_the_ota_table_is_refused(tmp_path):
    """Only the table's name was checked: `trusted` for `trust` (or `speed-limit`, with the
    dash a top-level key may have) started a daemon whose OTA agent stayed off, or whose
    downloads kept the default limit, and said nothing."""
    repo = tmp_path / "repo"
    repo.mkdir()
    config = tmp_path / "device.toml"
    config.write_text(f'repository = "{repo}"\nbroker = "mqtt://127.0.0.1:1"\ndevice_id = "t"\n'
                      'poll_interval = 0\n[ota]\ntrusted = "fleet.pub"\nspeed-limit = 0\n')
    result = edgerun("daemon", "--config", str(config), timeout=30)  # it served on, OTA off
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"edgerun daemon: {config}: unknown key(s) speed-limit, trusted in [ota]; known: trust,"
        " credential, speed_limit, speed_time, download_patience"), result.stderr
