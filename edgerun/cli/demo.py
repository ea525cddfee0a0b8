"""`edgerun demo`: train, bundle, verify and serve a real model, all on this machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgerun.cli.arguments import positive
from edgerun.runtime.batcher import MicroBatcher
from edgerun.runtime.bundle import Bundle, create_bundle
from edgerun.runtime.metrics import Registry
from edgerun.runtime.model import Model

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="train a digits classifier, bundle it and serve it through the batcher")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model and bundle here (default: a temporary folder)")
    # no callers or no requests gave a table of made-up figures (millions of requests/s)
    parser.add_argument("--requests", type=positive(int), default=4000,
                        help="single-image requests to serve (default 4000)")
    parser.add_argument("--concurrency", type=positive(int), default=64,
                        help="concurrent callers (default 64)")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgerun-demo-") as scratch:
            return run_demo(Path(scratch), args.requests, args.concurrency)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return run_demo(args.workdir, args.requests, args.concurrency)


def run_demo(workdir: Path, requests: int, concurrency: int) -> int:
    from edgerun.examples import digits_classifier_onnx

    started = time.perf_counter()
    with out.status("training an MLP on scikit-learn's bundled digits..."):
        onnx_bytes, images, labels = digits_classifier_onnx()
    model_file = workdir / "digits.onnx"
    model_file.write_bytes(onnx_bytes)
    np.savez(workdir / "heldout.npz", X=images, labels=labels)  # for `optimize --eval`
    sample = workdir / "sample.json"
    sample.write_text(json.dumps({"X": images[:1].tolist()}))
    (workdir / "infer.json").write_text(json.dumps({"inputs": [
        {"name": "X", "datatype": "FP32", "shape": [1, 64], "data": images[0].tolist()}]}))
    out.print(f"1. trained an MLP classifier on 1,400 8x8 digit images "
              f"({time.perf_counter() - started:.1f} s), converted with skl2onnx -> {model_file}; "
              f"a held-out image (a {labels[0]}) -> {sample} and infer.json (OIP v2)")

    folder, archive_path = workdir / "digits", workdir / "digits-1.tar.gz"
    for stale in (folder, archive_path):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    created = create_bundle(model_file, folder, name="digits", version="1")
    created.pack(archive_path)
    sig = created.signature
    out.print(f"2. bundled digits v1 -> {folder}: inputs "
              f"{', '.join(f'{s.name} {s.describe()}' for s in sig.inputs)}; outputs "
              f"{', '.join(f'{s.name} {s.describe()}' for s in sig.outputs)}; packed "
              f"{archive_path.name} ({archive_path.stat().st_size / 1024:.0f} KiB)")

    with Bundle.open(archive_path) as bundle:
        model = Model.load(bundle)
        model.check_golden()
        out.print(f"3. opened the archive: {len(bundle.manifest.files)} file hashes verified, "
                  f"golden sample reproduced on {', '.join(model.describe()['providers'])}")
        direct = model.predict({"X": images})["label"]
        registry = Registry()
        with MicroBatcher(model, registry=registry, max_batch_size=64,
                          max_queue_delay_us=2000) as batcher:
            served, seconds = asyncio.run(_serve(batcher, images, requests, concurrency))
            passes = batcher.metrics.batch_size.count
            rows = batcher.metrics.batch_size.sum
        model.close()

    index = np.arange(requests) % len(images)
    accuracy = float(np.mean(served == labels[index]))
    table = Table("", "value", title="4. served through the MicroBatcher")
    table.add_row("requests (one image each)", f"{requests:,}")
    table.add_row("concurrent callers", str(concurrency))
    table.add_row("forward passes", f"{passes:,} (mean batch {rows / max(passes, 1):.1f})")
    table.add_row("throughput", f"{requests / seconds:,.0f} requests/s")
    table.add_row("accuracy on held-out digits", f"{accuracy:.1%}")
    table.add_row("same labels as unbatched predict", str(bool(np.array_equal(
        served, direct[index]))))
    out.print(table)
    return 0 if np.array_equal(served, direct[index]) else 1


async def _serve(batcher: MicroBatcher, images: np.ndarray, requests: int,
                 concurrency: int) -> tuple[np.ndarray, float]:
    served = np.empty(requests, dtype=np.int64)
    next_index = 0

    with Progress(transient=True) as progress:
        task = progress.add_task("serving", total=requests)

        async def caller() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                row = images[i % len(images)][None, :]
                served[i] = (await batcher.predict_async({"X": row}))["label"][0]
                progress.advance(task)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return served, seconds
