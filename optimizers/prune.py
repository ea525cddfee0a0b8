"""Pruning of ONNX models: magnitude (unstructured) and whole channels (structured).

Unstructured pruning zeroes the smallest weights of every Conv/Gemm/MatMul layer: dense kernels
run no faster, but the zeros compress, so the OTA payload shrinks. Structured pruning removes
whole output channels (Conv) or units (Gemm/MatMul) with the smallest L1/L2 norms and rewrites
everything downstream that depends on them (biases, per-channel Add/Mul, BatchNormalization,
the next layer's input channels, a Flatten in between), giving a smaller dense model that runs
faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgerun.optimizers.errors import OptimizeError
from edgerun.optimizers.fp16 import subgraph_reads
from edgerun.optimizers.onnx_graph import weights_not_inputs

LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: One output per input element: channels pass through unchanged.
ELEMENTWISE = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu",
               "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Identity", "Dropout",
               "Clip", "Erf", "Abs", "Neg", "Exp", "Sqrt", "Cast"}
#: Elementwise with a second, constant operand that may be per channel.
BROADCAST = {"Add", "Sub", "Mul", "Div"}
#: Keep the channel axis (1) of NCHW activations.
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}


@dataclass
class PruneReport:
    """What pruning did: measured sparsity, parameters before and after, layers touched."""

    method: str
    target: float
    sparsity: float
    params_before: int
    params_after: int
    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"prune:{self.method}:{self.target:g}"


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise OptimizeError(f"pruning ratio {ratio:g} must lie strictly between 0 and 1")


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _layer_weight_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The float32 weights of the layers, and why others are left alone: a weight that some
    node also reads as anything but a layer's weight (a tied embedding a Gather reads, a
    body of an If/Loop/Scan) would change that node too."""
    inits = _weights(model)
    names: list[str] = []
    other: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in inits \
                and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT \
                and node.input[1] not in names:
            names.append(node.input[1])
        weight = node.input[1] if node.op_type in LAYER_OPS and len(node.input) > 1 else None
        for name in [*node.input, *sorted(subgraph_reads(node))]:
            if name != weight:
                other.setdefault(name, node)
    skipped = [f"{name}: also read by node {_label(other[name])}, which pruning would change "
               "too" for name in names if name in other]
    return [name for name in names if name not in other], skipped


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    inits = _weights(model)
    inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer
               if init.data_type == onnx.TensorProto.FLOAT)


def prune_unstructured(model: onnx.ModelProto, sparsity: float) -> PruneReport:
    """Zero the smallest-magnitude `sparsity` fraction of each layer's weights, in place."""
    _check_ratio(sparsity)
    names, skipped = _layer_weight_names(model)
    if not names:
        ops = sorted({node.op_type for node in model.graph.node})
        raise OptimizeError(f"nothing to prune: no {'/'.join(LAYER_OPS)} node with float32 "
                            f"weights of its own (the model's ops: {', '.join(ops)})"
                            + "".join(f"; {why}" for why in skipped))
    zeros = total = 0
    layers = []
    for name in names:
        weight = numpy_helper.to_array(_weights(model)[name]).copy()
        k = int(round(sparsity * weight.size))
        if k:
            # exactly k: zeroing all weights <= the k-th magnitude would overshoot on ties
            # (a layer of equal weights would lose every one)
            smallest = np.argpartition(np.abs(weight).ravel(), k - 1)[:k]
            np.put(weight, smallest, 0.0)
            _set(model, name, weight)
        zeros += int(np.count_nonzero(weight == 0))
        total += weight.size
        layers.append(f"{name}: {np.mean(weight == 0):.1%} zero")
    params = _param_count(model)
    return PruneReport("unstructured", sparsity, zeros / total, params, params - zeros, layers,
                       skipped)


#: What removing channels of one layer implies: (initializer, axis, indices to keep) triples.
Slices = list[tuple[str, int, np.ndarray]]


class _Blocked(Exception):
    """A layer's channels cannot be removed; the message names the node that prevents it."""


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {init.name: init for init in model.graph.initializer}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            # what an If/Loop/Scan body reads from outside counts as read by that node
            for name in [*node.input, *sorted(subgraph_reads(node))]:
                self.consumers.setdefault(name, []).append(node)
                self.uses[name] = self.uses.get(name, 0) + 1
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim]
                       for v in (*inferred.graph.value_info, *inferred.graph.input)}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def constant(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """An initializer used only by this node, that may therefore be sliced."""
        if name not in self.inits:
            raise _Blocked(f"node {_label(node)}: its operand {name!r} is not a constant")
        body = next((n for n in self.consumers.get(name, []) if name not in n.input), None)
        if body is not None:
            raise _Blocked(f"node {_label(node)}: initializer {name!r} is also read in the body "
                           f"of node {_label(body)}")
        if self.uses.get(name, 0) > 1:
            raise _Blocked(f"node {_label(node)}: initializer {name!r} is shared with other nodes")
        return self.array(name)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"({node.op_type})"


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _out_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The axis of a layer's weight that indexes its output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return 0
    return weight.ndim - 1


def _layer_slices(g: _Graph, node: onnx.NodeProto, keep: np.ndarray) -> Slices:
    """The slices on the layer itself: its weight's output axis and its bias."""
    weight = g.constant(node, node.input[1])
    edit: Slices = [(node.input[1], _out_axis(node, weight), keep)]
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias = g.constant(node, node.input[2])
        if bias.ndim and bias.shape[-1] == weight.shape[_out_axis(node, weight)]:
            edit.append((node.input[2], bias.ndim - 1, keep))
        elif bias.size != 1:
            raise _Blocked(f"node {_label(node)}: bias of shape {bias.shape} is not per unit")
    return edit


def _follow(g: _Graph, tensor: str, axis: int, rank: int | None, keep: np.ndarray,
            channels: int, edit: Slices, seen: set[str]) -> None:
    """Walk every consumer of `tensor` (whose `axis`, negative, holds the pruned channels) until
    the next layers, adding the slices that keep the graph consistent; _Blocked otherwise."""
    if tensor in g.graph_outputs:
        raise _Blocked(f"tensor {tensor!r} is a graph output")
    for node in g.consumers.get(tensor, []):
        key = f"{id(node)}:{tensor}"
        if key in seen:
            continue
        seen.add(key)
        op = node.op_type
        if tensor not in node.input:
            raise _Blocked(f"node {_label(node)}: its body reads {tensor!r}")
        if op in LAYER_OPS and node.input[0] == tensor:
            _consumer_slices(g, node, axis, rank, keep, channels, edit)
        elif op in ELEMENTWISE or (op in SPATIAL and axis == -(rank or 0) + 1):
            if op == "PRelu":
                _broadcast_slice(g, node, node.input[1], axis, keep, channels, edit)
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise _Blocked(f"node {_label(node)}: its mask output is used")
            _follow(g, node.output[0], axis, rank, keep, channels, edit, seen)
        elif op in BROADCAST:
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            if other == tensor:
                raise _Blocked(f"node {_label(node)}: combines the pruned tensor with itself")
            _broadcast_slice(g, node, other, axis, keep, channels, edit)
            _follow(g, node.output[0], axis, rank, keep, channels, edit, seen)
        elif op == "BatchNormalization" and rank is not None and axis == -rank + 1:
            for name in node.input[1:5]:
                edit.append((name, 0, keep))
                if g.constant(node, name).shape != (channels,):
                    raise _Blocked(f"node {_label(node)}: parameter {name!r} is not per channel")
            _follow(g, node.output[0], axis, rank, keep, channels, edit, seen)
        elif op == "Flatten" and rank is not None and axis == -rank + 1 \
                and _attr(node, "axis", 1) == 1:
            shape = g.shapes.get(tensor)
            if not shape or any(d is None for d in shape[1:]):
                raise _Blocked(f"node {_label(node)}: the spatial size before it is unknown")
            spatial = int(np.prod(shape[2:], dtype=np.int64))
            flat = (keep[:, None] * spatial + np.arange(spatial)[None, :]).ravel()
            _follow(g, node.output[0], -1, 2, flat, channels * spatial, edit, seen)
        else:
            raise _Blocked(f"node {_label(node)} consumes the pruned channels and cannot be "
                           "rewritten")


def _broadcast_slice(g: _Graph, node: onnx.NodeProto, name: str, axis: int, keep: np.ndarray,
                     channels: int, edit: Slices) -> None:
    value = g.constant(node, name)
    if value.ndim >= -axis and value.shape[axis] == channels:
        edit.append((name, value.ndim + axis, keep))
    elif value.ndim >= -axis and value.shape[axis] != 1:
        raise _Blocked(f"node {_label(node)}: operand {name!r} of shape {value.shape} does "
                       "not broadcast per channel")


def _consumer_slices(g: _Graph, node: onnx.NodeProto, axis: int, rank: int | None,
                     keep: np.ndarray, channels: int, edit: Slices) -> None:
    """The next layer loses the matching input channels of its weight."""
    if len(node.input) < 2 or node.input[1] not in g.inits:
        raise _Blocked(f"node {_label(node)}: its weight is not a constant")
    weight = g.constant(node, node.input[1])
    if node.op_type == "Conv":
        if rank is None or axis != -rank + 1 or _attr(node, "group", 1) != 1:
            raise _Blocked(f"node {_label(node)}: grouped or not fed NCHW channels")
        in_axis = 1
    else:
        if axis != -1 or (node.op_type == "Gemm" and _attr(node, "transA", 0)):
            raise _Blocked(f"node {_label(node)}: does not take the channels on its last axis")
        in_axis = 1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0
        if weight.ndim != 2:
            raise _Blocked(f"node {_label(node)}: weight of rank {weight.ndim} (2 expected)")
    if weight.shape[in_axis] != channels:
        raise _Blocked(f"node {_label(node)}: weight has {weight.shape[in_axis]} input "
                       f"channels, {channels} expected")
    edit.append((node.input[1], in_axis, keep))


def _plan(g: _Graph, node: onnx.NodeProto, ratio: float, norm: str) -> tuple[Slices, int, int]:
    weight = g.constant(node, node.input[1])
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        raise _Blocked(f"node {_label(node)}: transA is set")
    if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
        raise _Blocked(f"node {_label(node)}: grouped convolution")
    if node.op_type == "MatMul" and weight.ndim != 2:
        raise _Blocked(f"node {_label(node)}: weight of rank {weight.ndim} (2 expected)")
    out_axis = _out_axis(node, weight)
    channels = weight.shape[out_axis]
    removed = min(int(round(ratio * channels)), channels - 1)
    if removed == 0:
        raise _Blocked(f"node {_label(node)}: {channels} channels, none to remove at {ratio:g}")
    moved = np.moveaxis(weight, out_axis, 0).reshape(channels, -1)
    scores = np.abs(moved).sum(axis=1) if norm == "l1" else np.sqrt((moved ** 2).sum(axis=1))
    keep = np.sort(np.argsort(scores, kind="stable")[removed:])
    edit = _layer_slices(g, node, keep)
    rank = weight.ndim if node.op_type == "Conv" else None
    axis = -(weight.ndim - 1) if node.op_type == "Conv" else -1
    _follow(g, node.output[0], axis, rank, keep, channels, edit, set())
    return edit, channels, len(keep)


def prune_structured(model: onnx.ModelProto, ratio: float, *, norm: str = "l1") -> PruneReport:
    """Remove the `ratio` fraction of output channels with the smallest weight norm from every
    Conv/Gemm/MatMul layer whose outputs only reach other layers, in place.

    OptimizeError when no layer can be pruned, naming the node that blocks each one. Weights
    also declared graph inputs (IR 3 exports) stop being inputs: their declared shapes would
    no longer fit them.
    """
    _check_ratio(ratio)
    if norm not in ("l1", "l2"):
        raise OptimizeError(f"norm {norm!r}: choose l1 or l2")
    weights_not_inputs(model)
    before = _param_count(model)
    layers, skipped = [], []
    candidates = [node for node in model.graph.node
                  if node.op_type in LAYER_OPS and len(node.input) > 1]
    if not candidates:
        ops = sorted({node.op_type for node in model.graph.node})
        raise OptimizeError(f"nothing to prune: no {'/'.join(LAYER_OPS)} node "
                            f"(the model's ops: {', '.join(ops)})")
    for node in candidates:
        g = _Graph(model)  # fresh: earlier layers changed shapes and initializers
        try:
            if node.input[1] not in g.inits:
                raise _Blocked(f"node {_label(node)}: its weight is not a constant")
            edit, channels, kept = _plan(g, node, ratio, norm)
        except _Blocked as blocked:
            skipped.append(f"{_label(node)}: {blocked}")
            continue
        for name, axis, keep in edit:
            _set(model, name, np.take(g.array(name), keep, axis=axis))
        layers.append(f"{_label(node)}: {channels} -> {kept}")
    if not layers:
        raise OptimizeError("structured pruning found no layer whose channels can be removed: "
                            + "; ".join(skipped))
    del model.graph.value_info[:]  # intermediate shapes changed; runtimes infer them again
    after = _param_count(model)
    return PruneReport("structured", ratio, 1 - after / before, before, after, layers, skipped)
