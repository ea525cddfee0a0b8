"""The codecs on their own: OIP v2 JSON and binary, TF Serving REST, npz; no server involved."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgerun.adapters.codecs import npz, oip, tfserving
from edgerun.runtime import InvalidInput, PayloadTooLarge, Signature, TensorSpec

DTYPES = {datatype: dtype for datatype, dtype in oip.DATATYPES.items()}


def _elements(dtype: str):
    if dtype == "string":
        return st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFF),
                       max_size=5)
    if dtype.startswith("float"):  # NaN and infinities too: written and read as Triton does
        return st.floats(width=np.dtype(dtype).itemsize * 8)
    return None


def _array(draw, datatype: str) -> np.ndarray:
    dtype = DTYPES[datatype]
    shape = draw(st.tuples(st.integers(0, 3), st.integers(0, 4)))
    np_dtype = object if dtype == "string" else np.dtype(dtype)
    return draw(hnp.arrays(np_dtype, shape, elements=_elements(dtype)))


def _request(array: np.ndarray, datatype: str, *, binary: bool, nested: bool,
             **extra) -> tuple[bytes, str | None]:
    entry = {"name": "x", "datatype": datatype, "shape": list(array.shape)}
    if binary:
        blob = oip.encode_binary(array)
        entry["parameters"] = {"binary_data_size": len(blob)}
        header = json.dumps({"inputs": [entry], **extra}).encode()
        return header + blob, str(len(header))
    values = array.tolist() if nested else array.ravel().tolist()
    entry["data"] = values
    return json.dumps({"inputs": [entry], **extra}).encode(), None


@settings(max_examples=300, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(sorted(DTYPES)), binary=st.booleans(),
       nested=st.booleans())
def test_every_datatype_round_trips_json_and_binary(data, datatype, binary, nested):
    array = _array(data.draw, datatype)
    body, header_length = _request(array, datatype, binary=binary, nested=nested)
    request = oip.decode_request(body, header_length)
    decoded = request.inputs["x"]
    assert decoded.shape == array.shape
    if datatype == "BYTES":
        assert list(decoded.ravel()) == list(array.ravel())
    else:
        assert decoded.dtype == np.dtype(DTYPES[datatype])
        np.testing.assert_array_equal(decoded, array, strict=True)  # NaN equals NaN here
    # and back out: the response carries the same values, in JSON or binary as asked
    request.binary_outputs = binary
    payload, headers = oip.encode_response("m", "1", request, {"y": decoded})
    split = int(headers["Inference-Header-Content-Length"]) if headers else len(payload)
    head = json.loads(payload[:split])
    (output,) = head["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == \
        ("y", datatype, list(array.shape))
    if binary:
        back = oip.decode_binary("y", datatype, output["shape"], memoryview(payload)[split:])
    else:
        back = oip.decode_json("y", datatype, output["shape"], output["data"])
    if datatype == "BYTES":
        assert [v if isinstance(v, str) else v.decode() for v in back.ravel()] == \
            list(array.ravel())
    else:
        assert back.dtype == array.dtype and np.array_equal(back, array, equal_nan=array.dtype
                                                            .kind == "f")


NON_FINITE = [math.inf, -math.inf, math.nan, 1.0]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("binary_header", [False, True])
def test_nan_and_infinities_are_read_and_written_as_triton_does(datatype, binary_header):
    """json.dumps and tritonclient (binary_data=False) send NaN, Infinity and -Infinity, which
    simdjson and orjson refused (400); answers wrote them as null, no number at all."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [4],
                                   "data": NON_FINITE}]}).encode()
    request = oip.decode_request(body, str(len(body)) if binary_header else None)
    expected = np.array(NON_FINITE, DTYPES[datatype])
    assert np.array_equal(request.inputs["x"], expected, equal_nan=True)
    assert request.inputs["x"].dtype == expected.dtype
    payload, _ = oip.encode_response("m", "1", request, {"y": request.inputs["x"]})
    assert b'"data":[Infinity,-Infinity,NaN,1.0]' in payload
    # a null that stands for no float (a request id) stays; finite floats stay as orjson wrote
    request.id = "null"
    payload, _ = oip.encode_response("m", "1", request,
                                     {"y": np.array([0.5, 2.0], DTYPES[datatype])})
    assert b'"id":"null"' in payload and b'"data":[0.5,2.0]' in payload


@pytest.mark.parametrize("number", [b"NaN", b"1" * 30])
@pytest.mark.parametrize("text", [b'"\\ud800"', b'"a\\uDFFFb"', b'"\xed\xa0\x80"'])
@pytest.mark.parametrize("where", ["id", "data"])
@pytest.mark.parametrize("binary_header", [False, True])
def test_lone_surrogates_are_refused_whatever_else_the_body_holds(number, text, where,
                                                                  binary_header):
    """simdjson and orjson refuse a lone UTF-16 surrogate; json, which reads a body holding
    NaN, an infinity or an integer past 64 bits, took it, so the same request ran, and then
    its answer (a str orjson cannot write, in the id) or ONNX Runtime (in string data) failed
    with an internal error (500, and retryable)."""
    def body(value: bytes) -> bytes:
        return b'{"parameters": {"n": %s}, "id": %s, "inputs": [{"name": "s", "datatype": ' \
               b'"BYTES", "shape": [1], "data": [%s]}]}' % (
                   number, value if where == "id" else b'"r"',
                   value if where == "data" else b'"a"')

    with pytest.raises(InvalidInput, match="not valid JSON|does not fit in 64 bits"):
        oip.decode_request(body(text), str(len(body(text))) if binary_header else None)
    paired = body(b'"\\ud83d\\ude00"')  # a pair is a character, however written
    if binary_header and number.isdigit():
        return  # orjson reads no integer past 64 bits, json reads the header for NaN only
    request = oip.decode_request(paired, str(len(paired)) if binary_header else None)
    assert (request.id if where == "id" else request.inputs["s"][0]) == "\U0001F600"


def test_bytes_outputs_that_are_not_utf8_are_never_altered():
    """They became U+FFFD in JSON answers: another value, silently. JSON has no string for
    them; as binary data they go as they are."""
    request = oip.decode_request(_tensor(), None)
    outputs = {"s": np.array([b"ok", b"\xff\xfe"], dtype=object)}
    with pytest.raises(InvalidInput, match=re.escape(
            "output 's': element 1 is not UTF-8 text, which JSON cannot carry; ask for the "
            "output as binary data")) as info:
        oip.encode_response("m", "1", request, outputs)
    assert info.value.tensor == "s"
    request.outputs = [oip.RequestedOutput("s", True)]
    payload, headers = oip.encode_response("m", "1", request, outputs)
    split = int(headers["Inference-Header-Content-Length"])
    back = oip.decode_binary("s", "BYTES", [2], memoryview(payload)[split:])
    assert list(back) == ["ok", b"\xff\xfe"]


@pytest.mark.parametrize("body, ready", [
    (b"", False), (b"{}", False), (b'{"ready": true}', True), (b'{"ready": false}', False)])
def test_repository_index_requests(body, ready):
    assert oip.decode_index_request(body) is ready


@pytest.mark.parametrize("body, message", [
    (b"not json", "the index request body is not valid JSON"),
    (b"[]", "the index request must be a JSON object"),
    (b'{"ready": "yes"}', "\"ready\" must be true or false, got 'yes'"),
])
def test_malformed_repository_index_requests(body, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        oip.decode_index_request(body)


@pytest.mark.parametrize("body, message", [
    (b"", None), (b"{}", None), (b'{"parameters": {}}', None),
    (b'{"parameters": {"config": "{}"}}', "load parameter 'config' is not supported"),
    (b'{"parameters": {"config": "{}", "file:1/model.onnx": "eA=="}}',
     "load parameter 'config', 'file:1/model.onnx' is not supported"),
    (b'{"parameters": []}', "load parameters must be an object"),
    (b"not json", "the load request body is not valid JSON"),
])
def test_load_requests_refuse_what_is_not_implemented(body, message):
    """A config override or file: contents were ignored, answered 200 as if applied."""
    if message is None:
        oip.check_load_request(body)
        return
    with pytest.raises(InvalidInput, match=re.escape(message)):
        oip.check_load_request(body)


@pytest.mark.parametrize("data", [["a", None], ["a", 1], [["a"], "b"]])
def test_json_bytes_data_must_be_strings(data):
    # null and numbers once became "None" and "1"
    body = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
                                   "data": data}]}).encode()
    with pytest.raises(InvalidInput, match="input 's': (expected string|not a rectangular)"):
        oip.decode_request(body, None)


def test_nested_and_flat_data_decode_alike():
    flat = oip.decode_request(json.dumps({"inputs": [
        {"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}).encode(),
        None)
    nested = oip.decode_request(json.dumps({"inputs": [
        {"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}]})
        .encode(), None)
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
    assert flat.inputs["x"].dtype == np.int32


def test_request_fields_are_read():
    body = json.dumps({"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                "data": [1]}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
                       "parameters": {"timeout": 2500}}).encode()
    request = oip.decode_request(body, None)
    assert request.id == "r1" and request.timeout_us == 2500
    assert request.outputs == [oip.RequestedOutput("y", True)]


_MEMBERS = {"id", "inputs", "outputs", "parameters", "name", "datatype", "shape", "data"}


@settings(max_examples=150, deadline=None)
@example(top={"note\x00": 1}, item={"\x00": [], "data\x00x": [1]}, binary_header=False)
@given(top=st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=3), max_size=3),
       item=st.dictionaries(st.text(max_size=6), st.lists(st.integers(), max_size=2),
                            max_size=3), binary_header=st.booleans())
def test_members_oip_does_not_know_are_ignored_whatever_their_name(top, item, binary_header):
    """A member whose name holds NUL ("note\\u0000", valid JSON) raised simdjson's KeyError, as
    simdjson looks names up as C strings: answered as an internal error (500, retryable)."""
    top = {key: value for key, value in top.items() if key not in _MEMBERS}
    item = {key: value for key, value in item.items() if key not in _MEMBERS}
    body = json.dumps({**top, "id": "r1", "inputs": [
        {**item, "name": "x", "datatype": "INT32", "shape": [1, 2], "data": [3, 4]}]}).encode()
    request = oip.decode_request(body, str(len(body)) if binary_header else None,
                                 kept={"id": None, **dict.fromkeys(top)})
    assert request.id == "r1"
    assert request.inputs["x"].dtype == np.int32 and request.inputs["x"].tolist() == [[3, 4]]


@pytest.mark.parametrize("parameters, outputs, expected", [
    # binary_data_output holds for every listed output unless its own binary_data says else
    ({"binary_data_output": True}, [{"name": "y"}, {"name": "z", "parameters":
                                                   {"binary_data": False}}],
     [oip.RequestedOutput("y", True), oip.RequestedOutput("z", False)]),
    ({}, [{"name": "y"}], [oip.RequestedOutput("y", False)]),
    ({"binary_data_output": True}, [], None),  # an empty list asks for every output
])
def test_requested_outputs_follow_binary_data_output(parameters, outputs, expected):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                       "outputs": outputs, "parameters": parameters}).encode()
    assert oip.decode_request(body, None).outputs == expected


def _tensor(**fields) -> bytes:
    entry = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2], **fields}
    return json.dumps({"inputs": [entry]}).encode()


@pytest.mark.parametrize("body, header_length, message", [
    (b"{", None, "not valid JSON"),
    (b'{"inputs": [NaN', None, "not valid JSON"),  # the tokens, but no JSON even so
    (b"[1]", None, "must be a JSON object"),
    (b"{}", None, 'no "inputs" list'),
    (b'{"inputs": []}', None, 'no "inputs" list'),
    (b'{"inputs": [3]}', None, 'needs a "name" string'),
    (_tensor(datatype="BF16"), None, "datatype 'BF16' is not supported"),
    (_tensor(shape=[1, -2]), None, "shape must be a list of non-negative integers"),
    (_tensor(shape=[1, True]), None, "shape must be a list of non-negative integers"),
    (_tensor(shape=[1, 3]), None, "shape [1, 3] needs 3 elements, data has 2"),
    (_tensor(data=["a", "b"]), None, "expected float32, got string"),
    (_tensor(parameters=[1]), None, "parameters must be an object"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                            {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
     .encode(), None, "appears twice"),
    (_tensor(parameters={"binary_data_size": 8}), None, "both data and binary_data_size"),
    (_tensor(), "lots", "must be an integer"),
    (_tensor(), "+10", "must be an integer"),
    (_tensor(), "1_0", "must be an integer"),
    (_tensor(), "100000", "outside the"),
    (_tensor(), "9" * 5000, "outside the"),  # int() refuses over 4300 digits: a ValueError
    (_tensor(), "0", "Inference-Header-Content-Length 0 is outside the"),  # int(""): a 500
    (_tensor(), "000", "Inference-Header-Content-Length 000 is outside the"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [1, 300]}]})
     .encode(), None, "values out of int8 range"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "parameters": {"timeout": True}}).encode(), None, "parameters.timeout"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "parameters": {"timeout": -5}}).encode(), None, "parameters.timeout"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": [{"name": "y", "parameters": "binary"}]}).encode(), None,
     "requested output 'y': parameters must be an object"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": "y"}).encode(), None, '"outputs" must be a list'),
    # Triton's classification extension is not served: once the raw tensor came back
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": [{"name": "y", "parameters": {"classification": 2}}]}).encode(),
     None, "requested output 'y': parameter 'classification' is not supported"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": [{"name": "y"}, {"name": "y"}]}).encode(), None,
     "requested output 'y' appears twice"),
    # shapes numpy cannot hold: once a 500 from reshape
    (_tensor(shape=[2 ** 62, 2 ** 62, 0], data=[]), None, "cannot be held"),
    (_tensor(shape=[1] * 70, data=[1]), None, "cannot be held"),
    # dims past numpy's: the product of 300 63-bit dims has more than 4300 digits, which str()
    # refused in the error message (a 500); of 60,000 dims (1.2 MB) it took 14 s, GIL held
    (_tensor(shape=[2 ** 63 - 1] * 300, data=[1]), None, "a shape of 300 dims cannot be held"),
    (_tensor(shape=[2 ** 63, 1], data=[1]), None, "a shape of 2 dims cannot be held"),
    # json (read for NaN) takes integers simdjson refuses: 4000-digit dims, a timeout no
    # float holds (its division by 1e6 raised OverflowError in the data plane)
    (b'{"p": NaN, "inputs": [{"name": "x", "datatype": "FP32", "shape": [%s, %s], "data": [1]}]}'
     % (b"9" * 4000, b"9" * 4000), None, "a shape of 2 dims cannot be held"),
    (b'{"p": NaN, "parameters": {"timeout": %s}, "inputs": [{"name": "x", "datatype": "FP32", '
     b'"shape": [1], "data": [1]}]}' % (b"9" * 400), None, "parameters.timeout must be"),
    # parameters of the wrong type: "false" once read as true, [] as no parameters
    (_tensor(parameters=[]), None, "input 'x': parameters must be an object"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}).encode(),
     None, "requested output 'y': parameters.binary_data must be true or false, got 'false'"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "parameters": {"binary_data_output": 1}}).encode(), None,
     "request parameters.binary_data_output must be true or false, got 1"),
])
def test_malformed_requests_raise_invalid_input(body, header_length, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        oip.decode_request(body, header_length)


@pytest.mark.parametrize("binary", [False, True])
def test_a_shape_of_many_huge_dims_is_refused_at_once(binary):
    """The element count of 40,000 63-bit dims (an 800 KB body, decoded on the event loop)
    took seconds, quadratic in the dims, holding the GIL: the shape is refused first (the
    benchmark of speed is not this test's: it checks the shape is what refuses it)."""
    item = {"name": "x", "datatype": "FP32", "shape": [2 ** 63 - 1] * 40_000}
    if binary:
        header = json.dumps({"inputs": [{**item, "parameters": {"binary_data_size": 4}}]})
        body, length = header.encode() + b"\0" * 4, str(len(header))
    else:
        body, length = json.dumps({"inputs": [{**item, "data": [1]}]}).encode(), None
    with pytest.raises(InvalidInput, match="'x': a shape of 40000 dims cannot be held"):
        oip.decode_request(body, length)


def test_missing_data_is_named():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}).encode()
    with pytest.raises(InvalidInput, match="input 'x' has neither data") as info:
        oip.decode_request(body, None)
    assert info.value.tensor == "x"


@pytest.mark.parametrize("datatype", [["FP32"], {"FP32": 1}, []])
@pytest.mark.parametrize("binary", [False, True])
def test_a_datatype_that_is_a_list_or_object_is_invalid_input_naming_the_input(datatype,
                                                                             binary):
    """A list there was unhashable: the binary extension's header raised a TypeError, which
    every adapter answered as an internal error (HTTP 500) naming no input."""
    item = {"name": "x", "datatype": datatype, "shape": [1]}
    if binary:
        header = json.dumps({"inputs": [{**item, "parameters": {"binary_data_size": 4}}]})
        body, length = header.encode() + b"\0" * 4, str(len(header))
    else:
        body, length = json.dumps({"inputs": [{**item, "data": [1]}]}).encode(), None
    with pytest.raises(InvalidInput, match=re.escape(f"input 'x': datatype {datatype!r} is "
                                                     "not supported")) as info:
        oip.decode_request(body, length)
    assert info.value.tensor == "x"


@pytest.mark.parametrize("size, blob, message", [
    (16, b"\0" * 8, "runs past the 8 bytes"),
    (4, b"\0" * 4, "needs 8 bytes, binary_data_size is 4"),
    (8, b"\0" * 12, "4 bytes of binary data follow the last input"),
    (True, b"\0" * 8, "binary_data_size must be a non-negative integer, got True"),
    # not a size at all: once "runs past the 8 bytes of binary data", which they do not
    (4.5, b"\0" * 8, "binary_data_size must be a non-negative integer, got 4.5"),
    (8.0, b"\0" * 8, "binary_data_size must be a non-negative integer, got 8.0"),
    ("8", b"\0" * 8, "binary_data_size must be a non-negative integer, got '8'"),
    (-1, b"\0" * 8, "binary_data_size must be a non-negative integer, got -1"),
])
def test_binary_size_errors(size, blob, message):
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                                     "parameters": {"binary_data_size": size}}]}).encode()
    with pytest.raises(InvalidInput, match=message):
        oip.decode_request(header + blob, str(len(header)))


@pytest.mark.parametrize("datatype, number, message", [
    ("FP64", "18446744073709551616", "integer 18446744073709551616 is out of range for FP64"),
    ("FP32", "-9223372036854775809", "integer -9223372036854775809 is out of range for FP32"),
    ("INT64", "18446744073709551616",
     "integer 18446744073709551616 is out of range for INT64 [-9223372036854775808, "
     "9223372036854775807]"),
    ("UINT64", "99999999999999999999999",
     "integer 99999999999999999999999 is out of range for UINT64 [0, 18446744073709551615]"),
    ("INT8", "9" * 400, "integer of 1329 bits is out of range for INT8 [-128, 127]"),
])
@pytest.mark.parametrize("non_finite", [False, True])
def test_an_integer_past_64_bits_is_out_of_range_naming_the_input(datatype, number, message,
                                                                   non_finite):
    """Valid JSON: it was answered "the request body is not valid JSON" (simdjson reads no
    integer past 64 bits), or "does not fit in 64 bits" naming no input."""
    extra = ', "p": NaN' if non_finite else ""  # then read by json, not simdjson
    body = ('{"inputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1]}, '
            f'{{"name": "x", "datatype": "{datatype}", "shape": [2], "data": [1, {number}]}}]'
            f'{extra}}}').encode()
    with pytest.raises(InvalidInput, match=re.escape(f"input 'x': {message}")) as info:
        oip.decode_request(body, None)
    assert info.value.tensor == "x"
    with pytest.raises(InvalidInput, match="not valid JSON"):  # still no JSON
        oip.decode_request(body[:-1], None)


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "UINT8", "INT64", "UINT64"])
@pytest.mark.parametrize("data", [[True, 0], [True, False], [[1], [False]], [0.5, True]])
def test_json_booleans_in_a_numeric_tensor_are_refused_naming_the_input(datatype, data):
    """OIP's tensor data are JSON numbers for numeric datatypes (Triton refuses anything
    else): `[true, 0]` for FP32 was taken as [1.0, 0.0]."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype,
                                   "shape": list(np.shape(data)), "data": data}]}).encode()
    with pytest.raises(InvalidInput, match=re.escape(
            f"input 'x': {datatype} data must be numbers, not true or false")) as info:
        oip.decode_request(body, None)
    assert info.value.tensor == "x"
    flags = json.dumps({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [2],
                                    "data": [True, False]}]}).encode()
    assert oip.decode_request(flags, None).inputs["x"].tolist() == [True, False]


def test_binary_bool_and_bytes_errors():
    with pytest.raises(InvalidInput, match="BOOL bytes must be 0 or 1"):
        oip.decode_binary("b", "BOOL", [2], memoryview(b"\x00\x02"))
    with pytest.raises(InvalidInput, match="BYTES element 0 runs past"):
        oip.decode_binary("s", "BYTES", [1], memoryview(struct.pack("<I", 9) + b"abc"))
    with pytest.raises(InvalidInput, match="BYTES data end before element 1"):
        oip.decode_binary("s", "BYTES", [2], memoryview(struct.pack("<I", 5) + b"abcde"))
    with pytest.raises(InvalidInput, match="1 bytes left after 1 BYTES elements"):
        oip.decode_binary("s", "BYTES", [1], memoryview(struct.pack("<I", 1) + b"ab"))


def test_a_huge_bytes_shape_is_refused_before_anything_is_allocated():
    # 300 million elements announced with 5 bytes of data once allocated 2.4 GB first
    with pytest.raises(InvalidInput, match="300000000 BYTES elements need at least"):
        oip.decode_binary("s", "BYTES", [300_000_000], memoryview(b"\0" * 5))
    with pytest.raises(InvalidInput, match="BYTES elements need at least"):
        oip.decode_binary("s", "BYTES", [2 ** 62], memoryview(b""))


def test_requested_outputs_are_checked_against_the_signature():
    signature = Signature((TensorSpec("x", "float32", (-1, 2), 0),),
                          (TensorSpec("y", "float32", (-1, 2), 0),))
    request = oip.decode_request(json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
        "outputs": [{"name": "z"}]}).encode(), None)
    with pytest.raises(InvalidInput, match="requested output 'z' does not exist; the model "
                                           "gives 'y'"):
        oip.check_outputs(request, signature)


# ---------------------------------------------------------------------------- TF Serving
SIG_ONE = Signature((TensorSpec("x", "float32", (-1, 2), 0),),
                    (TensorSpec("y", "float32", (-1, 2), 0),))
SIG_TWO = Signature((TensorSpec("a", "float32", (-1, 2), 0), TensorSpec("b", "int32", (-1,), 0)),
                    (TensorSpec("y", "float32", (-1, 2), 0),))


@pytest.mark.parametrize("body, signature, inputs, rows", [
    ({"instances": [[1, 2], [3, 4]]}, SIG_ONE, {"x": [[1, 2], [3, 4]]}, True),
    ({"inputs": [[1, 2]]}, SIG_ONE, {"x": [[1, 2]]}, False),
    ({"instances": [{"a": [1, 2], "b": 3}, {"a": [0, 0], "b": 4}]}, SIG_TWO,
     {"a": [[1, 2], [0, 0]], "b": [3, 4]}, True),
    ({"inputs": {"a": [[1, 2]], "b": [5]}}, SIG_TWO, {"a": [[1, 2]], "b": [5]}, False),
    ({"instances": [[{"b64": "aGk="}]]}, SIG_ONE, {"x": [[b"hi"]]}, True),
    # TF Serving's own form for one binary input: each instance is the b64 object itself
    ({"instances": [{"b64": "aGk="}, {"b64": "/w=="}]}, SIG_ONE, {"x": [b"hi", b"\xff"]}, True),
    # and in columns, the one input's value (a scalar), as TF Serving reads it
    ({"inputs": {"b64": "aGk="}}, SIG_ONE, {"x": b"hi"}, False),
])
def test_tf_serving_formats_decode(body, signature, inputs, rows):
    assert tfserving.decode_predict(json.dumps(body).encode(), signature) == (inputs, rows)


SIG_TEXT = Signature((TensorSpec("s", "string", (-1,), 0),), (TensorSpec("y", "string", (-1,), 0),))


@pytest.mark.parametrize("body", [
    {"instances": [{"b64": "/w=="}, "b"]},
    {"instances": ["b", {"b64": "/w=="}]},
    {"instances": [{"s": "b"}, {"s": {"b64": "/w=="}}]},
    {"inputs": ["b", {"b64": "/w=="}]},
    {"inputs": {"s": ["b", {"b64": "/w=="}]}},
])
def test_tf_serving_strings_mix_plain_and_b64_values_in_any_order(body):
    """A row whose first value was a plain string was taken as all plain: a {"b64": ...}
    after it reached the model as a dict, refused ("expected string, got dict"), while the
    same values in the other order were answered."""
    inputs, _ = tfserving.decode_predict(json.dumps(body).encode(), SIG_TEXT)
    assert sorted(SIG_TEXT.validate(inputs)["s"].tolist(), key=repr) == ["b", b"\xff"]


@pytest.mark.parametrize("body, message", [
    (b"{", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"instances": [], "inputs": []}', "not both"),
    (b'{"instances": []}', "non-empty list"),
    (b'{"instances": [{"a": [1, 2]}, {"a": [1, 2], "b": 1}]}', "input 'b' is missing"),
    (b'{"instances": [[1, 2]]}', "the model takes inputs 'a', 'b': name them"),
    (b'{"instances": [{"a": [{"b64": "!!"}], "b": 1}]}', "invalid base64"),
    (b'{"instances": [{"a": [{"x": 1}], "b": 1}]}', "objects inside values"),
    (b'{"signature_name": "serving_default"}', 'needs "instances"'),
    (b'{"signature_name": "", "inputs": [NaN', "not valid JSON"),
    # another signature was answered from the only one, as if it were that signature's answer
    (b'{"signature_name": "predict_images", "inputs": {"a": [[1, 2]], "b": [1]}}',
     "signature_name 'predict_images' is not served: a model here has one signature, "
     "'serving_default'"),
    (b'{"signature_name": null, "inputs": {"a": [[1, 2]], "b": [1]}}',
     "signature_name None is not served"),
])
def test_tf_serving_errors(body, message):
    with pytest.raises(InvalidInput, match=message):
        tfserving.decode_predict(body, SIG_TWO)


@pytest.mark.parametrize("name", ["", "serving_default"])
def test_tf_serving_default_signature_name_is_served(name):
    body = json.dumps({"signature_name": name, "inputs": [[1, 2]]}).encode()
    assert tfserving.decode_predict(body, SIG_ONE) == ({"x": [[1, 2]]}, False)


def test_tf_serving_reads_and_writes_nan_and_infinities():
    """TF Serving's json_tensor.cc reads and writes NaN, Infinity and -Infinity: orjson refused
    them in requests and wrote them as null in answers."""
    inputs, rows = tfserving.decode_predict(b'{"instances": [[NaN, Infinity], [-Infinity, 1]]}',
                                            SIG_ONE)
    x = SIG_ONE.validate(inputs)["x"]
    expected = np.array([[math.nan, math.inf], [-math.inf, 1]], np.float32)
    assert x.dtype == np.float32 and np.array_equal(x, expected, equal_nan=True)
    assert tfserving.encode_predict({"y": x}, rows) == \
        b'{"predictions":[[NaN,Infinity],[-Infinity,1.0]]}'
    assert tfserving.encode_predict({"y": x}, False) == \
        b'{"outputs":[[NaN,Infinity],[-Infinity,1.0]]}'
    two = {"y": x, "z": np.array([math.nan, 2.0])}
    assert tfserving.encode_predict(two, True) == (
        b'{"predictions":[{"y":[NaN,Infinity],"z":NaN},{"y":[-Infinity,1.0],"z":2.0}]}')
    assert tfserving.encode_predict(two, False) == (
        b'{"outputs":{"y":[[NaN,Infinity],[-Infinity,1.0]],"z":[NaN,2.0]}}')


SIG_FLAGS = Signature((TensorSpec("a", "float32", (-1, 2), 0), TensorSpec("f", "bool", (-1, 2), 0)),
                      (TensorSpec("y", "float32", (-1, 2), 0),))


@pytest.mark.parametrize("body, signature", [
    (b'{"instances": [[true, 0]]}', SIG_ONE),
    (b'{"instances": [[true, false]]}', SIG_ONE),
    (b'{"inputs": [[1, 2], [0.5, false]]}', SIG_ONE),
    (b'{"inputs": [[NaN, true]]}', SIG_ONE),  # read by json, not orjson
    (b'{"inputs": true}', SIG_ONE),
    (b'{"instances": [{"x": [1, 2]}, {"x": [[true], 2]}]}', SIG_ONE),
    (b'{"instances": [{"a": [1, true], "f": [true, false]}]}', SIG_FLAGS),
    (b'{"inputs": {"a": [[Infinity, false]], "f": [[true, false]]}}', SIG_FLAGS),
])
def test_tf_serving_json_booleans_in_a_numeric_input_are_refused_naming_it(body, signature):
    """TF Serving takes only JSON numbers for a numeric tensor (json_tensor.cc): `[true, 0]`
    for float32 was taken as [1.0, 0.0]. A bool input still takes true and false."""
    name = signature.inputs[0].name
    with pytest.raises(InvalidInput, match=re.escape(
            f"input {name!r}: float32 values must be numbers, not true or false")) as info:
        tfserving.decode_predict(body, signature)
    assert info.value.tensor == name
    for flags in (b'{"instances": [{"a": [1, 2], "f": [true, false]}]}',
                  b'{"inputs": {"a": [[NaN, 2]], "f": [[true, false]]}}'):
        arrays = SIG_FLAGS.validate(tfserving.decode_predict(flags, SIG_FLAGS)[0])
        assert arrays["f"].dtype == np.bool_ and arrays["f"].tolist() == [[True, False]]


SIG_UINT64 = Signature((TensorSpec("x", "uint64", (-1, 2), 0),),
                       (TensorSpec("y", "uint64", (-1, 2), 0),))


@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_tf_serving_uint64_values_above_2_63_are_exact(key):
    """numpy reads [2**64 - 1, 1] as float64: the request was refused (or lost digits)."""
    body = json.dumps({key: [[2 ** 64 - 1, 2 ** 63 + 1], [0, 5]]}).encode()
    x = SIG_UINT64.validate(tfserving.decode_predict(body, SIG_UINT64)[0])["x"]
    assert x.dtype == np.uint64 and x.tolist() == [[2 ** 64 - 1, 2 ** 63 + 1], [0, 5]]
    negative = json.dumps({key: [[2 ** 64 - 1, -1]]}).encode()
    with pytest.raises(InvalidInput, match=re.escape("input 'x': values out of uint64 range")):
        SIG_UINT64.validate(tfserving.decode_predict(negative, SIG_UINT64)[0])


def test_tf_serving_rows_need_outputs_that_share_their_rows():
    scalar_first = {"total": np.float32(3.0), "y": np.ones((2, 2), np.float32)}
    uneven = {"y": np.ones((2, 2), np.float32), "z": np.ones((3,), np.float32)}
    for outputs in (scalar_first, uneven):
        with pytest.raises(InvalidInput, match="cannot be answered row by row"):
            tfserving.encode_predict({k: np.asarray(v) for k, v in outputs.items()}, True)
    columns = json.loads(tfserving.encode_predict({"total": np.asarray(np.float32(3.0)),
                                                   "y": np.ones((1, 2), np.float32)}, False))
    assert columns == {"outputs": {"total": 3.0, "y": [[1.0, 1.0]]}}


def test_tf_serving_answers_mirror_the_request():
    one = {"y": np.array([[1.5, 2.0]], np.float32)}
    assert json.loads(tfserving.encode_predict(one, True)) == {"predictions": [[1.5, 2.0]]}
    assert json.loads(tfserving.encode_predict(one, False)) == {"outputs": [[1.5, 2.0]]}
    two = {"y": np.array([1, 2]), "s": np.array([b"\xff", b"ok"], dtype=object)}
    assert json.loads(tfserving.encode_predict(two, True)) == {"predictions": [
        {"y": 1, "s": {"b64": "/w=="}}, {"y": 2, "s": "ok"}]}
    assert json.loads(tfserving.encode_predict(two, False)) == {
        "outputs": {"y": [1, 2], "s": [{"b64": "/w=="}, "ok"]}}


# ----------------------------------------------------------------------------------- npz
@settings(max_examples=100, deadline=None)
@given(arrays=st.dictionaries(
    st.text(alphabet="abcxyz_", min_size=1, max_size=6),
    hnp.arrays(st.sampled_from([np.float32, np.int64, np.uint8, np.bool_, np.float16]),
               hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)), max_size=3))
def test_npz_round_trips(arrays):
    back = npz.decode(npz.encode(arrays))
    assert back.keys() == arrays.keys()
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


def test_npz_answers_hold_outputs_named_as_np_savez_parameters():
    """`np.savez(buffer, **outputs)` took the outputs' names as its keywords: an output named
    `file` raised TypeError (every `.npz` answer of the model an internal error) and one named
    `allow_pickle` was read as that flag and left out of the answer without a word."""
    outputs = {"file": np.arange(3, dtype=np.float32), "allow_pickle": np.array([True, False]),
               "y": np.ones((2, 2), np.int64)}
    back = npz.decode(npz.encode(outputs))
    assert back.keys() == outputs.keys()
    for name, array in outputs.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


def test_npz_refuses_what_needs_pickle_or_is_not_npz():
    with pytest.raises(InvalidInput, match="no zip header"):
        npz.decode(b"\x93NUMPY not an archive")
    with pytest.raises(InvalidInput, match="not a valid .npz"):
        npz.decode(b"PK\x03\x04 broken")
    buffer = io.BytesIO()
    np.savez(buffer, s=np.array(["a"], dtype=object))
    with pytest.raises(InvalidInput, match="object arrays"):
        npz.decode(buffer.getvalue())
    with pytest.raises(InvalidInput, match="output 's' holds strings"):
        npz.encode({"s": np.array(["a"], dtype=object)})


def _npz_member(shape: tuple[int, ...], size: int, compression: int = zipfile.ZIP_STORED
                ) -> bytes:
    """An .npz of one uint8 member `x` whose header declares `shape`, holding `size` zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunk = bytes(1 << 20)
            for start in range(0, size, len(chunk)):
                member.write(chunk[:size - start])
    return buffer.getvalue()


def test_npz_members_that_are_no_npy_array_are_refused_naming_them():
    """np.load hands a member not named .npy over as its raw bytes: it reached validation as a
    byte string, refused there as if the client had sent a string tensor."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", _npy(np.zeros(2, np.float32)))
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(InvalidInput, match=re.escape(
            "the .npz payload's member 'notes.txt' is not a .npy array")):
        npz.decode(buffer.getvalue())


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


def test_npz_zip_bombs_are_refused_unread():
    """1.4 MB of deflate inflated to 300 MB (on the MQTT daemon's event loop): the sizes the
    archive declares are summed first."""
    bomb = _npz_member((300 << 20,), 300 << 20, zipfile.ZIP_DEFLATED)
    assert len(bomb) < 2 << 20
    with pytest.raises(PayloadTooLarge, match="holds 314572928 bytes once decompressed, over "
                                              "the 268435456-byte limit"):
        npz.decode(bomb)
    assert npz.decode(_npz_member((4,), 4), max_bytes=1 << 10)["x"].tolist() == [0] * 4
    with pytest.raises(PayloadTooLarge):
        npz.decode(_npz_member((4,), 4), max_bytes=64)


def test_npz_headers_declaring_a_huge_shape_are_invalid_input():
    """numpy allocates what a member's header declares before reading it: 1 PiB (more than
    any address space) was a MemoryError, answered as an internal error."""
    with pytest.raises(InvalidInput, match="declares an array too large to hold"):
        npz.decode(_npz_member((2 ** 50,), 0))


def _npz_claiming(body: bytes, method: int, flags: int = 0) -> bytes:
    """An .npz of one member `x.npy` holding `body`, its headers saying it was compressed by
    `method` with general purpose `flags`: a corrupt, encrypted or exotic archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", body)
    raw = bytearray(buffer.getvalue())
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<HH", raw, 6, flags, method)  # the local header
    struct.pack_into("<HH", raw, central + 8, flags, method)  # the central directory's
    return bytes(raw)


@pytest.mark.parametrize("payload, reason", [
    (_npz_claiming(b"\xff" * 16, zipfile.ZIP_DEFLATED), "invalid block type"),  # zlib.error
    (_npz_claiming(b"\x09\x14\x05\x00\x5d\x00\x00\x10\x00" + b"\xff" * 12,
                   zipfile.ZIP_LZMA), "Corrupt input data"),  # lzma.LZMAError
    (_npz_claiming(b"\xff" * 16, 93), "compression method is not supported"),  # Zstandard
    (_npz_claiming(b"\xff" * 16, 9), "compression method is not supported"),  # Deflate64
    (_npz_claiming(b"\xff" * 16, zipfile.ZIP_STORED, flags=1), "is encrypted"),
])
def test_npz_archives_zipfile_cannot_inflate_are_invalid_input(payload, reason):
    """zlib.error, LZMAError, NotImplementedError and RuntimeError passed through: an MQTT
    request was answered as an internal error of kind inference_error, which a queue takes
    for a retryable failure of the model and delivers again and again."""
    with pytest.raises(InvalidInput, match=f"not a valid .npz archive: .*{reason}"):
        npz.decode(payload)


@settings(max_examples=150, deadline=None)
@given(arrays=st.dictionaries(
    st.text(alphabet="abc", min_size=1, max_size=3),
    hnp.arrays(st.sampled_from([np.float32, np.int64, np.uint8]),
               hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)), min_size=1, max_size=2),
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                            zipfile.ZIP_LZMA]),
    flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1,
                   max_size=3), cut=st.none() | st.integers(0, 10 ** 6))
def test_npz_mutated_archives_decode_or_are_invalid_input(arrays, method, flips, cut):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, array in arrays.items():
            archive.writestr(f"{name}.npy", _npy(array))
    raw = bytearray(buffer.getvalue())
    for at, value in flips:
        raw[at % len(raw)] = value
    try:
        npz.decode(bytes(raw[:cut]) if cut is not None else bytes(raw))
    except InvalidInput:
        pass  # PayloadTooLarge included: every refusal is the payload's


def test_npz_members_inflate_outside_the_npy_header_lock(monkeypatch):
    """The lock that keeps numpy's `.npy` header parses one at a time (runtime.npy_headers)
    was held through a member's whole inflating: a big payload decoded on the daemon's worker
    thread held it for that long, and a small one decoded on the event loop meanwhile stopped
    the loop, and every request on the device, until then. The hook holds the big member's
    inflating open while the lock is tried from another thread."""
    import threading

    from edgerun.runtime import npy_headers

    inflating, tried = threading.Event(), threading.Event()
    read = zipfile.ZipExtFile.read

    def held_open(self, *args):
        if self.name == "big.npy" and not inflating.is_set():
            inflating.set()
            tried.wait(30)
        return read(self, *args)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", held_open)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, big=np.zeros(1 << 20, np.float32))
    decoded: list[dict] = []
    worker = threading.Thread(target=lambda: decoded.append(npz.decode(buffer.getvalue())))
    worker.start()
    try:
        assert inflating.wait(30)
        free = npy_headers.LOCK.acquire(blocking=False)
        if free:
            npy_headers.LOCK.release()
    finally:
        tried.set()
        worker.join(30)
    assert free, "the .npy header lock was held while the member inflated"
    assert decoded[0]["big"].shape == (1 << 20,)


# ----------------------------------------------------------------------------- lean hosts
@pytest.mark.parametrize("module", ["edgerun.adapters.codecs.oip",
                                    "edgerun.adapters.codecs.tfserving",
                                    "edgerun.adapters.dataplane",
                                    "edgerun.adapters.http.asgi"])
def test_codecs_data_plane_and_lean_app_import_no_web_framework(module):
    probe = (f"import sys, {module}; "
             "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'pydantic', "
             "'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_a_prometheus_scrape_reads_each_histogram_whole_while_it_is_observed() -> None:
    """Every scrape's +Inf bucket equals its _count, however the scrape and observations
    interleave (scrapers compute rates and quantiles from both)."""
    import threading

    from edgerun.adapters.codecs.prometheus import render
    from edgerun.runtime.metrics import Registry

    registry = Registry()
    histogram = registry.family("latency_seconds", "latency", "histogram", (),
                                buckets=(0.1, 1.0)).labels()
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            histogram.observe(0.5)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as often as possible
    thread = threading.Thread(target=observe)
    thread.start()
    try:
        torn = []
        for _ in range(3000):
            text = render(registry)
            inf = int(re.search(r'latency_seconds_bucket\{le="\+Inf"\} (\d+)', text)[1])
            count = int(re.search(r"latency_seconds_count (\d+)", text)[1])
            if inf != count:
                torn.append((inf, count))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert torn == []
