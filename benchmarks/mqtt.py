"""The MQTT edge daemon's speed over a loopback Mosquitto, against the harness and a naive daemon.

    python benchmarks/mqtt.py [--seconds 4] [--binary PATH] [--write]

One model (MLP 128-512-512-10, fp32), one row per request as OIP v2 JSON, MQTT v5 request/
response (Response Topic + Correlation Data), QoS 1 both ways. The load generator (a paho client
in this process, TCP_NODELAY on its socket, no client-side in-flight cap) keeps 1, 64 or 256
requests in flight (closed loop), then offers 500 requests/s (open loop), after a warm-up.
Responders, each its own process, each on two brokers (Mosquitto's defaults, and
`set_tcp_nodelay true`):
(a) the harness ceiling: a paho responder that answers every request at once and runs nothing;
(b) a naive daemon: paho with its defaults, one ONNX Runtime call per message, JSON in and out;
(c) `edgerun daemon` on a repository holding the model.
Also: idle RSS of `edgerun daemon` (and of the one-file binary, with --binary or when it can be
built here), and the binary's size.
Targets (nodelay broker, 64 in flight): edgerun >= 0.8x the ceiling and >= 1.4x the naive
daemon, with a p99 below the naive daemon's; at an offered 500/s, p99 <= 10 ms; idle RSS <=
120 MB; binary <= 60 MB. `--write` records the tables in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SCRATCH, machine, markdown_table, percentiles, record  # noqa: E402

SIZES = (128, 512, 512, 10)
LOADS: tuple[tuple[str, int], ...] = (("closed", 1), ("closed", 64), ("closed", 256),
                                      ("open", 500))


# --------------------------------------------------------------------- responders
def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def responder(kind: str, port: int, topic: str, model: str | None) -> None:
    """(a) echo: answers at once; (b) naive: paho defaults, one ORT call per message."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if kind == "echo":
        client.on_socket_open = _nodelay
        client.max_inflight_messages = 0
        answer = b'{"outputs":[]}'

        def on_message(client, userdata, message) -> None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = message.properties.CorrelationData
            client.publish(message.properties.ResponseTopic, answer, 1, properties=properties)
    else:
        import onnxruntime as ort
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

        def on_message(client, userdata, message) -> None:
            request = json.loads(message.payload)
            tensor = request["inputs"][0]
            x = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            y = session.run(None, {"x": x})[0]
            body = json.dumps({"model_name": "mlp", "outputs": [
                {"name": "y", "datatype": "FP32", "shape": list(y.shape),
                 "data": y.ravel().tolist()}]})
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = message.properties.CorrelationData
            client.publish(message.properties.ResponseTopic, body, 1, properties=properties)

    ready = threading.Event()
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, 1)
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.wait(10)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    client.disconnect()
    client.loop_stop()


# ------------------------------------------------------------------ load generator
class Load:
    """A paho v5 requester: closed loop (N in flight) or open loop (a fixed rate)."""

    def __init__(self, port: int, topic: str, body: bytes) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._Properties, self._PUBLISH = Properties, PacketTypes.PUBLISH
        self.topic, self.body = topic, body
        self.reply = f"bench/replies/{os.getpid()}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_socket_open = _nodelay
        self.client.max_inflight_messages = 0
        self.client.on_message = self._on_message
        self._ids = itertools.count()
        self._sent: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self.closed_loop = False
        self.latencies: list[float] = []
        self.errors = self.answered = 0
        self.recording = False
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.reply, 1)
        subscribed.wait(10)

    def send(self) -> None:
        key = str(next(self._ids)).encode()
        properties = self._Properties(self._PUBLISH)
        properties.ResponseTopic = self.reply
        properties.CorrelationData = key
        with self._lock:
            self._sent[key] = time.perf_counter()
        self.client.publish(self.topic, self.body, 1, properties=properties)

    def _on_message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        with self._lock:
            started = self._sent.pop(message.properties.CorrelationData, None)
        if started is None:
            return
        self.answered += 1
        if self.recording:
            if message.payload.startswith(b'{"error"'):
                self.errors += 1
            self.latencies.append(now - started)
        if self.closed_loop:
            self.send()

    def run(self, mode: str, level: int, seconds: float, warmup: float) -> dict[str, Any]:
        self.latencies, self.errors, self.answered = [], 0, 0
        if mode == "closed":
            self.closed_loop = True
            for _ in range(level):
                self.send()
            time.sleep(warmup)
            self.recording, started = True, time.perf_counter()
            time.sleep(seconds)
            self.recording = False
            elapsed = time.perf_counter() - started
            self.closed_loop = False
        else:
            interval, next_at = 1 / level, time.perf_counter()
            end_warmup = next_at + warmup
            end = end_warmup + seconds
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if now >= end_warmup and not self.recording:
                    self.recording, started = True, now
                if now >= next_at:
                    self.send()
                    next_at += interval
                else:
                    time.sleep(min(next_at - now, 0.001))
            time.sleep(0.5)  # the last answers
            self.recording = False
            elapsed = seconds
        # the next run starts once this one's requests are answered (a saturated responder
        # has a backlog), or after 30 s
        deadline = time.monotonic() + 30
        while self._sent and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self._sent.clear()
        count = len(self.latencies)
        return {"rps": count / elapsed, "count": count, "errors": self.errors,
                "total": self.answered,
                **(percentiles(self.latencies) if count else {"p50": float("nan"),
                                                              "p99": float("nan")})}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def start_broker(nodelay: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = SCRATCH / f"mosquitto-{port}.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000"]
    if nodelay:
        lines.append("set_tcp_nodelay true")
    config.write_text("\n".join(lines) + "\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, port


def start_daemon(port: int, repo: Path, command: list[str] | None = None) -> subprocess.Popen:
    """`edgerun daemon` (or the one-file binary) on the broker, once it says it is online."""
    command = command or [str(Path(sys.executable).with_name("edgerun")), "daemon"]
    process = subprocess.Popen(
        [*command, "--repository", str(repo), "--broker", f"mqtt://127.0.0.1:{port}",
         "--device-id", "bench", "--poll-interval", "0", "--telemetry-interval", "0",
         "--log-level", "warning"], stdout=subprocess.DEVNULL)
    wait_status(port)
    return process


def start_responder(kind: str, port: int, topic: str, model: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "responder", kind, str(port), topic,
                                str(model)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def wait_status(port: int, timeout: float = 60) -> None:
    """Wait until the daemon's status says online (an older retained "offline" may come first)."""
    watcher = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", "edgerun/bench/status",
                                "-W", str(int(timeout))], stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    try:
        for line in watcher.stdout:
            if '"online"' in line:
                return
        raise RuntimeError("edgerun daemon never came online")
    finally:
        watcher.kill()
        watcher.wait()


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the one-file binary runs as two)."""
    total = 0
    for candidate in [pid, *_children(pid)]:
        for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far."""
    total = 0.0
    for candidate in [pid, *_children(pid)]:
        fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found]


# --------------------------------------------------------------------------- main
def prepare() -> tuple[Path, Path, bytes]:
    from edgerun.examples import mlp_onnx
    from edgerun.runtime import create_bundle

    model = SCRATCH / "mqtt-mlp.onnx"
    model.write_bytes(mlp_onnx(list(SIZES)))
    repo = SCRATCH / "mqtt-repo"
    if not (repo / "mlp" / "1").is_dir():
        create_bundle(model, repo / "mlp" / "1", name="mlp", version="1")
    row = np.random.default_rng(0).normal(size=(1, SIZES[0])).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, SIZES[0]],
                                   "data": row.ravel().tolist()}]}).encode()
    return model, repo, body


def measure(seconds: float, warmup: float, brokers: tuple[bool, ...] = (False, True),
            loads: tuple[tuple[str, int], ...] = LOADS) -> list[dict[str, Any]]:
    model, repo, body = prepare()
    results = []
    for nodelay in brokers:
        broker, port = start_broker(nodelay)
        try:
            for kind, topic in (("echo", "bench/echo"), ("naive", "bench/naive"),
                                ("edgerun", "edgerun/bench/infer/mlp")):
                process = start_daemon(port, repo) if kind == "edgerun" else \
                    start_responder(kind, port, topic, model)
                load = Load(port, topic, body)
                try:
                    for mode, level in loads:
                        cpu = cpu_seconds(process.pid)
                        result = load.run(mode, level, seconds, warmup)
                        cpu = cpu_seconds(process.pid) - cpu
                        result.update(nodelay=nodelay, kind=kind, mode=mode, level=level,
                                      cpu_ms=1000 * cpu / max(result["total"], 1))
                        results.append(result)
                        print(f"nodelay={nodelay} {kind:8s} {mode} {level:4d}: "
                              f"{result['rps']:8.0f}/s p50 {result['p50']:7.2f} ms "
                              f"p99 {result['p99']:7.2f} ms errors {result['errors']} "
                              f"cpu {result['cpu_ms']:.3f} ms/answer",
                              flush=True)
                finally:
                    load.close()
                    stop(process)
        finally:
            stop(broker)
    return results


def idle_footprint(binary: Path | None) -> dict[str, Any]:
    _, repo, _ = prepare()
    broker, port = start_broker(True)
    found: dict[str, Any] = {}
    try:
        for name, command in (("edgerun daemon", None),
                              ("one-file binary", [str(binary)] if binary else None)):
            if name == "one-file binary" and binary is None:
                continue
            process = start_daemon(port, repo, command)
            time.sleep(3)
            found[name] = rss_mb(process.pid)
            stop(process)
    finally:
        stop(broker)
    if binary is not None:
        found["binary_mb"] = binary.stat().st_size / 2**20
    return found


def build_binary() -> Path | None:
    try:
        from edgerun.devices.daemon_build import build_daemon
        return build_daemon("cpu", SCRATCH / "daemon-build").binary
    except Exception as exc:  # PyInstaller missing, say
        print(f"could not build the one-file binary: {exc}", file=sys.stderr)
        return None


def report(results: list[dict[str, Any]], footprint: dict[str, Any], seconds: float) -> str:
    names = {"echo": "harness ceiling (echo)", "naive": "naive daemon", "edgerun": "edgerun daemon"}
    by = {(r["nodelay"], r["kind"], r["mode"], r["level"]): r for r in results}
    rows = []
    for r in results:
        load = f"{r['level']} in flight" if r["mode"] == "closed" else f"{r['level']}/s offered"
        rows.append([("nodelay" if r["nodelay"] else "defaults"), names[r["kind"]], load,
                     f"{r['rps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                     f"{r['cpu_ms']:.2f}", r["errors"]])
    text = [f"Command: `python benchmarks/mqtt.py --seconds {seconds:g} --write`  ",
            f"Machine: {machine()}, Mosquitto {mosquitto_version()}, model MLP "
            f"{'-'.join(map(str, SIZES))} fp32, one row per request, OIP v2 JSON, QoS 1  ",
            f"Load average during the run: {os.getloadavg()[0]:.1f} (the machine is shared; "
            "CPU per answer is the steadier figure)", "",
            markdown_table(["broker", "responder", "load", "answers/s", "p50 (ms)", "p99 (ms)",
                            "responder CPU (ms/answer)", "errors"], rows), ""]
    targets = []
    edge, echo, naive = (by.get((True, k, "closed", 64)) for k in ("edgerun", "echo", "naive"))
    open_edge = by.get((True, "edgerun", "open", 500))
    if edge and echo and naive:
        targets += [
            ["64 in flight: vs the harness ceiling", f"{edge['rps'] / echo['rps']:.2f}x",
             ">= 0.8x", _met(edge["rps"] >= 0.8 * echo["rps"])],
            ["64 in flight: vs the naive daemon", f"{edge['rps'] / naive['rps']:.2f}x",
             ">= 1.4x", _met(edge["rps"] >= 1.4 * naive["rps"])],
            ["64 in flight: p99 vs the naive daemon's", f"{edge['p99']:.2f} vs "
             f"{naive['p99']:.2f} ms", "below", _met(edge["p99"] < naive["p99"])]]
    if open_edge:
        targets.append(["500/s offered: p99", f"{open_edge['p99']:.2f} ms", "<= 10 ms",
                        _met(open_edge["p99"] <= 10)])
    for name in ("edgerun daemon", "one-file binary"):
        if name in footprint:
            targets.append([f"idle RSS, {name}", f"{footprint[name]:.0f} MB", "<= 120 MB",
                            _met(footprint[name] <= 120)])
    if "binary_mb" in footprint:
        targets.append(["one-file binary size", f"{footprint['binary_mb']:.1f} MB", "<= 60 MB",
                        _met(footprint["binary_mb"] <= 60)])
    text += ["Targets (broker with `set_tcp_nodelay true`):", "",
             markdown_table(["what", "measured", "target", ""], targets)]
    return "\n".join(text)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def mosquitto_version() -> str:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True).stdout
    return out.split("version", 1)[1].split()[0] if "version" in out else "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["responder"]:
        kind, port, topic, model = argv[1:5]
        responder(kind, int(port), topic, model)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per cell (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--binary", type=Path, help="a built edgerun-daemon (else built here)")
    parser.add_argument("--no-binary", action="store_true", help="skip the one-file binary")
    parser.add_argument("--quick", action="store_true",
                        help="development: nodelay broker, 64 in flight and 500/s only")
    parser.add_argument("--write", action="store_true", help="record in benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.quick:
        print(measure(args.seconds, args.warmup, (True,), (("closed", 64), ("open", 500))))
        return 0
    binary = None if args.no_binary else (args.binary or build_binary())
    footprint = idle_footprint(binary)
    results = measure(args.seconds, args.warmup)
    text = report(results, footprint, args.seconds)
    print(text)
    if args.write:
        record("mqtt", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
