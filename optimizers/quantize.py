"""Quantization of ONNX models: int8 dynamic, int8 static QDQ (calibrated), fp16.

int8 goes through `onnxruntime.quantization`, fp16 through onnxconverter-common with the
graph's inputs and outputs kept float32, so callers and bundles see the same signature as the
float model, and what float16 cannot hold (weights or activations past 65504, or too small
to keep their digits) kept float32 (`fp16`). Each function writes the new model and returns
the tag recorded in the bundle manifest's `optimizations`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgerun.optimizers.arrays import load_arrays
from edgerun.optimizers.errors import OptimizeError
from edgerun.runtime.signature import Signature

log = logging.getLogger(__name__)

#: Ops whose float weights int8 quantization turns into integer kernels.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops that mark a model as already quantized.
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                 "MatMulNBits")
PRECISIONS = ("int8", "fp16", "fp32")

Feed = Mapping[str, np.ndarray]
#: Calibration data: a folder of .npy/.npz files, or a callable yielding input dicts.
Calibration = Union[str, Path, Callable[[], Iterable[Feed]]]


def load_onnx(path: Path) -> onnx.ModelProto:
    """An ONNX model, or OptimizeError saying why it is not one."""
    if not Path(path).is_file():
        raise OptimizeError(f"{path}: no such model file")
    if Path(path).suffix.lower() != ".onnx":
        raise OptimizeError(f"{Path(path).name}: the optimizer takes ONNX models (.onnx); "
                            f"{Path(path).suffix or 'suffix-less'} files are bundled as they are "
                            "with `edgerun bundle create`")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError
        raise OptimizeError(f"{Path(path).name}: not a readable ONNX model ({exc})") from exc


def _float_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes with a float32 initializer that int8 quantization would convert."""
    floats = {init.name for init in model.graph.initializer
              if init.data_type == onnx.TensorProto.FLOAT}
    return [node.name or node.op_type for node in model.graph.node
            if node.op_type in WEIGHT_OPS and any(name in floats for name in node.input[1:])]


def check_quantizable(model: onnx.ModelProto, name: str, precision: str) -> None:
    """OptimizeError when `precision` cannot be applied to this model, naming the reason."""
    ops = sorted({node.op_type for node in model.graph.node})
    already = sorted(set(ops) & set(QUANTIZED_OPS))
    if already:
        raise OptimizeError(f"{name}: already quantized (it has {', '.join(already)}); "
                            "quantize the float model instead")
    if precision == "int8" and not _float_weights(model):
        raise OptimizeError(f"{name}: nothing to quantize to int8: no {'/'.join(WEIGHT_OPS)} "
                            f"node with float32 weights (its ops: {', '.join(ops)})")
    if precision == "fp16" and not any(init.data_type == onnx.TensorProto.FLOAT
                                       for init in model.graph.initializer):
        raise OptimizeError(f"{name}: nothing to convert to fp16: no float32 weights "
                            f"(its ops: {', '.join(ops)})")


def calibration_feeds(calibration: Calibration,
                      input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """Materialize calibration data as input dicts, checked against the model's input names.

    A folder holds `.npz` files keyed by input name, or `.npy` files for a single-input model;
    each file is one feed (a sample or a batch). A callable returns an iterable of dicts.
    """
    return [feed for _, feed in _labelled_feeds(calibration, input_names)]


def _labelled_feeds(calibration: Calibration,
                    input_names: list[str]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """`calibration_feeds`, each feed with what it came from (a file's path, or its index in
    the callable's), so that an error names the culprit among hundreds of files."""
    if callable(calibration):
        feeds = [(f"calibration feed {i} of the callable", dict(feed))
                 for i, feed in enumerate(calibration())]
        where = "the calibration callable"
    else:
        feeds = [(str(path), _read_feed(path, input_names))
                 for path in _calibration_files(calibration)]
        where = str(calibration)
    if not feeds:
        raise OptimizeError(f"{where} yielded no calibration inputs")
    for label, feed in feeds:
        if set(feed) != set(input_names):
            raise OptimizeError(f"{label}: calibration input has tensors {sorted(feed)}, the "
                                f"model takes {input_names}")
    return feeds


def _calibration_files(folder: str | Path) -> list[Path]:
    """The .npy and .npz files of a calibration folder; OptimizeError naming it if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptimizeError(f"calibration data {folder}: no such folder (it should hold "
                            ".npy or .npz files of model inputs)")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise OptimizeError(f"calibration data {folder}: no .npy or .npz files in it")
    return files


def _read_feed(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    if path.suffix == ".npy" and len(input_names) != 1:
        raise OptimizeError(f"{path}: a .npy file holds one tensor; the model takes "
                            f"{input_names}: use .npz files keyed by input name")
    arrays = load_arrays(path)  # a corrupt file: OptimizeError naming it
    return arrays if isinstance(arrays, dict) else {input_names[0]: arrays}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds (duck-typed: the ABC
    only asks for get_next)."""

    def __init__(self, feeds: list[tuple[str, dict[str, np.ndarray]]],
                 signature: Signature) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(
            [_validated(label, feed, signature) for label, feed in feeds])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _validated(label: str, feed: dict[str, np.ndarray],
               signature: Signature) -> dict[str, np.ndarray]:
    """A feed checked against the signature; OptimizeError naming its file otherwise. A feed
    without a single value is refused: calibrated on nothing, every range would be ONNX
    Runtime's default and the model's answers garbage."""
    try:
        arrays = signature.validate(feed)
    except Exception as exc:
        raise OptimizeError(f"calibration data does not fit the model: {label}: {exc}") from exc
    if all(array.size == 0 for array in arrays.values()):
        raise OptimizeError(f"{label}: calibration input holds no values "
                            f"(shapes {', '.join(str(list(a.shape)) for a in arrays.values())})")
    return arrays


def _non_finite(feeds: list[tuple[str, dict[str, np.ndarray]]]) -> list[str]:
    """'file: input x' for each float tensor of the feeds holding NaN or infinity."""
    return [f"{label}: input {name!r}" for label, feed in feeds for name, array in feed.items()
            if np.asarray(array).dtype.kind == "f" and not np.isfinite(array).all()]


def _check_scales(name: str, out_path: Path,
                  feeds: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """OptimizeError, naming the tensor and the feeds at fault, when calibration gave a tensor
    an infinite or NaN scale (calibration data with infinities): such a model answers garbage.
    The file is removed."""
    model = onnx.load(str(out_path))
    scales = {init.name: init for init in model.graph.initializer}
    bad = [node.input[0] for node in model.graph.node
           if node.op_type == "QuantizeLinear" and node.input[1] in scales
           and not np.isfinite(numpy_helper.to_array(scales[node.input[1]])).all()]
    if bad:
        out_path.unlink(missing_ok=True)
        culprits = _non_finite(feeds)
        raise OptimizeError(f"{name}: calibration gave no finite range to tensor(s) "
                            f"{', '.join(map(repr, bad))}"
                            + (f"; NaN or infinite values in {'; '.join(culprits)}"
                               if culprits else ""))


@contextlib.contextmanager
def _prepared(model_path: Path) -> Iterator[Path]:
    """The model after ONNX Runtime's quantization pre-processing (shape inference, graph
    optimization), which the quantizers expect; the model as it is where that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgerun-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing only helps
            log.warning("quantization pre-processing skipped: %s", exc)
            prepared = model_path
        yield prepared


# Per-channel weights use 7 bits (reduce_range): x86 CPUs without VNNI multiply uint8
# activations by int8 weights in int16 pairs that saturate, and per-channel scales fill the full
# int8 range in every column. Measured on an AVX2 host, 16-256-256-8 MLP, max relative error:
# dynamic 14 % at 8 bits, 2 % at 7; static QDQ 10 % at 8 bits (1.4 % with ORT's QDQ fusions
# off: the fused integer kernels saturate), 2.7 % at 7.
def quantize_int8_dynamic(model_path: Path, out_path: Path, *, per_channel: bool = False) -> str:
    """int8 weights, activations quantized at run time: no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_onnx(model_path)
    check_quantizable(model, Path(model_path).name, "int8")
    try:
        with _prepared(Path(model_path)) as prepared:
            quantize_dynamic(str(prepared), str(out_path), per_channel=per_channel,
                             reduce_range=per_channel, weight_type=QuantType.QInt8)
    except Exception as exc:
        raise OptimizeError(f"{Path(model_path).name}: int8 dynamic quantization failed: "
                            f"{exc}") from exc
    _check_changed(Path(model_path).name, model, Path(out_path))
    return "quantize:int8-dynamic" + (":per-channel" if per_channel else "")


def _check_changed(name: str, model: onnx.ModelProto, out_path: Path) -> None:
    """OptimizeError when dynamic quantization left every weight float: ONNX Runtime's dynamic
    mode covers fewer ops than `WEIGHT_OPS` (not ConvTranspose), and a float model must not be
    bundled as `int8-dynamic`. The file is removed."""
    ops = {node.op_type for node in onnx.load(str(out_path)).graph.node}
    if ops & set(QUANTIZED_OPS):
        return
    out_path.unlink(missing_ok=True)
    raise OptimizeError(f"{name}: int8 dynamic quantization changed nothing: ONNX Runtime's "
                        f"dynamic mode does not quantize {', '.join(_float_weights(model))}; "
                        "give calibration data (--calibration) for static QDQ quantization")


def quantize_int8_static(model_path: Path, out_path: Path, calibration: Calibration, *,
                         per_channel: bool = False) -> str:
    """int8 weights and activations as QuantizeLinear/DequantizeLinear pairs (QDQ), with
    activation ranges from the calibration data."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edgerun.runtime.backends.onnxruntime import OnnxRuntimeBackend

    model = load_onnx(model_path)
    check_quantizable(model, Path(model_path).name, "int8")
    signature = OnnxRuntimeBackend.inspect(Path(model_path))
    feeds = _labelled_feeds(calibration, [spec.name for spec in signature.inputs])
    reader = _Reader(feeds, signature)
    with _per_channel_opset(model, Path(model_path), per_channel) as source, \
            _prepared(source) as prepared:
        try:
            quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=per_channel,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            # onnxruntime 1.32's per-channel weight-scale adjustment for int32
                            # biases fails on 2-D biases ([1, n], as skl2onnx writes them)
                            extra_options={"QDQDisableWeightAdjustForInt32Bias": per_channel})
        except Exception as exc:
            culprits = _non_finite(feeds)
            raise OptimizeError(f"{Path(model_path).name}: int8 static quantization failed: "
                                f"{exc}" + (f" (NaN or infinite values in {'; '.join(culprits)})"
                                            if culprits else "")) from exc
    _check_scales(Path(model_path).name, Path(out_path), feeds)
    return "quantize:int8-static-qdq" + (":per-channel" if per_channel else "")


#: Per-channel QDQ needs DequantizeLinear's `axis` (opset 13): ONNX Runtime's quantizer writes
#: it into a model of an older opset as it is, which ONNX Runtime then refuses to load.
PER_CHANNEL_OPSET = 13


@contextlib.contextmanager
def _per_channel_opset(model: onnx.ModelProto, model_path: Path,
                       per_channel: bool) -> Iterator[Path]:
    """The model at opset PER_CHANNEL_OPSET or later for per-channel quantization (converted
    by onnx's version converter), else as it is; OptimizeError naming the opset when the
    conversion fails."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                   PER_CHANNEL_OPSET)
    if not per_channel or version >= PER_CHANNEL_OPSET:
        yield model_path
        return
    try:
        converted = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises its own types
        raise OptimizeError(f"{model_path.name}: per-channel int8 needs opset "
                            f"{PER_CHANNEL_OPSET} or later; converting the model's opset "
                            f"{version} failed ({exc}): convert it yourself, or quantize per "
                            "tensor (without --per-channel)") from exc
    with tempfile.TemporaryDirectory(prefix="edgerun-opset-") as scratch:
        path = Path(scratch) / model_path.name
        onnx.save(converted, str(path))
        yield path


def convert_fp16(model_path: Path, out_path: Path, *,
                 feeds: list[dict[str, np.ndarray]] | None = None, strict: bool = False) -> str:
    """Weights and activations in float16; the graph's inputs and outputs stay float32.

    What float16 cannot hold stays float32: the nodes that make or read a weight beyond
    float16's range (past 65504, or so small that float16 loses its digits) and what those
    nodes give, or an activation beyond it when the float32 model runs on `feeds` (input
    dicts; by default 64 rows of normal floats). The model's metadata records those nodes and
    why (`kept_float32` reads it). `strict` refuses such a model instead, naming what float16
    cannot hold.
    """
    from edgerun.optimizers import fp16

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise OptimizeError("fp16 conversion needs onnxconverter-common: "
                            "pip install 'edgerun[optimize]'") from exc
    name = Path(model_path).name
    model = load_onnx(model_path)
    check_quantizable(model, name, "fp16")
    _identity_casts_to_identity(model)
    fp16.prepare(model)
    weights = fp16.weight_ranges(model.graph)
    activations = fp16.measure(model, feeds if feeds is not None
                               else _synthetic_feeds(Path(model_path)))
    tensors = fp16.out_of_range(model.graph, weights, activations)
    if strict and tensors:
        raise OptimizeError(f"{name}: strict fp16: " + "; ".join(tensors.values())
                            + " (without strict, the nodes that make or read them stay float32)")
    blocked = fp16.plan(model.graph, tensors, fp16.from_weights(model.graph, tensors, weights))
    for node in model.graph.node:
        if node.name in blocked and fp16.subgraphs(node):
            raise OptimizeError(
                f"{name}: fp16 cannot keep node {node.name!r} float32 ({blocked[node.name]}): "
                "the converter leaves the body of an If, Loop or Scan it keeps float32 but "
                "converts what that body reads from outside it; choose fp32 or int8")
    converted = _convert_blocking(float16, model, blocked, name)
    if blocked:
        log.info("%s: kept float32 in the fp16 model: %s", name, blocked)
        fp16.record(converted, blocked)
    onnx.save(converted, str(out_path))
    _check_loads(converted, name, Path(out_path))
    return "quantize:fp16"


def _convert_blocking(float16: Any, model: onnx.ModelProto, blocked: dict[str, str],
                      name: str) -> onnx.ModelProto:
    """The converter's float16 model of `model` with the `blocked` nodes float32, mended."""
    from edgerun.optimizers import fp16

    work = onnx.ModelProto()
    work.CopyFrom(model)
    fp16.split_shared_weights(work.graph, blocked)
    original = {node.name for graph in fp16.graphs(work.graph) for node in graph.node}
    try:
        with warnings.catch_warnings():  # one warning per weight clamped
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                work, min_positive_val=fp16.MIN_POSITIVE, max_finite_val=fp16.FLOAT16_MAX,
                keep_io_types=True, node_block_list=list(blocked))
    except Exception as exc:
        raise OptimizeError(f"{name}: fp16 conversion failed: {exc}") from exc
    fp16.drop_cast_pairs(converted.graph, original)
    _retarget_float_casts(converted.graph)
    _keep_output_types(model, converted)
    return converted


def _synthetic_feeds(model_path: Path) -> list[dict[str, np.ndarray]] | None:
    """Feeds of normal floats (zeros for integer inputs) for measuring activation ranges when
    no data is given; None (logged) when the model's inputs cannot be read."""
    from edgerun.optimizers import fp16, measure
    from edgerun.runtime.backends.onnxruntime import OnnxRuntimeBackend

    try:
        signature = OnnxRuntimeBackend.inspect(model_path)
    except Exception as exc:
        log.warning("fp16: activation ranges not measured: %s", exc)
        return None
    data = measure.synthetic_eval(signature)
    return fp16.chunks(data.inputs, True) if signature.batchable else [data.inputs]


def kept_float32(model_path: Path) -> dict[str, str]:
    """{node: why it stayed float32} of an fp16 model `convert_fp16` wrote; {} when none did
    (or for any other model)."""
    from edgerun.optimizers import fp16

    return fp16.kept_float32(onnx.load(str(model_path), load_external_data=False))


def _retarget_float_casts(graph: onnx.GraphProto) -> list[str]:
    """Casts to float32 whose output the converter typed float16 now cast to float16.

    The converter turns every float32 value into float16 but keeps a Cast's `to`: a Cast from
    an integer or float64 input (`Cast(int64 ids, to=float)`) would then feed float32 into
    float16 ops, a model ONNX Runtime refuses to load. Returns the retargeted outputs.
    """
    fp16 = {v.name for v in graph.value_info
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    changed = []
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" \
                    and attr.i == onnx.TensorProto.FLOAT and node.output[0] in fp16:
                attr.i = onnx.TensorProto.FLOAT16
                changed.append(node.output[0])
            if attr.type == onnx.AttributeProto.GRAPH:  # If/Loop/Scan bodies
                changed += _retarget_float_casts(attr.g)
            for sub in attr.graphs:
                changed += _retarget_float_casts(sub)
    return changed


def _keep_output_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]:
    """Graph outputs the converter retyped float16 become float32 again.

    With `keep_io_types` the converter still declares float16 an output made by a node it
    keeps in float32 (TopK, Max, Min, CumSum, Resize, ...: its block list; and the nodes
    `convert_fp16` blocks), through a Cast to float16 it adds, so the bundle's signature would
    change under callers. That Cast becomes an Identity: the float32 value, not its float16
    rounding (past 65504, inf). Any other output gets a final Cast. Returns the outputs put
    back.
    """
    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    graph = converted.graph
    producers = {out: node for node in graph.node for out in node.output}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    names = set(producers) | {n for node in graph.node for n in node.input} | \
        {i.name for i in graph.input} | {i.name for i in graph.initializer}
    restored = []
    for output in graph.output:
        target = want.get(output.name)
        if target in (None, output.type.tensor_type.elem_type) or output.name not in producers:
            continue
        cast = producers[output.name]
        if cast.op_type == "Cast" and types.get(cast.input[0]) == target:
            cast.op_type = "Identity"
            del cast.attribute[:]
            for info in (output, *(v for v in graph.value_info if v.name == output.name)):
                info.type.tensor_type.elem_type = target
            restored.append(output.name)
            continue
        inner = f"{output.name}_fp16"
        while inner in names:
            inner += "_"
        names.add(inner)
        for node in graph.node:
            node.input[:] = [inner if n == output.name else n for n in node.input]
            node.output[:] = [inner if n == output.name else n for n in node.output]
        for info in graph.value_info:
            if info.name == output.name:
                info.name = inner
        graph.node.append(helper.make_node("Cast", [inner], [output.name], to=target,
                                           name=f"{inner}_to_output"))
        output.type.tensor_type.elem_type = target
        restored.append(output.name)
    return restored


def _check_loads(model: onnx.ModelProto, name: str, path: Path) -> None:
    """OptimizeError, naming the node at fault where ONNX Runtime says, when ONNX Runtime cannot
    load the converted model: a broken model must fail here, at the step that made it, not
    later as a bundle of a temporary file. The file is removed."""
    import onnxruntime as ort

    options = ort.SessionOptions()  # loading type-checks the graph; optimizing adds nothing
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        path.unlink(missing_ok=True)
        reason = str(exc).replace(f"Load model from {path} failed:", "").strip()
        raise OptimizeError(f"{name}: fp16 conversion made a model ONNX Runtime cannot load"
                            f"{_culprit(model, reason)}: {reason}") from None


def _identity_casts_to_identity(model: onnx.ModelProto) -> None:
    """Casts from float32 to float32 (skl2onnx starts graphs with one) become Identity: the fp16
    converter keeps a Cast's target type, which would feed float32 into fp16 ops."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input)}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to is not None and types.get(node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]


def _culprit(model: onnx.ModelProto, reason: str) -> str:
    """' (at node N, a Cast producing x)' for the first tensor ONNX Runtime's message names."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for tensor in re.findall(r"arg \(([^)]+)\)", reason):
        if tensor in producers:
            node = producers[tensor]
            return f" (at node {node.name or '<unnamed>'}, a {node.op_type} producing {tensor!r})"
    return ""


def check_options(precision: str, *, calibration: Calibration | None = None,
                  per_channel: bool = False, strict: bool = False) -> None:
    """OptimizeError when the options do not go together: `optimize` checks them before any
    work (bundling the original, pruning), not when it gets to quantizing."""
    if precision not in PRECISIONS:
        raise OptimizeError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "int8" and (calibration is not None or per_channel):
        raise OptimizeError(f"calibration data and --per-channel apply to int8 only, "
                            f"not {precision}")
    if precision != "fp16" and strict:
        raise OptimizeError(f"strict fp16 applies to fp16 only, not {precision}")
    if calibration is not None and not callable(calibration):
        _calibration_files(calibration)  # a missing or empty folder, before the work


def quantize(model_path: Path, out_path: Path, precision: str, *,
             calibration: Calibration | None = None, per_channel: bool = False,
             feeds: list[dict[str, np.ndarray]] | None = None, strict: bool = False
             ) -> str | None:
    """Apply `precision` (int8: static QDQ when calibration data is given, else dynamic).

    fp16 only: `feeds` are the inputs on which activation ranges are measured, and `strict`
    refuses a model float16 cannot hold rather than keeping parts of it float32 (see
    `convert_fp16`). Returns the manifest tag, or None for fp32 (nothing written).
    """
    check_options(precision, calibration=calibration, per_channel=per_channel, strict=strict)
    if precision == "fp32":
        return None
    if precision == "fp16":
        return convert_fp16(model_path, out_path, feeds=feeds, strict=strict)
    if calibration is not None:
        return quantize_int8_static(model_path, out_path, calibration, per_channel=per_channel)
    return quantize_int8_dynamic(model_path, out_path, per_channel=per_channel)
