"""The fleet server as its clients see it: a real `edgerun serve` process, real HTTP clients."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import InferenceServerException

from edgerun.examples import mlp_onnx
from edgerun.runtime import Model
from tests.helpers import gather_onnx, identity_onnx, two_input_onnx
from tests.fleet_sim import wait_for
from tests.serving import add_version, running_server

OIP_TYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
             "BYTES": "string"}
SLOW_QUEUE = """
[batching]
max_batch_size = 8
max_queue_delay_us = 1500000
max_queue_size = 2
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo") / "models"
    root.mkdir()
    for datatype, dtype in OIP_TYPES.items():
        add_version(root, f"identity-{datatype.lower()}", "1", identity_onnx(dtype, ["b", "n"]))
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    add_version(root, "text", "1", identity_onnx("string", ["b"]))
    add_version(root, "scalar-text", "1", identity_onnx("string", []))
    add_version(root, "lookup", "1", gather_onnx())
    add_version(root, "two", "1", two_input_onnx())
    add_version(root, "slowq", "1", identity_onnx("float32", ["b", 2]))
    (root / "slowq" / "config.toml").write_text(SLOW_QUEUE)
    add_version(root, "patient", "1", identity_onnx("float32", ["b", 2]))
    (root / "patient" / "config.toml").write_text("[batching]\nmax_queue_delay_us = 60000000\n")
    return root


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, "--max-body-bytes", str(1 << 20)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def oip(name: str, datatype: str, shape: list, data) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------ health and metadata
def test_health_and_server_metadata_with_tritonclient(server, client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edgerun"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_with_tritonclient(client):
    metadata = client.get_model_metadata("mlp")
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_model_metadata("mlp", "1")["versions"] == ["1"]


def test_model_ready(server, client):
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    missing = httpx.get(server.url + "/v2/models/nope/ready")
    assert missing.status_code == 404 and "model 'nope' is not loaded" in missing.json()["error"]


def test_openapi_docs_are_served(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert "/v1/models/{name}:predict" in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


# ----------------------------------------------------------------------- round trips
def _values(datatype: str):
    dtype = OIP_TYPES[datatype]
    if dtype == "string":
        return st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF),
                       max_size=6), object
    if dtype.startswith("float"):  # NaN and infinities too, in JSON as in binary
        return st.floats(width=np.dtype(dtype).itemsize * 8), np.dtype(dtype)
    return None, np.dtype(dtype)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), datatype=st.sampled_from(sorted(OIP_TYPES)), binary=st.booleans())
def test_every_datatype_round_trips_with_tritonclient(client, data, datatype, binary):
    elements, dtype = _values(datatype)
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(0, 4)))
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    if datatype == "BYTES":
        array = np.vectorize(lambda s: s.encode(), otypes=[object])(array).reshape(shape)
    tensor = triton.InferInput("x", list(shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = [triton.InferRequestedOutput("y", binary_data=binary)]
    result = client.infer(f"identity-{datatype.lower()}", [tensor], outputs=requested)
    out = result.as_numpy("y")
    assert out.shape == array.shape
    if datatype == "BYTES":
        assert [v if isinstance(v, bytes) else v.encode() for v in out.ravel()] == \
            list(array.ravel())
    else:
        assert out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_nested_and_flat_json_data_agree(server, repo):
    flat = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [2, 8], list(range(16))))
    nested = post(server, "/v2/models/mlp/infer",
                  oip("x", "FP32", [2, 8], [list(range(8)), list(range(8, 16))]))
    assert flat.status_code == nested.status_code == 200
    assert flat.json()["outputs"] == nested.json()["outputs"]
    expected = Model.load(repo / "mlp" / "1").predict(
        {"x": np.arange(16, dtype=np.float32).reshape(2, 8)})["y"]
    np.testing.assert_allclose(np.array(flat.json()["outputs"][0]["data"]).reshape(2, 4),
                               expected, rtol=1e-5)


def test_binary_request_by_hand_and_binary_output_by_default(server):
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = post(server, "/v2/models/mlp/infer", header + x.tobytes(),
                    {"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200
    split = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:split])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 2 * 4 * 4}
    y = np.frombuffer(response.content[split:], np.float32).reshape(2, 4)
    json_y = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [2, 8], x.tolist()))
    np.testing.assert_array_equal(y, np.float32(json_y.json()["outputs"][0]["data"]).reshape(2, 4))


def test_requested_outputs_and_request_id_are_honoured(server):
    body = {**oip("x", "FP32", [1, 8], [0] * 8), "id": "req-7", "outputs": [{"name": "y"}]}
    answer = post(server, "/v2/models/mlp/versions/1/infer", body).json()
    assert answer["id"] == "req-7" and answer["model_version"] == "1"
    assert [o["name"] for o in answer["outputs"]] == ["y"]
    bad = post(server, "/v2/models/mlp/infer", {**body, "outputs": [{"name": "nope"}]})
    assert bad.status_code == 400 and "requested output 'nope'" in bad.json()["error"]


@pytest.mark.parametrize("given, echoed", [
    ({"a": 1}, '{"a":1}'), (5, "5"), (True, "true"), ([1, "é"], '[1,"é"]'), ("s", "s")])
def test_a_request_id_that_is_no_string_is_echoed_as_its_json(server, given, echoed):
    """OIP's id is a string; one that is not was echoed as Python's repr ("{'a': 1}",
    "True"), which no JSON client reads back. The MQTT daemon's answers agree (test_mqtt)."""
    body = {**oip("x", "FP32", [1, 8], [0] * 8), "id": given}
    assert post(server, "/v2/models/mlp/infer", body).json()["id"] == echoed


NON_FINITE = [math.inf, -math.inf, math.nan, 1.0]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_nan_and_infinities_round_trip_as_json_with_tritonclient(client, datatype):
    """tritonclient with binary_data=False sends NaN, Infinity and -Infinity, as Triton reads
    and writes them: they were refused (400 TAPE_ERROR), and answered as null."""
    x = np.array([NON_FINITE], OIP_TYPES[datatype])
    tensor = triton.InferInput("x", [1, 4], datatype)
    tensor.set_data_from_numpy(x, binary_data=False)
    result = client.infer(f"identity-{datatype.lower()}", [tensor],
                          outputs=[triton.InferRequestedOutput("y", binary_data=False)])
    assert "parameters" not in result.get_output("y")  # JSON, not binary data
    y = result.as_numpy("y")
    assert y.dtype == x.dtype and np.array_equal(y, x, equal_nan=True)


# ------------------------------------------------------------------------ TF Serving
def test_tf_serving_row_and_column_formats(server):
    rows = post(server, "/v1/models/mlp:predict", {"instances": [[1] * 8, [2] * 8]})
    columns = post(server, "/v1/models/mlp/versions/1:predict", {"inputs": [[1] * 8, [2] * 8]})
    assert rows.status_code == columns.status_code == 200
    assert len(rows.json()["predictions"]) == 2 and len(rows.json()["predictions"][0]) == 4
    assert rows.json()["predictions"] == columns.json()["outputs"]


def test_tf_serving_named_inputs_and_multiple_outputs(server):
    rows = post(server, "/v1/models/two:predict",
                {"instances": [{"a": [1, 2, 3, 4], "b": [1, 1, 1, 1]},
                               {"a": [0, 0, 0, 0], "b": [2, 2, 2, 2]}]})
    assert rows.json() == {"predictions": [[2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0]]}
    columns = post(server, "/v1/models/two:predict",
                   {"inputs": {"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}})
    assert columns.json() == {"outputs": [[2.0, 3.0, 4.0, 5.0]]}
    missing = post(server, "/v1/models/two:predict", {"instances": [{"a": [1, 2, 3, 4]}]})
    assert missing.status_code == 400 and "missing input 'b'" in missing.json()["error"]


def test_tf_serving_nan_infinities_uint64_and_signature_name(server):
    """TF Serving reads and writes NaN and the infinities (they were refused, and answered as
    null), takes uint64 values from 2**63 up (numpy read them as float64: refused), and
    refuses a signature it does not serve (it was answered from the default one)."""
    rows = json.dumps({"instances": [NON_FINITE]}).encode()
    answer = post(server, "/v1/models/identity-fp32:predict", rows)
    assert answer.status_code == 200, answer.text
    assert answer.content == b'{"predictions":[[Infinity,-Infinity,NaN,1.0]]}'
    (predicted,) = json.loads(answer.content)["predictions"]
    assert np.array_equal(predicted, NON_FINITE, equal_nan=True)
    big = [[2 ** 64 - 1, 2 ** 63 + 1]]
    for key, answered in (("instances", "predictions"), ("inputs", "outputs")):
        answer = post(server, "/v1/models/identity-uint64:predict", {key: big})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {answered: big}
    refused = post(server, "/v1/models/mlp:predict",
                   {"signature_name": "classify", "instances": [[0] * 8]})
    assert refused.status_code == 400
    assert "signature_name 'classify' is not served" in refused.json()["error"]
    named = post(server, "/v1/models/mlp:predict",
                 {"signature_name": "serving_default", "instances": [[0] * 8]})
    assert named.status_code == 200, named.text


@pytest.mark.parametrize("body", [{"instances": [[True, 0]]}, {"instances": [[True, False]]},
                                  {"inputs": {"x": [[0.5, False]]}},
                                  b'{"inputs": [[NaN, true]]}'])
def test_tf_serving_json_booleans_for_a_float_input_get_400_naming_it(server, body):
    """TF Serving refuses a JSON bool for a DT_FLOAT tensor: `[[true, 0]]` was answered as
    [[1.0, 0.0]]. A bool model still takes them."""
    refused = post(server, "/v1/models/identity-fp32:predict", body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith(
        "input 'x': float32 values must be numbers, not true or false")
    flags = post(server, "/v1/models/identity-bool:predict", {"instances": [[True, False]]})
    assert flags.status_code == 200 and flags.json() == {"predictions": [[True, False]]}


def test_tf_serving_b64_strings_and_status(server):
    answer = post(server, "/v1/models/identity-bytes:predict",
                  {"instances": [[{"b64": "aGVsbG8="}], ["plain"]]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": [["hello"], ["plain"]]}
    # all b64, so nothing mixes them into text: ONNX Runtime once answered "b'hello'"
    answer = post(server, "/v1/models/identity-bytes:predict",
                  {"instances": [[{"b64": "aGVsbG8="}]]})
    assert answer.json() == {"predictions": [["hello"]]}
    rows = post(server, "/v1/models/text:predict",
                {"instances": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]})
    assert rows.status_code == 200, rows.text
    assert rows.json() == {"predictions": ["hello", "world"]}
    status = httpx.get(server.url + "/v1/models/mlp").json()
    assert status["model_version_status"][0] == {
        "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert httpx.get(server.url + "/v1/models/mlp/versions/3").status_code == 404


# ------------------------------------------------------------------------ error codes
@pytest.mark.parametrize("body, message", [
    (oip("z", "FP32", [1, 8], [0] * 8), "unknown input 'z'"),
    (oip("x", "BYTES", [1, 8], ["a"] * 8), "input 'x': expected float32, got string"),
    (oip("x", "FP32", [1, 3], [0] * 3), "input 'x': dim 1 must be 8"),
    (oip("x", "FP32", [1, 8], [0] * 7), "input 'x': shape [1, 8] needs 8 elements, data has 7"),
    (oip("x", "INT32", [1, 8], [0.5] * 8), "input 'x': expected int32, got float64"),
    (oip("x", "BF16", [1, 8], [0] * 8), "datatype 'BF16' is not supported"),
    (b'{"inputs": [', "not valid JSON"),
    ({"inputs": []}, "no \"inputs\" list"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": '
     b'[23227224206947391635456, 0, 0, 0, 0, 0, 0, 0]}]}',
     "input 'x': integer 23227224206947391635456 is out of range for FP32"),
    # valid JSON, once "not valid JSON"; JSON booleans, once read as 1.0 and 0.0
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": '
     b'[18446744073709551616, 0, 0, 0, 0, 0, 0, 0]}]}',
     "input 'x': integer 18446744073709551616 is out of range for FP32"),
    (oip("x", "FP32", [1, 8], [True] + [0] * 7),
     "input 'x': FP32 data must be numbers, not true or false"),
])
def test_bad_tensors_get_400_naming_the_culprit(server, body, message):
    response = post(server, "/v2/models/mlp/infer", body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_deeply_nested_json_gets_400_and_the_server_keeps_serving(server):
    deep = 1000  # under orjson's 1,024 levels: TF Serving once walked it into a RecursionError
    for path, body in (("/v1/models/mlp:predict", {"instances": [[0] * 8]}),
                       ("/v1/models/identity-bytes:predict", {"instances": [[{"b64": "YQ=="}]]})):
        nested = b"[" * deep + json.dumps(body["instances"][0][0]).encode() + b"]" * deep
        response = post(server, path, b'{"instances": ' + nested + b"}")
        assert response.status_code == 400, response.text
        assert "nested deeper than a tensor's 64 dimensions" in response.json()["error"]
    too_deep = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": ' + \
        b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    response = post(server, "/v2/models/mlp/infer", too_deep)
    assert response.status_code == 400
    assert response.json()["error"].startswith("the request body cannot be read as JSON")
    assert post(server, "/v1/models/mlp:predict", {"instances": [[0] * 8]}).status_code == 200


def test_binary_size_errors_get_400(server):
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                     "parameters": {"binary_data_size": 32}}]}).encode()
    short = post(server, "/v2/models/mlp/infer", header + b"\0" * 16,
                 {"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "runs past" in short.json()["error"]
    bad_length = post(server, "/v2/models/mlp/infer", header,
                      {"Inference-Header-Content-Length": "lots"})
    assert bad_length.status_code == 400 and "must be an integer" in bad_length.json()["error"]


def test_text_tensors_take_utf8_bytes_and_refuse_other_bytes(server):
    def binary_bytes(*elements: bytes) -> tuple[bytes, dict[str, str]]:
        data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
        header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES",
                                         "shape": [1, len(elements)],
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        return header + data, {"Inference-Header-Content-Length": str(len(header))}

    ok = post(server, "/v2/models/identity-bytes/infer", *binary_bytes("é".encode(), b"ok"))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == ["é", "ok"]
    refused = post(server, "/v2/models/identity-bytes/infer", *binary_bytes(b"ok", b"\xff\xfe"))
    assert refused.status_code == 400, refused.text
    assert "input 'x': element 1 is not UTF-8 text" in refused.json()["error"]


def test_tf_serving_columns_take_a_b64_object_as_the_one_inputs_value(server):
    """TF Serving reads `"inputs": {"b64": "..."}` as the single input's value (its REST API:
    "a list or base64 object (when there is only one named input)"): it was read as inputs by
    name, and a model whose one input is a scalar string answered 400 "unknown input 'b64'"."""
    for body in ({"inputs": {"b64": "aGk="}}, {"inputs": {"x": {"b64": "aGk="}}},
                 {"inputs": "hi"}):
        answer = post(server, "/v1/models/scalar-text:predict", body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"outputs": "hi"}
    bad = post(server, "/v1/models/scalar-text:predict", {"inputs": {"b64": "!!"}})
    assert bad.status_code == 400 and "input 'x': invalid base64" in bad.json()["error"]


@pytest.mark.timeout(60)
def test_a_request_of_zero_rows_is_answered(server):
    response = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [0, 8], []))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [0, 4]


def test_unknown_model_and_version_get_404(server, client):
    assert post(server, "/v2/models/ghost/infer", oip("x", "FP32", [1, 8], [0] * 8)) \
        .status_code == 404
    response = post(server, "/v2/models/mlp/versions/9/infer", oip("x", "FP32", [1, 8], [0] * 8))
    assert response.status_code == 404
    assert response.json()["error"] == "model 'mlp' has no version '9' loaded (loaded: 1)"
    with pytest.raises(InferenceServerException, match="not loaded") as info:
        client.get_model_metadata("ghost")
    assert info.value.status() == "404"


def test_answers_no_route_reaches_carry_a_request_id_too(server):
    """The README promises an X-Request-Id on every answer; the 405 for a wrong method and
    the 404 for a path that is no route were sent before the data plane, without one."""
    for method, path, status in (("DELETE", "/v2", 405), ("GET", "/nope", 404),
                                 ("GET", "/openapi.json", 200)):
        answer = httpx.request(method, server.url + path, headers={"X-Request-Id": "mine-1"},
                               timeout=30)
        assert answer.status_code == status and answer.headers["X-Request-Id"] == "mine-1"
        fresh = httpx.request(method, server.url + path, timeout=30)
        assert len(fresh.headers["X-Request-Id"]) == 32  # a new one, as the hook makes


def test_body_over_the_cap_gets_413(server):
    counted = metric(server, "edgerun_requests_total", model="mlp", version="",
                     transport="http", outcome="payload_too_large")
    response = post(server, "/v2/models/mlp/infer", b"{" + b" " * (2 << 20) + b"}",
                    {"X-Request-Id": "too-big-1"})
    assert response.status_code == 413 and "over the 1048576-byte limit" in response.json()["error"]
    # refused before the data plane read a byte, it still passes the hooks and the metrics
    assert response.headers["X-Request-Id"] == "too-big-1"
    assert metric(server, "edgerun_requests_total", model="mlp", version="", transport="http",
                  outcome="payload_too_large") == counted + 1


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(client, algorithm):
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    tensor = triton.InferInput("x", [2, 8], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    plain = client.infer("mlp", [tensor]).as_numpy("y")
    packed = client.infer("mlp", [tensor], request_compression_algorithm=algorithm).as_numpy("y")
    np.testing.assert_array_equal(packed, plain)


def test_content_codings_that_cannot_be_read(server):
    body = json.dumps(oip("x", "FP32", [1, 8], [0] * 8)).encode()
    brotli = post(server, "/v2/models/mlp/infer", body, {"Content-Encoding": "br"})
    assert brotli.status_code == 415 and "'br' is not supported" in brotli.json()["error"]
    corrupt = post(server, "/v2/models/mlp/infer", body, {"Content-Encoding": "gzip"})
    assert corrupt.status_code == 400 and "gzip request body is corrupt" in corrupt.json()["error"]
    bomb = gzip.compress(b" " * (2 << 20))  # 2 KiB that inflate past the 1 MiB cap
    assert len(bomb) < 10_000
    inflated = post(server, "/v2/models/mlp/infer", bomb, {"Content-Encoding": "gzip"})
    assert inflated.status_code == 413 and "once decompressed" in inflated.json()["error"]


def test_inference_failure_gets_500_and_neighbours_still_succeed(server):
    results: dict[int, httpx.Response] = {}

    def send(index: int) -> None:
        results[index] = post(server, "/v2/models/lookup/infer",
                              oip("idx", "INT64", [1], [99 if index == 3 else index]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[3].status_code == 500 and "model 'lookup'" in results[3].json()["error"]
    for index, response in results.items():
        if index != 3:
            assert response.status_code == 200
            assert response.json()["outputs"][0]["data"] == [3 * index, 3 * index + 1,
                                                             3 * index + 2]


def test_full_queue_gets_503_with_retry_after_and_deadline_gets_504(server):
    row = oip("x", "FP32", [1, 2], [1, 2])
    waiting = []
    for _ in range(2):  # fill slowq's queue of 2; they wait out its 1.5 s batching delay
        thread = threading.Thread(target=lambda: waiting.append(post(server,
                                                                     "/v2/models/slowq/infer", row)))
        thread.start()
        waiting.append(thread)
    time.sleep(0.4)
    full = post(server, "/v2/models/slowq/infer", row)
    assert full.status_code == 503
    assert "queue full" in full.json()["error"]
    # the queued batch runs once its 1.5 s delay (0.4 s of it gone) is over: room in ~1.1 s
    assert full.headers["retry-after"] in ("1", "2"), full.headers["retry-after"]
    for thread in [t for t in waiting if isinstance(t, threading.Thread)]:
        thread.join()
    answers = [r for r in waiting if isinstance(r, httpx.Response)]
    assert [r.status_code for r in answers] == [200, 200], "queued requests still ran"
    started = time.monotonic()
    late = post(server, "/v2/models/slowq/infer", row, {"X-Request-Timeout-Ms": "100"})
    assert late.status_code == 504 and "past its deadline" in late.json()["error"]
    assert time.monotonic() - started < 1.4, "answered at the deadline, not after the delay"
    oip_timeout = post(server, "/v2/models/slowq/infer",
                       {**row, "parameters": {"timeout": 100_000}})
    assert oip_timeout.status_code == 504


def test_a_request_whose_client_went_away_is_withdrawn(server):
    """uvicorn only marks such a request disconnected: a client that gave up (its own timeout)
    kept its place in the queue, and a forward pass later ran for nobody."""
    labels = {"model": "patient", "version": "1"}
    batches = metric(server, "edgerun_batch_size_count", **labels)
    cancelled = metric(server, "edgerun_requests_total", **labels, transport="http",
                       outcome="cancelled")
    body = json.dumps(oip("x", "FP32", [1, 2], [1, 2])).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v2/models/patient/infer HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        wait_for(lambda: metric(server, "edgerun_queue_depth", **labels) == 1, 10,
                 "the request to wait out its 60 s batching delay")
    wait_for(lambda: metric(server, "edgerun_queue_depth", **labels) == 0, 10,
             "the request of the closed connection to leave the queue")
    assert metric(server, "edgerun_requests_total", **labels, transport="http",
                  outcome="cancelled") == cancelled + 1
    assert metric(server, "edgerun_batch_size_count", **labels) == batches  # never ran
    assert metric(server, "edgerun_inflight_requests", **labels) == 0
    assert "Exception in ASGI application" not in server.output()
    assert post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [0] * 8)).status_code \
        == 200


def test_metrics_move_as_requests_are_made(server):
    labels = {"model": "mlp", "version": "1", "transport": "http"}
    ok = metric(server, "edgerun_requests_total", **labels, outcome="ok")
    bad = metric(server, "edgerun_requests_total", **labels, outcome="invalid_input")
    timed = metric(server, "edgerun_request_duration_seconds_count", **labels)
    batches = metric(server, "edgerun_batch_size_count", model="mlp", version="1")
    for _ in range(3):
        post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [0] * 8))
    post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 3], [0] * 3))
    assert metric(server, "edgerun_requests_total", **labels, outcome="ok") == ok + 3
    assert metric(server, "edgerun_requests_total", **labels, outcome="invalid_input") == bad + 1
    assert metric(server, "edgerun_batch_size_count", model="mlp", version="1") >= batches + 3
    assert metric(server, "edgerun_request_duration_seconds_count", **labels) == timed + 4
    text = httpx.get(server.url + "/metrics").text
    for family in ("edgerun_queue_wait_seconds_bucket", "edgerun_queue_depth",
                   "edgerun_inflight_requests", "edgerun_inference_seconds_sum"):
        assert f'{family}{{model="mlp",version="1"' in text


# ----------------------------------------------------------- hot swap, traffic policies
class Load:
    """Clients sending requests back to back until stopped; every response is kept."""

    def __init__(self, server, path: str, body: dict, clients: int = 6,
                 headers: dict | None = None) -> None:
        self.responses: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(server, path, body, headers))
                         for _ in range(clients)]

    def _run(self, server, path, body, headers) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not self._stop.is_set():
                response = http.post(path, json=body, headers=headers)
                version = response.json().get("model_version", "") \
                    if response.status_code == 200 else response.text
                self.responses.append((response.status_code, version))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, version: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(v == version for _, v in self.responses[-20:]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"version {version} never answered")


def test_hot_swap_under_load_never_fails_a_request(tmp_path):
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 64, 4], seed=1))
    with running_server(repo, "--poll-interval", "0.2") as server:
        with Load(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [1] * 8)) as load:
            time.sleep(0.5)
            for version, seed in (("2", 2), ("3", 3)):
                add_version(repo, "mlp", version, mlp_onnx([8, 64, 4], seed=seed))
                load.wait_for(version)
                time.sleep(0.5)
        codes = {code for code, _ in load.responses}
        versions = [v for _, v in load.responses]
        assert codes == {200}, [r for r in load.responses if r[0] != 200][:3]
        assert {"1", "2", "3"} <= set(versions) and len(versions) > 100
        assert versions.index("3") > max(i for i, v in enumerate(versions) if v == "1")
        assert httpx.get(server.url + "/v2/models/mlp/versions/1/ready").status_code == 404
        index = post(server, "/v2/repository/index", b"").json()
        assert {(s["version"], s["state"]) for s in index} == {
            ("1", "UNLOADED"), ("2", "UNLOADED"), ("3", "READY")}


def test_explicit_load_and_unload(tmp_path):
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    with running_server(repo) as server:
        with Load(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [1] * 8)) as load:
            load.wait_for("1")
            add_version(repo, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
            time.sleep(0.3)
            assert {v for _, v in load.responses} == {"1"}, "no polling: nothing changes"
            assert post(server, "/v2/repository/models/mlp/load", b"").status_code == 200
            load.wait_for("2")
        assert {code for code, _ in load.responses} == {200}
        assert post(server, "/v2/repository/models/mlp/unload", b"").status_code == 200
        gone = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [1] * 8))
        assert gone.status_code == 404
        missing = post(server, "/v2/repository/models/ghost/load", b"")
        assert missing.status_code == 404 and "not in the repository" in missing.json()["error"]


def test_load_refuses_what_it_does_not_implement(tmp_path):
    """A config override, file: contents or a body that is not JSON were ignored: 200, as if
    the model had loaded as asked."""
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    with running_server(repo) as server:
        client = triton.InferenceServerClient(server.address)
        with pytest.raises(InferenceServerException,
                           match="load parameter 'config' is not supported") as info:
            client.load_model("mlp", config='{"max_batch_size": 4}')
        assert info.value.status() == "400"
        files = post(server, "/v2/repository/models/mlp/load",
                     {"parameters": {"config": "{}", "file:1/model.onnx": "eA=="}})
        assert files.status_code == 400
        assert "'config', 'file:1/model.onnx' is not supported" in files.json()["error"]
        garbled = post(server, "/v2/repository/models/mlp/load", b"not json")
        assert garbled.status_code == 400 and "not valid JSON" in garbled.json()["error"]
        client.load_model("mlp")  # a body of {}
        assert post(server, "/v2/repository/models/mlp/load", b"").status_code == 200
        assert client.is_model_ready("mlp")


def test_a_corrupt_new_version_never_replaces_a_good_one(tmp_path):
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    with running_server(repo) as server:
        folder = add_version(repo, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
        (folder / "model.onnx").write_bytes(b"tampered")
        failed = post(server, "/v2/repository/models/mlp/load", b"")
        assert failed.status_code == 400 and "model.onnx" in failed.json()["error"]
        still = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], [1] * 8))
        assert still.status_code == 200 and still.json()["model_version"] == "1"
        states = {s["version"]: s for s in post(server, "/v2/repository/index", b"").json()}
        assert states["2"]["state"] == "UNAVAILABLE" and "tampered" in states["2"]["reason"]
        # {"ready": true} lists the READY versions only (it was ignored: every version came)
        ready = post(server, "/v2/repository/index", {"ready": True})
        assert ready.status_code == 200
        assert [(s["version"], s["state"]) for s in ready.json()] == [("1", "READY")]
        everything = triton.InferenceServerClient(server.address).get_model_repository_index()
        assert {s["version"] for s in everything} == {"1", "2"}


def test_canary_split_and_sticky_key(tmp_path):
    repo = tmp_path / "models"
    for version in ("1", "2"):
        add_version(repo, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    (repo / "mlp" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\nweights = { "1" = 75, "2" = 25 }\n'
        'sticky_key = "x-user"\n')
    body = oip("x", "FP32", [1, 8], [1] * 8)
    with running_server(repo) as server, httpx.Client(base_url=server.url) as http:
        versions = [http.post("/v2/models/mlp/infer", json=body).json()["model_version"]
                    for _ in range(1200)]
        share = versions.count("2") / len(versions)
        assert 0.20 <= share <= 0.30, share  # 25 % +- 5 points (about 4 sigma at n=1200)
        for user in ("alice", "bob", "carol"):
            seen = {http.post("/v2/models/mlp/infer", json=body,
                              headers={"X-User": user}).json()["model_version"]
                    for _ in range(20)}
            assert len(seen) == 1, f"{user} moved between versions"
        users = {http.post("/v2/models/mlp/infer", json=body, headers={"x-user": f"u{i}"})
                 .json()["model_version"] for i in range(200)}
        assert users == {"1", "2"}, "keys spread over both versions"
        explicit = http.post("/v2/models/mlp/versions/2/infer", json=body).json()
        assert explicit["model_version"] == "2", "a named version bypasses the split"


def test_shadow_never_changes_a_response(tmp_path):
    repo = tmp_path / "models"
    for version in ("1", "2"):
        add_version(repo, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    (repo / "mlp" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\nweights = { "1" = 100 }\nshadow = "2"\n')
    primary = Model.load(repo / "mlp" / "1")
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    expected = primary.predict({"x": x})["y"]
    with running_server(repo) as server:
        for _ in range(40):
            answer = post(server, "/v2/models/mlp/infer", oip("x", "FP32", [1, 8], x.tolist()))
            assert answer.status_code == 200
            assert answer.json()["model_version"] == "1"
            np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected.ravel(),
                                       rtol=1e-5)
        labels = {"model": "mlp", "version": "1", "shadow_version": "2"}
        deadline = time.monotonic() + 10
        while metric(server, "edgerun_shadow_requests_total", **labels, outcome="mismatch") < 40:
            assert time.monotonic() < deadline, "shadow copies were not all compared"
            time.sleep(0.05)
        assert metric(server, "edgerun_shadow_requests_total", **labels, outcome="match") == 0
        assert metric(server, "edgerun_requests_total", model="mlp", version="2",
                      transport="http", outcome="ok") == 0, "shadow answers are never returned"


def test_requests_in_flight_at_sigterm_are_answered(tmp_path):
    repo = tmp_path / "models"
    add_version(repo, "slowq", "1", identity_onnx("float32", ["b", 2]))
    (repo / "slowq" / "config.toml").write_text(SLOW_QUEUE)
    answers = []
    with running_server(repo) as server:
        waiting = threading.Thread(target=lambda: answers.append(
            post(server, "/v2/models/slowq/infer", oip("x", "FP32", [1, 2], [1, 2]))))
        waiting.start()
        time.sleep(0.3)  # queued, waiting out the 1.5 s batching delay
        server.process.send_signal(signal.SIGTERM)
        waiting.join()
    assert [a.status_code for a in answers] == [200]
    assert server.process.returncode in (0, -signal.SIGTERM)


def test_fastapi_routes_answer_like_the_lean_app(server, repo):
    """Hosts that mount the FastAPI app itself get the same answers as the served lean app."""
    import asyncio

    from edgerun.adapters.dataplane import DataPlane
    from edgerun.adapters.http import create_app
    from edgerun.runtime.metrics import Registry
    from edgerun.runtime.repository import Repository

    repository = Repository(repo, registry=Registry())
    repository.load("mlp")
    app = create_app(DataPlane(repository))
    body = oip("x", "FP32", [1, 8], list(range(8)))

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return (await http.post("/v2/models/mlp/infer", json=body),
                    await http.post("/v1/models/mlp:predict", json={"instances": [[0] * 8]}),
                    await http.post("/v2/models/mlp/infer", json=oip("x", "FP32", [1, 3], [0] * 3)),
                    await http.get("/v2/models/mlp"))

    infer, predict, bad, metadata = asyncio.run(ask())
    repository.close()
    assert infer.status_code == predict.status_code == 200
    assert infer.json()["outputs"] == post(server, "/v2/models/mlp/infer", body).json()["outputs"]
    assert predict.json() == post(server, "/v1/models/mlp:predict",
                                  {"instances": [[0] * 8]}).json()
    assert bad.status_code == 400 and "input 'x': dim 1 must be 8" in bad.json()["error"]
    assert metadata.json() == httpx.get(server.url + "/v2/models/mlp").json()


# ------------------------------------------------------------------------------ the wire
def _request(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: edgerun", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _content_length(head: bytes) -> int:
    found = re.search(rb"\r\ncontent-length: (\d+)\r\n", head, re.I)
    assert found is not None, head
    return int(found.group(1))


def _data_segments_in(sock: socket.socket) -> int:
    """TCP segments with data this socket has received (Linux `tcp_info.tcpi_data_segs_in`)."""
    return struct.unpack_from("<I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160),
                              152)[0]


def test_each_response_leaves_in_one_send(server):
    """Head and body go out in one send, so each answer reaches the client as one segment
    (uvicorn's own way, head then body, is two sends and two segments)."""
    infer = json.dumps(oip("x", "FP32", [1, 8], list(range(8)))).encode()
    asked = [("POST", "/v2/models/mlp/infer", infer), ("GET", "/v2/health/ready", b""),
             ("POST", "/v2/models/mlp/infer", b"{broken"), ("GET", "/nowhere", b"")] * 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for method, path, body in asked:
            before = _data_segments_in(sock)
            sock.sendall(_request(method, path, body))
            data = sock.recv(1 << 16)
            head, _, rest = data.partition(b"\r\n\r\n")
            while len(rest) < _content_length(head):
                rest += sock.recv(1 << 16)
            assert _data_segments_in(sock) - before == 1, (method, path, head)
        sock.sendall(_request("HEAD", "/v2/models/mlp"))  # a head and no body at all
        head = sock.recv(1 << 16)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert _content_length(head) > 0
        sock.sendall(_request("GET", "/v2/health/live", b"", "Connection: close"))
        answer = sock.recv(1 << 16)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"live":true}')
        assert sock.recv(1 << 16) == b""  # closed after the answer, nothing held back


def test_expect_100_continue_is_not_held_back(server):
    """The interim answer goes out at once: the client waits for it before sending the body."""
    body = json.dumps(oip("x", "FP32", [1, 8], list(range(8)))).encode()
    head = _request("POST", "/v2/models/mlp/infer", b"", "Expect: 100-continue",
                    "Content-Type: application/json")
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1 << 16) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = sock.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["outputs"][0]["shape"] == [1, 4]


def test_malformed_http_gets_400_and_the_connection_closes(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = sock.recv(1 << 16)
        assert answer.startswith(b"HTTP/1.1 400")
        assert sock.recv(1 << 16) == b""
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_an_explicit_load_tries_again_what_failed_for_a_cause_outside_the_files(
        tmp_path, monkeypatch):
    """A version that failed to load is remembered by its files and config, so polling does
    not retry it each pass; POST .../load got that remembered failure back too, without a
    try, after the operator had fixed a cause outside the files (here the server's temporary
    folder, removed by a cleaner and made again): Triton's explicit load always tries again."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the server's temporary folder
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    with running_server(repo, "--poll-interval", "0.2") as server:  # its first load used it
        shutil.rmtree(scratch)
        folder = add_version(repo, "late", "1", mlp_onnx([8, 16, 4], seed=2))
        settled = time.time() - 60  # written long ago: the same files at every look
        for path in folder.rglob("*"):
            os.utime(path, (settled, settled))
        failed = post(server, "/v2/repository/models/late/load", b"")
        assert failed.status_code == 400, failed.text
        assert "FileNotFoundError" in failed.json()["error"], failed.text
        scratch.mkdir()  # the cause fixed, no file of the version touched
        time.sleep(1)  # polls meanwhile skip the known failure
        assert httpx.get(server.url + "/v2/models/late/ready").status_code == 404
        loaded = post(server, "/v2/repository/models/late/load", b"")
        assert loaded.status_code == 200, loaded.text
        answer = post(server, "/v2/models/late/infer", oip("x", "FP32", [1, 8], [1] * 8))
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
