"""A small int8 LiteRT model written with the flatbuffer schema that ai-edge-litert ships.

No TensorFlow converter is needed: the graph is one FULLY_CONNECTED op on int8 tensors with
per-tensor scales and zero points, and a dynamic batch dim.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

IN_Q = (0.05, -3)
OUT_Q = (0.1, 5)
W_SCALE = 0.02


def _buffer(data: np.ndarray | None = None) -> schema.BufferT:
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(data.tobytes(), np.uint8)
    return buffer


def _tensor(name: str, shape: list[int], kind: int, buffer: int, scale: float, zero_point: int,
            dynamic: bool = False) -> schema.TensorT:
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name, shape, kind, buffer
    if dynamic:
        tensor.shapeSignature = [-1, *shape[1:]]
    params = schema.QuantizationParametersT()
    params.scale, params.zeroPoint = [scale], [zero_point]
    tensor.quantization = params
    return tensor


def _pack(graph: schema.SubGraphT, operators: list[tuple[int, int]],
          buffers: list[schema.BufferT]) -> bytes:
    """A one-subgraph model of `graph` as .tflite bytes; `operators` are the (builtin, version)
    its operators' opcode indexes name, in order."""
    codes = []
    for builtin, version in operators:
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = builtin
        code.version = version
        codes.append(code)
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, codes, [graph]
    model.buffers = buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def int8_dense_tflite(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """y = x @ weight.T + bias with int8 input and output tensors, as .tflite bytes."""
    units, features = weight.shape
    qw = np.clip(np.round(weight / W_SCALE), -127, 127).astype(np.int8)
    qb = np.round(bias / (IN_Q[0] * W_SCALE)).astype(np.int32)
    int8, int32 = schema.TensorType.INT8, schema.TensorType.INT32
    graph = schema.SubGraphT()
    graph.tensors = [_tensor("x", [1, features], int8, 0, *IN_Q, dynamic=True),
                     _tensor("w", [units, features], int8, 1, W_SCALE, 0),
                     _tensor("b", [units], int32, 2, IN_Q[0] * W_SCALE, 0),
                     _tensor("y", [1, units], int8, 0, *OUT_Q, dynamic=True)]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    graph.inputs, graph.outputs, graph.operators, graph.name = [0], [3], [op], "main"
    return _pack(graph, [(schema.BuiltinOperator.FULLY_CONNECTED, 4)],
                 [_buffer(), _buffer(qw), _buffer(qb)])


def int32_row_mixing_tflite(features: int = 4) -> bytes:
    """y = x + sum(x, axis=0) on an int32 input whose batch dim is fixed at 1: one row gives 2x,
    but a batch resized to two rows mixes them, as a graph that assumes batch 1 can."""
    int32 = schema.TensorType.INT32
    graph = schema.SubGraphT()
    graph.tensors = [_tensor("x", [1, features], int32, 0, 0.0, 0),
                     _tensor("axis", [1], int32, 1, 0.0, 0),
                     _tensor("total", [1, features], int32, 0, 0.0, 0),
                     _tensor("y", [1, features], int32, 0, 0.0, 0)]
    for tensor in graph.tensors:
        tensor.quantization = None
    total = schema.OperatorT()
    total.opcodeIndex, total.inputs, total.outputs = 0, [0, 1], [2]
    total.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
    total.builtinOptions = schema.ReducerOptionsT()
    total.builtinOptions.keepDims = True
    add = schema.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 1, [0, 2], [3]
    add.builtinOptionsType = schema.BuiltinOptions.AddOptions
    add.builtinOptions = schema.AddOptionsT()
    graph.inputs, graph.outputs, graph.operators, graph.name = [0], [3], [total, add], "main"
    return _pack(graph, [(schema.BuiltinOperator.SUM, 1), (schema.BuiltinOperator.ADD, 1)],
                 [_buffer(), _buffer(np.zeros(1, np.int32))])


def float_add_tflite() -> bytes:
    """z = x + y on float32 [-1, -1] inputs: any two shapes resize, only equal ones allocate."""
    float32 = schema.TensorType.FLOAT32
    graph = schema.SubGraphT()
    graph.tensors = [_tensor(name, [1, 1], float32, 0, 0.0, 0) for name in ("x", "y", "z")]
    for tensor in graph.tensors:
        tensor.shapeSignature, tensor.quantization = [-1, -1], None
    add = schema.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 0, [0, 1], [2]
    add.builtinOptionsType = schema.BuiltinOptions.AddOptions
    add.builtinOptions = schema.AddOptionsT()
    graph.inputs, graph.outputs, graph.operators, graph.name = [0, 1], [2], [add], "main"
    return _pack(graph, [(schema.BuiltinOperator.ADD, 1)], [_buffer()])


def float_sum_tflite() -> bytes:
    """y = sum(x) ([1]) of a float32 sequence x of any length: axis 0 is no batch."""
    float32, int32 = schema.TensorType.FLOAT32, schema.TensorType.INT32
    graph = schema.SubGraphT()
    graph.tensors = [_tensor("x", [1], float32, 0, 0.0, 0),
                     _tensor("axis", [1], int32, 1, 0.0, 0),
                     _tensor("y", [1], float32, 0, 0.0, 0)]
    for tensor in graph.tensors:
        tensor.quantization = None
    graph.tensors[0].shapeSignature = [-1]
    total = schema.OperatorT()
    total.opcodeIndex, total.inputs, total.outputs = 0, [0, 1], [2]
    total.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
    total.builtinOptions = schema.ReducerOptionsT()
    total.builtinOptions.keepDims = True
    graph.inputs, graph.outputs, graph.operators, graph.name = [0], [2], [total], "main"
    return _pack(graph, [(schema.BuiltinOperator.SUM, 1)],
                 [_buffer(), _buffer(np.zeros(1, np.int32))])


def float_concat_tflite() -> bytes:
    """joined = concat(prefix, x) of two float32 sequences of any lengths ([-1] each): axis 0
    is no batch, though every tensor leads with a dynamic dim, and either may be empty."""
    float32 = schema.TensorType.FLOAT32
    graph = schema.SubGraphT()
    graph.tensors = [_tensor(name, [n], float32, 0, 0.0, 0)
                     for name, n in (("prefix", 1), ("x", 1), ("joined", 2))]
    for tensor in graph.tensors:
        tensor.shapeSignature, tensor.quantization = [-1], None
    concat = schema.OperatorT()
    concat.opcodeIndex, concat.inputs, concat.outputs = 0, [0, 1], [2]
    concat.builtinOptionsType = schema.BuiltinOptions.ConcatenationOptions
    concat.builtinOptions = schema.ConcatenationOptionsT()
    concat.builtinOptions.axis = 0
    graph.inputs, graph.outputs, graph.operators, graph.name = [0, 1], [2], [concat], "main"
    return _pack(graph, [(schema.BuiltinOperator.CONCATENATION, 1)], [_buffer()])
