"""The fleet HTTP server's speed, against the FastAPI server users would otherwise write.

    python benchmarks/server.py [--seconds 5] [--write]

One compute-bound model (MLP 1024-4096-4096-10, fp32), one row per request as Open Inference
Protocol v2 JSON, the same body for every server. Each server runs alone, as its own process;
the load generator (benchmarks/loadgen.py, closed loop, keep-alive) runs as another process at
concurrency 1, 16 and 64, after a warm-up.
(a) `edgerun serve` on a model repository holding the bundle.
(b) plain FastAPI (benchmarks/plain_fastapi.py): sync endpoint, pydantic body, one
    `InferenceSession.run` per request, uvicorn with httptools and uvloop, one worker.
(c) bare ONNX Runtime in-process (default session options) on pre-stacked batches of its best
    size, the limit; the same while another process keeps one core 50 % busy (the ceiling for
    any server whose loop and load generator share these cores); the batch-1 compute time.
Targets: at concurrency 64, edgerun >= 3x plain FastAPI's throughput with a p99 no worse, and
>= 0.6x the limit; at concurrency 1, edgerun's p50 minus the batch-1 compute time <= 1 ms.
`--write` records the tables in benchmarks/README.md (only when every server ran).
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
WARMUP_S = 1.0
READY_TIMEOUT_S = 120.0
EDGERUN, PLAIN = "edgerun", "plain FastAPI"


@dataclass
class ServerRun:
    """What one server produced: a result per concurrency, or why it could not run."""

    name: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failure: str = ""
    outputs_match: bool | None = None


def make_body(rows: np.ndarray) -> bytes:
    """OIP v2 JSON for one row, floats rounded to 6 significant digits."""
    data = [float(f"{v:.6g}") for v in rows.ravel()]
    return json.dumps({"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": data}]}).encode()


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
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server and return once GET /v2/health/ready answers 200."""
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


def first_output(port: int, path: str, body: bytes) -> np.ndarray:
    """One request through the server: its first output, to compare with bare ORT."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        output = json.loads(response.read())["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def run_loadgen(port: int, path: str, body_file: Path, connections: int,
                seconds: float) -> dict[str, Any]:
    """The load generator as its own process, so it never shares a GIL with what it measures."""
    command = [sys.executable, str(HERE / "loadgen.py"), "--host", "127.0.0.1", "--port",
               str(port), "--path", path, "--body-file", str(body_file), "--connections",
               str(connections), "--seconds", str(seconds), "--warmup", str(WARMUP_S)]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=seconds + WARMUP_S + 120)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_server(run: ServerRun, command: list[str], path: str, body_file: Path,
                   expected: np.ndarray, seconds: float, *, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> None:
    """Start the server, check one answer, load it at each concurrency, stop it."""
    port = free_port()
    command = [arg.replace("{port}", str(port)) for arg in command]
    log = SCRATCH / f"{run.name.replace(' ', '-')}.log"
    try:
        process = start_server(command, port, log, cwd=cwd, env=env)
    except RuntimeError as exc:
        run.failure = str(exc)
        return
    try:
        try:
            got = first_output(port, path, body_file.read_bytes())
            run.outputs_match = got.shape == expected.shape and bool(
                np.allclose(got, expected, rtol=1e-3, atol=1e-4))
        except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError,
                ValueError) as exc:
            print(f"{run.name}: first request failed: {exc}", file=sys.stderr)
            run.outputs_match = False
        for connections in CONCURRENCY:
            run.results[connections] = run_loadgen(port, path, body_file, connections, seconds)
            print(f"{run.name}, concurrency {connections}: "
                  f"{json.dumps(run.results[connections])}", file=sys.stderr)
        if process.poll() is not None:
            run.failure = (f"the server exited with status {process.returncode} during the "
                           f"run:\n{log_tail(log)}")
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
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
                         f"{r['client_cpu_us']:.0f}"])
        if run.failure:
            rows.append([run.name, "", "failed" if run.results else "not run", "", "", "", "",
                         "", ""])
    return markdown_table(["server", "concurrency", "req/s (2xx)", "p50 (ms)", "p95 (ms)",
                           "p99 (ms)", "non-2xx", "errors", "loadgen CPU (us/req)"], rows)


def target_table(ours: ServerRun, plain: ServerRun, limit: dict[str, float],
                 compute_ms: float) -> str:
    """The targets; `limit` also holds `contended`, the limit with a core half taken."""
    top, one = max(CONCURRENCY), min(CONCURRENCY)

    def get(run: ServerRun, connections: int, key: str) -> float | None:
        result = run.results.get(connections)
        value = None if result is None else result[key]
        return None if value is None or math.isnan(value) else value

    e_rps, p_rps = get(ours, top, "ok_rps"), get(plain, top, "ok_rps")
    e_p99, p_p99 = get(ours, top, "p99"), get(plain, top, "p99")
    e_p50, p_p50 = get(ours, one, "p50"), get(plain, one, "p50")
    vs_plain = e_rps / p_rps if e_rps is not None and p_rps else None
    vs_limit = e_rps / limit["rps"] if e_rps is not None else None
    overhead = e_p50 - compute_ms if e_p50 is not None else None

    def show(value: float | None, fmt: str, unit: str) -> str:
        return "not measured" if value is None else format(value, fmt) + unit

    rows = [
        [f"throughput vs plain FastAPI, concurrency {top}", show(vs_plain, ".2f", "x"),
         ">= 3x", verdict(None if vs_plain is None else vs_plain >= 3)],
        [f"p99 vs plain FastAPI, concurrency {top}",
         f"{show(e_p99, '.1f', ' ms')} vs {show(p_p99, '.1f', ' ms')}", "no worse",
         verdict(None if e_p99 is None or p_p99 is None else e_p99 <= p_p99)],
        [f"throughput vs bare ORT limit ({limit['rps']:,.0f} rows/s at batch "
         f"{limit['batch']:.0f})", show(vs_limit, ".2f", "x"), ">= 0.6x",
         verdict(None if vs_limit is None else vs_limit >= 0.6)],
        [f"p50 minus batch-1 compute ({compute_ms:.2f} ms), concurrency {one}",
         show(overhead, "+.2f", " ms"), "<= 1 ms",
         verdict(None if overhead is None else overhead <= 1)],
    ]
    table = markdown_table(["edgerun", "measured", "target", ""], rows)
    info = []
    if p_rps is not None:
        info.append(f"plain FastAPI for reference: {p_rps / limit['rps']:.2f}x the limit at "
                    f"concurrency {top}")
    if p_p50 is not None:
        info.append(f"p50 minus batch-1 compute {p_p50 - compute_ms:+.2f} ms at concurrency {one}")
    ceiling = (f"Bare ORT at batch {limit['batch']:.0f} while another process keeps one core "
               f"50 % busy: {limit['contended']:,.0f} rows/s, {limit['contended'] / limit['rps']:.2f}x "
               "the limit: the ceiling for a server whose event loop and load generator share "
               "these two cores with the model")
    if e_rps is not None:
        ceiling += f" (edgerun reaches {e_rps / limit['contended']:.2f}x of it)"
    return table + ("\n\n" + "; ".join(info) + "." if info else "") + "\n\n" + ceiling + "."


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


def report(runs: list[ServerRun], limit: dict[str, float], compute_ms: float,
           seconds: float) -> str:
    """The recorded text: command, machine, both tables and every warning."""
    ours, plain = runs
    command = "python benchmarks/server.py" + (f" --seconds {seconds:g}"
                                               if seconds != 5.0 else "") + " --write"
    notes = warnings(runs)
    return (f"Command: `{command}`  \nMachine: {machine()}, onnxruntime {ort.__version__}, "
            f"fastapi {version('fastapi')}, uvicorn {version('uvicorn')}\n\n"
            f"MLP {'-'.join(map(str, SIZES))} fp32, one row per request (OIP v2 JSON), closed "
            f"loop over keep-alive connections, {seconds:g} s measured after {WARMUP_S:g} s "
            f"warm-up; bare ORT batch-1 compute {compute_ms:.2f} ms. Loadgen CPU is the load "
            f"generator's own CPU time per response, spent on the same cores as the server.\n\n"
            f"{server_table(runs)}\n\n{target_table(ours, plain, limit, compute_ms)}"
            + ("\n\n" + "\n".join(f"- **{line}**" for line in notes) if notes else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    args = parser.parse_args()
    atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)

    bundle = mlp_bundle(SIZES)
    repo = make_repository(bundle.model_path)
    rows = np.random.default_rng(1).standard_normal((128, SIZES[0])).astype(np.float32)
    body = make_body(rows[:1])
    body_file = SCRATCH / "body.json"
    body_file.write_bytes(body)
    sent = np.asarray(json.loads(body)["inputs"][0]["data"], np.float32).reshape(1, SIZES[0])

    # (c) first, in this process, while no server runs
    session = bare_session(bundle.model_path)
    expected = session.run(None, {"x": sent})[0]
    compute_ms = batch1_compute_ms(session, sent, min(args.seconds, 3.0))
    limit = bare_limit(session, rows, args.seconds)
    limit["contended"] = contended_limit(session, rows, int(limit["batch"]), args.seconds)
    del session

    path = f"/v2/models/{MODEL}/infer"
    ours, plain = ServerRun(EDGERUN), ServerRun(PLAIN)
    try:
        measure_server(ours, edgerun_command(repo), path, body_file, expected, args.seconds)
    except RuntimeError as exc:
        ours.failure = str(exc)
    if ours.failure:
        print(f"(a) edgerun: {ours.failure}", file=sys.stderr)
    uvicorn = [sys.executable, "-m", "uvicorn", "plain_fastapi:app", "--host", "127.0.0.1",
               "--port", "{port}", "--no-access-log", "--workers", "1", "--loop", "uvloop",
               "--http", "httptools"]
    env = {**os.environ, "EDGERUN_BENCH_MODEL": str(bundle.model_path)}
    measure_server(plain, uvicorn, path, body_file, expected, args.seconds, cwd=HERE, env=env)

    text = report([ours, plain], limit, compute_ms, args.seconds)
    print(text)
    complete = not (ours.failure or plain.failure)
    if args.write:
        if complete:
            record("server", text)
        else:
            print("\nnot written: every server must run for a recorded table", file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
