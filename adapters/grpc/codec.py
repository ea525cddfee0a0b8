"""OIP v2 gRPC messages <-> the data plane's decoded requests and arrays.

Tensors come either as typed `contents` (one repeated field per datatype family) or as
`raw_input_contents` (little-endian, row-major bytes, what tritonclient sends): raw bytes share
the binary extension's decoder, so BYTES elements carry the same 4-byte length prefix. A request
that came raw is answered raw; a typed one typed, unless an output has no typed field (FP16),
since the protocol allows only one of the two ways in a response.

Integer and BOOL fields are converted one Python object per element, `STEP_ELEMENTS` at a time,
and BYTES one by one: a worker thread lets go of the GIL between steps, so the servicer converts
big ones there, off the event loop (`decode_work` and `encode_work` say how big they are).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from edgerun.adapters.codecs import oip
from edgerun.adapters.grpc import grpc_predict_v2_pb2 as pb
from edgerun.runtime.errors import InvalidInput
from edgerun.runtime.signature import cast_array

#: OIP datatype -> the InferTensorContents field that carries it (FP16: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
#: Wire dtype of each contents field, to read a repeated field into an array in one go.
_FIELD_DTYPE = {
    "bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
    "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
#: Float contents of this many elements or more are read and written as the packed bytes of
#: their field (little-endian values) by numpy: one Python float per element held the event
#: loop, and the GIL, so no thread helps, for half a second per 16 MB; every caller waited.
PACKED_ELEMENTS = 4096
_PACKED = {"fp32_contents": np.dtype("<f4"), "fp64_contents": np.dtype("<f8")}
#: Elements converted in one call between a repeated field and an array. One call over a whole
#: field held the GIL throughout (0.4 s for 4 million INT64, with `np.array`), so even on a
#: worker thread the event loop waited; a step of this many holds it a few milliseconds, and
#: steps by slices are twice as quick as `np.array` over the field.
STEP_ELEMENTS = 1 << 15
_FIELD_NUMBER = {f.name: f.number for f in pb.InferTensorContents.DESCRIPTOR.fields}
#: Bytes a field of each other wire type takes (0, a varint, is read to be skipped).
_SKIP = {0: 0, 1: 8, 5: 4}


def parameter(value: pb.InferParameter) -> Any:
    """An InferParameter's value, whichever of its choices is set (None if none)."""
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def decode_request(message: pb.ModelInferRequest) -> oip.InferRequest:
    """The request's tensors as arrays; InvalidInput naming the tensor when one is malformed."""
    if not message.inputs:
        raise InvalidInput("the request has no inputs")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for "
                           f"{len(message.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice", name)
        if datatype not in oip.DATATYPES:
            raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not supported (one "
                               f"of {', '.join(oip.DATATYPES)})", name)
        oip.check_dims(name, shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {name!r}: shape must be non-negative integers, got "
                               f"{shape}", name)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has contents while the request uses "
                                   "raw_input_contents", name)
            inputs[name] = oip.decode_binary(name, datatype, shape, memoryview(raw[index]))
        else:
            inputs[name] = _decode_contents(name, datatype, shape, tensor.contents)
    parameters = {key: parameter(value) for key, value in message.parameters.items()}
    timeout = parameters.get("timeout")
    if timeout is not None and (isinstance(timeout, (bool, str)) or not 0 < timeout < math.inf):
        raise InvalidInput(f"parameters.timeout must be a positive number of microseconds, "
                           f"got {timeout!r}")
    requested: dict[str, oip.RequestedOutput] = {}
    for output in message.outputs:
        if output.name in requested:
            raise InvalidInput(f"requested output {output.name!r} appears twice", output.name)
        oip.check_output_parameters(output.name, output.parameters)
        requested[output.name] = oip.RequestedOutput(output.name, True)
    return oip.InferRequest(id=message.id or None, inputs=inputs,
                            outputs=list(requested.values()) or None,
                            binary_outputs=bool(raw), timeout_us=timeout)


def _decode_contents(name: str, datatype: str, shape: list[int],
                     contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents field; send it "
                           "in raw_input_contents", name)
    values = getattr(contents, field)
    if not values:
        _check_field(name, datatype, field, contents)
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = [_text(v) for v in values]
    elif field in _PACKED and len(values) >= PACKED_ELEMENTS:
        array = cast_array(_read_packed(contents, field), oip.DATATYPES[datatype], name)
    elif len(values) > STEP_ELEMENTS:
        array = np.empty(len(values), dtype=_FIELD_DTYPE[field])
        for start in range(0, len(values), STEP_ELEMENTS):
            array[start:start + STEP_ELEMENTS] = values[start:start + STEP_ELEMENTS]
        array = cast_array(array, oip.DATATYPES[datatype], name)
    else:
        array = cast_array(np.array(values, dtype=_FIELD_DTYPE[field]),
                           oip.DATATYPES[datatype], name)
    return oip.shaped(name, shape, array)


def _check_field(name: str, datatype: str, field: str, contents: pb.InferTensorContents) -> None:
    """Data sent in another contents field than the datatype's: named, where the datatype's
    own field, empty, said the data held no elements."""
    given = [described.name for described, _ in contents.ListFields() if described.name != field]
    if given:
        raise InvalidInput(f"input {name!r}: {datatype} data go in contents.{field}; the request "
                           f"set contents.{', contents.'.join(given)}", name)


def decode_work(message: pb.ModelInferRequest) -> int:
    """How many elements decoding `message` converts one Python object at a time: typed
    contents but packed floats, and raw BYTES elements (at most one per 4 bytes)."""
    raw, work = message.raw_input_contents, 0
    for index, tensor in enumerate(message.inputs):
        if raw:
            if tensor.datatype == "BYTES" and index < len(raw):
                work += len(raw[index]) // 4
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is not None:
            count = len(getattr(tensor.contents, field))
            if field not in _PACKED or count < PACKED_ELEMENTS:
                work += count
    return work


def encode_work(request: oip.InferRequest, outputs: dict[str, np.ndarray]) -> int:
    """How many elements `encode_response` converts one Python object at a time (at most):
    BYTES ones, and typed integers, BOOL and floats too few to be packed."""
    if request.binary_outputs:
        return sum(a.size for a in outputs.values() if a.dtype.kind in "OSU")
    return sum(a.size for a in outputs.values()
               if a.dtype.kind != "f" or a.size < PACKED_ELEMENTS)


def encode_response(model: str, version: str, request: oip.InferRequest,
                    outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """The answer: raw if the request was raw or an output has no typed field, else typed."""
    response = pb.ModelInferResponse(model_name=model, model_version=version,
                                     id=request.id or "")
    datatypes = {name: oip.datatype_of(array) for name, array in outputs.items()}
    raw = request.binary_outputs or any(d not in CONTENTS_FIELD for d in datatypes.values())
    for name, array in outputs.items():
        tensor = response.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        if raw:
            response.raw_output_contents.append(oip.encode_binary(array))
        elif datatypes[name] == "BYTES":
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist())
        elif CONTENTS_FIELD[datatypes[name]] in _PACKED and array.size >= PACKED_ELEMENTS:
            _write_packed(tensor.contents, CONTENTS_FIELD[datatypes[name]], array)
        else:
            values, flat = getattr(tensor.contents, CONTENTS_FIELD[datatypes[name]]), array.ravel()
            for start in range(0, flat.size, STEP_ELEMENTS):
                values.extend(flat[start:start + STEP_ELEMENTS].tolist())
    return response


def model_of(wire: bytes) -> tuple[str, str] | None:
    """A ModelInferRequest's `model_name` and `model_version` from its wire bytes, its tensors
    skipped unparsed (None where the bytes are no protobuf message, so no ModelInferRequest
    either). protobuf's own parser reads them, by its rules (the last of a repeated field
    wins, UTF-8 checked): a scan in Python took 20 s over 64 MiB of tiny fields."""
    try:
        head = _HEAD.FromString(wire)
    except Exception:  # DecodeError, whatever protobuf's implementation
        return None
    return head.model_name, head.model_version


def _head_message() -> Any:
    """A message of ModelInferRequest's fields 1 and 2 alone: the rest parse as unknown
    fields, length-delimited ones skipped, not decoded."""
    proto = descriptor_pb2.FileDescriptorProto(name="edgerun/model_infer_head.proto",
                                               package="edgerun", syntax="proto3")
    message = proto.message_type.add(name="ModelInferHead")
    for name in ("model_name", "model_version"):
        field = pb.ModelInferRequest.DESCRIPTOR.fields_by_name[name]
        message.field.add(name=name, number=field.number,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("edgerun.ModelInferHead"))


_HEAD = _head_message()


def _read_packed(contents: pb.InferTensorContents, field: str) -> np.ndarray:
    """A float field's values from its packed wire bytes (proto3 packs repeated numbers)."""
    wire = memoryview(contents.SerializeToString())
    number, offset, parts = _FIELD_NUMBER[field], 0, []
    while offset < len(wire):
        key, offset = _varint(wire, offset)
        kind = key & 7
        if kind == 2:
            length, offset = _varint(wire, offset)
            if key >> 3 == number:
                parts.append(wire[offset:offset + length])
            offset += length
        elif key >> 3 == number or kind not in _SKIP:  # ours unpacked: no serializer writes it
            raise InvalidInput(f"typed contents: unexpected wire type {kind} in field "
                               f"{key >> 3}")
        else:  # another field (unknown ones included), skipped
            offset = _varint(wire, offset)[1] if kind == 0 else offset + _SKIP[kind]
    return np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts), _PACKED[field])


def _write_packed(contents: pb.InferTensorContents, field: str, array: np.ndarray) -> None:
    """Set a float field from an array through its packed wire bytes."""
    payload = np.ascontiguousarray(array, _PACKED[field]).tobytes()
    contents.MergeFromString(_varint_bytes(_FIELD_NUMBER[field] << 3 | 2)
                             + _varint_bytes(len(payload)) + payload)


def _varint(wire: memoryview, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(wire) or shift > 63:
            raise InvalidInput("typed contents: a truncated or overlong varint")
        byte = wire[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if byte < 0x80:
            return value, offset


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text(raw: bytes) -> str | bytes:
    """BYTES elements as the HTTP codecs give them: text when they are UTF-8, else bytes."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw
