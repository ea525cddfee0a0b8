"""Stopping with requests held: real `edgerun serve` and `edgerun daemon` processes, real signals.

A SIGTERM (a rolling update, `systemctl stop`) must not cost a request its answer: requests
queued in a batcher behind a long batching delay run at once, and the process exits 0 well
before the platform's kill timeout, even while a model is still loading.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.fleet_sim import wait_for
from tests.helpers import _model, identity_onnx
from tests.mqtt import (DaemonProcess, Requester, connect, daemon_command, read_retained,
                        running_broker, running_daemon)
from tests.serving import add_version, running_server

#: A batching delay far past uvicorn's 30 s grace period, and room for every request in one
#: batch: without a flush at SIGTERM these requests waited a minute, and were cut off first.
PATIENT = """
[batching]
max_batch_size = 1024
max_queue_delay_us = 60000000
max_queue_size = 1024
"""
#: Well under the 60 s delay and the 30 s grace period; seconds, whatever the machine.
PROMPT_S = 20


@pytest.fixture
def patient_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    add_version(repo, "patient", "1", identity_onnx("float32", ["b", 2]))
    (repo / "patient" / "config.toml").write_text(PATIENT)
    return repo


def slow_load_onnx(size: int = 1024) -> bytes:
    """y = x + mean(A @ A), A a [size, size] ConstantOfShape: ONNX Runtime folds the product
    while it creates each session (tens of ms at 1024), so loading is slow, running is not."""
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0 / size])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["a"], value=value),
         helper.make_node("MatMul", ["a", "a"], ["aa"]),
         helper.make_node("ReduceMean", ["aa"], ["mean"], keepdims=0),
         helper.make_node("Add", ["x", "mean"], ["y"])], "slow_load",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        [numpy_helper.from_array(np.array([size, size], np.int64), "shape")])
    return _model(graph)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def body(rows: list[list[float]]) -> bytes:
    data = [value for row in rows for value in row]
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(rows), 2],
                                   "data": data}]}).encode()


def in_thread(function, *args) -> tuple[threading.Thread, list]:
    """Run `function(*args)` on a thread; its result (or the exception it raised) lands in
    the list."""
    result: list = []

    def run() -> None:
        try:
            result.append(function(*args))
        except Exception as exc:  # kept for the assertion, which names it
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_runs_queued_requests_at_once_and_exits_0(patient_repo):
    """Requests over HTTP and gRPC wait in one batcher behind a 60 s delay; SIGTERM runs them
    now: each gets a 200 with its own rows, and the server exits 0 in seconds."""
    with running_server(patient_repo, grpc=True) as server:
        rows = {f"http-{i}": [[i, -i]] for i in range(3)}
        rows.update({f"grpc-{i}": [[10 + i, 0.5], [20 + i, 0.25]] for i in range(2)})
        calls = {}
        for key, value in rows.items():
            if key.startswith("http"):
                calls[key] = in_thread(lambda b: httpx.post(
                    server.url + "/v2/models/patient/infer", content=b, timeout=90), body(value))
            else:
                calls[key] = in_thread(_grpc_infer, server.grpc_address, value)
        wait_for(lambda: metric(server, "edgerun_queue_depth", model="patient",
                                version="1") == len(rows), 30, "all five requests to queue")
        assert metric(server, "edgerun_batch_size_count", model="patient", version="1") == 0
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread, _ in calls.values():
            thread.join(90)
        status = server.process.wait(90)
        took = time.monotonic() - signalled
        output = server.output()
    for key, (_, result) in calls.items():
        assert len(result) == 1, key
        answer = result[0]
        if key.startswith("http"):
            assert isinstance(answer, httpx.Response), (key, answer)
            assert answer.status_code == 200, (key, answer.status_code, answer.text)
            got = answer.json()["outputs"][0]
            assert got["shape"] == [1, 2] and got["data"] == [v for r in rows[key] for v in r]
        else:
            assert isinstance(answer, np.ndarray), (key, answer)
            assert answer.tolist() == rows[key]
    assert status == 0, output
    assert took < PROMPT_S, f"exited {took:.1f} s after SIGTERM:\n{output}"
    assert "Exception in ASGI application" not in output


def test_a_request_still_arriving_at_sigterm_is_answered_and_new_ones_are_refused(
        patient_repo):
    """A request whose body is still coming when SIGTERM lands is answered for real (it
    waits no batching delay); while the server stops, new connections are refused and a new
    gRPC call gets UNAVAILABLE: nothing is answered with a 500."""
    with running_server(patient_repo, grpc=True) as server:
        queued = in_thread(lambda: httpx.post(server.url + "/v2/models/patient/infer",
                                              content=body([[1, 2]]), timeout=90))
        wait_for(lambda: metric(server, "edgerun_queue_depth", model="patient",
                                version="1") == 1, 30, "the first request to queue")
        payload = body([[7, 8]])
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"POST /v2/models/patient/infer HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload[:10]))
        # the server has read the head once it answers a request sent after it
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        channel = tgrpc.InferenceServerClient(server.grpc_address)
        assert channel.is_server_live()
        server.process.send_signal(signal.SIGTERM)
        refused = wait_for(lambda: _refuses_connections(server.port), 30,
                           "the HTTP listener to close")
        assert refused
        with pytest.raises(InferenceServerException) as late:
            channel.infer("patient", [_fp32(np.ones((1, 2), np.float32))])
        assert late.value.status() == "StatusCode.UNAVAILABLE", late.value
        assert server.process.poll() is None, "the server waits for the request still arriving"
        slow.sendall(payload[10:])
        answer = _read_response(slow)
        slow.close()
        queued[0].join(90)
        status = server.process.wait(90)
        output = server.output()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    got = json.loads(answer.split(b"\r\n\r\n", 1)[1])["outputs"][0]
    assert got["data"] == [7, 8]
    first = queued[1][0]
    assert isinstance(first, httpx.Response) and first.status_code == 200, first
    assert first.json()["outputs"][0]["data"] == [1, 2]
    assert status == 0, output
    assert "Exception in ASGI application" not in output


def _grpc_infer(address: str, rows: list[list[float]]) -> np.ndarray:
    client = tgrpc.InferenceServerClient(address)
    array = np.array(rows, np.float32)
    return client.infer("patient", [_fp32(array)], client_timeout=90).as_numpy("y")


def _fp32(array: np.ndarray) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length, read from a raw socket."""
    sock.settimeout(90)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_a_second_sigterm_ends_the_grpc_grace_period_too(patient_repo):
    """The first SIGTERM waits up to 30 s for calls in flight; a second one gave up on HTTP's
    connections at once but still waited out gRPC's grace. Here a call whose request message
    never comes holds the gRPC server open: the second signal ends it, and the process."""
    import grpc

    with running_server(patient_repo, grpc=True) as server:
        channel = grpc.insecure_channel(server.grpc_address)
        infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                     request_serializer=bytes, response_deserializer=bytes)
        never = threading.Event()

        def no_message():  # the call's head goes out, its one message never does
            never.wait(120)
            return
            yield

        holding = infer.future(no_message(), timeout=120)
        # streams of one connection are read in order: once a later call on it is answered,
        # the server holds the first one
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=bytes, response_deserializer=bytes)
        live(b"", timeout=30)
        assert not holding.done()
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses_connections(server.port), 30, "the HTTP listener to close")
        assert not holding.done() and server.process.poll() is None, \
            "the first signal waits for calls in flight"
        server.process.send_signal(signal.SIGTERM)
        forced = time.monotonic()
        status = server.process.wait(90)
        took = time.monotonic() - forced
        never.set()
        error = holding.exception(30)
        code = error.code() if error is not None else None
        channel.close()
        output = server.output()
    assert status == 0, output
    assert took < PROMPT_S, f"exited {took:.1f} s after the second signal:\n{output}"
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), code
    assert "Traceback" not in output, output


def test_sigterm_while_models_load_stops_the_server_at_once(tmp_path):
    """Model "a" is served while "b" takes minutes to load (thousands of instances): SIGTERM
    waited for b's load (closing the repository queued behind it), past Kubernetes' grace
    period; and a process that ended with a load under way aborted when the loading thread
    came back from ONNX Runtime. It ends in seconds with status 0."""
    repo = tmp_path / "models"
    add_version(repo, "a", "1", identity_onnx("float32", ["b", 2]))
    add_version(repo, "b", "1", slow_load_onnx())
    (repo / "b" / "config.toml").write_text("instances = 5000\n")
    with running_server(repo, ready=False) as server:
        wait_for(lambda: httpx.get(server.url + "/v2/models/a/ready").status_code == 200, 60,
                 "model a to load")
        assert httpx.get(server.url + "/v2/health/ready").status_code != 200  # b loads
        server.process.send_signal(signal.SIGTERM)
        try:
            status = server.process.wait(PROMPT_S)
        except subprocess.TimeoutExpired:
            status = "still running"
        output = server.output()
    assert status == 0, output
    assert "terminate called" not in output


# ------------------------------------------------------------------------ the MQTT daemon
def test_sigterm_while_models_load_stops_the_daemon_at_once(tmp_path):
    """A load can take minutes (a TensorRT engine build); SIGTERM waited for it, past
    systemd's 60 s stop timeout and into its SIGKILL. Here model "a" loads at once and "b"
    takes minutes (thousands of instances): SIGTERM during b's load ends the daemon in
    seconds with status 0, and it never went online."""
    repo = tmp_path / "repo"
    add_version(repo, "a", "1", identity_onnx("float32", ["b", 2]))
    add_version(repo, "b", "1", slow_load_onnx())
    (repo / "b" / "config.toml").write_text("instances = 5000\n")
    with running_broker(tmp_path / "broker") as broker:
        daemon = DaemonProcess(daemon_command(repo, broker, "loading"), tmp_path / "daemon.log")
        daemon.start()
        try:
            wait_for(lambda: "loaded a version 1" in daemon.output(), 60, "model a to load")
            assert daemon.process.poll() is None
            status = daemon.terminate(PROMPT_S)
        finally:
            daemon.kill()
        assert read_retained(broker, "edgerun/loading/status", timeout=1) is None
    assert status == 0, daemon.output()
    assert "loaded b version 1" not in daemon.output()
    assert "terminate called" not in daemon.output()


def test_sigterm_answers_the_daemons_queued_requests_at_once(tmp_path):
    """Requests the daemon took (and acknowledged: the broker never sends them again) wait in
    a batcher behind a 60 s delay; SIGTERM runs them now and answers each before the daemon
    disconnects. They waited out the 10 s drain, the daemon disconnected, and their answers,
    published a minute later into the closed session, were lost."""
    repo = tmp_path / "repo"
    add_version(repo, "patient", "1", identity_onnx("float32", ["b", 2]))
    (repo / "patient" / "config.toml").write_text(PATIENT)
    rows = [[[i, -i]] for i in range(4)]
    with running_broker(tmp_path / "broker") as broker:
        requester = Requester(broker)
        with running_daemon(repo, broker, "patient", "--telemetry-interval", "0.2") as daemon:
            keys = [requester.send("edgerun/patient/infer/patient", body(r)) for r in rows]
            _wait_for_inbox(broker, "patient", len(keys))
            assert not any(k in requester.answers for k in keys)
            status = daemon.terminate(PROMPT_S)
        requester.wait(keys, timeout=30)
        requester.close()
        offline = read_retained(broker, "edgerun/patient/status")
    assert status == 0, daemon.output()
    for key, sent in zip(keys, rows):
        (payload, _), = requester.answers[key]
        answer = orjson.loads(payload)
        assert "error" not in answer, answer
        assert answer["outputs"][0]["data"] == sent[0]
    assert offline["state"] == "offline"


def _wait_for_inbox(broker, device_id: str, depth: int, timeout: float = 30) -> None:
    """Until the daemon's telemetry counts `depth` requests taken and not yet answered."""
    got: queue.Queue = queue.Queue()
    client = connect(broker)
    client.on_message = lambda c, u, m: got.put(orjson.loads(m.payload))
    client.subscribe(f"edgerun/{device_id}/telemetry", 0)
    deadline = time.monotonic() + timeout
    try:
        while got.get(timeout=max(0.0, deadline - time.monotonic()))["inbox_depth"] != depth:
            pass
    finally:
        client.disconnect()
        client.loop_stop()
