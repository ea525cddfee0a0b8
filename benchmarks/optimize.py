"""The optimizer on real data: sizes, accuracy and latency of each optimization of one model.

    python benchmarks/optimize.py [--hidden 1024] [--rounds 11] [--write]

An sklearn MLPClassifier (one hidden layer of `--hidden` units, L2 penalty `--alpha`) trained on
scikit-learn's bundled digits (1,400 training rows), converted with skl2onnx, then made into
bundles by `edgerun.optimizers.pipeline.optimize`: fp32 (the baseline), int8 dynamic, int8
static QDQ (calibrated on the training rows), fp16, 50 % structured pruning, 50 % unstructured
pruning. Accuracy is on the 397 held-out rows. Latency: one ONNX Runtime thread, batch 1 and
64, interleaved rounds, medians. Targets (issue 7): int8 >= 3x smaller losing <= 1 accuracy
point; 50 % structured pruning within 2 points and faster.
`--write` records the tables in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table, median, record  # noqa: E402

from edgerun.examples import digits_classifier_onnx, digits_split  # noqa: E402
from edgerun.optimizers import measure  # noqa: E402
from edgerun.optimizers.pipeline import OptimizeOptions, optimize  # noqa: E402
from edgerun.runtime import Bundle, Model  # noqa: E402

BATCHES = (1, 64)


def variants(calibration: Path) -> dict[str, OptimizeOptions]:
    return {
        "fp32 (baseline)": OptimizeOptions(quantize="fp32"),
        "int8 dynamic": OptimizeOptions(quantize="int8"),
        "int8 static QDQ": OptimizeOptions(quantize="int8", calibration=calibration),
        "fp16": OptimizeOptions(quantize="fp16"),
        "pruned 50 % structured": OptimizeOptions(quantize="fp32", prune=0.5, structured=True),
        "pruned 50 % unstructured": OptimizeOptions(quantize="fp32", prune=0.5),
    }


def build(scratch: Path, hidden: int, alpha: float) -> tuple[dict[str, Path], measure.EvalData]:
    onnx_bytes, test_x, test_y = digits_classifier_onnx(hidden=(hidden,), alpha=alpha)
    source = scratch / f"digits-mlp-{hidden}.onnx"
    source.write_bytes(onnx_bytes)
    np.savez(scratch / "eval.npz", X=test_x, labels=test_y)
    calibration = scratch / "calibration"
    calibration.mkdir()
    train_x = digits_split()[0]
    for i in range(0, len(train_x), 100):
        np.save(calibration / f"{i:04d}.npy", train_x[i:i + 100])
    bundles = {}
    for label, options in variants(calibration).items():
        folder = scratch / label.split(" (")[0].replace(" ", "-").replace("%", "pct")
        options = OptimizeOptions(**{**vars(options), "device": "x86-64",
                                     "eval_data": scratch / "eval.npz", "name": "digits",
                                     "latency_seconds": 0.01})
        optimize(source, folder, options)
        bundles[label] = folder
    return bundles, measure.EvalData({"X": test_x}, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--alpha", type=float, default=1e-2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=0.2, help="per figure per round")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="edgerun-bench-optimize-"))
    print(f"training a 64-{args.hidden}-10 MLP on digits and building bundles ...",
          file=sys.stderr)
    bundles, data = build(scratch, args.hidden, args.alpha)
    models = {label: Model.load(Bundle.open(path), "x86-64", intra_op_threads=1)
              for label, path in bundles.items()}
    outputs = {label: measure.predict_all(model, data) for label, model in models.items()}
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for label, model in models.items():
            for batch in BATCHES:
                samples.setdefault((label, batch), []).append(
                    measure.latency_ms(model, data, batch, args.seconds))
    base = "fp32 (baseline)"
    sizes = {label: measure.sizes(path, Bundle.open(path).manifest.model_file)
             for label, path in bundles.items()}
    latency = {key: median(values) for key, values in samples.items()}
    accuracy = {label: measure.accuracy(out, data.labels) for label, out in outputs.items()}

    rows = []
    for label in bundles:
        s, b = sizes[label], sizes[base]
        rows.append([
            label,
            f"{s.model:,}", f"{b.model / s.model:.2f}x",
            f"{s.model_gzip:,}", f"{b.model_gzip / s.model_gzip:.2f}x",
            f"{s.bundle:,}", f"{b.bundle / s.bundle:.2f}x",
            f"{s.bundle_targz:,}", f"{b.bundle_targz / s.bundle_targz:.2f}x",
            f"{accuracy[label]:.2%}", f"{(accuracy[label] - accuracy[base]) * 100:+.2f}",
            f"{measure.max_abs_error(outputs[base], outputs[label]):.2g}",
            *[f"{latency[label, batch]:.3f} ({latency[base, batch] / latency[label, batch]:.2f}x)"
              for batch in BATCHES]])
    header = ["variant", "model file (B)", "ratio", "model gzip'd (B)", "ratio",
              "bundle folder (B)", "ratio", "bundle .tar.gz (B)", "ratio", "accuracy",
              "points vs fp32", "max abs error (probabilities)",
              "batch 1 ms (speed-up)", "batch 64 ms (speed-up)"]
    table = markdown_table(header, rows)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    int8 = "int8 static QDQ"
    pruned = "pruned 50 % structured"
    int8_model = sizes[base].model / sizes[int8].model
    int8_bundle = sizes[base].bundle / sizes[int8].bundle
    int8_loss = (accuracy[base] - accuracy[int8]) * 100
    pruned_loss = (accuracy[base] - accuracy[pruned]) * 100
    speed = {batch: latency[base, batch] / latency[pruned, batch] for batch in BATCHES}
    targets = markdown_table(["target (issue 7)", "measured", "", ""], [
        ["int8 (static QDQ) >= 3x smaller: model file / bundle folder",
         f"{int8_model:.2f}x / {int8_bundle:.2f}x", ">= 3x", verdict(min(int8_model,
                                                                          int8_bundle) >= 3)],
        ["int8 (static QDQ) accuracy lost", f"{int8_loss:.2f} points", "<= 1",
         verdict(int8_loss <= 1)],
        ["50 % structured pruning accuracy lost", f"{pruned_loss:.2f} points", "<= 2",
         verdict(pruned_loss <= 2)],
        ["50 % structured pruning faster: batch 1 / batch 64",
         f"{speed[1]:.2f}x / {speed[64]:.2f}x", "> 1x", verdict(min(speed.values()) > 1)],
    ])
    text = (f"Command: `python benchmarks/optimize.py --write`  \n"
            f"Machine: {machine()}, onnxruntime {ort.__version__}; load average "
            f"{os.getloadavg()[0]:.1f} when the timing ended (the machine is shared)\n\n"
            f"Model: scikit-learn MLPClassifier 64-{args.hidden}-10 (alpha {args.alpha:g}) "
            f"trained on 1,400 digits rows, skl2onnx; accuracy on the 397 held-out rows. "
            f"Bundles made by `edgerun.optimizers.pipeline.optimize` for the x86-64 profile; "
            f"int8 static calibrated on the training rows. Latency: ONNX Runtime, 1 thread, "
            f"{args.rounds} interleaved rounds of {args.seconds:g} s, medians. The bundle folder "
            "holds the model, golden.npz and manifest.json; the .tar.gz is what OTA ships.\n\n"
            f"{table}\n\n{targets}\n")
    print(text)
    if args.write:
        record("optimize", text)
    for model in models.values():
        model.close()


if __name__ == "__main__":
    main()
