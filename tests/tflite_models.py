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
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 4
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [_buffer(), _buffer(qw), _buffer(qb)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
