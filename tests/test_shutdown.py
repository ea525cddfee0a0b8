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

from tests.cli import edgerun
from tests.fleet_sim import wait_for
from tests.helpers import _model, identity_onnx
from tests.mqtt import (DaemonProcess, Requester, connect, daemon_command, read_retained,
                        running_broker, running_daemon)
from tests.serving import add_version, free_port, running_server

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


def exit_status(wait) -> int | str:
    """What `wait` gives (a stopped process's exit status), or "still running"."""
    try:
        return wait()
    except subprocess.TimeoutExpired:
        return "still running"


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
        slow = _started_post(server.port, "/v2/models/patient/infer", payload)
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


def test_answers_sent_once_sigterm_lands_say_connection_close(patient_repo):
    """The requests SIGTERM runs at once were answered keep-alive (uvicorn turns its
    connections to closing only at its next tick), and their connections stayed open until
    then: a client reusing one lost its next request to the close. Once stopping, every
    answer says `Connection: close` and closes its connection; an idle connection closes,
    and one whose request head is still coming gets its answer, closing, too."""
    with running_server(patient_repo) as server:
        queued = socket.create_connection(("127.0.0.1", server.port))
        queued.sendall(_post(body([[1, 2]])))
        wait_for(lambda: metric(server, "edgerun_queue_depth", model="patient",
                                version="1") == 1, 30, "the request to queue")
        idle = socket.create_connection(("127.0.0.1", server.port))
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _read_response(idle).startswith(b"HTTP/1.1 200 ")
        head = socket.create_connection(("127.0.0.1", server.port))
        head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        # the server has read that part once it answers a request sent after it
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        answer = _read_response(queued)
        after = _rest(queued)
        idle.settimeout(90)
        closed = idle.recv(1024)
        head.sendall(b"st: t\r\n\r\n")
        late = _read_response(head)
        for sock in (queued, idle, head):
            sock.close()
        status = server.process.wait(90)
        output = server.output()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["outputs"][0]["data"] == [1, 2]
    assert re.search(rb"(?im)^connection: close\r$", answer), answer
    assert after == b"", "the connection closes after the answer"
    assert closed == b"", "an idle connection closes"
    assert late.startswith(b"HTTP/1.1 200 "), late
    assert re.search(rb"(?im)^connection: close\r$", late), late
    assert status == 0, output


def _post(payload: bytes, path: str = "/v2/models/patient/infer") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))


def _rest(sock: socket.socket) -> bytes:
    """What a raw socket still reads until the server closes it."""
    sock.settimeout(90)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_request_a_second_sigterm_cuts_off_gets_503_with_its_request_id(patient_repo):
    """A request whose body never finished when a second SIGTERM ended the grace got a 503
    without X-Request-Id, the one answer that carried none: the caller could not match it
    to its logs. It carries the caller's id."""
    with running_server(patient_repo) as server:
        payload = body([[7, 8]])
        slow = _started_post(server.port, "/v2/models/patient/infer", payload,
                             b"X-Request-Id: cut-off-1")
        # the server has read the head once it answers a request sent after it
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses_connections(server.port), 30, "the HTTP listener to close")
        server.process.send_signal(signal.SIGTERM)
        answer = _read_response(slow)
        slow.close()
        status = exit_status(lambda: server.process.wait(PROMPT_S))
        output = server.output()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert re.search(rb"(?im)^x-request-id: cut-off-1\r$", answer), answer
    assert status == 0, output


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


def _started_post(port: int, path: str, payload: bytes,
                  header: bytes = b"Content-Type: application/json") -> socket.socket:
    """A raw connection that has sent a POST's head and its body's first 10 bytes only."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\n%s\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), header, len(payload), payload[:10]))
    return sock


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
        status = exit_status(lambda: server.process.wait(PROMPT_S))
        output = server.output()
    assert status == 0, output
    assert "terminate called" not in output


@pytest.mark.parametrize("taken", ["http", "grpc", "host"])
def test_a_port_in_use_ends_start_up_naming_it_before_any_model_loads(tmp_path, taken):
    """A port in use (or a --host that is no address) ended start-up while model "b" loaded:
    the loading thread, inside ONNX Runtime as the interpreter ended, aborted the process
    ("terminate called", SIGABRT), and over HTTP uvicorn's error named no address and the
    status was 3. Loading starts once both ports listen; the error names the address, and
    the status is 2, as for the command's other errors; uvicorn's own line for it ("ERROR:
    [Errno -2] Name or service not known") is not printed too."""
    repo = tmp_path / "models"
    add_version(repo, "b", "1", slow_load_onnx())
    (repo / "b" / "config.toml").write_text("instances = 5000\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        used = holder.getsockname()[1]
        ports = {"http": ["--port", str(used)],
                 "grpc": ["--port", str(free_port()), "--grpc-port", str(used)],
                 "host": ["--port", str(used), "--host", "nosuch.invalid"]}[taken]
        result = edgerun("serve", "--repository", str(repo), *ports, timeout=PROMPT_S)
    assert result.returncode == 2, result.stderr
    host = "nosuch.invalid" if taken == "host" else "127.0.0.1"
    assert f"could not listen on {host}:{used}" in result.stderr
    assert "terminate called" not in result.stderr
    assert "still loading" not in result.stderr
    assert "ERROR:" not in result.stderr, result.stderr
    if taken == "grpc":  # nor gRPC's, logged from C ("E1206 ... add_port.cc:83] ... Address
        # already in use"), the reason edgerun's line left out ("set GRPC_VERBOSITY=debug")
        assert result.stderr == (f"error: gRPC could not listen on 127.0.0.1:{used}: "
                                 "Address already in use\n")


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


# ------------------------------------------------------------- hot swaps, cut-off requests
def slow_run_onnx(size: int = 2048, products: int = 10) -> bytes:
    """y = x, after `products` [size, size] matrix products that depend on x (0 * sum(x)),
    so ONNX Runtime cannot fold them: each forward pass takes about a second, loading does
    not."""
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0 / size])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"], value=value),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Add", ["c", "z"], ["a0"])]
    for i in range(products):
        nodes.append(helper.make_node("MatMul", [f"a{i}", "a0"], [f"a{i + 1}"]))
    nodes += [helper.make_node("ReduceMean", [f"a{products}"], ["mean"], keepdims=0),
              helper.make_node("Mul", ["mean", "zero"], ["m"]),
              helper.make_node("Add", ["x", "m"], ["y"])]
    graph = helper.make_graph(
        nodes, "slow_run", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        [numpy_helper.from_array(np.array([size, size], np.int64), "shape"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return _model(graph)


def _loading(server) -> bool:
    index = httpx.post(server.url + "/v2/repository/index", timeout=10).json()
    return any(entry["state"] == "LOADING" for entry in index)


def test_sigterm_during_a_polled_hot_swap_stops_the_server_at_once(tmp_path):
    """`--poll-interval` found version 2, which takes minutes to load, when SIGTERM came:
    closing the repository waited for the poller's load, past Kubernetes' grace period.
    The request queued in version 1 is answered, and the server exits 0 in seconds."""
    repo = tmp_path / "models"
    add_version(repo, "m", "1", identity_onnx("float32", ["b", 2]))
    (repo / "m" / "config.toml").write_text(PATIENT)
    with running_server(repo, "--poll-interval", "0.2") as server:
        queued = in_thread(lambda: httpx.post(server.url + "/v2/models/m/infer",
                                              content=body([[1, 2]]), timeout=90))
        wait_for(lambda: metric(server, "edgerun_queue_depth", model="m", version="1") == 1,
                 30, "the request to queue")
        (repo / "m" / "config.toml").write_text("instances = 5000\n" + PATIENT)
        add_version(repo, "m", "2", slow_load_onnx())
        wait_for(lambda: _loading(server), 60, "the hot swap to start loading")
        server.process.send_signal(signal.SIGTERM)
        status = exit_status(lambda: server.process.wait(PROMPT_S))
        queued[0].join(30)
        output = server.output()
    assert status == 0, output
    answer = queued[1][0]
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert "terminate called" not in output and "Traceback" not in output, output


def test_a_second_signal_during_a_load_call_answers_503_and_exits(tmp_path):
    """POST /v2/repository/models/m/load runs for minutes when SIGTERM comes, and a second
    signal ends the grace: the call got uvicorn's 500 with an "Exception in ASGI application"
    traceback, then the process waited for the load (the loop's executor, then the
    repository). The call is answered 503 and the process exits 0 at once."""
    repo = tmp_path / "models"
    add_version(repo, "m", "1", identity_onnx("float32", ["b", 2]))
    with running_server(repo) as server:
        (repo / "m" / "config.toml").write_text("instances = 5000\n")
        add_version(repo, "m", "2", slow_load_onnx())
        load = in_thread(lambda: httpx.post(server.url + "/v2/repository/models/m/load",
                                            timeout=120))
        wait_for(lambda: _loading(server), 60, "the load to start")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses_connections(server.port), 30, "the HTTP listener to close")
        server.process.send_signal(signal.SIGTERM)
        status = exit_status(lambda: server.process.wait(PROMPT_S))
        load[0].join(30)
        output = server.output()
    assert status == 0, output
    answer = load[1][0]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, (answer, output)
    assert "error" in answer.json()
    assert "Traceback" not in output and "terminate called" not in output, output


def test_a_request_routed_to_a_version_swapped_in_after_sigterm_waits_no_delay(tmp_path):
    """SIGTERM flushed the batchers of the versions served then; a load still under way
    (here POST .../load, held through the grace period) swapped in a version whose batcher
    was not: a request routed to it after the swap waited out its 60 s batching delay, and
    was cut off at the end of the 30 s grace. It is answered at once."""
    repo = tmp_path / "models"
    add_version(repo, "m", "1", identity_onnx("float32", ["b", 2]))
    (repo / "m" / "config.toml").write_text(PATIENT)
    with running_server(repo) as server:
        payload = body([[7, 8]])
        held = _started_post(server.port, "/v2/models/m/infer", payload)
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        (repo / "m" / "config.toml").write_text("instances = 100\n" + PATIENT)
        add_version(repo, "m", "2", slow_load_onnx())
        load = in_thread(lambda: httpx.post(server.url + "/v2/repository/models/m/load",
                                            timeout=120))
        wait_for(lambda: _loading(server), 60, "the load to start")
        server.process.send_signal(signal.SIGTERM)
        load[0].join(60)  # answered once version 2 is swapped in
        swapped = load[1][0]
        held.sendall(payload[10:])
        sent = time.monotonic()
        answer = _read_response(held)
        took = time.monotonic() - sent
        held.close()
        status = server.process.wait(90)
        output = server.output()
    assert isinstance(swapped, httpx.Response) and swapped.status_code == 200, (swapped, output)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    got = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert got["model_version"] == "2"  # y = x + a constant about 1e-3
    assert np.allclose(got["outputs"][0]["data"], [7, 8], atol=1e-2), got
    assert took < PROMPT_S, f"answered {took:.1f} s after its body"
    assert status == 0, output


def test_sigterm_during_a_polled_hot_swap_stops_the_daemon_at_once(tmp_path):
    """The daemon's poller was loading version 2 (minutes) when SIGTERM came: closing the
    repository waited for it, past systemd's 60 s TimeoutStopSec and into its SIGKILL. The
    daemon says offline and exits 0 in seconds."""
    repo = tmp_path / "repo"
    add_version(repo, "m", "1", identity_onnx("float32", ["b", 2]))
    with running_broker(tmp_path / "broker") as broker:
        command = daemon_command(repo, broker, "swapping")
        command[command.index("--poll-interval") + 1] = "0.2"
        with running_daemon(repo, broker, "swapping", command=command) as daemon:
            (repo / "m" / "config.toml").write_text("instances = 5000\n")
            add_version(repo, "m", "2", slow_load_onnx())
            time.sleep(2)  # the poller is minutes into loading version 2
            status = exit_status(lambda: daemon.terminate(PROMPT_S))
        offline = read_retained(broker, "edgerun/swapping/status")
    assert status == 0, daemon.output()
    assert "loaded m version 2" not in daemon.output()
    assert "terminate called" not in daemon.output() and "Traceback" not in daemon.output()
    assert offline["state"] == "offline"


@pytest.mark.parametrize("qos", [0, 2])
def test_requests_the_broker_hands_over_while_the_daemon_drains_are_answered(tmp_path, qos):
    """A draining daemon left new requests unacknowledged for its next session. That works at
    QoS 1 only: at QoS 2 paho had sent PUBREC already, so the broker repeats only its PUBREL,
    never the request, and at QoS 0 there is no next time. Both were lost; both are
    answered."""
    repo = tmp_path / "repo"
    add_version(repo, "slow", "1", slow_run_onnx(products=5))
    (repo / "slow" / "config.toml").write_text("[batching]\nmax_batch_size = 1\n")
    with running_broker(tmp_path / "broker") as broker:
        requester = Requester(broker)
        qos_args = ("--qos", str(qos), "--telemetry-interval", "0.2", "--drain-timeout", "90")
        with running_daemon(repo, broker, "draining", *qos_args) as daemon:
            first = [requester.send("edgerun/draining/infer/slow", body([[i, 0]]), qos=qos)
                     for i in range(4)]
            _wait_for_inbox(broker, "draining", 4)
            daemon.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # draining: the first of four forward passes (each ~1 s) runs
            late = [requester.send("edgerun/draining/infer/slow", body([[10 + i, 0]]), qos=qos)
                    for i in range(3)]
            status = daemon.process.wait(120)
        # a next session answers whatever the broker kept for it (QoS 1's way)
        with running_daemon(repo, broker, "draining", *qos_args):
            try:
                requester.wait(first + late, timeout=60)
            except TimeoutError:
                pass
        requester.close()
    assert status == 0, daemon.output()
    unanswered = [key for key in first + late if key not in requester.answers]
    assert not unanswered, (unanswered, daemon.output())
    for key, rows in zip(first + late, [*range(4), *range(10, 13)]):
        (payload, _), *_ = requester.answers[key]
        assert orjson.loads(payload)["outputs"][0]["data"] == [rows, 0]


def test_a_daemon_past_its_drain_timeout_exits_without_running_the_backlog(tmp_path):
    """Past --drain-timeout the daemon says "exiting anyway", yet closing the repository ran
    every request still queued (and waited up to 60 s more per version) for answers that
    could only go into the closed session: a minute and more, past systemd's TimeoutStopSec.
    It exits 0 within seconds of the drain timeout."""
    repo = tmp_path / "repo"
    add_version(repo, "slow", "1", slow_run_onnx())
    (repo / "slow" / "config.toml").write_text("[batching]\nmax_batch_size = 1\n")
    with running_broker(tmp_path / "broker") as broker:
        requester = Requester(broker)
        with running_daemon(repo, broker, "backlog", "--drain-timeout", "2",
                            "--telemetry-interval", "0.2") as daemon:
            for i in range(60):
                requester.send("edgerun/backlog/infer/slow", body([[i, 0]]))
            _wait_for_inbox(broker, "backlog", 60)
            signalled = time.monotonic()
            status = exit_status(lambda: daemon.terminate(90))
            took = time.monotonic() - signalled
        requester.close()
        offline = read_retained(broker, "edgerun/backlog/status")
    assert status == 0, daemon.output()
    assert took < PROMPT_S, f"exited {took:.1f} s after SIGTERM:\n{daemon.output()}"
    assert "exiting anyway" in daemon.output() and "Traceback" not in daemon.output()
    assert offline["state"] == "offline"
