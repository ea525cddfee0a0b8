"""What float16 cannot hold stays float32: the ranges, the block list, and the converter's gaps.

onnxconverter-common's `convert_float_to_float16` casts every float32 weight to float16,
clamping what lies outside (by default to +/-1e4, well inside float16's 65504, and magnitudes
under 1e-7 up to 1e-7), and computes every activation in float16, where a value past 65504
becomes inf. Here the tensors float16 cannot hold are found, weights (initializers, Constant
values) by their values and activations by running the float32 model on data, and the nodes
that make or read them, and the readers of what a node reading such a weight gives, are
handed to the converter's `node_block_list`: they compute in float32 with float32 weights.
What the converter gets wrong about blocked nodes is mended around it: a weight shared by a
blocked and an unblocked node (it would stay float32 for both), a float32 value it still
rounds through float16 between two blocked nodes (a Cast pair it leaves when the value has
several readers or comes from a Constant), and unnamed nodes (it names its Casts after them).

ONNX Runtime's CPU kernels compute most float16 ops in float32 (it drops the Casts around
them), so running the converted model on this host seldom shows a float16 overflow that a
GPU would: the ranges are measured on the float32 model instead.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgerun.optimizers.onnx_graph import weights_not_inputs

log = logging.getLogger(__name__)

#: float16's largest finite value.
FLOAT16_MAX = 65504.0
#: The converter raises nonzero magnitudes under this to it (its default, kept: a tiny epsilon
#: must not become 0); a tensor made only of such values is kept float32 (ROUNDING_LIMIT).
MIN_POSITIVE = 1e-7
#: A tensor that float16 would change by more than this (root mean square, relative to the
#: tensor's: 1 %, the golden check's rtol for fp16 bundles) is kept float32. Rounding a value in
#: float16's normal range changes it by at most 2**-11 (0.05 %); more means the tensor's values
#: lie below that range (under 6.1e-5, where float16 has fewer digits), and 1 % that they lie
#: under about 3e-6 (an epsilon of 1e-5 stays float16; one of 1e-6 or 1e-9 does not).
ROUNDING_LIMIT = 1e-2
#: Eval rows on which activation ranges are measured, and rows per run.
RANGE_ROWS = 1024
RANGE_CHUNK = 8
#: Key of the converted model's metadata_props: JSON {node name: why it stayed float32}.
METADATA_KEY = "edgerun.fp16.kept_float32"

Feed = Mapping[str, np.ndarray]


@dataclass
class Range:
    """What a tensor's finite values need: the largest magnitude, and how much float16 would
    change them (sums of squares, relative error = sqrt(error / square))."""

    peak: float = 0.0
    square: float = 0.0
    error: float = 0.0

    def add(self, values: np.ndarray, to_float16: Any = np.float16) -> None:
        values = np.asarray(values, np.float32).reshape(-1)
        values = values[np.isfinite(values)]
        if not values.size:
            return
        self.peak = max(self.peak, float(np.abs(values).max()))
        self.square += float(np.square(values, dtype=np.float64).sum())
        if self.peak <= FLOAT16_MAX:  # past it the verdict is overflow, whatever the error
            with warnings.catch_warnings(), np.errstate(over="ignore"):
                warnings.simplefilter("ignore", UserWarning)  # the converter's "truncated"
                half = np.asarray(to_float16(values)).astype(np.float64)
            self.error += float(np.square(half - values).sum())

    def add_summaries(self, summaries: np.ndarray) -> None:
        """Add [..., 3] summaries made in the graph (`_summary`) as `add` adds an array."""
        rows = np.asarray(summaries, np.float64).reshape(-1, 3)
        if not rows.size:
            return
        self.peak = max(self.peak, float(rows[:, 0].max()))
        self.square += float(rows[:, 1].sum())
        if self.peak <= FLOAT16_MAX:
            self.error += float(rows[:, 2].sum())

    def problem(self, what: str, measured: bool = False) -> str | None:
        """Why float16 cannot hold the tensor `what` (an activation when `measured`), or
        None when it can."""
        on = " on the data measured" if measured else ""
        if self.peak > FLOAT16_MAX:
            return (f"{what} reaches {self.peak:.3g} in magnitude{on}, beyond float16's "
                    "largest, 65504")
        if self.square > 0 and self.error > ROUNDING_LIMIT ** 2 * self.square:
            change = math.sqrt(self.error / self.square)
            return (f"{what} lies below float16's range{on} (its largest magnitude is "
                    f"{self.peak:.3g}): float16 would change it by {change * 100:.3g} %")
        return None


@dataclass(frozen=True)
class NonFinite:
    """A float32-finite tensor that the float16 model gives as inf/NaN."""

    tensor: str
    count: int
    node: onnx.NodeProto

    def describe(self) -> str:
        return (f"node {self.node.name!r} ({self.node.op_type}), whose output {self.tensor!r} "
                f"holds {self.count} inf/NaN value(s) where float32's are finite")


def chunks(inputs: Mapping[str, np.ndarray], batchable: bool, rows: int = RANGE_ROWS,
           step: int = RANGE_CHUNK, per_call: int = 1) -> list[dict[str, np.ndarray]]:
    """Feeds of at most `rows` rows: `step` at a time when the model batches, else `per_call`
    rows (its fixed batch) at a time, as `measure.predict_all` runs it."""
    total = min(len(next(iter(inputs.values()))), rows) if inputs else 0
    if not batchable:
        step, total = per_call, total - total % per_call
    return [{name: array[i:i + step] for name, array in inputs.items()}
            for i in range(0, total, step)]


# --- before converting ----------------------------------------------------------------------

def prepare(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the converter names the Casts it adds after the nodes it
    touches: two unnamed nodes reading one input would get two Casts of one name, a model ONNX
    Runtime refuses), and turn Constant `value_float(s)` into tensors, which the converter
    converts (a float attribute it leaves float32 under a value it declares float16). Weights
    also declared graph inputs stop being inputs (`weights_not_inputs`)."""
    weights_not_inputs(model)
    every = [(i, node) for graph in graphs(model.graph) for i, node in enumerate(graph.node)]
    given = {node.name for _, node in every if node.name}
    taken: set[str] = set()
    for i, node in every:
        name = node.name if node.name and node.name not in taken else \
            f"{node.name or node.op_type}_{i}"
        while name in taken or (name != node.name and name in given):
            name += "_"
        node.name = name
        taken.add(name)
        if node.op_type == "Constant":
            _constant_as_tensor(node)
    _read_outputs_through_identity(model.graph, taken)


def _read_outputs_through_identity(graph: onnx.GraphProto, taken: set[str]) -> None:
    """A float32 graph output that nodes also read (a transformer's hidden states, say) reaches
    them from its producer, and the graph output becomes an Identity of it: the converter
    renames the producer's output and casts it to float32 under the output's name, so the
    readers, computing in float16, would get float32 (a model ONNX Runtime refuses)."""
    read = _read_names(graph) & {o.name for o in graph.output
                                 if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names = {n for g in graphs(graph) for node in g.node for n in (*node.input, *node.output)} \
        | {i.name for i in (*graph.input, *graph.initializer)}
    for position, node in reversed(list(enumerate(graph.node))):  # inserting after each
        for output in [o for o in node.output if o in read]:
            inner = f"{output}_value"
            while inner in names:
                inner += "_"
            names.add(inner)
            for g in graphs(graph):
                for reader in g.node:
                    reader.input[:] = [inner if n == output else n for n in reader.input]
            node.output[:] = [inner if n == output else n for n in node.output]
            name = f"{output}_output"
            while name in taken:
                name += "_"
            taken.add(name)
            graph.node.insert(position + 1, helper.make_node("Identity", [inner], [output],
                                                             name=name))


def graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """`graph` and every subgraph in it (If, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If, Loop or Scan `node`; [] for other nodes."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + [*attr.graphs]]


def subgraph_values(node: onnx.NodeProto) -> set[str]:
    """The values `node`'s bodies hold: their inputs, weights and what their nodes make."""
    return {name for body in subgraphs(node) for graph in graphs(body)
            for name in (*(v.name for v in (*graph.input, *graph.initializer)),
                         *(out for n in graph.node for out in n.output))} - {""}


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The values from outside them that `node`'s bodies read (outer-scope weights, say)."""
    read = {name for body in subgraphs(node) for graph in graphs(body)
            for n in graph.node for name in n.input}
    return read - subgraph_values(node) - {""}


def _constant_as_tensor(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            dims = [] if attr.name == "value_float" else [len(values)]
            tensor = helper.make_tensor(node.output[0], onnx.TensorProto.FLOAT, dims, values)
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", tensor))
            return


def weight_ranges(graph: onnx.GraphProto) -> dict[str, Range]:
    """Ranges of the float32 initializers and Constant values of the graph and its bodies, as
    the converter would store them in float16."""
    from onnxconverter_common.float16 import convert_np_to_float16

    def as_converter(values: np.ndarray) -> np.ndarray:
        return convert_np_to_float16(values, MIN_POSITIVE, FLOAT16_MAX)

    ranges = {}
    tensors = [(init.name, init) for g in graphs(graph) for init in g.initializer]
    tensors += [(node.output[0], attr.t) for g in graphs(graph) for node in g.node
                if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"]
    for name, tensor in tensors:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            ranges[name] = Range()
            ranges[name].add(numpy_helper.to_array(tensor), as_converter)
    return ranges


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _exposing(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named tensors (untyped: ONNX Runtime infers)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name and name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return probe


def _float_values(graph: onnx.GraphProto) -> list[str]:
    """What `graph`'s nodes make that shape inference typed float32."""
    typed = {v.name for v in (*graph.value_info, *graph.output)
             if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return [out for node in graph.node for out in node.output if out in typed]


def _fresh(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _lift(graph: onnx.GraphProto, taken: set[str]) -> dict[str, str]:
    """Make `graph`'s If, Loop and Scan nodes also output a summary of each float32 value
    their bodies make (`_summary`: three numbers, whatever the value's shape, so a Loop or
    Scan can stack them per iteration even where the value's shape changes, and an If's
    untaken branch gives zeros), deepest first. {name in `graph`: the body value it shows}."""
    lifted: dict[str, str] = {}
    for node in graph.node:
        bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        branches = [bodies[b] for b in ("body", "then_branch", "else_branch") if b in bodies]
        for branch in branches:
            nested = _lift(branch, taken)
            shown = {_summary(branch, value, taken): value for value in _float_values(branch)}
            shown.update({_merged(branch, inner, taken): original
                          for inner, original in nested.items()})
            others = [b for b in branches if b is not branch]  # If: the branch not taken
            for summary, original in shown.items():
                branch.output.append(helper.make_tensor_value_info(
                    summary, onnx.TensorProto.DOUBLE, [SUMMARY]))
                for other in others:
                    zeros = _constant(other, np.zeros(SUMMARY), f"{summary}_none", taken)
                    other.output.append(helper.make_tensor_value_info(
                        zeros, onnx.TensorProto.DOUBLE, [SUMMARY]))
                for axes in (a for a in node.attribute if a.name in (
                        "scan_output_axes", "scan_output_directions")):
                    axes.ints.append(0)
                node.output.append(_fresh(f"{original}_out", taken))
                lifted[node.output[-1]] = original
    return lifted


#: A lifted value's summary: its finite values' largest magnitude, sum of squares and sum of
#: squared float16 rounding errors (float64), what `Range` keeps of them.
SUMMARY = 3


def _node(graph: onnx.GraphProto, op: str, inputs: list[str], taken: set[str],
          **attributes: Any) -> str:
    """Append one `op` node to `graph`; the name of its output."""
    out = _fresh(f"{inputs[0]}_{op.lower()}", taken)
    graph.node.append(helper.make_node(op, inputs, [out], name=_fresh(f"{out}_node", taken),
                                       **attributes))
    return out


def _constant(graph: onnx.GraphProto, value: np.ndarray, name: str, taken: set[str]) -> str:
    out = _fresh(name, taken)
    graph.node.append(helper.make_node("Constant", [], [out], name=_fresh(f"{out}_node", taken),
                                       value=numpy_helper.from_array(np.asarray(value))))
    return out


def _summary(graph: onnx.GraphProto, value: str, taken: set[str]) -> str:
    """Nodes in `graph` that reduce the float32 `value` to its [3] summary, as `Range.add`
    measures an array (inf and NaN left out; float16 as ONNX Runtime's Cast rounds)."""
    def op(name: str, *inputs: str, **attributes: Any) -> str:
        return _node(graph, name, list(inputs), taken, **attributes)

    bad = op("Or", op("IsNaN", value), op("IsInf", value))
    kept = op("Where", bad, _constant(graph, np.float32(0), f"{value}_zero", taken), value)
    wide = op("Cast", kept, to=onnx.TensorProto.DOUBLE)
    flat = op("Reshape", wide, _constant(graph, np.array([-1]), f"{value}_flat", taken))
    padded = op("Concat", op("Abs", flat), _constant(graph, np.zeros(1), f"{value}_pad", taken),
                axis=0)  # ReduceMax of nothing is not 0
    rounded = op("Cast", op("Cast", kept, to=onnx.TensorProto.FLOAT16),
                 to=onnx.TensorProto.DOUBLE)
    error = op("Sub", rounded, wide)
    return _stacked(graph, value, taken, op("ReduceMax", padded, keepdims=0),
                    op("ReduceSum", op("Mul", flat, flat), keepdims=0),
                    op("ReduceSum", op("Mul", error, error), keepdims=0))


def _merged(graph: onnx.GraphProto, summaries: str, taken: set[str]) -> str:
    """Nodes in `graph` that merge the [..., 3] summaries a nested body's node gives (one per
    iteration of an inner Loop, say) into one [3] summary."""
    def op(name: str, *inputs: str, **attributes: Any) -> str:
        return _node(graph, name, list(inputs), taken, **attributes)

    rows = op("Concat", _constant(graph, np.zeros((1, SUMMARY)), f"{summaries}_pad", taken),
              op("Reshape", summaries, _constant(graph, np.array([-1, SUMMARY]),
                                                 f"{summaries}_rows", taken)), axis=0)
    column = [op("Gather", rows, _constant(graph, np.array([i]), f"{summaries}_{i}", taken),
                 axis=1) for i in range(SUMMARY)]
    return _stacked(graph, summaries, taken, op("ReduceMax", column[0], keepdims=0),
                    op("ReduceSum", column[1], keepdims=0), op("ReduceSum", column[2], keepdims=0))


def _stacked(graph: onnx.GraphProto, value: str, taken: set[str], *scalars: str) -> str:
    """The scalars as one [3] tensor."""
    one = _constant(graph, np.array([1]), f"{value}_one", taken)
    return _node(graph, "Concat", [_node(graph, "Reshape", [s, one], taken) for s in scalars],
                 taken, axis=0)


def _ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
            shown: Mapping[str, str]) -> dict[str, Range]:
    names = [out for node in model.graph.node for out in node.output]
    ranges: dict[str, Range] = {}
    session = _session(_exposing(model, names))
    exposed = [o.name for o in session.get_outputs()]
    for feed in feeds:
        results = zip(exposed, session.run(None, dict(feed)))
        for name, array in (*feed.items(), *results):
            if name in shown:
                ranges.setdefault(shown[name], Range()).add_summaries(array)
            elif isinstance(array, np.ndarray) and array.dtype == np.float32:
                ranges.setdefault(name, Range()).add(array)
    return ranges


def measure(model: onnx.ModelProto,
            feeds: list[dict[str, np.ndarray]] | None) -> dict[str, Range] | None:
    """Ranges of the float32 inputs and node outputs of the float32 model run on `feeds`, the
    values inside If, Loop and Scan bodies included where they can be shown; None (logged) when
    it does not run, and activation ranges are then not known."""
    if not feeds:
        return None
    if any(subgraphs(node) for node in model.graph.node):
        probe = onnx.shape_inference.infer_shapes(model)
        taken = {n for g in graphs(probe.graph) for node in g.node
                 for n in (node.name, *node.input, *node.output)} | \
            {v.name for g in graphs(probe.graph) for v in (*g.input, *g.initializer)}
        shown = _lift(probe.graph, taken)
        try:
            return _ranges(probe, feeds, shown)
        except Exception as exc:  # onnxruntime raises its own types
            log.warning("fp16: activations inside If, Loop and Scan bodies not measured (shown "
                        "as outputs, the model did not run: %s)", exc)
    try:
        return _ranges(model, feeds, {})
    except Exception as exc:  # onnxruntime raises its own types
        log.warning("fp16: activation ranges not measured (the float32 model did not run on "
                    "the data: %s); weights only are checked", exc)
        return None


def out_of_range(graph: onnx.GraphProto, weights: dict[str, Range],
                 activations: dict[str, Range] | None) -> dict[str, str]:
    """{tensor: why float16 cannot hold it}: weights, graph inputs and activations."""
    inputs = {i.name for i in graph.input}
    found = {}
    for name, span in weights.items():
        why = span.problem(f"weight {name!r}")
        if why:
            found[name] = why
    for name, span in (activations or {}).items():
        if name in found:
            continue
        why = span.problem(f"input {name!r}" if name in inputs else repr(name), measured=True)
        if why:
            found[name] = why
    return found


def from_weights(graph: onnx.GraphProto, tensors: Mapping[str, str],
                 weights: Mapping[str, Any]) -> dict[str, str]:
    """{tensor: why}: the outputs of nodes that read a weight of `tensors` (the nodes stay
    float32), kept float32 for their readers too: a float32 epsilon added to a value is lost
    again when the sum is rounded to float16 (1e-9 becomes 0), and Log, Sqrt or a division
    that the epsilon guards then gives inf or NaN."""
    derived = {}
    for node in graph.node:
        read = [t for t in node.input if t in tensors and t in weights]
        for out in node.output:
            if read and out and out not in tensors:
                derived[out] = (f"{out!r} comes from {node.name!r}, which reads weight "
                                f"{read[0]!r}")
    return derived


def plan(graph: onnx.GraphProto, tensors: Mapping[str, str],
         derived: Mapping[str, str]) -> dict[str, str]:
    """{node: why it stays float32}: the nodes that make or read a tensor of `tensors` or
    `derived` (an If, Loop or Scan reads what its bodies read from outside them, and makes what
    they make); each reason starts with the node's op."""
    blocked = {}
    for node in graph.node:
        names = (*node.input, *sorted(subgraph_reads(node)), *node.output,
                 *sorted(subgraph_values(node)))
        why = [tensors[t] for t in names if t in tensors] or \
            [derived[t] for t in names if t in derived]
        if why:
            blocked[node.name] = f"{node.op_type}: " + "; ".join(dict.fromkeys(why))
    return blocked


def split_shared_weights(graph: onnx.GraphProto, blocked: Iterable[str]) -> None:
    """Initializers that blocked and unblocked nodes share get a copy for the blocked ones: the
    converter leaves every initializer of a blocked node float32, for all its readers (the
    float16 bodies of If, Loop and Scan nodes among them)."""
    blocked = set(blocked)
    floats = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in (*node.input, *subgraph_reads(node)):
            if name in floats:
                readers.setdefault(name, set()).add(node.name in blocked)
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    for name, kinds in readers.items():
        if kinds != {True, False}:
            continue
        copy = f"{name}_float32"
        while copy in taken:
            copy += "_"
        taken.add(copy)
        tensor = onnx.TensorProto()
        tensor.CopyFrom(floats[name])
        tensor.name = copy
        graph.initializer.append(tensor)
        for node in graph.node:
            if node.name in blocked:
                node.input[:] = [copy if n == name else n for n in node.input]


# --- after converting -----------------------------------------------------------------------

def _to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def drop_cast_pairs(graph: onnx.GraphProto, original: set[str]) -> None:
    """A float32 value the converter casts to float16 and back between two blocked nodes reaches
    the second as it left the first (the converter drops such pairs itself only for a single
    reader that is not fed by a Constant). Casts it added that nothing reads are removed."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    renamed = {}
    for node in graph.node:
        if node.op_type != "Cast" or node.name in original or _to(node) != onnx.TensorProto.FLOAT \
                or node.output[0] in outputs:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Cast" and source.name not in original \
                and _to(source) == onnx.TensorProto.FLOAT16:
            renamed[node.output[0]] = source.input[0]
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
    while True:  # remove added Casts whose outputs nothing reads, then those they fed
        read = _read_names(graph) | outputs
        dead = [node for node in graph.node if node.op_type == "Cast"
                and node.name not in original and node.output[0] not in read]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    present = _read_names(graph) | outputs | {o for n in graph.node for o in n.output}
    for info in [v for v in graph.value_info if v.name not in present]:
        graph.value_info.remove(info)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, in subgraphs too (they may read outer-scope values)."""
    return {name for g in graphs(graph) for node in g.node for name in node.input}


def record(model: onnx.ModelProto, kept: Mapping[str, str]) -> None:
    """Write {node: why} into the model's metadata, where `kept_float32` reads it."""
    for prop in [p for p in model.metadata_props if p.key == METADATA_KEY]:
        model.metadata_props.remove(prop)
    if kept:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(dict(kept)))


def kept_float32(model: onnx.ModelProto) -> dict[str, str]:
    """{node: why it stayed float32} of a model `convert_fp16` wrote; {} for any other."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    return {}


# --- checking the result --------------------------------------------------------------------

def _non_finite(got: Any, want: Any) -> int:
    """How many values `got` holds as inf/NaN where the float32 `want` is finite."""
    if not isinstance(got, np.ndarray) or not isinstance(want, np.ndarray) \
            or want.dtype.kind != "f" or got.shape != want.shape:
        return 0
    return int(np.count_nonzero(~np.isfinite(got) & np.isfinite(want)))


def first_non_finite(reference: onnx.ModelProto, converted: onnx.ModelProto,
                     feed: Feed) -> NonFinite | None:
    """The first node of `reference` (in graph order) whose output the converted model gives
    as inf/NaN on `feed` where the float32 model's is finite: where float16 broke."""
    names = [out for node in reference.graph.node for out in node.output if out]
    produced = {out for node in converted.graph.node for out in node.output} | \
        {i.name for i in converted.graph.input}
    want_session = _session(_exposing(reference, names))
    want = dict(zip([o.name for o in want_session.get_outputs()],
                    want_session.run(None, dict(feed))))
    got_session = _session(_exposing(converted, [n for n in names if n in produced]))
    got = dict(zip([o.name for o in got_session.get_outputs()],
                   got_session.run(None, dict(feed))))
    for node in reference.graph.node:
        for out in node.output:
            count = _non_finite(got.get(out), want.get(out))
            if count:
                return NonFinite(out, count, node=node)
    return None
