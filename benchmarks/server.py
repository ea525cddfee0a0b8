"""The fleet HTTP server's speed, against the limits of this machine and the server users write.

    python benchmarks/server.py [--seconds 5] [--write]
    python benchmarks/server.py --seconds 2 --only grpc,binary   # a quick check, not recorded

One compute-bound model (MLP 1024-4096-4096-10, fp32), one row per request. Each server runs
alone, as its own process; the load generator (benchmarks/loadgen.py, closed loop, keep-alive)
runs as another process on the same cores, after a warm-up. Measured in the same run:
(a) the echo ceiling: a raw ASGI app on uvicorn (benchmarks/echo_asgi.py) answering edgerun's
    own answer, canned, at concurrency 64: what HTTP and the load generator cost, the harness
    alone;
(b) the ORT limit: bare ONNX Runtime in-process (default session options) on pre-stacked
    batches of its best size, the compute alone; the ideal is 1 / (1/echo + 1/limit), a server
    whose only costs were HTTP and the forward pass;
(c) `edgerun serve` with OIP v2 JSON at concurrency 1, 16 and 64, and with the binary tensor
    extension (binary in, binary out, as tritonclient sends) at 64;
(d) plain FastAPI (benchmarks/plain_fastapi.py): sync endpoint, pydantic body, one
    `InferenceSession.run` per request, at concurrency 1, 16 and 64;
(e) `edgerun serve --grpc-port` under benchmarks/grpc_loadgen.py (async gRPC, closed loop, the
    same row in raw_input_contents, raw outputs back) at concurrency 64.
(f) the gRPC echo ceiling: benchmarks/echo_grpc.py, a grpc.aio server answering every ModelInfer
    with edgerun's answer, canned, under the same gRPC load generator: what grpcio costs on
    these cores, and with the limit the gRPC ideal.
Every server's CPU time per response (from /proc, over the whole load-generator run) is printed
beside its throughput: on a shared machine it moves far less than req/s does.
Targets at concurrency 64: edgerun JSON >= 0.75x the ideal, binary >= 0.85x, p99 no worse than
the previous recorded run's; >= 3x plain FastAPI's throughput with a p99 no worse; at
concurrency 1, p50 minus the batch-1 compute time <= 1 ms; gRPC raw >= 0.9x the HTTP binary
figure. `--write` records the tables in benchmarks/README.md (only when every server ran).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from common import (SCRATCH, bare_limit, machine, markdown_table, median,  # noqa: E402
                    mlp_bundle, record)

from edgerun.runtime import create_bundle  # noqa: E402

HERE = Path(__file__).parent
SIZES = (1024, 4096, 4096, 10)
MODEL = "mlp"
CONCURRENCY = (1, 16, 64)
TOP = max(CONCURRENCY)
WARMUP_S = 1.0
READY_TIMEOUT_S = 120.0
ECHO, JSON_RUN, BINARY_RUN = "echo ASGI (ceiling)", "edgerun JSON", "edgerun binary"
GRPC_RUN, PLAIN = "edgerun gRPC raw", "plain FastAPI"
GRPC_ECHO = "gRPC echo (ceiling)"
#: --only's names for the servers.
SELECT = {"echo": ECHO, "json": JSON_RUN, "binary": BINARY_RUN, "grpc-echo": GRPC_ECHO,
          "grpc": GRPC_RUN, "plain": PLAIN}
#: HTTP/2 connections grpc_loadgen.py spreads its calls over (see its --channels).
GRPC_CHANNELS = 1
#: The previous recorded run's p99 at concurrency 64 (edgerun JSON): "p99 no worse than today".
PREVIOUS_P99_MS = 35.09


@dataclass
class ServerRun:
    """What one server produced: a result per concurrency, or why it could not run."""

    name: str
    body_file: Path
    concurrency: tuple[int, ...] = CONCURRENCY
    headers: list[str] = field(default_factory=list)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failure: str = ""
    outputs_match: bool | None = None


def _selection(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SELECT]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--only takes some of {', '.join(SELECT)}, got "
                                         f"{text!r}")
    return names


def make_body(rows: np.ndarray) -> bytes:
    """OIP v2 JSON for one row, floats rounded to 6 significant digits."""
    data = [float(f"{v:.6g}") for v in rows.ravel()]
    return json.dumps({"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": data}]}).encode()


def make_binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    """The same row with the binary tensor extension, outputs asked for as binary too."""
    header = json.dumps({"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": rows.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + np.ascontiguousarray(rows, "<f4").tobytes(), len(header)


def canned_answer(expected: np.ndarray) -> bytes:
    """edgerun's JSON answer to the benchmark request, for the echo app to send as it is."""
    return json.dumps({"model_name": MODEL, "model_version": "1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": list(expected.shape),
         "data": [float(v) for v in expected.ravel()]}]}).encode()


def canned_grpc_answer(expected: np.ndarray) -> bytes:
    """edgerun's gRPC answer to the benchmark call (raw output contents), serialized."""
    from edgerun.adapters.grpc import grpc_predict_v2_pb2 as pb

    response = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    response.outputs.add(name="y", datatype="FP32", shape=expected.shape)
    response.raw_output_contents.append(np.ascontiguousarray(expected, "<f4").tobytes())
    return response.SerializeToString()


def make_repository(model_path: Path) -> Path:
    """REPO/mlp/1/ is a bundle of the same model file named mlp version 1.

    Not a copy of the benchmark's own bundle: the repository refuses a folder whose bundle
    names another model or version.
    """
    repo = SCRATCH / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / MODEL).mkdir(parents=True)
    create_bundle(model_path, repo / MODEL / "1", name=MODEL, version="1")
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_server(command: list[str], port: int, log: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, http: bool = True
                 ) -> subprocess.Popen[bytes]:
    """Start a server and return once GET /v2/health/ready answers 200 (or, with `http`
    off, once the port accepts connections)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`{' '.join(command)}` exited with status {process.returncode} "
                               f"before it was ready:\n{log_tail(log)}")
        try:
            if not http:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return process
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"`{' '.join(command)}` was not ready after {READY_TIMEOUT_S:.0f} s:\n"
                       f"{log_tail(log)}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def first_output(port: int, path: str, body: bytes, headers: list[str]) -> np.ndarray:
    """One request through the server: its first output, to compare with bare ORT."""
    sent = {"Content-Type": "application/json"}
    sent.update(h.split(": ", 1) for h in headers)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=sent)
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        split = response.headers.get("Inference-Header-Content-Length")
    if split is None:
        output = json.loads(raw)["outputs"][0]
        return np.asarray(output["data"], np.float32).reshape(output["shape"])
    output = json.loads(raw[:int(split)])["outputs"][0]
    return np.frombuffer(raw[int(split):], "<f4").reshape(output["shape"])


def run_loadgen(port: int, path: str, run: ServerRun, connections: int,
                seconds: float) -> dict[str, Any]:
    """The load generator as its own process, so it never shares a GIL with what it measures."""
    command = [sys.executable, str(HERE / "loadgen.py"), "--host", "127.0.0.1", "--port",
               str(port), "--path", path, "--body-file", str(run.body_file), "--connections",
               str(connections), "--seconds", str(seconds), "--warmup", str(WARMUP_S)]
    for header in run.headers:
        command += ["--header", header]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=seconds + WARMUP_S + 120)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_server(run: ServerRun, command: list[str], path: str, expected: np.ndarray | None,
                   seconds: float, *, cwd: Path | None = None,
                   env: dict[str, str] | None = None,
                   compute: Callable[[], float] | None = None) -> None:
    """Start the server, check one answer, load it at each concurrency, stop it.

    Beside the load generator's figures, each result gets `server_cpu_us`: the server's CPU
    time over the whole load-generator run divided by every response it gave in that time.
    With `compute`, the concurrency-1 result also gets `compute_ms`: the batch-1 forward pass
    timed just before and just after it (their mean), since on this host that time moves by
    up to 2x from one minute to the next with the memory bandwidth left by its neighbours.
    """
    port = free_port()
    command = [arg.replace("{port}", str(port)) for arg in command]
    log = SCRATCH / f"{run.name.replace(' ', '-')}.log"
    try:
        process = start_server(command, port, log, cwd=cwd, env=env)
    except RuntimeError as exc:
        run.failure = str(exc)
        return
    try:
        if expected is not None:
            try:
                got = first_output(port, path, run.body_file.read_bytes(), run.headers)
                run.outputs_match = got.shape == expected.shape and bool(
                    np.allclose(got, expected, rtol=1e-3, atol=1e-4))
            except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError,
                    ValueError) as exc:
                print(f"{run.name}: first request failed: {exc}", file=sys.stderr)
                run.outputs_match = False
        for connections in run.concurrency:
            timed = compute is not None and connections == 1
            compute_before = compute() if timed else 0.0
            before = cpu_seconds(process.pid)
            result = run_loadgen(port, path, run, connections, seconds)
            spent = cpu_seconds(process.pid) - before
            result["server_cpu_us"] = spent / result["total"] * 1e6 if result["total"] \
                else float("nan")
            if timed:
                result["compute_ms"] = (compute_before + compute()) / 2
            run.results[connections] = result
            print(f"{run.name}, concurrency {connections}: {json.dumps(result)}",
                  file=sys.stderr)
        if process.poll() is not None:
            run.failure = (f"the server exited with status {process.returncode} during the "
                           f"run:\n{log_tail(log)}")
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
        run.failure = f"load generator failed: {exc}"
    finally:
        stop_server(process)


def edgerun_command(repo: Path) -> list[str]:
    """`edgerun serve` from this environment, or RuntimeError saying why it cannot run."""
    script = Path(sys.executable).parent / "edgerun"
    if not script.exists():
        raise RuntimeError(f"{script} does not exist (is edgerun installed in this venv?)")
    probe = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError("`edgerun serve` is not available in this checkout yet "
                           f"(`edgerun serve --help` exited {probe.returncode}: {last})")
    return [str(script), "serve", "--repository", str(repo), "--host", "127.0.0.1",
            "--port", "{port}"]


def bare_session(model_path: Path) -> ort.InferenceSession:
    """Default session options and the same providers as plain_fastapi.py."""
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    return ort.InferenceSession(str(model_path), providers=providers)


def batch1_compute_ms(session: ort.InferenceSession, row: np.ndarray, seconds: float) -> float:
    """Median time of one `session.run` on a single row: the floor for concurrency-1 latency."""
    for _ in range(20):
        session.run(None, {"x": row})
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 200:
        t0 = time.perf_counter()
        session.run(None, {"x": row})
        times.append(time.perf_counter() - t0)
    return median(times) * 1000


def ort_cpu_per_row(model_path: Path, rows: np.ndarray, batch: int, seconds: float) -> float:
    """CPU microseconds per row of the forward pass alone: one intra-op thread, no spinning.

    The least CPU any server must spend on the model per request. With it the ideal can be
    stated in CPU time too, which a machine shared with other work disturbs far less than
    req/s: a server that is CPU-bound on two quiet cores reaches the ideal in the ratio of
    the ideal's CPU per request to its own.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))
    session.run(None, {"x": x})
    count, start = 0, time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or count < 3:
        session.run(None, {"x": x})
        count += 1
    return (time.process_time() - start) / (count * batch) * 1e6


HALF_BUSY = """
import time
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.001:
        pass
    time.sleep(0.001)
"""


def contended_limit(session: ort.InferenceSession, rows: np.ndarray, batch: int,
                    seconds: float) -> float:
    """Bare ORT at the limit's batch size while another process keeps a core 50 % busy.

    A server's event loop and its load generator take at least that much CPU from the model,
    and two-thread ORT stalls whenever one of its threads is preempted: this is the ceiling for
    any server sharing these cores with its load, whatever its own cost per request.
    """
    x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))
    busy = subprocess.Popen([sys.executable, "-c", HALF_BUSY])
    try:
        time.sleep(0.3)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            session.run(None, {"x": x})
            count += 1
        return count * batch / (time.perf_counter() - start)
    finally:
        busy.kill()
        busy.wait()


def verdict(ok: bool | None) -> str:
    """A target nobody measured is not met."""
    return "MISSED (not measured)" if ok is None else ("met" if ok else "MISSED")


def server_table(runs: list[ServerRun]) -> str:
    rows: list[list[object]] = []
    for run in runs:
        for connections, r in run.results.items():
            rows.append([run.name, connections, f"{r['ok_rps']:,.1f}", f"{r['p50']:.2f}",
                         f"{r['p95']:.2f}", f"{r['p99']:.2f}", r["non_2xx"], r["errors"],
                         f"{r['server_cpu_us']:.0f}", f"{r['client_cpu_us']:.0f}"])
        if run.failure:
            rows.append([run.name, "-", "failed", "", "", "", "", "", "", ""])
    return markdown_table(["server", "concurrency", "req/s (2xx)", "p50 (ms)", "p95 (ms)",
                           "p99 (ms)", "non-2xx", "errors", "server CPU (us/req)",
                           "loadgen CPU (us/req)"], rows)


def _get(run: ServerRun | None, connections: int, key: str) -> float | None:
    result = None if run is None else run.results.get(connections)
    value = None if result is None else result[key]
    return None if value is None or math.isnan(value) else value


def _show(value: float | None, fmt: str, unit: str = "") -> str:
    return "not measured" if value is None else format(value, fmt) + unit


def ideal_rps(echo: ServerRun, limit: dict[str, float]) -> float | None:
    """A server whose only costs were HTTP (the echo ceiling) and the forward pass (the limit)."""
    echo_rps = _get(echo, TOP, "ok_rps")
    return None if not echo_rps else 1 / (1 / echo_rps + 1 / limit["rps"])


def cpu_per_request(run: ServerRun | None) -> float | None:
    """Server plus load-generator CPU per response at concurrency 64: all this machine spends."""
    server, client = _get(run, TOP, "server_cpu_us"), _get(run, TOP, "client_cpu_us")
    return None if server is None or client is None else server + client


def ratio_table(runs: dict[str, ServerRun], limit: dict[str, float]) -> str:
    """Each server at concurrency 64 against the echo ceiling, the ORT limit and the ideal,
    by throughput and by CPU time per request (ideal's CPU / the server's)."""
    ideal = ideal_rps(runs[ECHO], limit)
    echo_rps, echo_cpu = _get(runs[ECHO], TOP, "ok_rps"), cpu_per_request(runs[ECHO])
    ideal_cpu = None if echo_cpu is None else echo_cpu + limit["cpu_us"]
    rows: list[list[object]] = [
        ["echo ceiling: raw ASGI on uvicorn, canned answer", _show(echo_rps, ",.0f"), "",
         _show(echo_cpu, ",.0f"), ""],
        [f"ORT limit: bare ONNX Runtime at batch {limit['batch']:.0f} (CPU: one thread)",
         f"{limit['rps']:,.0f}", "", f"{limit['cpu_us']:,.0f}", ""],
        ["ideal: 1 / (1/echo + 1/limit); CPU: echo + forward pass", _show(ideal, ",.0f"),
         "1.00", _show(ideal_cpu, ",.0f"), "1.00"]]
    grpc_echo = runs.get(GRPC_ECHO)
    if grpc_echo is not None and grpc_echo.results:
        g_ideal, g_cpu = ideal_rps(grpc_echo, limit), cpu_per_request(grpc_echo)
        rows += [["gRPC echo ceiling: grpc.aio, canned answer",
                  _show(_get(grpc_echo, TOP, "ok_rps"), ",.0f"), "", _show(g_cpu, ",.0f"), ""],
                 ["gRPC ideal: 1 / (1/gRPC echo + 1/limit)", _show(g_ideal, ",.0f"),
                  _show(g_ideal / ideal if g_ideal and ideal else None, ".2f", "x"),
                  _show(None if g_cpu is None else g_cpu + limit["cpu_us"], ",.0f"), ""]]
    for name in (JSON_RUN, BINARY_RUN, GRPC_RUN, PLAIN):
        rps, cpu = _get(runs.get(name), TOP, "ok_rps"), cpu_per_request(runs.get(name))
        rows.append([name, _show(rps, ",.0f"),
                     _show(rps / ideal if rps is not None and ideal else None, ".2f", "x"),
                     _show(cpu, ",.0f"),
                     _show(ideal_cpu / cpu if cpu and ideal_cpu else None, ".2f", "x")])
    return markdown_table([f"concurrency {TOP}", "req/s", "vs ideal",
                           "CPU per request (us, server + loadgen)", "vs ideal, by CPU"], rows)


def target_table(runs: dict[str, ServerRun], limit: dict[str, float],
                 compute_ms: float) -> str:
    one = min(CONCURRENCY)
    ours, binary, plain, grpc = runs[JSON_RUN], runs[BINARY_RUN], runs[PLAIN], runs[GRPC_RUN]
    ideal = ideal_rps(runs[ECHO], limit)
    e_rps, b_rps, p_rps = (_get(r, TOP, "ok_rps") for r in (ours, binary, plain))
    g_rps = _get(grpc, TOP, "ok_rps")
    e_p99, b_p99, p_p99 = (_get(r, TOP, "p99") for r in (ours, binary, plain))
    e_p50 = _get(ours, one, "p50")
    compute_ms = _get(ours, one, "compute_ms") or compute_ms

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    json_ideal, binary_ideal = ratio(e_rps, ideal), ratio(b_rps, ideal)
    vs_plain, grpc_binary = ratio(e_rps, p_rps), ratio(g_rps, b_rps)
    overhead = e_p50 - compute_ms if e_p50 is not None else None
    rows = [
        [f"JSON throughput vs the ideal, concurrency {TOP}", _show(json_ideal, ".2f", "x"),
         ">= 0.75x", verdict(None if json_ideal is None else json_ideal >= 0.75)],
        [f"binary throughput vs the ideal, concurrency {TOP}", _show(binary_ideal, ".2f", "x"),
         ">= 0.85x", verdict(None if binary_ideal is None else binary_ideal >= 0.85)],
        [f"p99 at concurrency {TOP}, JSON / binary",
         f"{_show(e_p99, '.1f', ' ms')} / {_show(b_p99, '.1f', ' ms')}",
         f"<= {PREVIOUS_P99_MS:.1f} ms (previous run)",
         verdict(None if e_p99 is None or b_p99 is None
                 else max(e_p99, b_p99) <= PREVIOUS_P99_MS)],
        [f"gRPC raw vs HTTP binary, concurrency {TOP}",
         _show(grpc_binary, ".2f", "x") + (f" ({grpc.failure})" if grpc.failure else ""),
         ">= 0.9x", verdict(None if grpc_binary is None else grpc_binary >= 0.9)],
        [f"throughput vs plain FastAPI, concurrency {TOP}", _show(vs_plain, ".2f", "x"),
         ">= 3x", verdict(None if vs_plain is None else vs_plain >= 3)],
        [f"p99 vs plain FastAPI, concurrency {TOP}",
         f"{_show(e_p99, '.1f', ' ms')} vs {_show(p_p99, '.1f', ' ms')}", "no worse",
         verdict(None if e_p99 is None or p_p99 is None else e_p99 <= p_p99)],
        [f"p50 minus batch-1 compute ({compute_ms:.2f} ms, timed around the run), "
         f"concurrency {one}",
         _show(overhead, "+.2f", " ms"), "<= 1 ms",
         verdict(None if overhead is None else overhead <= 1)],
    ]
    ceiling = (f"Bare ORT at batch {limit['batch']:.0f} while another process keeps one core "
               f"50 % busy: {limit['contended']:,.0f} rows/s, "
               f"{limit['contended'] / limit['rps']:.2f}x the limit: the compute left to any "
               "server whose event loop and load generator share these two cores with the "
               "model.")
    g_ideal = ideal_rps(runs[GRPC_ECHO], limit) if GRPC_ECHO in runs else None
    if g_ideal and g_rps and b_rps:
        ceiling += (f" A gRPC server whose only costs were grpcio's and the forward pass (the gRPC "
                    f"ideal) would do {g_ideal:,.0f} req/s, {g_ideal / b_rps:.2f}x the HTTP "
                    f"binary figure; edgerun gRPC raw reaches {g_rps / g_ideal:.2f}x of it.")
    return markdown_table(["edgerun", "measured", "target", ""], rows) + "\n\n" + ceiling


def warnings(runs: list[ServerRun]) -> list[str]:
    """Everything a reader must not miss: servers that did not run, wrong answers, failures."""
    lines = []
    for run in runs:
        if run.failure:
            lines.append(f"{run.name} did not complete: {run.failure}")
        if run.outputs_match is False:
            lines.append(f"{run.name}'s answer does NOT match bare ONNX Runtime's")
        for connections, r in run.results.items():
            if r["non_2xx"] or r["errors"]:
                lines.append(f"{run.name} at concurrency {connections}: {r['non_2xx']} non-2xx "
                             f"responses (statuses {r['statuses']}), {r['errors']} errors "
                             f"{r['error_kinds'] or ''}")
    return lines


def report(runs: dict[str, ServerRun], limit: dict[str, float], compute_ms: float,
           seconds: float, only: tuple[str, ...] = tuple(SELECT)) -> str:
    """The recorded text: command, machine, the tables and every warning."""
    command = "python benchmarks/server.py" + (f" --seconds {seconds:g}"
                                               if seconds != 5.0 else "") + (
        f" --only {','.join(only)}" if set(only) != set(SELECT) else " --write")
    notes = warnings(list(runs.values()))
    measured = [run for run in runs.values() if run.results or run.failure]
    return (f"Command: `{command}`  \nMachine: {machine()}, onnxruntime {ort.__version__}, "
            f"fastapi {version('fastapi')}, uvicorn {version('uvicorn')}\n\n"
            f"MLP {'-'.join(map(str, SIZES))} fp32, one row per request, closed loop over "
            f"keep-alive connections, {seconds:g} s measured after {WARMUP_S:g} s warm-up; bare "
            f"ORT batch-1 compute {compute_ms:.2f} ms. JSON: OIP v2 JSON both ways; binary: the "
            "binary tensor extension both ways; gRPC: OIP v2 ModelInfer with "
            "raw_input_contents / raw_output_contents (as tritonclient sends), "
            f"{TOP} calls in flight over {GRPC_CHANNELS} HTTP/2 connection(s) from "
            "benchmarks/grpc_loadgen.py (its non-2xx are non-OK status codes). Server CPU is the "
            "server process's CPU time "
            "(all threads) per response over the whole load-generator run; loadgen CPU is the "
            "load generator's own, spent on the same cores.\n\n"
            f"{server_table(measured)}\n\n{ratio_table(runs, limit)}\n\n"
            f"{target_table(runs, limit, compute_ms)}"
            + ("\n\n" + "\n".join(f"- **{line}**" for line in notes) if notes else ""))


def grpc_available() -> str:
    """Why the gRPC row cannot be measured in this checkout, or "" when it can."""
    script = Path(sys.executable).parent / "edgerun"
    probe = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True)
    if "--grpc-port" not in probe.stdout:
        return "`edgerun serve` has no --grpc-port in this checkout"
    return ""


def run_grpc_loadgen(grpc_port: int, run: ServerRun, seconds: float,
                     first_output: Path) -> dict[str, Any]:
    """benchmarks/grpc_loadgen.py as its own process (it must never share one with
    tritonclient, which registers the same protobuf package)."""
    command = [sys.executable, str(HERE / "grpc_loadgen.py"), "--port", str(grpc_port),
               "--model", MODEL, "--input", f"x={run.body_file}", "--connections", str(TOP),
               "--channels", str(GRPC_CHANNELS), "--seconds", str(seconds), "--warmup",
               str(WARMUP_S), "--first-output", str(first_output)]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=seconds + WARMUP_S + 120)
    if done.returncode != 0:
        raise RuntimeError(f"grpc_loadgen failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_grpc(run: ServerRun, repo: Path, expected: np.ndarray, seconds: float) -> None:
    """`edgerun serve --grpc-port` under benchmarks/grpc_loadgen.py at concurrency 64, raw
    contents both ways; its first answer is compared with bare ORT's like the HTTP servers'."""
    try:
        command = edgerun_command(repo)
    except RuntimeError as exc:
        run.failure = str(exc)
        return
    run.failure = grpc_available()
    if run.failure:
        return
    port, grpc_port = free_port(), free_port()
    command = [arg.replace("{port}", str(port)) for arg in command]
    _load_grpc(run, [*command, "--grpc-port", str(grpc_port)], port, grpc_port, expected,
               seconds)


def measure_grpc_echo(run: ServerRun, answer: Path, seconds: float) -> None:
    """benchmarks/echo_grpc.py (canned answer) under the same gRPC load generator."""
    grpc_port = free_port()
    _load_grpc(run, [sys.executable, str(HERE / "echo_grpc.py"), "--port", str(grpc_port),
                     "--answer", str(answer)], None, grpc_port, None, seconds)


def _load_grpc(run: ServerRun, command: list[str], http_port: int | None, grpc_port: int,
               expected: np.ndarray | None, seconds: float) -> None:
    """Start a gRPC server (ready when its HTTP port says so, or its gRPC port opens), load it
    at concurrency 64, compare its first answer with bare ORT's when `expected` is given."""
    log = SCRATCH / f"{run.name.replace(' ', '-')}.log"
    try:
        process = start_server(command, grpc_port if http_port is None else http_port, log,
                               http=http_port is not None)
    except RuntimeError as exc:
        run.failure = str(exc)
        return
    answer = SCRATCH / "grpc-answer.npy"
    try:
        before = cpu_seconds(process.pid)
        result = run_grpc_loadgen(grpc_port, run, seconds, answer)
        spent = cpu_seconds(process.pid) - before
        result["server_cpu_us"] = spent / result["total"] * 1e6 if result["total"] \
            else float("nan")
        run.results[TOP] = result
        if expected is not None:
            got = np.load(answer)
            run.outputs_match = got.shape == expected.shape and bool(
                np.allclose(got, expected, rtol=1e-3, atol=1e-4))
        print(f"{run.name}, concurrency {TOP}: {json.dumps(result)}", file=sys.stderr)
        if process.poll() is not None:
            run.failure = (f"the server exited with status {process.returncode} during the "
                           f"run:\n{log_tail(log)}")
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
        run.failure = f"load generator failed: {exc}"
    finally:
        stop_server(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    parser.add_argument("--only", type=_selection, default=tuple(SELECT),
                        help="a quick check of some servers, comma-separated from "
                             f"{','.join(SELECT)} (never recorded)")
    args = parser.parse_args()
    if args.write and set(args.only) != set(SELECT):
        parser.error("--write records every server: leave out --only")
    atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)

    bundle = mlp_bundle(SIZES)
    repo = make_repository(bundle.model_path)
    rows = np.random.default_rng(1).standard_normal((128, SIZES[0])).astype(np.float32)
    body = make_body(rows[:1])
    json_file, binary_file, answer_file = (SCRATCH / name for name in
                                           ("body.json", "body.bin", "answer.json"))
    json_file.write_bytes(body)
    sent = np.asarray(json.loads(body)["inputs"][0]["data"], np.float32).reshape(1, SIZES[0])
    binary, header_length = make_binary_body(sent)
    binary_file.write_bytes(binary)
    tensor_file = SCRATCH / "row.npy"  # the same row, for the gRPC load generator
    np.save(tensor_file, sent, allow_pickle=False)

    # the limit first, in this process, while no server runs
    session = bare_session(bundle.model_path)
    expected = session.run(None, {"x": sent})[0]
    answer_file.write_bytes(canned_answer(expected))
    compute_ms = batch1_compute_ms(session, sent, min(args.seconds, 3.0))
    limit = bare_limit(session, rows, args.seconds)
    limit["contended"] = contended_limit(session, rows, int(limit["batch"]), args.seconds)
    limit["cpu_us"] = ort_cpu_per_row(bundle.model_path, rows, int(limit["batch"]),
                                      min(args.seconds, 3.0))

    def batch1() -> float:
        return batch1_compute_ms(session, sent, 1.0)

    path = f"/v2/models/{MODEL}/infer"
    binary_headers = ["Content-Type: application/octet-stream",
                      f"Inference-Header-Content-Length: {header_length}"]
    runs = {run.name: run for run in (
        ServerRun(ECHO, json_file, (TOP,)), ServerRun(JSON_RUN, json_file),
        ServerRun(BINARY_RUN, binary_file, (TOP,), binary_headers),
        ServerRun(GRPC_ECHO, tensor_file, (TOP,)), ServerRun(GRPC_RUN, tensor_file, (TOP,)),
        ServerRun(PLAIN, json_file))}
    chosen = {SELECT[key] for key in args.only}
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}",
               "--no-access-log", "--workers", "1", "--loop", "uvloop", "--http", "httptools"]
    echo_env = {**os.environ, "EDGERUN_ECHO_BODY": str(answer_file)}
    if ECHO in chosen:
        measure_server(runs[ECHO], [*uvicorn, "echo_asgi:app", "--lifespan", "off"], path,
                       None, args.seconds, cwd=HERE, env=echo_env)
    for name in (JSON_RUN, BINARY_RUN):
        if name in chosen:
            try:
                measure_server(runs[name], edgerun_command(repo), path, expected,
                               args.seconds, compute=batch1)
            except RuntimeError as exc:
                runs[name].failure = str(exc)
    del session
    if GRPC_ECHO in chosen:
        grpc_answer = SCRATCH / "answer.pb"
        grpc_answer.write_bytes(canned_grpc_answer(expected))
        measure_grpc_echo(runs[GRPC_ECHO], grpc_answer, args.seconds)
    if GRPC_RUN in chosen:
        measure_grpc(runs[GRPC_RUN], repo, expected, args.seconds)
    if PLAIN in chosen:
        env = {**os.environ, "EDGERUN_BENCH_MODEL": str(bundle.model_path)}
        measure_server(runs[PLAIN], [*uvicorn, "plain_fastapi:app"], path, expected,
                       args.seconds, cwd=HERE, env=env)

    text = report(runs, limit, compute_ms, args.seconds, args.only)
    print(text)
    complete = not any(run.failure for run in runs.values())
    if args.write:
        if complete:
            record("server", text)
        else:
            print("\nnot written: every server must run for a recorded table", file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
