"""A simulated fleet on a real broker: Mosquitto, devices (agents in threads), load, registry.

Each `SimDevice` is what `edgerun daemon` is to the agent: a paho client subscribed to its
`edgerun/<id>/ota` topic feeding a real `OtaAgent`, its own data folder and `Repository`, a
`DataPlane` answering requests, retained status with its group, and telemetry (p50/p99 and
errors over the last interval) from the load it serves. Used by the tests and by
benchmarks/ota.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import uvicorn

from edgerun.adapters.auth.devices import DeviceCredentials
from edgerun.adapters.auth.tokens import TokenStore, create_token
from edgerun.adapters.dataplane import Call, DataPlane
from edgerun.adapters.dataplane.call import INFER
from edgerun.adapters.http.registry import FleetAccess, create_registry_app
from edgerun.adapters.ota.agent import OtaAgent
from edgerun.devices import load_profile
from edgerun.runtime import create_bundle, signing
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from tests.mqtt import Broker, running_broker  # noqa: F401 (the broker the fleet runs on)
from tests.serving import free_port

PROFILE = load_profile("cpu").replace(intra_op_threads=1, inter_op_threads=1,
                                      allow_spinning=False)


def mqtt_client(client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(0.1, 1.0)
    return client


class LoadStats:
    """Requests one device answered: counts since start, latencies since the last telemetry
    (the shape `edgerun daemon` reports)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors = 0
        self.total = 0
        self.failed: list[str] = []

    def record(self, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.total += 1
            if error:
                self.errors += 1
                self.failed.append(error)

    def window(self) -> dict:
        with self.lock:
            latencies, self.latencies = self.latencies, []
            counts = {"requests": self.total, "errors": self.errors}
        if not latencies:
            return counts
        ms = np.array(latencies) * 1000
        return {**counts, "latency_ms": {"p50": float(np.percentile(ms, 50)),
                                         "p99": float(np.percentile(ms, 99))}}


class SimDevice:
    """One device: broker connection, agent, repository, data plane, status and telemetry."""

    def __init__(self, device_id: str, folder: Path, broker: Broker, trusted: list,
                 initial: Path | None, group: str = "fleet", telemetry_s: float = 0.3,
                 credential: str | None = None) -> None:
        self.device_id, self.group, self.folder = device_id, group, folder
        models = folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        if initial is not None:
            with open(initial / "manifest.json") as handle:
                manifest = json.load(handle)
            shutil.copytree(initial, models / manifest["name"] / manifest["version"])
        self.repository = Repository(models, PROFILE, registry=Registry())
        self.plane = DataPlane(self.repository)
        self.stats = LoadStats()
        self.client = mqtt_client(device_id)
        self.client.will_set(f"edgerun/{device_id}/status", json.dumps(
            {"state": "offline", "group": group}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.agent.handle_job(m.payload)
        self.agent = OtaAgent(publish=self.client.publish, repository=self.repository,
                              device_id=device_id, data_dir=folder / "data", trusted=trusted,
                              group=group, credential=credential)
        self.repository.load_all()
        self.agent.recover()
        self.broker = broker
        self._stop = threading.Event()
        self._telemetry = threading.Thread(target=self._publish_telemetry, args=(telemetry_s,),
                                           daemon=True)

    def start(self) -> SimDevice:
        self.client.connect_async("127.0.0.1", self.broker.port, keepalive=10)
        self.client.loop_start()
        self._telemetry.start()
        return self

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        client.subscribe(self.agent.topic, qos=1)
        client.publish(f"edgerun/{self.device_id}/status", json.dumps(
            {"state": "online", **self.agent.describe()}), qos=1, retain=True)

    def _publish_telemetry(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self.client.is_connected():
                self.client.publish(f"edgerun/{self.device_id}/telemetry", json.dumps(
                    {**self.stats.window(), "group": self.group}), qos=0)

    def go_offline(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def come_back(self) -> None:
        self.client.reconnect()
        self.client.loop_start()

    def served(self, model: str) -> list[str]:
        return self.repository.versions(model)

    def infer(self, body: bytes, model: str = "m") -> str | None:
        started = time.perf_counter()
        reply = self.plane.handle(Call(INFER, model=model, body=body, transport="mqtt"))
        error = None if reply.error is None else f"{reply.error.kind}: {reply.error}"
        self.stats.record(time.perf_counter() - started, error)
        return error

    def close(self) -> None:
        self._stop.set()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
        self.agent.close()
        self.repository.close()


class SteadyLoad:
    """Threads sending requests round-robin over devices until stopped; counts failures."""

    def __init__(self, devices: list[SimDevice], body: bytes, threads: int = 3,
                 pause: float = 0.002) -> None:
        self.devices, self.body, self.pause = devices, body, pause
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            self.devices[i % len(self.devices)].infer(self.body)
            i += 1
            time.sleep(self.pause)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def total(self) -> int:
        return sum(d.stats.total for d in self.devices)

    @property
    def failures(self) -> list[str]:
        return [f for d in self.devices for f in d.stats.failed]


def infer_body(width: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, width],
                                   "data": [0.5] * width}]}).encode()


def make_bundle(folder: Path, onnx_bytes: bytes, name: str, version: str,
                key: Path | None) -> Path:
    """A bundle folder, signed with `key` when given."""
    source = folder / f"{name}-{version}.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    source.write_bytes(onnx_bytes)
    bundle = create_bundle(source, folder / f"{name}-{version}", name=name, version=version)
    if key is not None:
        signing.sign_folder(bundle.path, key)
    return bundle.path


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what or predicate}")


class FleetServer:
    """`edgerun fleet serve` as a real process (restartable, killable)."""

    def __init__(self, data: Path, broker: Broker, trust: list[Path],
                 extra: Sequence[str] = (), preexec: Callable[[], None] | None = None) -> None:
        self.data, self.broker, self.trust, self.extra = data, broker, trust, list(extra)
        self.preexec = preexec  # run in the child before it starts (a resource limit)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> FleetServer:
        from tests.cli import edgerun_command

        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.data / "server.log", "ab")
        self.process = subprocess.Popen(
            [*edgerun_command(), "fleet", "serve", "--data", str(self.data), "--broker",
             self.broker.url, "--port", str(self.port),
             *[a for key in self.trust for a in ("--trust", str(key))], *self.extra],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec)
        import httpx

        def up() -> bool:
            assert self.process.poll() is None, (self.data / "server.log").read_text()
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 60, "fleet serve to answer")
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str) -> dict:
        import httpx

        return httpx.get(self.url + path, timeout=10).json()

    def deploy(self, **spec) -> dict:
        import httpx

        answer = httpx.post(self.url + "/rollouts", json=spec, timeout=30)
        assert answer.status_code == 201, answer.text
        return answer.json()

    def wait_rollout(self, rollout_id: str, states=("completed", "aborted"),
                     timeout: float = 120) -> dict:
        return wait_for(lambda: (s := self.get(f"/rollouts/{rollout_id}"))["state"] in states
                        and s, timeout, f"rollout {rollout_id} to end")


@dataclass
class Downloads:
    """The registry's bundle downloads at `base`, each device with its own secret."""

    base: str
    secrets: dict[str, str]

    def fetch(self, device: str, version: str) -> int:
        """The status of `device`'s own download of m:`version`."""
        return httpx.get(f"{self.base}/bundles/m/{version}",
                         auth=(device, self.secrets[device]), timeout=30).status_code


@contextmanager
def registry_downloads(tmp_path: Path, store, registry, orchestrator,
                       devices: Sequence[str]) -> Iterator[Downloads]:
    """The registry's HTTP app on loopback behind device credentials, `devices` enrolled."""
    credentials = DeviceCredentials(store.db)
    secrets = {device: credentials.enroll(device) for device in devices}
    create_token("read", tmp_path / "tokens", tmp_path / "read.secret", name="read")
    access = FleetAccess(TokenStore(tmp_path / "tokens"), store, credentials)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_registry_app(registry, orchestrator, access, credentials), port=port,
        log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn")
        yield Downloads(f"http://127.0.0.1:{port}", secrets)
    finally:
        server.should_exit = True
        thread.join(10)
