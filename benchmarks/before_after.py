"""`edgerun serve` from this checkout against an earlier one, in interleaved rounds.

    python benchmarks/before_after.py --baseline-venv ../before/.venv [--rounds 3] [--write]

A change to the request path must not cost throughput or p99 (issue 6: "no worse than
before"). On a shared 2-core machine two runs of the same code drift by 10-20 %, so a single
before run and a single after run cannot show that; this script alternates them. Each round
starts the baseline's `edgerun serve` (from a virtualenv where the earlier revision is installed:
`git worktree add ../before REV && python3 -m venv ../before/.venv && ../before/.venv/bin/pip
install -e "../before[server]"`) and this checkout's, on the same repository (the benchmark MLP
1024-4096-4096-10), loads each with benchmarks/loadgen.py at concurrency 64 (OIP v2 JSON, one row
a request) and at concurrency 1, and reads the server's CPU time per request from /proc.
Medians over the rounds; `--write` records the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SCRATCH, machine, markdown_table, record  # noqa: E402
from server import SIZES, ServerRun, make_body, make_repository, measure_server  # noqa: E402

from edgerun.examples import mlp_onnx  # noqa: E402


def serve_command(venv: Path, repo: Path) -> list[str]:
    return [str(venv / "bin" / "edgerun"), "serve", "--repository", str(repo), "--host",
            "127.0.0.1", "--port", "{port}", "--log-level", "warning"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-venv", type=Path, required=True,
                        help="a virtualenv with the earlier revision of edgerun installed")
    parser.add_argument("--label", default="before", help="the baseline's name in the table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    model = SCRATCH / "mlp.onnx"
    model.write_bytes(mlp_onnx(SIZES))
    repo = make_repository(model)
    body = SCRATCH / "body.json"
    body.write_bytes(make_body(np.random.default_rng(0).standard_normal((1, SIZES[0]))))
    venvs = {args.label: args.baseline_venv.resolve(), "after": Path(sys.executable).parent.parent}
    results: dict[str, list[dict]] = {name: [] for name in venvs}
    for round_ in range(args.rounds):
        for name, venv in venvs.items():
            run = ServerRun(f"{name}-{round_}", body, concurrency=(64, 1))
            measure_server(run, serve_command(venv, repo), "/v2/models/mlp/infer", None,
                           args.seconds)
            if run.failure:
                print(f"{name}: {run.failure}", file=sys.stderr)
                return 1
            results[name].append(run.results)

    def med(name: str, connections: int, key: str) -> float:
        return statistics.median(r[connections][key] for r in results[name])

    rows = []
    for name in venvs:
        rows.append([name, f"{med(name, 64, 'ok_rps'):,.0f}", f"{med(name, 64, 'p50'):.1f}",
                     f"{med(name, 64, 'p99'):.1f}", f"{med(name, 64, 'server_cpu_us'):,.0f}",
                     f"{med(name, 1, 'p50'):.2f}", f"{med(name, 1, 'p99'):.2f}"])
    base, after = args.label, "after"
    ratio = med(after, 64, "ok_rps") / med(base, 64, "ok_rps")
    p99 = med(after, 64, "p99") / med(base, 64, "p99")
    text = (f"Command: `python benchmarks/before_after.py --baseline-venv VENV --label "
            f"{shlex.quote(base)} "
            f"--rounds {args.rounds} --seconds {args.seconds:g}"
            f"{' --write' if args.write else ''}`  \n"
            f"Machine: {machine()}\n\nMLP {'-'.join(map(str, SIZES))} fp32, OIP v2 JSON, one row "
            f"a request; {args.rounds} interleaved rounds of {args.seconds:g} s per server and "
            f"concurrency, medians. `{base}` is the baseline revision's `edgerun serve`, `after` "
            f"this checkout's.\n\n"
            + markdown_table(["server", "req/s (c=64)", "p50 ms (c=64)", "p99 ms (c=64)",
                              "server CPU us/req (c=64)", "p50 ms (c=1)", "p99 ms (c=1)"], rows)
            + f"\n\nafter / {base}: throughput {ratio:.2f}x, p99 {p99:.2f}x at concurrency 64 "
              f"(target: throughput >= 1.00x within noise, p99 no worse).\n")
    print(text)
    if args.write:
        record("before-after", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
