"""Mosquitto on generated broker files plus a loopback listener, and a paho v5 test client."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.serving import free_port

QUIET = 0.7  # how long a message that must not arrive gets to arrive anyway


@contextmanager
def broker(directory: Path, port: int | None = None, listening: bool = False,
           user: str = "root") -> Iterator[tuple[int, subprocess.Popen]]:
    """Mosquitto on the generated config plus a loopback listener on `port` (a free one by
    default), as an operator adds one; or, `listening`, on a config whose own listeners
    include `port`. Started by root, it runs as `user` (root, unless the test is about it)."""
    port = port or free_port()
    config = directory / "test.conf"
    lines = [] if listening else [f"listener {port} 127.0.0.1"]
    if os.geteuid() == 0:
        lines.append(f"user {user}")
    config.write_text((directory / "mosquitto.conf").read_text() + "\n".join(lines) + "\n")
    log = (directory / "mosquitto.log").open("wb")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (directory / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto never listened"
                time.sleep(0.05)
        yield port, process
    finally:
        process.terminate()
        process.wait(10)
        log.close()


class Peer:
    """A paho MQTT v5 client with a queue of what it receives."""

    def __init__(self, port: int, username: str, password: str,
                 client_id: str | None = None, ca: str | None = None) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()
        self.dropped: queue.Queue = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"{username}-test",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        if ca is not None:  # TLS, the broker's certificate checked against this CA
            self.client.tls_set(ca_certs=ca)
        self.client.on_connect = lambda c, u, f, reason, p: self.connected.put(reason)
        self.client.on_disconnect = lambda c, u, f, reason, p: self.dropped.put(reason)
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.acks.put(reasons)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.reason = self.connected.get(timeout=5)

    @property
    def accepted(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> list:
        self.client.subscribe(topic, qos=1)
        return self.acks.get(timeout=5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, timeout: float = 5) -> tuple[str, bytes]:
        return self.inbox.get(timeout=timeout)

    def nothing(self) -> bool:
        try:
            self.inbox.get(timeout=QUIET)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
