"""TVM (apache-tvm 0.27) against ONNX Runtime on this x86 host, untuned and tuned.

    python benchmarks/tvm.py [--trials 16] [--write]

Each model is compiled for the `x86-64` profile with `compile_bundle(force=True)` (so the
slower artifacts are still built and measured), once untuned (dynamic batch) and once tuned with
MetaSchedule for `--trials` trials (batch 1, the tuned kernels are static-shape). Every TVM
figure is a median latency of `Model.predict` on the TVM bundle (at the profile's thread count,
as served); the baseline is an ONNX Runtime session on the same model in the same run, built with
the profile's session options as edgerun's ONNX Runtime backend builds them (its threads, no
spinning: a bare session takes every physical core and spins), and the error column is the largest
difference from ONNX Runtime's outputs over the rows measured. `--write` records the table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# this file is benchmarks/tvm.py: its folder must not shadow the tvm package, so common.py is
# found at the end of sys.path instead of the front
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
import tvm  # noqa: E402
from common import machine, markdown_table, record  # noqa: E402

from edgerun.devices import load_profile  # noqa: E402
from edgerun.examples import digits_classifier_onnx, mlp_onnx  # noqa: E402
from edgerun.optimizers.tvm import compile_bundle, median_latency_ms  # noqa: E402
from edgerun.runtime import Model  # noqa: E402
from edgerun.runtime.backends.onnxruntime import session_options  # noqa: E402
from edgerun.runtime.backends.tvm import threads_for  # noqa: E402

PROFILE = "x86-64"

SCRATCH = Path(tempfile.mkdtemp(prefix="edgerun-bench-tvm-"))


def digits_probabilities() -> tuple[Path, str, np.ndarray, str]:
    """skl2onnx's digits MLP without its ai.onnx.ml label op (TVM cannot import it)."""
    onnx_bytes, images, _ = digits_classifier_onnx()
    model = onnx.load_from_string(onnx_bytes)
    path = SCRATCH / "digits.onnx"
    onnx.save(onnx.utils.Extractor(model).extract_model(
        [i.name for i in model.graph.input], ["probabilities"]), str(path))
    return path, "X", images, "digits MLP 64-128-10 (probabilities)"


def mlp(sizes: tuple[int, ...]) -> tuple[Path, str, np.ndarray, str]:
    path = SCRATCH / f"mlp-{'-'.join(map(str, sizes))}.onnx"
    path.write_bytes(mlp_onnx(sizes))
    rows = np.random.default_rng(0).standard_normal((256, sizes[0])).astype(np.float32)
    return path, "x", rows, f"MLP {'-'.join(map(str, sizes))}"


def measure(path: Path, input_name: str, rows: np.ndarray, label: str, trials: int,
            budget_s: float) -> list[list[object]]:
    profile = load_profile(PROFILE)
    session = ort.InferenceSession(str(path), session_options(profile),
                                   providers=["CPUExecutionProvider"])
    untuned = compile_bundle(path, profile, SCRATCH / f"{path.stem}-untuned", name="m",
                             version="1", force=True)
    started = time.perf_counter()
    tuned = compile_bundle(path, profile, SCRATCH / f"{path.stem}-tuned", name="m",
                           version="1", force=True, tune_trials=trials)
    tuning_s = time.perf_counter() - started
    models = {"untuned": Model.load(untuned.bundle, profile),
              "tuned": Model.load(tuned.bundle, profile)}
    table = []
    for batch in (1, 64):
        feed = {input_name: np.ascontiguousarray(rows[:batch])}
        expected = session.run(None, feed)[0]
        ort_ms = median_latency_ms(lambda: session.run(None, feed), budget_s)
        cells: list[object] = [label, batch, f"{ort_ms:.3f}"]
        errors = []
        for kind, model in models.items():
            if kind == "tuned" and batch != 1:
                cells.append("(batch 1 only)")
                continue
            got = next(iter(model.predict(feed).values()))
            errors.append(float(np.max(np.abs(got - expected))))
            ms = median_latency_ms(lambda: model.predict(feed), budget_s)
            cells.append(f"{ms:.3f} ({ort_ms / ms:.2f}x)")
        cells.append(f"{max(errors):.1e}")
        table.append(cells)
    table[0][-1] += f"; tuned {trials} trials in {tuning_s:.0f} s"
    for model in models.values():
        model.close()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per model")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per figure")
    parser.add_argument("--write", action="store_true", help="record in benchmarks/README.md")
    args = parser.parse_args()
    started = time.perf_counter()
    import tvm.s_tir.tensor_intrin  # noqa: F401  (MetaSchedule's one-time start-up, timed apart)
    startup_s = time.perf_counter() - started
    rows: list[list[object]] = []
    for path, input_name, data, label in (digits_probabilities(), mlp((256, 1024, 1024, 10))):
        rows += measure(path, input_name, data, label, args.trials, args.seconds)
        print(markdown_table(HEADER, rows[-2:]), flush=True)
    text = (f"Command: `python benchmarks/tvm.py --trials {args.trials} --write`  \n"
            f"Machine: {machine()}, onnxruntime {ort.__version__}, apache-tvm {tvm.__version__}"
            "\n\nms per call (lower is better); in brackets ONNX Runtime's latency / TVM's "
            "(above 1.00x TVM is faster); tuning times exclude MetaSchedule's one-time start-up "
            f"in the process ({startup_s:.0f} s here: importing its tensor intrinsics); both "
            f"sides at the {PROFILE} profile's settings, as served: {_threads()}\n\n"
            + markdown_table(HEADER, rows))
    print(text)
    if args.write:
        record("tvm", text)


def _threads() -> str:
    """The thread counts both sides ran at, for the text above the table (0: the runtime's own
    default)."""
    profile = load_profile(PROFILE)
    return (f"ONNX Runtime {session_options(profile).intra_op_num_threads} intra-op threads, "
            f"TVM {threads_for(profile)} threads (0: each one's default)")


HEADER = ("model", "batch", f"ONNX Runtime, {PROFILE} profile's session options (ms)",
          "TVM untuned (ms)", "TVM tuned (ms)", "max abs error vs ORT")

if __name__ == "__main__":
    main()
