"""Shared by the benchmarks: building bundles, timing, percentiles, tables, README updates."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, create_bundle

HERE = Path(__file__).parent
SCRATCH = Path(tempfile.mkdtemp(prefix="edgerun-bench-"))


def mlp_bundle(sizes: Sequence[int]) -> Bundle:
    """A bundle of an fp32 MLP with these layer sizes (built once, never downloaded)."""
    name = "mlp-" + "-".join(map(str, sizes))
    if (SCRATCH / name).is_dir():
        return Bundle.open(SCRATCH / name)
    source = SCRATCH / f"{name}.onnx"
    source.write_bytes(mlp_onnx(sizes))
    return create_bundle(source, SCRATCH / name, name=name, version="1")


def bare_limit(session: ort.InferenceSession, rows: np.ndarray,
               seconds: float) -> dict[str, float]:
    """Bare ONNX Runtime on pre-stacked batches of 8..128 rows: the best rows/s, the limit."""
    best = {"rps": 0.0, "batch": 0}
    for batch in (8, 16, 32, 64, 128):
        x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))
        for _ in range(3):
            session.run(None, {"x": x})
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            session.run(None, {"x": x})
            count += 1
        rps = count * batch / (time.perf_counter() - start)
        if rps > best["rps"]:
            best = {"rps": rps, "batch": batch}
    return best


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    values = np.asarray(latencies_s) * 1000
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def record(section: str, text: str) -> None:
    """Replace the text between `<!-- section -->` markers in benchmarks/README.md."""
    readme = HERE / "README.md"
    content = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in content:
        content = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, content,
                         flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    readme.write_text(content)
