"""Lambda cold start: the edgerun handler against the naive Mangum + FastAPI function.

    python benchmarks/lambda_coldstart.py [--runs 15] [--warm 200] [--write]

Each cold start is a fresh `python -S` process (no site hooks, as in a Lambda package) with the
function's code on PYTHONPATH, timed from spawn to the first HTTP invocation's answer (an API
Gateway HTTP API v2 event): interpreter start, imports, model load, first request. The two
handlers alternate, `--runs` times each; medians. The same processes then time `--warm`
invocations each (warm overhead against the model's bare compute) and report their peak RSS
(VmHWM after the first invocation). `python -X importtime` splits the imports.
`--write` records the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from common import SCRATCH, machine, markdown_table, median, mlp_bundle, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = (512, 2048, 2048, 10)
THREADS = 2
MEMORY_MB = 1769 * THREADS  # the function size whose vCPUs match this machine's cores
EVENT = ROOT / "tests" / "fixtures" / "lambda" / "apigw_v2.json"

DRIVER = """
import json, statistics, sys, time
t0 = time.perf_counter()
import {module} as function
t1 = time.perf_counter()
event = json.loads(sys.argv[1])
answer = function.handler(event, None)
t2 = time.perf_counter()
assert answer["statusCode"] == 200, answer
# VmHWM, the peak RSS of this process image (ru_maxrss keeps the parent's across exec)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"init": t1 - t0, "first": t2 - t1, "rss_kb": rss}}), flush=True)
warm = []
for _ in range({warm}):
    start = time.perf_counter()
    function.handler(event, None)
    warm.append(time.perf_counter() - start)
print(json.dumps({{"warm": statistics.median(warm)}}), flush=True)
"""


def task_roots(bundle_path: Path) -> dict[str, tuple[Path, str, dict[str, str]]]:
    """A task root per handler, laid out as its deployment package would be."""
    from edgerun.adapters.aws_lambda.packaging import _copy_edgerun

    edgerun_root = SCRATCH / "task-edgerun"
    shutil.rmtree(edgerun_root, ignore_errors=True)
    edgerun_root.mkdir()
    _copy_edgerun(edgerun_root, "onnxruntime")
    shutil.copy2(ROOT / "functions" / "inference" / "app.py", edgerun_root / "app.py")
    shutil.copytree(bundle_path, edgerun_root / "model")
    naive_root = SCRATCH / "task-naive"
    shutil.rmtree(naive_root, ignore_errors=True)
    naive_root.mkdir()
    for script in ("naive_lambda.py", "plain_fastapi.py"):
        shutil.copy2(Path(__file__).with_name(script), naive_root / script)
    shutil.copy2(bundle_path / "model.onnx", naive_root / "model.onnx")
    return {"edgerun": (edgerun_root, "app", {"EDGERUN_MODEL": "model",
                                              "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(MEMORY_MB)}),
            "naive": (naive_root, "naive_lambda", {"EDGERUN_BENCH_MODEL": "model.onnx"})}


def environment(root: Path, extra: dict[str, str]) -> dict[str, str]:
    site = sysconfig.get_paths()["purelib"]
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{root}{os.pathsep}{site}",
            "LAMBDA_TASK_ROOT": str(root), "HOME": os.environ.get("HOME", "/tmp"), **extra}


def cold_start(root: Path, module: str, extra: dict[str, str], event: str,
               warm: int) -> dict[str, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-S", "-c", DRIVER.format(module=module,
                                                                          warm=warm), event],
                               cwd=root, env=environment(root, extra), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    lines = []
    while True:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith('{"init"'):
            cold = time.perf_counter() - started
            lines.append(json.loads(line))
        elif line.startswith('{"warm"'):
            lines.append(json.loads(line))
    if process.wait() != 0 or len(lines) != 2:
        raise SystemExit(f"{module} failed:\n{process.stderr.read()[-3000:]}")
    return {"cold": cold, **lines[0], **lines[1]}


def interpreter_start(runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-S", "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    return median(times)


def import_split(root: Path, module: str, extra: dict[str, str], runs: int = 3
                 ) -> list[tuple[str, float]]:
    """Where `import <handler module>` goes, from `-X importtime` self times (ms) grouped by
    top-level package (the standard library as one); the handler module's own body (model
    load, app set-up) as "init"."""
    per_group: dict[str, list[float]] = {}
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c",
                               f"import {module}"], cwd=root, env=environment(root, extra),
                              capture_output=True, text=True, check=True)
        totals: dict[str, float] = {}
        for line in done.stderr.splitlines():
            fields = line[len("import time:"):].split("|")
            if not line.startswith("import time:") or not fields[0].strip().isdigit():
                continue
            top = fields[2].strip().split(".")[0]
            group = ("init" if top in (module, "plain_fastapi") else
                     "stdlib" if top in sys.stdlib_module_names or top.startswith("_") else top)
            totals[group] = totals.get(group, 0.0) + int(fields[0]) / 1000
        for group, value in totals.items():
            per_group.setdefault(group, []).append(value)
    split = [(group, median(values)) for group, values in per_group.items()]
    return sorted(split, key=lambda item: -item[1])


def bare_compute(model: Path, x: np.ndarray, runs: int = 2000) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(50):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    bundle = mlp_bundle(SIZES)
    roots = task_roots(bundle.path)
    x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)
    event = json.loads(EVENT.read_text())
    event["body"] = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, SIZES[0]],
                                            "data": x.ravel().tolist()}]})
    event["rawPath"] = event["requestContext"]["http"]["path"] = f"/v2/models/{bundle.manifest.name}/infer"
    event_json = json.dumps(event)

    results: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
    for _ in range(args.runs):  # alternate, so drift on a shared machine hits both alike
        for name, (root, module, extra) in roots.items():
            results[name].append(cold_start(root, module, extra, event_json, args.warm))
    floor = interpreter_start(args.runs)
    compute = bare_compute(bundle.path / "model.onnx", x)
    splits = {name: import_split(root, module, extra)
              for name, (root, module, extra) in roots.items()}

    def m(name: str, key: str) -> float:
        return median([r[key] for r in results[name]])

    labels = {"edgerun": "edgerun (`functions/inference/app.py`)",
              "naive": "naive (Mangum + FastAPI + ONNX Runtime, `naive_lambda.py`)"}
    rows = []
    for name in roots:
        warm = m(name, "warm")
        rows.append([labels[name], f"{m(name, 'cold') * 1000:,.0f}",
                     f"{min(r['cold'] for r in results[name]) * 1000:,.0f}",
                     f"{m(name, 'init') * 1000:,.0f}",
                     f"{m(name, 'first') * 1000:,.1f}", f"{warm * 1e6:,.0f}",
                     f"{(warm - compute) * 1e6:+,.0f}", f"{m(name, 'rss_kb') / 1024:,.0f}"])
    ratio = m("edgerun", "cold") / m("naive", "cold")
    verdict = "met" if ratio <= 0.6 else "MISSED"
    split_rows = [[labels[name], ", ".join(f"{pkg} {ms:,.0f}" for pkg, ms in splits[name][:8])]
                  for name in roots]
    text = "\n".join([
        "Command: `python benchmarks/lambda_coldstart.py --write`  ",
        f"Machine: {machine()}, onnxruntime {ort.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} at the end (shared); {args.runs} cold starts per handler, "
        f"alternating, medians; {args.warm} warm invocations per process",
        "",
        f"MLP {'-'.join(map(str, SIZES))} fp32 ({(bundle.path / 'model.onnx').stat().st_size / 2**20:.1f} MB), "
        f"one row per request, API Gateway HTTP API v2 event; edgerun sized for {MEMORY_MB} MB "
        f"({THREADS} vCPUs = {THREADS} ONNX Runtime threads, as this machine's cores). Cold start: "
        f"spawn of `python -S` to the first invocation's answer (interpreter start alone: "
        f"{floor * 1000:.0f} ms); init: importing the handler module, model load included. "
        f"Bare ORT compute "
        f"({THREADS} threads, batch 1): {compute * 1e6:,.0f} us.",
        "",
        markdown_table(["handler", "cold start p50 (ms)", "min (ms)", "init (ms)",
                        "first invocation (ms)",
                        "warm invocation (us)", "warm overhead vs compute (us)",
                        "peak RSS (MB)"], rows),
        "",
        markdown_table(["where init goes (`-X importtime` self ms by package, median of 3 "
                        "separate runs; init = the handler module's body: model load, app "
                        "set-up)", ""], split_rows),
        "",
        markdown_table(["edgerun", "measured", "target", ""],
                       [["cold start vs naive", f"{ratio:.2f}x", "<= 0.6x (aim 0.5x)",
                         verdict]]),
    ])
    print(text)
    if args.write:
        record("lambda", text)


if __name__ == "__main__":
    main()
