"""A real Mosquitto on a free loopback port, `edgerun daemon` processes, and a paho requester."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.cli import edgerun_command
from tests.serving import free_port

INFER_JSON = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "data": [1, 2, 3, 4]}]})


class Broker:
    """`mosquitto -c <own config>`; stop() and start() again keep its port and persistence."""

    def __init__(self, folder: Path, *, nodelay: bool = True, tls: dict | None = None) -> None:
        self.folder = folder
        self.tls = tls
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "persistence true", f"persistence_location {folder}/",
                 "max_queued_messages 10000", f"set_tcp_nodelay {str(nodelay).lower()}"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write here
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      "require_certificate true"]
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([mosquitto, "-c", str(self.config)], stdout=sink,
                                            stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process, self.log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves its persistence file on the way out
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_broker(folder: Path, **options) -> Iterator[Broker]:
    broker = Broker(folder, **options)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 10) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited:\n{log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class DaemonProcess:
    """`edgerun daemon ...` (or the one-file binary) as a child process."""

    def __init__(self, command: Sequence[str], log: Path) -> None:
        self.command = list(command)
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        return self

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def daemon_command(repo: Path, broker: Broker, device_id: str, *args: str) -> list[str]:
    return [*edgerun_command(), "daemon", "--repository", str(repo), "--broker", broker.url,
            "--device-id", device_id, "--poll-interval", "0", *args]


@contextmanager
def running_daemon(repo: Path, broker: Broker, device_id: str, *args: str,
                   command: Sequence[str] | None = None) -> Iterator[DaemonProcess]:
    log = repo.parent / f"daemon-{device_id}-{uuid.uuid4().hex[:6]}.log"
    daemon = DaemonProcess(command or daemon_command(repo, broker, device_id, *args), log)
    daemon.start()
    try:
        wait_online(broker, device_id, daemon)
        yield daemon
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.terminate()


def wait_online(broker: Broker, device_id: str, daemon: DaemonProcess | None = None,
                timeout: float = 60) -> dict:
    """Wait for the retained status to say online (a fresh one, from this start)."""
    started = time.time() - 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{daemon.output()}")
        status = read_retained(broker, f"edgerun/{device_id}/status", timeout=1)
        if status and status["state"] == "online" and status["ts"] >= started:
            return status
        time.sleep(0.2)
    raise TimeoutError(f"{device_id} never came online:\n"
                       f"{daemon.output() if daemon else ''}")


def ask_once_then_stop(broker: Broker, device_id: str, daemon: DaemonProcess) -> dict:
    """Once `daemon` is online, one inference of its model `mlp` (INFER_JSON), then SIGTERM,
    which it must end with status 0; the answer."""
    wait_online(broker, device_id, daemon)
    requester = Requester(broker)
    try:
        payload, _ = requester.ask(f"edgerun/{device_id}/infer/mlp", INFER_JSON,
                                   correlation=device_id.encode())
    finally:
        requester.close()
    assert daemon.terminate() == 0
    return orjson.loads(payload)


def read_retained(broker: Broker, topic: str, timeout: float = 2) -> dict | None:
    got: list[bytes] = []
    done = threading.Event()
    client = connect(broker)

    def on_message(client, userdata, message):
        got.append(message.payload)
        done.set()

    client.on_message = on_message
    client.subscribe(topic, 1)
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return orjson.loads(got[0]) if got else None


def connect(broker: Broker, *, protocol: int = mqtt.MQTTv5, client_id: str = "",
            clean: bool = True, tls: dict | None = None) -> mqtt.Client:
    """A paho client with its network loop started, connected (waits for CONNACK)."""
    v5 = protocol == mqtt.MQTTv5
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                         clean_session=None if v5 else clean)
    client.max_inflight_messages = 0
    tls = tls or broker.tls
    if tls:
        client.tls_set(ca_certs=tls["ca"], certfile=tls.get("client_cert"),
                       keyfile=tls.get("client_key"))
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600 if not clean else 0
        client.connect("127.0.0.1", broker.port, 30, clean_start=clean, properties=properties)
    else:
        client.connect("127.0.0.1", broker.port, 30)
    client.loop_start()
    assert connected.wait(10), "no CONNACK"
    return client


class Requester:
    """Sends requests with Correlation Data and collects every answer by it (duplicates too)."""

    def __init__(self, broker: Broker, *, client_id: str = "", clean: bool = True) -> None:
        self.reply_topic = f"replies/{uuid.uuid4().hex}"
        self.answers: dict[bytes, list[tuple[bytes, Properties]]] = {}
        #: Answers the broker delivered again (DUP set: it restarted before our PUBACK).
        self.redelivered: dict[bytes, list[bytes]] = {}
        self.acknowledged: set[bytes] = set()
        self._condition = threading.Condition()
        self._ids = itertools.count()
        self.client = connect(broker, client_id=client_id, clean=clean)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._mids: dict[int, bytes] = {}
        self._early: set[int] = set()
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(self.reply_topic, 1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        key = getattr(message.properties, "CorrelationData", b"")
        with self._condition:
            if message.dup and key in self.answers:
                self.redelivered.setdefault(key, []).append(message.payload)
                return
            self.answers.setdefault(key, []).append((message.payload, message.properties))
            self._condition.notify_all()

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._condition:
            key = self._mids.pop(mid, None)
            if key is None:
                self._early.add(mid)  # acknowledged before send() recorded the mid
            else:
                self.acknowledged.add(key)

    def send(self, topic: str, payload: bytes, *, content_type: str | None = None,
             user: list[tuple[str, str]] | None = None, correlation: bytes | None = None,
             qos: int = 1) -> bytes:
        key = correlation if correlation is not None else f"c{next(self._ids)}".encode()
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = key
        if content_type:
            properties.ContentType = content_type
        if user:
            properties.UserProperty = user
        # not under the lock: paho's thread may be waiting for it in on_publish
        info = self.client.publish(topic, payload, qos, properties=properties)
        with self._condition:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acknowledged.add(key)
            else:
                self._mids[info.mid] = key
        return key

    def wait(self, keys: Sequence[bytes], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._condition:
            while not all(k in self.answers for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [k for k in keys if k not in self.answers]
                    raise TimeoutError(f"{len(missing)} of {len(keys)} unanswered, e.g. "
                                       f"{missing[:3]}")
                self._condition.wait(left)

    def ask(self, topic: str, payload: bytes, timeout: float = 30, **options
            ) -> tuple[bytes, Properties]:
        key = self.send(topic, payload, **options)
        self.wait([key], timeout)
        return self.answers[key][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def user_properties(properties: Properties) -> dict[str, str]:
    return dict(getattr(properties, "UserProperty", []))
