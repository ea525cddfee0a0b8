"""Small real ONNX models built with onnx.helper, and a model wrapper that records batches."""

from __future__ import annotations

import threading

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgerun.runtime import Model

ONNX_TYPES = {
    "bool": TensorProto.BOOL, "uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64, "int8": TensorProto.INT8,
    "int16": TensorProto.INT16, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
    "float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
    "string": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def identity_onnx(dtype: str, shape: list) -> bytes:
    """y = x for one tensor of any dtype; shape entries may be names (dynamic) or ints."""
    elem = ONNX_TYPES[dtype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)])
    return _model(graph)


def expand_onnx(columns: int, rows: int) -> bytes:
    """y = x (float32 [1, columns]) repeated into [rows, columns]: a big answer to a small
    request. Fixed shapes, so nothing is batched."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, columns])],
        [numpy_helper.from_array(np.array([rows, columns], np.int64), "shape")])
    return _model(graph)


def gather_onnx() -> bytes:
    """rows = table[idx]; an index out of 0..9 fails inside ONNX Runtime at run time."""
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(table, "table")])
    return _model(graph)


def two_input_onnx() -> bytes:
    """out = a + float(b), with a float32 [batch, 4] and b int32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "bf"], ["out"])], "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.INT32, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])])
    return _model(graph)


def masked_sum_onnx() -> bytes:
    """total = sum(x * mask) per row, with x and mask float32 [batch, "seq"]: one sequence."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "mask"], ["kept"]),
         helper.make_node("ReduceSum", ["kept", "axes"], ["total"], keepdims=0)], "masked_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return _model(graph)


def total_onnx() -> bytes:
    """total = sum(x) of x float32 ["n", 4]: a dynamic dim 0 in, a scalar out, so requests
    cannot be stacked (each needs its own total) though the input looks batched."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "total",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    return _model(graph)


def gram_onnx() -> bytes:
    """gram = x @ x.T of x float32 ["n", 2]: an ["n", "n"] answer, so dim 0 is no batch."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["xt"]),
         helper.make_node("MatMul", ["x", "xt"], ["gram"])], "gram",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["n", "n"])])
    return _model(graph)


def centered_onnx() -> bytes:
    """centered = x - mean(x) of x float32 ["seq"]: dim 0 is one caller's sequence, not a
    batch, though nothing in the graph says so; two callers' sequences stacked share a mean."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=1),
         helper.make_node("Sub", ["x", "mean"], ["centered"])], "centered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq"])],
        [helper.make_tensor_value_info("centered", TensorProto.FLOAT, ["seq"])])
    return _model(graph)


class Recording(Model):
    """A real model that records every batch it runs and can hold its worker at a gate."""

    def __init__(self, model: Model) -> None:
        super().__init__(model.bundle, model.backend, model.device)
        self.batches: list[dict[str, np.ndarray]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append({name: array.copy() for name, array in arrays.items()})
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return super().run(arrays)

    def hold(self) -> None:
        """Make the next forward pass wait until `release()`."""
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def batch_rows(self) -> list[int]:
        return [next(iter(batch.values())).shape[0] for batch in self.batches]
