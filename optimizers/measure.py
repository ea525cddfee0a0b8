"""What an optimization bought: sizes, latency on this host, output error and accuracy.

Shared by `edgerun optimize` and `benchmarks/optimize.py`, so the report and the recorded
benchmark measure the same things the same way.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun.optimizers.arrays import load_arrays
from edgerun.optimizers.errors import OptimizeError
from edgerun.runtime import Model, archive
from edgerun.runtime.backends import backend_class, backend_for_file
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature


@dataclass(frozen=True)
class Sizes:
    """Bytes of the model file alone, gzip'd, the whole bundle folder, and its .tar.gz."""

    model: int
    model_gzip: int
    bundle: int
    bundle_targz: int


def sizes(bundle_dir: Path, model_file: str) -> Sizes:
    """The model's bytes count its external data files too: an ONNX model whose weights lie
    beside it is a few hundred bytes alone, and its int8 result (weights inline) looked 100x
    larger."""
    parts = [(bundle_dir / name).read_bytes()
             for name in (model_file, *_data_files(bundle_dir / model_file))]
    bundle = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory(prefix="edgerun-size-") as scratch:
        packed = archive.pack(bundle_dir, Path(scratch) / "bundle.tar.gz").stat().st_size
    return Sizes(sum(map(len, parts)), sum(len(gzip.compress(part, 9, mtime=0))
                                           for part in parts), bundle, packed)


def _data_files(model_path: Path) -> list[str]:
    """The files beside `model_path` its backend reads (ONNX external data); none for an
    artifact no registered backend names by suffix (a TVM library)."""
    try:
        backend = backend_class(backend_for_file(model_path))
    except BundleError:
        return []
    return sorted(set(backend.data_files(model_path)))


@dataclass(frozen=True)
class EvalData:
    """Inputs by tensor name, and optional labels (an .npz with a `labels` array)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    #: Trailing rows left out: fewer than the fixed batch of a model that cannot batch.
    dropped: int = 0
    #: Each entry along the first axis is one whole sample (one call's inputs) of a model with
    #: no batch axis (`--max-batch-size 0`), whose dim 0 is no row of a batch: fed alone.
    whole: bool = False

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, rows: int) -> dict[str, np.ndarray]:
        """The first `rows` rows, repeated if there are fewer."""
        return {name: np.resize(array, (rows, *array.shape[1:]))
                for name, array in self.inputs.items()}

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample `i` of `whole` data: one call's inputs."""
        return {name: array[i] for name, array in self.inputs.items()}


def load_eval(path: Path, signature: Signature, whole: bool = False) -> EvalData:
    """An .npz of model inputs (by input name; any name for a single-input model) and labels.
    `whole`: the model has no batch axis, and each entry along the arrays' first axis is one
    sample, fed whole (see `EvalData.whole`)."""
    if not Path(path).is_file():
        raise OptimizeError(f"eval data {path}: no such file (an .npz with the model's inputs "
                            "and optionally a `labels` array)")
    arrays = load_arrays(path)
    if not isinstance(arrays, dict):
        raise OptimizeError(f"eval data {path}: an .npz of the model's inputs (and optionally "
                            "`labels`), not a single .npy array")
    labels = arrays.pop("labels", None)
    names = [spec.name for spec in signature.inputs]
    if len(names) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    if set(arrays) != set(names):
        raise OptimizeError(f"eval data {path}: holds {sorted(arrays)}, the model takes "
                            f"{names} (and optionally `labels`)")
    if whole:
        _check_samples_axis(path, signature, arrays)
    rows = _rows(path, arrays)
    per_call = 1 if whole else rows_per_call(signature)
    kept = rows - rows % per_call
    if not kept:
        raise OptimizeError(f"eval data {path}: {rows} rows; the model takes a fixed batch of "
                            f"{per_call} rows, so at least {per_call} are needed")
    arrays = {name: array[:kept] for name, array in arrays.items()}
    try:
        inputs = _validate_samples(signature, arrays, rows) if whole \
            else signature.validate(arrays) if signature.batchable \
            else _validate_rows(signature, arrays, kept, per_call)
    except Exception as exc:
        raise OptimizeError(f"eval data {path}: {exc}") from exc
    if labels is not None:
        if labels.ndim == 2 and labels.shape[1:] == (1,):
            labels = labels.reshape(-1)
        if labels.ndim != 1 or len(labels) != rows:
            raise OptimizeError(f"eval data {path}: `labels` has shape {list(labels.shape)}; "
                                f"it should hold one class per row: shape [{rows}] (class "
                                "indices or names, not one-hot or probabilities)")
    return EvalData(inputs, None if labels is None else labels[:kept], rows - kept, whole)


def _check_samples_axis(path: Path, signature: Signature, arrays: dict[str, np.ndarray]) -> None:
    """Samples of a model with no batch axis come stacked along a first axis of their own:
    cutting the model's own dim 0 into rows would feed each sequence step alone."""
    for spec in signature.inputs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape) + 1:
            dims = ", ".join(str(d) if d >= 0 else "?" for d in spec.shape)
            raise OptimizeError(
                f"eval data {path}: {spec.name!r} has shape {list(array.shape)}; the model has "
                "no batch axis (max_batch_size 0), so each eval sample is fed whole: stack the "
                f"samples along a new first axis (shape [samples, {dims}])")


def _validate_samples(signature: Signature, arrays: dict[str, np.ndarray],
                      samples: int) -> dict[str, np.ndarray]:
    """Each sample of `EvalData.whole` data checked as one call's inputs."""
    checked = []
    for i in range(samples):
        try:
            checked.append(signature.validate({n: a[i] for n, a in arrays.items()}))
        except Exception as exc:
            raise OptimizeError(f"sample {i}: {exc}") from exc
    return {name: np.stack([sample[name] for sample in checked]) for name in arrays}


def _rows(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """The number of rows every input has (at least one): measuring needs a first row."""
    counts = {name: array.shape[0] if array.ndim else None for name, array in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise OptimizeError(f"eval data {path}: inputs should share their first axis (rows); "
                            "shapes: " + ", ".join(f"{name} {list(arrays[name].shape)}"
                                                   for name in arrays))
    rows = next(iter(counts.values()))
    if not rows:
        raise OptimizeError(f"eval data {path}: no rows to measure on (the inputs have 0)")
    return rows


def rows_per_call(signature: Signature) -> int:
    """Rows one call takes: 1 for a model that batches, else its inputs' fixed first dim (a
    fixed batch of 8 runs 8 rows at a time), 1 where they do not share one."""
    if signature.batchable:
        return 1
    firsts = {spec.shape[0] if spec.shape else None for spec in signature.inputs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if first is not None and first > 0 else 1


def _validate_rows(signature: Signature, arrays: dict[str, np.ndarray],
                   rows: int, per_call: int = 1) -> dict[str, np.ndarray]:
    """A model without a dynamic batch (a fixed batch of 1 or 8, say) runs `per_call` rows at
    a time, as `predict_all` feeds it: each call's rows must fit the signature, not the set."""
    checked = []
    for i in range(0, rows, per_call):
        try:
            checked.append(signature.validate({n: a[i:i + per_call]
                                               for n, a in arrays.items()}))
        except Exception as exc:
            raise OptimizeError(f"row {i}: {exc}") from exc
    return {name: np.concatenate([row[name] for row in checked]) for name in arrays}


def synthetic_eval(signature: Signature, rows: int = 64, seed: int = 0,
                   whole: bool = False) -> EvalData:
    """Normal floats (zeros for integer and bool inputs, empty strings for text ones, as in
    a bundle's generated golden sample) when no eval data is given; `whole`: `rows` samples
    of a model with no batch axis (`EvalData.whole`)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in signature.inputs:
        shape = [rows if (axis == spec.batch_axis) else (d if d >= 0 else 1)
                 for axis, d in enumerate(spec.shape)]
        if whole:
            shape = [rows, *shape]
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.np_dtype)
        elif spec.dtype == "string":  # np.zeros of object would be the integer 0, not text
            inputs[spec.name] = np.full(shape, "", dtype=object)
        else:
            inputs[spec.name] = np.zeros(shape, spec.np_dtype)
    return EvalData(inputs, whole=whole)


def predict_all(model: Model, data: EvalData, chunk: int = 256) -> dict[str, np.ndarray]:
    """Outputs for every row, in chunks when the model batches (no larger than its
    max_batch_size), else one call's fixed batch at a time (the rows are a whole number of
    such batches: `load_eval` drops the rest), or, for `EvalData.whole` data, one sample at a
    time, the outputs stacked."""
    if data.whole:
        samples = [model.predict(data.sample(i)) for i in range(data.rows)]
        return {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    limit = model.signature.max_batch_size
    step = min(chunk, limit or chunk) if model.signature.batchable \
        else rows_per_call(model.signature)
    parts = [model.predict({n: a[i:i + step] for n, a in data.inputs.items()})
             for i in range(0, data.rows, step)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def max_abs_error(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over the float outputs (integer outputs: labels, ids); none
    where both give the same inf or NaN (log(0), say), inf where only one does."""
    worst = 0.0
    for name, want in reference.items():
        if want.dtype.kind == "f":
            got, want = candidate[name].astype(np.float64), want.astype(np.float64)
            with np.errstate(invalid="ignore"):  # inf - inf
                diff = np.abs(got - want)
            same = (got == want) | (np.isnan(got) & np.isnan(want))
            diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
            worst = max(worst, float(np.max(diff, initial=0)))
    return worst


def changed_rows(reference: dict[str, np.ndarray],
                 candidate: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """{output: (rows that differ, rows)} for each integer, bool or string output (a
    classifier's labels, ids): `max_abs_error` covers float outputs only, and a model whose
    labels flip on half the rows must not be reported as exact."""
    changed = {}
    for name, want in reference.items():
        got = candidate.get(name)
        if want.dtype.kind == "f" or got is None:
            continue
        rows = len(want) if want.ndim else 1
        if got.shape != want.shape:
            changed[name] = (rows, rows)
            continue
        differ = np.asarray(got != want).reshape(rows, -1).any(axis=1) if want.ndim \
            else np.asarray([got != want])
        changed[name] = (int(np.count_nonzero(differ)), rows)
    return changed


def predicted_labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class predictions: an integer or string output of one value per row (a classifier's
    `label`), else argmax of a [rows, classes] float one. A single float column ([rows, 1] or
    [rows]) is a binary classifier, where argmax would always say 0: class 1 where it is past
    0.5 if its values lie in [0, 1] (probabilities), else past 0 (logits)."""
    for array in outputs.values():
        if array.dtype.kind in "iuOUS" and array.ndim and array.size == array.shape[0]:
            return array.reshape(-1)
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            return array.argmax(axis=1)
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim in (1, 2) and array.size == array.shape[0]:
            return _binary(array.reshape(-1))
    raise OptimizeError("accuracy needs an integer or string label output, a [rows, classes] "
                        "float output or one float score per row (binary); the model gives "
                        f"{', '.join(outputs)}")


def _binary(scores: np.ndarray) -> np.ndarray:
    """Class 0/1 from one score per row: probabilities past 0.5, logits past 0."""
    finite = scores[np.isfinite(scores)]
    probabilities = finite.size and finite.min() >= 0 and finite.max() <= 1
    return (scores > (0.5 if probabilities else 0.0)).astype(np.int64)


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """The fraction of rows whose predicted class is the label; class names (strings) compare
    as text, class indices as numbers, and one kind never silently against the other."""
    predicted = predicted_labels(outputs)
    labels = labels.reshape(-1)
    text = predicted.dtype.kind in "OUS"
    if text != (labels.dtype.kind in "OUS"):
        def kind(array: np.ndarray, is_text: bool) -> str:
            examples = ", ".join(map(repr, array[:3].tolist()))
            return f"{'class names' if is_text else 'class indices'} ({examples}, ...)"

        raise OptimizeError(
            f"accuracy: the model predicts {kind(predicted, text)} but the eval `labels` are "
            f"{kind(labels, not text)}: store the labels as "
            f"{'class names (strings)' if text else 'class indices (integers)'}")
    if text:
        return float(np.mean(predicted.astype(str) == labels.astype(str)))
    return float(np.mean(predicted == labels))


def latency_ms(model: Model, data: EvalData, batch: int, seconds: float = 0.5) -> float | None:
    """Median forward-pass time for a batch of `batch` rows; None when the model cannot take
    that many (a fixed batch of another size, more than its max_batch_size). For
    `EvalData.whole` data, batch 1 is one sample and there is no other."""
    if data.whole:
        if batch != 1:
            return None
        feed = model.validate(data.sample(0))
    elif not model.signature.batchable and batch != rows_per_call(model.signature):
        return None
    elif model.signature.max_batch_size and batch > model.signature.max_batch_size:
        return None
    else:
        feed = model.validate(data.take(batch))
    for _ in range(3):
        model.run(feed)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000
