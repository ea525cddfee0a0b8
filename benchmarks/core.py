"""The inference core's speed: per-call overhead, and micro-batched throughput.

    python benchmarks/core.py [--seconds 3] [--rounds 3] [--write]

(a) `Model.predict` against a bare `InferenceSession.run` on the same session, batch 1,
    interleaved rounds, medians. Targets: <= 5 % on the large MLP, <= 30 us on the small one.
(b) 64 concurrent asyncio callers, one row per request, closed loop, through the MicroBatcher;
    the same callers with one forward pass per request; bare ONNX Runtime (default session
    options) on pre-stacked batches of its best size, the limit. Interleaved rounds, medians.
    Targets: batched >= 3x unbatched and >= 0.7x the limit.
`--write` records the tables in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from common import (bare_limit, machine, markdown_table, median,  # noqa: E402
                    mlp_bundle, percentiles, record)

from edgerun.runtime import MicroBatcher, Model  # noqa: E402

LARGE = (512, 2048, 2048, 10)
SMALL = (64, 128, 10)
CALLERS = 64


def per_call_overhead(sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    bundle = mlp_bundle(sizes)
    model = Model.load(bundle, allow_spinning=True)  # the bare session's options: ORT defaults
    session = model.backend.session
    feed = {"x": np.random.default_rng(0).standard_normal((1, sizes[0])).astype(np.float32)}
    calls = {"bare": lambda: session.run(None, feed), "predict": lambda: model.predict(feed)}
    for call in calls.values():
        for _ in range(50):
            call()
    # calls per round so a round lasts ~50 ms; many interleaved rounds, medians
    start = time.perf_counter()
    for _ in range(20):
        calls["bare"]()
    per_round = max(10, int(0.05 / ((time.perf_counter() - start) / 20)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                call()
            samples[name].append((time.perf_counter() - t0) / per_round)
    bare, ours = median(samples["bare"]), median(samples["predict"])
    model.close()
    return {"bare_us": bare * 1e6, "predict_us": ours * 1e6, "overhead_us": (ours - bare) * 1e6,
            "overhead_pct": (ours - bare) / bare * 100}


async def closed_loop(call: Callable[[np.ndarray], Awaitable[object]], rows: np.ndarray,
                      seconds: float) -> dict[str, float]:
    """CALLERS tasks, each sending its next one-row request as soon as the last returns."""
    latencies: list[float] = []

    async def caller(index: int) -> None:
        x = rows[index:index + 1]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await call(x)
            latencies.append(time.perf_counter() - t0)

    warm_stop = time.perf_counter() + min(1.0, seconds / 3)
    stop = warm_stop
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    latencies.clear()
    start = time.perf_counter()
    stop = start + seconds
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, **percentiles(latencies)}


def throughput(sizes: tuple[int, ...], seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds of the three paths; the median of each figure across rounds."""
    bundle = mlp_bundle(sizes)
    rows = np.random.default_rng(1).standard_normal((CALLERS, sizes[0])).astype(np.float32)
    model = Model.load(bundle, allow_spinning=True)  # ORT's default, as the limit runs
    still = Model.load(bundle, allow_spinning=False)  # as every shipped profile runs
    samples: dict[str, list[dict[str, float]]] = {
        "batched": [], "still": [], "unbatched": [], "limit": []}
    for _ in range(rounds):
        for path, instance in (("batched", model), ("still", still)):
            with MicroBatcher(instance, max_batch_size=64) as batcher:
                result = asyncio.run(closed_loop(
                    lambda x: batcher.predict_async({"x": x}), rows, seconds))
                result["mean_batch"] = batcher.metrics.batch_size.sum / max(
                    1, batcher.metrics.batch_size.count)
                samples[path].append(result)
        samples["unbatched"].append(asyncio.run(closed_loop(
            lambda x: model.predict_async({"x": x}), rows, seconds)))
        session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
        samples["limit"].append(bare_limit(session, rows, seconds))
    model.close()
    still.close()
    return {path: {key: median([r[key] for r in results]) for key in results[0]}
            for path, results in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians")
    parser.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    args = parser.parse_args()

    overhead_rows = []
    for label, sizes, target in (("large " + "-".join(map(str, LARGE)), LARGE, "<= 5 %"),
                                 ("small " + "-".join(map(str, SMALL)), SMALL, "<= 30 us")):
        r = per_call_overhead(sizes, args.seconds)
        met = r["overhead_pct"] <= 5 if sizes == LARGE else r["overhead_us"] <= 30
        overhead_rows.append([label, f"{r['bare_us']:.1f}", f"{r['predict_us']:.1f}",
                              f"{r['overhead_us']:+.1f}", f"{r['overhead_pct']:+.1f} %",
                              target, "met" if met else "MISSED"])
    table_a = markdown_table(
        ["model (batch 1)", "bare run (us)", "Model.predict (us)", "overhead (us)",
         "overhead (%)", "target", ""], overhead_rows)

    r = throughput(LARGE, args.seconds, args.rounds)
    batched, still, unbatched, limit = r["batched"], r["still"], r["unbatched"], r["limit"]
    vs_unbatched = batched["rps"] / unbatched["rps"]
    vs_limit = batched["rps"] / limit["rps"]
    table_b = markdown_table(
        ["path (large MLP, 64 callers)", "req/s", "p50 (ms)", "p99 (ms)", "ratio", "target", ""],
        [["MicroBatcher (max 64, delay 500 us, ORT threads spinning), mean batch "
          f"{batched['mean_batch']:.1f}", f"{batched['rps']:,.0f}", f"{batched['p50']:.2f}",
          f"{batched['p99']:.2f}", "1.00", "", ""],
         ["the same with ORT threads never spinning (`allow_spinning = false`, as every "
          "shipped profile runs)", f"{still['rps']:,.0f}", f"{still['p50']:.2f}",
          f"{still['p99']:.2f}",
          f"{still['rps'] / limit['rps']:.2f}x the limit", "", ""],
         ["one forward pass per request (Model.predict_async)", f"{unbatched['rps']:,.0f}",
          f"{unbatched['p50']:.2f}", f"{unbatched['p99']:.2f}", f"batched is {vs_unbatched:.1f}x",
          ">= 3x", "met" if vs_unbatched >= 3 else "MISSED"],
         [f"bare ORT, pre-stacked batch {limit['batch']} (the limit)", f"{limit['rps']:,.0f}",
          "", "", f"batched is {vs_limit:.2f}x", ">= 0.7x", "met" if vs_limit >= 0.7 else "MISSED"]])

    command = "python benchmarks/core.py" + (f" --seconds {args.seconds:g}"
                                             if args.seconds != 3.0 else "") + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "") + " --write"
    text = (f"Command: `{command}`  \nMachine: {machine()}, onnxruntime {ort.__version__}\n\n"
            f"(a) per-call overhead\n\n{table_a}\n\n(b) micro-batched throughput\n\n{table_b}")
    print(text)
    if args.write:
        record("core", text)


if __name__ == "__main__":
    main()
