"""Open Inference Protocol v2 bodies: JSON and the binary tensor data extension.

Only translation lives here: wire bytes to `dict[str, np.ndarray]` and back, whatever carries
the bytes (HTTP, a Lambda event, an MQTT message). Numeric JSON `data` goes from the request
bytes straight into a numpy buffer (simdjson, no Python float per element), binary data is a
zero-copy view, and nothing is validated element by element: the core checks names, dtypes and
shapes as arrays.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from edgerun.runtime.errors import InvalidInput
from edgerun.runtime.signature import (Signature, as_array, cast_array, exact_uint64,
                                       string_array)

#: OIP datatype -> manifest dtype name.
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "string",
}
#: manifest dtype name -> OIP datatype.
OIP_DATATYPE = {dtype: datatype for datatype, dtype in DATATYPES.items()}
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in DATATYPES.values()
           if name != "string"}
#: simdjson buffer kind (and its numpy dtype) that holds each numeric datatype exactly.
_BUFFERS = {datatype: ("d" if datatype.startswith("FP") else "u" if datatype.startswith("U")
                       else "i") for datatype in DATATYPES if datatype not in ("BOOL", "BYTES")}
_BUFFER_DTYPES = {"d": np.dtype(np.float64), "i": np.dtype(np.int64), "u": np.dtype(np.uint64)}
HEADER_LENGTH = "inference-header-content-length"
#: The most dimensions numpy holds, and the largest size of one (its index type, int64).
MAX_DIMS, MAX_DIM = 64, 2 ** 63 - 1


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: its tensors and what it asked to get back."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None
    binary_outputs: bool
    timeout_us: float | None


#: numpy dtype -> OIP datatype (a dict lookup: `dtype.name` costs microseconds per call).
_DATATYPE_OF = {np.dtype(dtype): datatype for dtype, datatype in OIP_DATATYPE.items()
                if dtype != "string"}


def datatype_of(array: np.ndarray) -> str:
    datatype = _DATATYPE_OF.get(array.dtype)
    if datatype is not None:
        return datatype
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:  # another byte order of a known dtype
        return OIP_DATATYPE[array.dtype.name]
    except KeyError:
        raise InvalidInput(f"outputs of dtype {array.dtype} have no OIP datatype") from None


def decode_request(body: bytes, header_length: str | None,
                   kept: dict[str, Any] | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensor data).

    `kept`, when given, gets the header's top-level members named by its keys (plain values,
    None where missing) as soon as the header is read, before any error in its tensors: a
    transport that needs them for its answer (MQTT: the id and the reply topic of an error
    reply) takes them there instead of parsing the body a second time."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()):  # not "+1", "1_0"
            raise InvalidInput("Inference-Header-Content-Length must be an integer, got "
                               f"{header_length[:32]!r}")
        # past the body's own digit count it is outside the body: never int() it (over 4300
        # digits, Python refuses, which answered an internal error); "0" strips to "", which
        # int() refuses too
        digits = header_length.lstrip("0")
        split = int(digits) if digits and len(digits) <= len(str(len(body))) else 0
        if not 0 < split <= len(body):
            shown = header_length if len(header_length) <= 32 else f"{header_length[:32]}..."
            raise InvalidInput(f"Inference-Header-Content-Length {shown} is outside the "
                               f"{len(body)}-byte body")
        # The header before binary tensors is small: plain Python reads it faster than lazy
        # simdjson proxies, each access of which costs a call into the parser.
        header, binary = _parse_small(body[:split]), memoryview(body)[split:]
    else:
        header, binary = _shallow(_parse(body)), memoryview(b"")
    if kept is not None:
        for key in kept:
            kept[key] = _plain(header.get(key)) if isinstance(header, dict) else None
    if not isinstance(header, dict):
        raise InvalidInput("the request must be a JSON object")
    items = header.get("inputs")
    if not isinstance(items, _ARRAYS) or not len(items):
        raise InvalidInput("the request has no \"inputs\" list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        item = _shallow(item)
        name, datatype, shape, parameters = _tensor_header(item)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice", name)
        size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise InvalidInput(f"input {name!r} has both data and binary_data_size", name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative "
                                   f"integer, got {_plain(size)!r:.32}", name)
            if offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past the "
                                   f"{len(binary)} bytes of binary data", name)
            inputs[name] = decode_binary(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            inputs[name] = _decode_data(name, datatype, shape, item["data"])
        else:
            raise InvalidInput(f"input {name!r} has neither data nor binary_data_size", name)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the last input")
    parameters = _parameters(_plain(header.get("parameters")), "request parameters")
    timeout = parameters.get("timeout")
    # at most the largest float: a longer integer (JSON read by json, for NaN) made the data
    # plane's division by 1e6 raise OverflowError, answered as an internal error
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= sys.float_info.max):
        raise InvalidInput(f"parameters.timeout must be a positive number of microseconds, "
                           f"got {timeout!r:.32}")
    request_id = _plain(header.get("id"))
    binary_outputs = _flag(parameters, "binary_data_output", "request parameters")
    return InferRequest(
        id=id_text(request_id), inputs=inputs,
        outputs=_requested_outputs(_plain(header.get("outputs")), binary_outputs),
        binary_outputs=binary_outputs, timeout_us=timeout)


def id_text(value: Any) -> str | None:
    """A request's `id` as the string OIP makes it: a string as it is, any other JSON value
    as its JSON text (5 is "5", {"a": 1} is '{"a":1}'), never Python's repr of it."""
    if value is None or isinstance(value, str):
        return value
    # json, not orjson: the slow parser's values (an integer past 64 bits, NaN) write too
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _parse(data: bytes) -> Any:
    # A parser per request: its lazy proxies may outlive the request (in a traceback, say),
    # and a shared parser refuses to parse again while any of them exist.
    try:
        return simdjson.Parser().parse(data)
    except ValueError as exc:
        # NaN or an infinity, or an integer past 64 bits (NUMBER_ERROR), which simdjson
        # cannot read: json reads them, and the integer's input says it is out of range
        parsed = loads_non_finite(data) if "NUMBER_ERROR" not in str(exc) else _loads_exact(data)
        if parsed is None:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
        return parsed
    except RuntimeError as exc:  # simdjson's BIGINT_ERROR (found by the API fuzzer), DEPTH_ERROR
        if "BIGINT" in str(exc):
            parsed = _loads_exact(data)
            if parsed is not None:
                return parsed
            raise InvalidInput(f"the request body holds an integer that does not fit in 64 "
                               f"bits ({exc})") from None
        raise InvalidInput(f"the request body cannot be read as JSON ({exc})") from None


def _loads_exact(body: bytes) -> Any | None:
    """`body` read by json, its integers exact whatever their size (a float past the largest
    is no number: None, as for a body that is not JSON)."""
    try:
        return _json_loads(body, parse_float=_finite_float)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested too deep
        return None


#: A \u escape of a UTF-16 surrogate, paired or lone.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_loads(raw: bytes, **options: Any) -> Any:
    """json's parse of `raw`, refusing what simdjson and orjson refuse, a lone surrogate
    (escaped, or as bytes, which json reads too): in a str no UTF-8 writer takes, it ran a
    request whose answer, or whose model, then failed with an internal error."""
    parsed = json.loads(raw.decode(), **options)  # strict UTF-8 first: no surrogate bytes
    if _SURROGATE_ESCAPE.search(raw):  # UnicodeEncodeError, a ValueError, for a lone one
        json.dumps(parsed, ensure_ascii=False).encode()
    return parsed


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{text[:32]} is too large for a float")
    return value


# NaN and the infinities. JSON has no token for them; Triton (rapidjson's kParseNanAndInfFlag,
# kWriteNanAndInfFlag), TF Serving (json_tensor.cc), Python's json and tritonclient with
# binary_data=False use JavaScript's NaN, Infinity and -Infinity. simdjson and orjson do not:
# orjson writes null (no number at all), and both refuse the tokens. So a float answer holding
# one is written again, by a slower path, and a request is parsed again, by json, only once the
# fast parser has refused it and it holds such a token: finite traffic pays next to nothing.
_NAN, _INFINITY, _NEGATIVE_INFINITY = (orjson.Fragment(b"NaN"), orjson.Fragment(b"Infinity"),
                                       orjson.Fragment(b"-Infinity"))
_NON_FINITE_TOKENS = (b"NaN", b"Infinity")


def finite(array: np.ndarray) -> bool:
    """Whether orjson can write `array` as it is: not floats, or floats all finite."""
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())


def non_finite_list(array: np.ndarray) -> Any:
    """`array` as nested lists for orjson, each NaN or infinity a fragment writing its token
    (the slow path, for arrays that are not `finite`)."""
    values = array.astype(object)
    values[np.isnan(array)] = _NAN
    values[np.isposinf(array)] = _INFINITY
    values[np.isneginf(array)] = _NEGATIVE_INFINITY
    return values.tolist()


def loads_non_finite(body: bytes | memoryview) -> Any | None:
    """`body` parsed with the tokens, for a body the fast parser refused; None when it holds
    none of them or is not JSON even so (then the fast parser's error is the one to give)."""
    raw = bytes(body)
    if not any(token in raw for token in _NON_FINITE_TOKENS):
        return None
    try:
        return _json_loads(raw)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested too deep
        return None


def loads(body: bytes | memoryview) -> Any:
    """orjson's parse, or json's for a body orjson refuses that holds NaN or an infinity;
    orjson.JSONDecodeError for a body that is not JSON either way."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = loads_non_finite(body)
        if parsed is None:
            raise
        return parsed


def _parse_small(data: bytes) -> Any:
    try:
        return loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request header is not valid JSON: {exc}") from None


_ARRAYS = (simdjson.Array, list)


def _shallow(value: Any) -> Any:
    """A simdjson object as a dict of its members, still lazy proxies.

    `Object.get` of a missing key costs a C++ exception (microseconds); optional members
    (`parameters`, `id`, `outputs`) are missing from most requests.
    """
    if isinstance(value, simdjson.Object):
        try:
            return {key: value[key] for key in value.keys()}
        except KeyError:  # a key holding NUL, which simdjson looks up cut short there
            return value.as_dict()
    return value


def _plain(value: Any) -> Any:
    """A simdjson proxy as plain Python (for the small parts of a request)."""
    if isinstance(value, simdjson.Array):
        return value.as_list()
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    return value


def _tensor_header(item: Any) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput("each input needs a \"name\" string")
    name = item["name"]
    datatype = item.get("datatype")
    # a str first: a list or object there is unhashable (a TypeError, answered as a 500)
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise InvalidInput(f"input {name!r}: datatype {_plain(datatype)!r} is not supported "
                           f"(one of {known})", name)
    shape = _plain(item.get("shape"))
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers",
                           name)
    check_dims(name, shape)
    return name, datatype, shape, _parameters(_plain(item.get("parameters")),
                                              f"input {name!r}: parameters", name)


def check_dims(name: str, shape: list[int]) -> None:
    """Refuse a shape numpy cannot hold before its element count is computed: the product of
    thousands of 63-bit dims took seconds (quadratic, holding the GIL) and its digits, past
    4300, made `str` raise ValueError in the error message, answered as an internal error."""
    if len(shape) > MAX_DIMS or max(shape, default=0) > MAX_DIM:
        raise InvalidInput(f"input {name!r}: a shape of {len(shape)} dims cannot be held: "
                           f"numpy takes at most {MAX_DIMS} dims of at most {MAX_DIM} each", name)


def _decode_data(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """Numbers straight from the parsed document into a buffer; anything else, the long way."""
    kind = _BUFFERS.get(datatype)
    if kind is not None and isinstance(data, simdjson.Array):
        try:
            raw = np.frombuffer(data.as_buffer(of_type=kind), dtype=_BUFFER_DTYPES[kind])
        except (TypeError, ValueError):
            # not all numbers of that kind (the error path, or JSON booleans: looked for here,
            # not on the way every numeric tensor takes)
            plain = _plain(data)
            _refuse_booleans(name, datatype, plain)
            return decode_json(name, datatype, shape, plain)
        else:
            return shaped(name, shape, cast_array(raw, DATATYPES[datatype], name))
    return decode_json(name, datatype, shape, _plain(data))


def _refuse_booleans(name: str, datatype: str, data: Any) -> None:
    """JSON `true` or `false` in a numeric tensor's data: OIP's numbers are JSON numbers (and
    Triton refuses the rest), and numpy would read them as 1 and 0."""
    stack = [data]
    while stack:
        value = stack.pop()
        if type(value) is list:
            stack.extend(value)
        elif type(value) is bool:
            raise _booleans(name, datatype)


def _booleans(name: str, datatype: str) -> InvalidInput:
    return InvalidInput(f"input {name!r}: {datatype} data must be numbers, not true or false "
                        "(only BOOL data take them)", name)


def _elements(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def decode_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) as an array of `datatype` and `shape`."""
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        array = string_array(data, name)
    else:
        array = as_array(data, name)
        if datatype != "BOOL" and array.dtype.kind in "bO":  # never numbers: the error path
            _check_numbers(name, datatype, array)
        if datatype == "UINT64":
            array = exact_uint64(data, array, name)
        array = cast_array(array, DATATYPES[datatype], name)
    return shaped(name, shape, array)


#: The integers a JSON number in numeric data may be read as (simdjson's int64 and uint64).
_JSON_INTEGERS = (-2 ** 63, 2 ** 64 - 1)


def _check_numbers(name: str, datatype: str, array: np.ndarray) -> None:
    """For data numpy could not read as numbers: refuse JSON booleans, and integers past 64
    bits (as json reads them, exactly) as out of range, naming the input. Other elements are
    left to `cast_array` to refuse."""
    if array.dtype.kind == "b":
        raise _booleans(name, datatype)
    for value in array.reshape(-1):  # not .flat: numpy's iterators stop at 32 dimensions
        if type(value) is bool:
            raise _booleans(name, datatype)
        if type(value) is int and not _JSON_INTEGERS[0] <= value <= _JSON_INTEGERS[1]:
            bits = value.bit_length()
            shown = str(value) if bits <= 256 else f"of {bits} bits"
            dtype = DATATYPES[datatype]
            limits = "" if dtype.startswith("float") else \
                f" [{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]"
            raise InvalidInput(f"input {name!r}: integer {shown} is out of range for "
                               f"{datatype}{limits}", name)


def shaped(name: str, shape: list[int], array: np.ndarray) -> np.ndarray:
    """`array` in the request's `shape`; InvalidInput naming the input when the counts differ
    or numpy cannot hold the shape (over 64 dims, or dims whose product overflows)."""
    if array.size != _elements(shape):
        raise InvalidInput(f"input {name!r}: shape {shape} needs {_elements(shape)} elements, "
                           f"data has {array.size}", name)
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise InvalidInput(f"input {name!r}: shape {shape} cannot be held ({exc})",
                           name) from None


def decode_binary(name: str, datatype: str, shape: list[int], data: memoryview) -> np.ndarray:
    """Little-endian, row-major tensor bytes; BYTES elements are 4-byte length + bytes."""
    count = _elements(shape)
    if datatype == "BYTES":
        return shaped(name, shape, _decode_bytes(name, data, count))
    dtype = _LITTLE[DATATYPES[datatype]]
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: shape {shape} of {datatype} needs "
                           f"{count * dtype.itemsize} bytes, binary_data_size is {len(data)}",
                           name)
    if datatype == "BOOL":
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1", name)
        return shaped(name, shape, raw.astype(bool))
    return shaped(name, shape, np.frombuffer(data, dtype=dtype))


def _decode_bytes(name: str, data: memoryview, count: int) -> np.ndarray:
    if 4 * count > len(data):  # checked before allocating: the shape is the caller's to choose
        raise InvalidInput(f"input {name!r}: {count} BYTES elements need at least {4 * count} "
                           f"bytes (a 4-byte length each), the data has {len(data)}", name)
    elements = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(data):
            raise InvalidInput(f"input {name!r}: BYTES data end before element {index}", name)
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInput(f"input {name!r}: BYTES element {index} runs past the data", name)
        elements[index] = _text(bytes(data[offset:offset + length]))
        offset += length
    if offset != len(data):
        raise InvalidInput(f"input {name!r}: {len(data) - offset} bytes left after {count} "
                           "BYTES elements", name)
    return elements


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _parameters(value: Any, where: str, name: str | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be an object", name)
    return value


def _flag(parameters: dict[str, Any], key: str, where: str, name: str | None = None) -> bool:
    """A boolean parameter; the string "false" must not read as true."""
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}.{key} must be true or false, got {value!r}", name)
    return value


def _requested_outputs(items: Any, binary: bool) -> list[RequestedOutput] | None:
    """The outputs asked for (None, or an empty list: all of them); each is binary when its
    `binary_data` says so, else as the request's `binary_data_output` says."""
    if items is None:
        return None
    if not isinstance(items, list):
        raise InvalidInput("\"outputs\" must be a list")
    requested: dict[str, RequestedOutput] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each requested output needs a \"name\" string")
        name = item["name"]
        if name in requested:
            raise InvalidInput(f"requested output {name!r} appears twice", name)
        where = f"requested output {name!r}: parameters"
        parameters = _parameters(item.get("parameters"), where, name)
        check_output_parameters(name, parameters)
        flag = _flag(parameters, "binary_data", where, name) if "binary_data" in parameters \
            else binary
        requested[name] = RequestedOutput(name, flag)
    return list(requested.values()) or None


def check_output_parameters(name: str, parameters: Mapping[str, Any]) -> None:
    """Refuse output parameters this server does not implement: `classification` (Triton's
    top-k extension) would otherwise come back as the raw tensor, which reads as an answer."""
    unknown = sorted(set(parameters) - {"binary_data"})
    if unknown:
        raise InvalidInput(f"requested output {name!r}: parameter "
                           f"{', '.join(map(repr, unknown))} is not supported (only "
                           "'binary_data')", name)


def check_outputs(request: InferRequest, signature: Signature) -> None:
    """Refuse a request for outputs the model does not give, before anything runs."""
    if request.outputs is None:
        return
    names = [spec.name for spec in signature.outputs]
    for output in request.outputs:
        if output.name not in names:
            raise InvalidInput(f"requested output {output.name!r} does not exist; the model "
                               f"gives {', '.join(map(repr, names))}", output.name)


def encode_response(model: str, version: str, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (the header length when binary follows)."""
    wanted = request.outputs if request.outputs is not None else \
        [RequestedOutput(name, request.binary_outputs) for name in outputs]
    entries, blobs = [], []
    for output in wanted:
        array = outputs[output.name]
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype_of(array),
                                 "shape": list(array.shape)}
        if output.binary:
            blob = encode_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(output.name, array)
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = entries
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in head:  # looked for once written: cheaper than isfinite on every output
        head = _non_finite_rewritten(header, head)
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def _json_data(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind in "OSU":
        return [_json_text(name, index, v) if isinstance(v, bytes) else str(v)
                for index, v in enumerate(array.ravel().tolist())]
    return np.ascontiguousarray(array).ravel()


def _non_finite_rewritten(header: dict[str, Any], head: bytes) -> bytes:
    """`head` written again with NaN, Infinity and -Infinity where orjson wrote null for
    them; a null that is none of them (in a request id, say) leaves it as it is."""
    rewrite = False
    for entry in header["outputs"]:
        data = entry.get("data")
        if isinstance(data, np.ndarray) and not finite(data):
            entry["data"] = non_finite_list(data)
            rewrite = True
    return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY) if rewrite else head


def _json_text(name: str, index: int, value: bytes) -> str:
    """A BYTES element as JSON text. Bytes that are not UTF-8 have no JSON string: Triton
    copies them raw (a body no JSON parser reads), replacing them would change the answer, so
    the request is refused, telling how to get the bytes as they are."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"output {name!r}: element {index} is not UTF-8 text, which JSON "
                           "cannot carry; ask for the output as binary data (its parameters."
                           "binary_data true)", name) from None


def encode_binary(array: np.ndarray) -> bytes:
    """Tensor bytes as the binary extension wants them."""
    if array.dtype.kind in "OSU":
        parts = []
        for value in array.ravel().tolist():
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def decode_index_request(body: bytes) -> bool:
    """Whether a repository index request (empty, or `{"ready": true}`) asks for READY model
    versions only."""
    ready = _repository_request(body, "index").get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"\"ready\" must be true or false, got {ready!r:.32}")
    return ready


def check_load_request(body: bytes) -> None:
    """Refuse load parameters this server does not implement: a `config` override or `file:`
    contents were ignored while the answer said the model loaded as asked."""
    parameters = _parameters(_repository_request(body, "load").get("parameters"),
                             "load parameters")
    if parameters:
        named = ", ".join(repr(key[:64]) for key in sorted(parameters)[:8])
        raise InvalidInput(f"load parameter {named} is not supported: a model loads from its "
                           "folder in the repository as it is")


def _repository_request(body: bytes, what: str) -> dict[str, Any]:
    """A repository extension request body: empty, or a JSON object."""
    if not body.strip():
        return {}
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the {what} request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InvalidInput(f"the {what} request must be a JSON object")
    return request


def metadata_tensor(name: str, dtype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"name": name, "datatype": OIP_DATATYPE[dtype], "shape": list(shape)}


def encode_error(message: str) -> bytes:
    """The protocol's error body."""
    return orjson.dumps({"error": message})
