"""OIP v2 over gRPC as its clients see it: a real `edgerun serve --grpc-port`, tritonclient.

Typed `contents` requests are built with tritonclient's own protocol messages (its
`grpc_service.proto` is a superset of the one edgerun serves), since tritonclient itself always
sends raw tensors. This process never imports edgerun's generated stubs: both define the
`inference` protobuf package, which one process's descriptor pool can hold only once.
"""

from __future__ import annotations

import filecmp
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgerun.examples import mlp_onnx
from tests.fleet_sim import wait_for
from tests.helpers import expand_onnx, gather_onnx, identity_onnx
from tests.serving import add_version, running_process, running_server, wait_until
from tests.test_http_edges import cpu_ticks, loop_share

ROOT = Path(__file__).resolve().parents[1]
OIP_TYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
             "BYTES": "string"}
#: The protocol's typed field per datatype (FP16 has none).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
SLOW_QUEUE = """
[batching]
max_batch_size = 8
max_queue_delay_us = 1500000
max_queue_size = 2
"""
CANARY = """
[traffic]
weights = { "1" = 50, "2" = 50 }
sticky_key = "x-user-id"
"""
StatusCode = grpc.StatusCode
#: A 256 KiB request answered with 68 MiB, past the 64 MiB request limit.
EXPAND_COLUMNS, EXPAND_ROWS = 1 << 16, 272


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpc") / "models"
    for datatype, dtype in OIP_TYPES.items():
        add_version(root, f"identity-{datatype.lower()}", "1", identity_onnx(dtype, ["b", "n"]))
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    add_version(root, "lookup", "1", gather_onnx())
    add_version(root, "expand", "1", expand_onnx(EXPAND_COLUMNS, EXPAND_ROWS))
    add_version(root, "slowq", "1", identity_onnx("float32", ["b", 2]))
    (root / "slowq" / "config.toml").write_text(SLOW_QUEUE)
    add_version(root, "canary", "1", mlp_onnx([8, 4], seed=1))
    add_version(root, "canary", "2", mlp_onnx([8, 4], seed=2))
    (root / "canary" / "config.toml").write_text("version_policy = { all = true }\n" + CANARY)
    return root


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> tgrpc.InferenceServerClient:
    return tgrpc.InferenceServerClient(server.grpc_address)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def fp32_input(array: np.ndarray, name: str = "x") -> tgrpc.InferInput:
    tensor = tgrpc.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def code_of(error: InferenceServerException) -> str:
    return error.status()


# ------------------------------------------------------------------ health and metadata
def test_health_and_server_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    # only what gRPC serves: its repository RPCs are UNIMPLEMENTED and binary tensor data is
    # HTTP's; they were listed as over HTTP
    assert metadata.name == "edgerun" and list(metadata.extensions) == []
    assert thttp.InferenceServerClient(server.address).get_server_metadata()["extensions"] == [
        "binary_tensor_data", "model_repository"]


def test_model_readiness(client):
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7") and not client.is_model_ready("nope")
    assert client.is_model_ready("canary", "2")


def test_model_metadata(client):
    metadata = client.get_model_metadata("mlp", as_json=True)
    assert metadata["name"] == "mlp" and metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert client.get_model_metadata("canary").versions == ["1", "2"]
    assert client.get_model_metadata("canary", "2").versions == ["2"]
    error = refused(client.get_model_metadata, "nope")
    assert code_of(error) == "StatusCode.NOT_FOUND" and "'nope'" in error.message()


# ----------------------------------------------------------------------- round trips
def _values(datatype: str):
    dtype = OIP_TYPES[datatype]
    if dtype == "string":
        return st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FFF),
                       max_size=6).map(str.encode), object
    if dtype.startswith("float"):
        return st.floats(allow_nan=False, allow_infinity=False,
                         width=np.dtype(dtype).itemsize * 8), np.dtype(dtype)
    return None, np.dtype(dtype)


def typed_request(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    getattr(tensor.contents, CONTENTS[datatype]).extend(array.ravel().tolist())
    return request


def typed_output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    """A typed output as an array (tritonclient's as_numpy reads raw contents only)."""
    assert not response.raw_output_contents, "a typed request must get a typed answer"
    output = response.outputs[index]
    values = list(getattr(output.contents, CONTENTS[output.datatype]))
    dtype = object if output.datatype == "BYTES" else OIP_TYPES[output.datatype]
    return np.array(values, dtype=dtype).reshape(tuple(output.shape))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), datatype=st.sampled_from(sorted(OIP_TYPES)), raw=st.booleans())
def test_every_datatype_round_trips_raw_and_typed(client, stub, data, datatype, raw):
    elements, dtype = _values(datatype)
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(0, 4)))
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    model = f"identity-{datatype.lower()}"
    if raw or datatype == "FP16":  # FP16 has no typed field: raw is its only way
        tensor = tgrpc.InferInput("x", list(shape), datatype)
        tensor.set_data_from_numpy(array)
        result = client.infer(model, [tensor])
        assert result.get_response().raw_output_contents
        out = result.as_numpy("y")
    else:
        out = typed_output(stub.ModelInfer(typed_request(model, "x", datatype, array)))
    assert out.shape == array.shape
    if datatype == "BYTES":
        assert list(out.ravel()) == list(array.ravel())
    else:
        assert out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_bytes_elements_round_trip_typed_and_raw(client, stub):
    array = np.array([["héllo".encode(), b"", "\u2fff x".encode()]], dtype=object)
    tensor = tgrpc.InferInput("x", [1, 3], "BYTES")
    tensor.set_data_from_numpy(array)
    assert list(client.infer("identity-bytes", [tensor]).as_numpy("y").ravel()) == \
        list(array.ravel())
    typed = stub.ModelInfer(typed_request("identity-bytes", "x", "BYTES", array))
    assert list(typed_output(typed).ravel()) == list(array.ravel())


@pytest.mark.parametrize("datatype, dtype", [("FP32", np.float32), ("FP64", np.float64)])
def test_a_big_typed_float_request_costs_the_event_loop_what_a_raw_one_does(server, datatype,
                                                                            dtype):
    """Typed float contents of 16 MB (4 million FP32) were read into an array, and the answer
    written back, one Python float at a time on the event loop (half a second for 16 MB, the
    GIL held throughout): every HTTP and gRPC caller waited that long. The packed field's
    wire bytes are now read and written by numpy, so the loop's thread works about as long as
    for the same tensor sent raw (grpcio parses and serializes both on it)."""
    rng = np.random.default_rng(5)
    count = 16_000_000 // np.dtype(dtype).itemsize  # 16 MB each way
    array = rng.standard_normal((1, count)).astype(dtype)
    model = f"identity-{datatype.lower()}"
    typed = typed_request(model, "x", datatype, array)
    raw = pb.ModelInferRequest(model_name=model, raw_input_contents=[array.tobytes()])
    raw.inputs.add(name="x", datatype=datatype, shape=array.shape)
    answers = {}
    big = [("grpc.max_receive_message_length", 64 << 20)]
    pid = server.process.pid
    with grpc.insecure_channel(server.grpc_address, options=big) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        loop_ticks = {}
        for kind, request in (("raw", raw), ("typed", typed)):
            before = cpu_ticks(pid)[0]
            answers[kind] = infer(request)
            loop_ticks[kind] = cpu_ticks(pid)[0] - before
    output = answers["typed"].outputs[0]
    assert list(output.shape) == [1, count] and not answers["typed"].raw_output_contents
    values = getattr(output.contents, CONTENTS[datatype])
    assert len(values) == count and values[0] == array[0, 0] and values[-1] == array[0, -1]
    np.testing.assert_array_equal(np.array(values[::9973], dtype=dtype), array[0, ::9973])
    # CPU ticks (10 ms each) count the loop thread's work, not the host's load: one element at
    # a time it was 30 to 80 ticks against the raw request's few
    assert loop_ticks["typed"] <= 3 * loop_ticks["raw"] + 10, loop_ticks


@pytest.mark.parametrize("datatype", ["BOOL", "INT8", "INT32", "INT64", "UINT32", "UINT64"])
def test_big_typed_integer_requests_are_converted_off_the_event_loop(server, datatype):
    """Typed integers and BOOL (no packed bytes numpy can read) were converted one element at
    a time on the event loop, request and answer: 4 million INT64 held it 0.8 s, every other
    HTTP and gRPC caller waiting. Now a worker thread converts them, in steps between which
    the loop runs: the loop's thread does a small share of the work (it still parses and
    serializes the messages), where it did nearly all of it."""
    dtype = np.dtype(OIP_TYPES[datatype])
    count = 4_000_000
    array = np.random.default_rng(9).integers(0, 2 if dtype.kind == "b" else 100, (1, count))
    array = array.astype(dtype)
    if dtype.kind != "b":  # the extremes survive the steps
        array[0, :2] = np.iinfo(dtype).min, np.iinfo(dtype).max
    request = typed_request(f"identity-{datatype.lower()}", "x", datatype, array)
    answers = []
    big = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.grpc_address, options=big) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(typed_request(f"identity-{datatype.lower()}", "x", datatype, array[:, :8]))
        share = loop_share(server.process.pid, lambda: answers.append(infer(request)))
    output = answers[0].outputs[0]
    assert list(output.shape) == [1, count] and not answers[0].raw_output_contents
    np.testing.assert_array_equal(
        np.array(getattr(output.contents, CONTENTS[datatype]), dtype=dtype), array[0])
    # on the loop: 0.85 to 1 of the process's CPU time; off it, 0.1 to 0.2
    assert share < 0.5, f"the event loop's thread did {share:.0%} of the work"


def test_callers_are_answered_while_a_big_typed_request_converts(server):
    """The worker converts in steps, letting go of the GIL between them: one `np.array` over
    a field, on any thread, held it (and so the event loop) until the whole field was read.
    Cheap HTTP requests sent all along keep being answered."""
    count = 16_000_000  # BOOL: 16 MB, quick to send and parse, slow to convert one at a time
    array = np.random.default_rng(3).integers(0, 2, (1, count)).astype(bool)
    request = typed_request("identity-bool", "x", "BOOL", array)
    answered: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client() as http:
            while not done.is_set():
                http.get(server.url + "/v2/health/live")
                answered.append(time.perf_counter())

    poller = threading.Thread(target=poll)
    big = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.grpc_address, options=big) as channel:
        poller.start()
        try:
            time.sleep(0.05)
            started = time.perf_counter()
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            finished = time.perf_counter()
        finally:
            done.set()
            poller.join()
    assert len(response.outputs[0].contents.bool_contents) == count
    during = [started] + [t for t in answered if started < t < finished] + [finished]
    longest = max(b - a for a, b in zip(during, during[1:]))
    # converted on the loop, or in one call on the worker, the callers waited 0.5 to 0.6 of
    # the big request's time in one stretch; in steps, 0.05 to 0.1
    assert longest < (finished - started) / 4, \
        f"the callers waited {longest:.2f} s of the {finished - started:.2f} s"


def test_a_big_request_whose_caller_leaves_while_it_decodes_is_counted(server):
    """A big request is decoded on the worker: a caller gone by then (here its deadline passes
    while the worker decodes) still has its call hooked and counted once."""
    def counted() -> float:
        text = httpx.get(server.url + "/metrics").text
        return sum(float(n) for n in re.findall(
            r'^edgerun_requests_total\{model="identity-bool",version="[^"]*",'
            r'transport="grpc",outcome="[^"]*"\} (\S+)$', text, re.M))

    array = np.random.default_rng(4).integers(0, 2, (1, 16_000_000)).astype(bool)
    request = typed_request("identity-bool", "x", "BOOL", array)
    big = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.grpc_address, options=big) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for _ in range(5):  # on a busy host the deadline can pass before the servicer is called
            before = counted()
            try:  # 16 million BOOL take 0.5 to 1 s to decode here
                infer(request, timeout=0.3)
            except grpc.RpcError as exc:
                assert exc.code() == StatusCode.DEADLINE_EXCEEDED
            try:
                wait_for(lambda: counted() > before, 3)
            except TimeoutError:
                continue
            time.sleep(0.2)
            assert counted() == before + 1
            return
    pytest.fail("no call was counted")


def test_requested_outputs_and_request_id_are_honoured(client):
    x = np.ones((1, 8), np.float32)
    result = client.infer("mlp", [fp32_input(x)], model_version="1", request_id="req-7",
                          outputs=[tgrpc.InferRequestedOutput("y")])
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["y"]


def test_an_answer_over_the_request_limit_is_sent(server, client):
    """The send limit was the request limit (64 MiB): an answer past it failed after the
    model had run, counted ok, a traceback in the log. Triton's is a message's own limit."""
    x = np.arange(EXPAND_COLUMNS, dtype=np.float32).reshape(1, -1)
    before = metric(server, "edgerun_requests_total", model="expand", version="1",
                    transport="grpc", outcome="ok")
    y = client.infer("expand", [fp32_input(x)]).as_numpy("y")
    assert y.shape == (EXPAND_ROWS, EXPAND_COLUMNS) and y.nbytes > 64 << 20
    assert np.array_equal(y[0], x[0]) and np.array_equal(y[-1], x[0])
    assert metric(server, "edgerun_requests_total", model="expand", version="1",
                  transport="grpc", outcome="ok") == before + 1


def test_request_id_metadata_is_echoed_in_trailing_metadata(stub):
    request = typed_request("mlp", "x", "FP32", np.zeros((1, 8), np.float32))
    _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "trace-42")])
    assert ("x-request-id", "trace-42") in call.trailing_metadata()
    _, call = stub.ServerLive.with_call(pb.ServerLiveRequest())
    assert any(key == "x-request-id" for key, _ in call.trailing_metadata())


def test_same_model_answers_alike_over_http_and_grpc(server, client, stub):
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    over_grpc = client.infer("mlp", [fp32_input(x)])
    tensor = thttp.InferInput("x", [5, 8], "FP32")
    tensor.set_data_from_numpy(x)
    over_http = thttp.InferenceServerClient(server.address).infer("mlp", [tensor])
    typed = stub.ModelInfer(typed_request("mlp", "x", "FP32", x))
    np.testing.assert_array_equal(over_grpc.as_numpy("y"), over_http.as_numpy("y"))
    np.testing.assert_array_equal(typed_output(typed), over_http.as_numpy("y"))
    assert over_grpc.get_response().model_version == over_http.get_response()["model_version"]


def test_grpc_calls_are_counted_with_their_transport(server, client):
    labels = {"model": "mlp", "version": "1", "transport": "grpc"}
    ok, bad = (metric(server, "edgerun_requests_total", **labels, outcome=o)
               for o in ("ok", "invalid_input"))
    client.infer("mlp", [fp32_input(np.zeros((1, 8), np.float32))])
    refused(client.infer, "mlp", [fp32_input(np.zeros((1, 7), np.float32))])
    assert metric(server, "edgerun_requests_total", **labels, outcome="ok") == ok + 1
    assert metric(server, "edgerun_requests_total", **labels, outcome="invalid_input") == bad + 1


# --------------------------------------------------------------------------- errors
def test_bad_input_is_invalid_argument_naming_the_input(client, stub):
    wrong_type = tgrpc.InferInput("x", [1, 8], "BYTES")
    wrong_type.set_data_from_numpy(np.full((1, 8), b"one", dtype=object))
    wrong_shape = fp32_input(np.zeros((2, 7), np.float32))
    for inputs in ([wrong_type], [wrong_shape]):
        error = refused(client.infer, "mlp", inputs)
        assert code_of(error) == "StatusCode.INVALID_ARGUMENT" and "'x'" in error.message()
    error = refused(client.infer, "mlp", [fp32_input(np.zeros((1, 8), np.float32))],
                    outputs=[tgrpc.InferRequestedOutput("nope")])
    assert code_of(error) == "StatusCode.INVALID_ARGUMENT" and "'nope'" in error.message()
    error = refused(client.infer, "mlp", [fp32_input(np.zeros((1, 8), np.float32))],
                    outputs=[tgrpc.InferRequestedOutput("y", class_count=2)])
    assert code_of(error) == "StatusCode.INVALID_ARGUMENT"
    assert "'classification' is not supported" in error.message()

    short = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[b"\0" * 12])
    short.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    half = pb.ModelInferRequest(model_name="identity-fp16")
    half.inputs.add(name="x", datatype="FP16", shape=[1, 1]).contents.fp32_contents.append(1)
    few = typed_request("mlp", "x", "FP32", np.zeros(7, np.float32))
    few.inputs[0].shape[:] = [1, 8]
    huge = typed_request("mlp", "x", "FP32", np.zeros(0, np.float32))  # int64 product: 0
    huge.inputs[0].shape[:] = [2 ** 32, 2 ** 32]
    many = typed_request("mlp", "x", "FP32", np.zeros(1, np.float32))  # INTERNAL: str() of
    many.inputs[0].shape[:] = [2 ** 63 - 1] * 300  # an element count of 5,700 digits
    endless = typed_request("mlp", "x", "FP32", np.zeros(8, np.float32))
    endless.inputs[0].shape[:] = [1, 8]
    endless.parameters["timeout"].double_param = float("inf")
    for request, says in ((short, "32 bytes"), (half, "raw_input_contents"), (few, "8 elements"),
                          (huge, "18446744073709551616 elements"),
                          (many, "a shape of 300 dims cannot be held")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert "'x'" in caught.value.details() and says in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(endless)
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    assert "parameters.timeout must be a positive number" in caught.value.details()


def test_typed_data_in_another_contents_field_is_named(stub):
    """Values sent in a contents field the datatype does not take (int_contents for FP32, a
    natural slip) were refused as "data has 0 elements", as if none had been sent."""
    for datatype, given, values in (("FP32", "int_contents", [1] * 8),
                                    ("FP32", "fp64_contents", [0.5] * 8),
                                    ("INT64", "int_contents", [1] * 8)):
        request = pb.ModelInferRequest(model_name=f"identity-{datatype.lower()}")
        tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, 8])
        getattr(tensor.contents, given).extend(values)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            f"input 'x': {datatype} data go in contents.{CONTENTS[datatype]}; the request set "
            f"contents.{given}"), caught.value.details()
    empty = typed_request("identity-fp32", "x", "FP32", np.zeros(0, np.float32))
    empty.inputs[0].shape[:] = [1, 0]  # nothing sent, nothing needed: answered
    assert list(stub.ModelInfer(empty).outputs[0].shape) == [1, 0]


def test_a_big_bad_request_is_refused_and_counted_as_a_small_one(server, stub):
    """Big requests are decoded on the worker, small ones on the loop, both where the data
    plane decodes, after its hooks and routing: the same codes, the same counts."""
    labels = {"model": "identity-int8", "version": "1", "transport": "grpc",
              "outcome": "invalid_input"}
    refused_before = metric(server, "edgerun_requests_total", **labels)
    out_of_range = typed_request("identity-int8", "x", "INT8", np.zeros((1, 100_000), np.int8))
    out_of_range.inputs[0].contents.int_contents[70_000] = 300
    misshapen = typed_request("identity-int8", "x", "INT8", np.zeros((1, 100_000), np.int8))
    misshapen.inputs[0].shape[:] = [1, 99_999]
    for request in (out_of_range, misshapen):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert "'x'" in caught.value.details()
    assert metric(server, "edgerun_requests_total", **labels) == refused_before + 2
    out_of_range.model_name = "nope"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(out_of_range)
    assert caught.value.code() == StatusCode.NOT_FOUND


RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer")


def test_a_message_that_is_not_protobuf_is_invalid_argument_hooked_and_counted(server, client):
    """Bytes that do not parse as the RPC's message were deserialized by grpcio's handler
    before the servicer ran: UNKNOWN ("Unexpected DecodeError"), an ERROR traceback logged per
    message (log spam any client could cause), no request id, no count. Now the call reaches
    the data plane and is refused there, as HTTP refuses malformed JSON."""
    garbage = b"\xff" * 16  # field 0x1fffffff..., wire type 7: not protobuf
    logged = len(server.output())
    counted = {"model": "", "version": "", "transport": "grpc", "outcome": "invalid_input"}
    before = metric(server, "edgerun_requests_total", **counted)
    with grpc.insecure_channel(server.grpc_address) as channel:
        for name in RPCS:  # no serializers: the bytes go as they are
            rpc = channel.unary_unary(f"/inference.GRPCInferenceService/{name}")
            with pytest.raises(grpc.RpcError) as caught:
                rpc(garbage, metadata=[("x-request-id", f"garbage-{name}")])
            assert caught.value.code() == StatusCode.INVALID_ARGUMENT, (name, caught.value)
            assert caught.value.details() == (
                f"the request is not a valid inference.{name}Request message (16 bytes that "
                "do not parse as protobuf)"), caught.value.details()
            assert ("x-request-id", f"garbage-{name}") in caught.value.trailing_metadata()
        # an empty message is a valid one (every field at its default), as protobuf says
        assert channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"") == \
            pb.ServerLiveResponse(live=True).SerializeToString()
    assert metric(server, "edgerun_requests_total", **counted) == before + 1  # ModelInfer's
    x = np.ones((1, 8), np.float32)
    assert client.infer("mlp", [fp32_input(x)]).as_numpy("y").shape == (1, 4)
    output = server.output()[logged:]
    assert "Traceback" not in output and "ERROR" not in output, output


def test_a_big_request_is_parsed_only_once_the_hooks_let_its_call_through(tmp_path):
    """grpcio parsed every message before any hook ran: 48 MB of INT64 contents held the
    event loop 0.12 s, for a caller the hooks then refused. A big request is now read only for
    its model and version until the hooks and routing let it through."""
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    values = np.random.default_rng(2).integers(0, 1 << 40, (1, 6_000_000))
    typed = typed_request("mlp", "x", "INT64", values)
    raw = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[bytes(typed.ByteSize())])
    raw.inputs.add(name="x", datatype="INT64", shape=[1, typed.ByteSize() // 8])
    # the inputs field is not an InferInputTensor: only a full parse finds that out
    corrupt = b"".join((b"\x0a\x03mlp", b"\x2a\x10", b"\xff" * 16,
                        b"\x3a\x80\x80\x80\x01", bytes(1 << 21)))
    good = [("authorization", "Bearer good")]
    command = [sys.executable, "-m", "tests.grpc_hooked_server", str(root)]
    with running_process(command, log_dir=tmp_path, ready=False, grpc=True) as server, \
            grpc.insecure_channel(server.grpc_address,
                                  options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        wait_until(server, "/v2/models/mlp/ready")  # models load once both ports listen
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        ticks = {}
        for kind, request in (("raw", raw), ("typed", typed)):
            before = cpu_ticks(server.process.pid)[1]
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as caught:
                    infer(request)
                assert caught.value.code() == StatusCode.UNAUTHENTICATED
            ticks[kind] = cpu_ticks(server.process.pid)[1] - before
        # CPU ticks of 10 ms, the process's threads together: parsed before the hooks ran,
        # each typed request cost 11 to 13 ticks more than the raw one
        assert ticks["typed"] <= ticks["raw"] + 6, ticks
        # 16 MiB of two-byte fields: protobuf reads the model past them in 0.2 to 0.5 s, as its
        # full parse did; a scan of the fields in Python took 4.6 s
        tiny_fields = b"\x0a\x03mlp" + b"\x78\x00" * (8 << 20)
        before = cpu_ticks(server.process.pid)[1]
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(tiny_fields)
        assert caught.value.code() == StatusCode.UNAUTHENTICATED
        assert cpu_ticks(server.process.pid)[1] - before < 150
        # let through, it is parsed and refused for what it holds, as a small one is
        with pytest.raises(grpc.RpcError) as caught:
            infer(typed, metadata=good)
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert "'x'" in caught.value.details()
        typed.model_name = "nope"
        with pytest.raises(grpc.RpcError) as caught:
            infer(typed, metadata=good)
        assert caught.value.code() == StatusCode.NOT_FOUND
        bytes_rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            bytes_rpc(corrupt, metadata=good)
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            f"the request is not a valid inference.ModelInferRequest message ({len(corrupt)} "
            "bytes that do not parse as protobuf)"), caught.value.details()
        x = [fp32_input(np.ones((1, 8), np.float32))]
        assert tgrpc.InferenceServerClient(server.grpc_address).infer(
            "mlp", x, headers=dict(good)).as_numpy("y").shape == (1, 4)
    assert server.process.returncode == 0, server.output()


def test_unknown_model_or_version_is_not_found(client, stub):
    x = [fp32_input(np.zeros((1, 8), np.float32))]
    for model, version in (("nope", ""), ("mlp", "7")):
        error = refused(client.infer, model, x, model_version=version)
        assert code_of(error) == "StatusCode.NOT_FOUND", error
    with pytest.raises(grpc.RpcError) as caught:  # routed before its body is read, as on HTTP
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
    assert caught.value.code() == StatusCode.NOT_FOUND


def test_an_error_naming_a_long_name_keeps_its_status_code(stub):
    """The details travel as a trailer; past the client's 8 KiB metadata limit the client
    turned them into RESOURCE_EXHAUSTED."""
    x = typed_request("mlp", "x", "FP32", np.zeros(8, np.float32))
    x.inputs[0].shape[:] = [1, 8]
    x.model_name = "m" * 20_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(x)
    assert caught.value.code() == StatusCode.NOT_FOUND
    assert caught.value.details().startswith("model 'mmm")
    assert caught.value.details().endswith("more bytes cut)")


def test_backend_failure_is_internal_and_the_server_keeps_serving(client):
    index = tgrpc.InferInput("idx", [1], "INT64")
    index.set_data_from_numpy(np.array([42], np.int64))
    assert code_of(refused(client.infer, "lookup", [index])) == "StatusCode.INTERNAL"
    index.set_data_from_numpy(np.array([2], np.int64))
    np.testing.assert_array_equal(client.infer("lookup", [index]).as_numpy("rows"),
                                  [[6, 7, 8]])


def test_full_queue_is_unavailable(server):
    """slowq holds 2 queued requests for 1.5 s; the others are refused at once."""
    codes: list[str] = []

    def one() -> None:
        try:
            tgrpc.InferenceServerClient(server.grpc_address).infer(
                "slowq", [fp32_input(np.ones((1, 2), np.float32))])
            codes.append("OK")
        except InferenceServerException as exc:
            codes.append(code_of(exc))
    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == ["OK", "OK", *["StatusCode.UNAVAILABLE"] * 3], codes


def test_deadline_that_expires_while_queued(server, client):
    labels = {"model": "slowq", "version": "1", "transport": "grpc",
              "outcome": "deadline_exceeded"}
    before = metric(server, "edgerun_requests_total", **labels)
    x = [fp32_input(np.ones((1, 2), np.float32))]
    # the gRPC deadline: the queued request is dropped by the server, not only by the client
    error = refused(client.infer, "slowq", x, client_timeout=0.4)
    assert code_of(error) == "StatusCode.DEADLINE_EXCEEDED"
    # OIP's own timeout parameter (microseconds), well inside a longer gRPC deadline
    error = refused(client.infer, "slowq", x, timeout=200_000, client_timeout=10)
    assert code_of(error) == "StatusCode.DEADLINE_EXCEEDED"
    assert "past its deadline" in error.message()
    assert metric(server, "edgerun_requests_total", **labels) == before + 2


def test_canary_split_and_sticky_key_from_metadata(client):
    x = [fp32_input(np.ones((1, 8), np.float32))]
    versions = [client.infer("canary", x).get_response().model_version for _ in range(120)]
    assert 25 <= versions.count("1") <= 95, versions.count("1")
    pinned = {client.infer("canary", x, headers={"x-user-id": "alice"})
              .get_response().model_version for _ in range(15)}
    assert len(pinned) == 1
    spread = {client.infer("canary", x, headers={"x-user-id": f"user-{i}"})
              .get_response().model_version for i in range(40)}
    assert spread == {"1", "2"}
    named = client.infer("canary", x, model_version="2")
    assert named.get_response().model_version == "2"


# ------------------------------------------------------------------ hooks, readiness
def test_hooks_see_grpc_calls_and_a_loading_model_is_unavailable(tmp_path):
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    add_version(root, "slow", "1", identity_onnx("float32", ["b", 2]))
    command = [sys.executable, "-m", "tests.grpc_hooked_server", str(root)]
    with running_process(command, log_dir=tmp_path, ready=False, grpc=True) as server:
        client = tgrpc.InferenceServerClient(server.grpc_address)
        wait_until(server, "/v2/models/mlp/ready")  # models load once both ports listen
        good = {"authorization": "Bearer good"}
        for call in (client.is_server_live, client.get_server_metadata):
            assert code_of(refused(call)) == "StatusCode.UNAUTHENTICATED"
            assert code_of(refused(call, headers={"authorization": "Bearer bad"})) == \
                "StatusCode.PERMISSION_DENIED"
        x = [fp32_input(np.ones((1, 8), np.float32))]
        assert code_of(refused(client.infer, "mlp", x)) == "StatusCode.UNAUTHENTICATED"
        client.infer("mlp", x, headers=good)  # slow is held back
        assert not client.is_server_ready(headers=good)
        assert not client.is_model_ready("slow", headers=good)
        error = refused(client.infer, "slow", [fp32_input(np.ones((1, 2), np.float32))],
                        headers=good)
        assert code_of(error) == "StatusCode.UNAVAILABLE" and "loading" in error.message()
        (tmp_path / "slow.go").touch()
        for _ in range(200):
            if client.is_server_ready(headers=good):
                break
            threading.Event().wait(0.05)
        assert client.is_model_ready("slow", headers=good)
        client.infer("slow", [fp32_input(np.ones((1, 2), np.float32))], headers=good)
    assert server.process.returncode == 0, server.output()


def test_a_version_still_loading_beside_a_served_one_is_unavailable_on_both_transports(
        tmp_path):
    """A request naming version 2 while it loads for the first time (POST .../load, a poll)
    beside version 1 got 404 / NOT_FOUND, "no version 2", where a model still loading gets 503
    / UNAVAILABLE: a client took a version about to serve for one that never would. Triton
    answers UNAVAILABLE "version 2 is not at ready state"; a version never offered stays 404."""
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    command = [sys.executable, "-m", "tests.grpc_hooked_server", str(root)]
    with running_process(command, log_dir=tmp_path, grpc=True) as server:
        (tmp_path / "mlp-2.hold").touch()  # version 2 stays LOADING until this goes
        add_version(root, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
        loaded: list[int] = []
        loading = threading.Thread(target=lambda: loaded.append(httpx.post(
            server.url + "/v2/repository/models/mlp/load", timeout=120).status_code))
        loading.start()
        wait_for(lambda: {"name": "mlp", "version": "2", "state": "LOADING", "reason": ""} in
                 httpx.post(server.url + "/v2/repository/index").json(), 60, "mlp 2 loading")
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                            "data": [0.0] * 8}]}
        http = {v: httpx.post(f"{server.url}/v2/models/mlp/versions/{v}/infer", json=body)
                for v in ("1", "2", "3")}
        assert {v: r.status_code for v, r in http.items()} == {"1": 200, "2": 503, "3": 404}
        assert "version '2' is loading" in http["2"].json()["error"], http["2"].text
        assert httpx.get(f"{server.url}/v2/models/mlp/versions/2/ready").status_code == 503
        client = tgrpc.InferenceServerClient(server.grpc_address)
        good = {"authorization": "Bearer good"}
        x = [fp32_input(np.zeros((1, 8), np.float32))]
        error = refused(client.infer, "mlp", x, model_version="2", headers=good)
        assert code_of(error) == "StatusCode.UNAVAILABLE", error
        assert "version '2' is loading" in error.message()
        error = refused(client.infer, "mlp", x, model_version="3", headers=good)
        assert code_of(error) == "StatusCode.NOT_FOUND", error
        assert not client.is_model_ready("mlp", "2", headers=good)
        assert client.infer("mlp", x, model_version="1", headers=good) \
            .get_response().model_version == "1"
        (tmp_path / "mlp-2.hold").unlink()
        loading.join(120)
        assert loaded == [200]
        assert client.infer("mlp", x, model_version="2", headers=good) \
            .get_response().model_version == "2"
    assert server.process.returncode == 0, server.output()


# ---------------------------------------------------------------------------- stubs
def test_committed_stubs_are_what_generate_sh_makes(tmp_path):
    subprocess.run(["bash", str(ROOT / "adapters" / "grpc" / "generate.sh"), str(tmp_path)],
                   check=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi",
                 "grpc_predict_v2_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, ROOT / "adapters" / "grpc" / name, shallow=False), \
            f"{name} is stale: run adapters/grpc/generate.sh"


PARITY_PROBE = """
import grpc
from edgerun.adapters.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as gen
from edgerun.adapters.grpc.servicer import InferenceServicer, Undecodable, add_to_server

class Recorder:  # records what is registered, as grpc.aio.Server would be asked
    def __init__(self):
        self.calls = []
    def add_generic_rpc_handlers(self, handlers):
        self.calls.append(("generic", tuple(h.service_name() for h in handlers)))
    def add_registered_method_handlers(self, service, handlers):
        self.calls.append(("registered", service, dict(handlers)))

generated, ours = Recorder(), Recorder()
gen.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(None), generated)
add_to_server(ours, None)
assert [c[:2] for c in ours.calls] == [c[:2] for c in generated.calls], ours.calls
theirs, mine = generated.calls[1][2], ours.calls[1][2]
assert list(mine) == list(theirs), (list(mine), list(theirs))
for name, handler in mine.items():
    model = theirs[name]
    assert (handler.request_streaming, handler.response_streaming) == (False, False)
    assert handler.response_serializer == model.response_serializer, name
    message = model.request_deserializer(b"")
    message = type(message)(**({"model_name": "m", "id": "7"} if name == "ModelInfer" else {}))
    wire = message.SerializeToString()
    assert handler.request_deserializer(wire) == model.request_deserializer(wire), name
    assert isinstance(handler.request_deserializer(b"\\xff" * 4), Undecodable), name
print("ok", grpc.__version__, sorted(mine))
"""


def test_the_service_is_registered_as_the_generated_code_registers_it():
    """`add_to_server` registers the handlers itself (to deserialize leniently): the same RPCs,
    serializers and registration calls (generic handler, then registered methods) as the
    generated `add_GRPCInferenceServiceServicer_to_server`, with this venv's grpcio. In a child
    process: this one holds tritonclient's `inference` messages."""
    result = subprocess.run([sys.executable, "-c", PARITY_PROBE], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok "), result.stdout


def test_sigterm_answers_a_queued_grpc_request_then_exits_cleanly(tmp_path):
    root = tmp_path / "models"
    add_version(root, "slowq", "1", identity_onnx("float32", ["b", 2]))
    (root / "slowq" / "config.toml").write_text(SLOW_QUEUE)
    answers = []
    with running_server(root, grpc=True) as server:
        client = tgrpc.InferenceServerClient(server.grpc_address)
        waiting = threading.Thread(target=lambda: answers.append(client.infer(
            "slowq", [fp32_input(np.ones((1, 2), np.float32))]).as_numpy("y")))
        waiting.start()
        threading.Event().wait(0.3)  # queued, waiting out the 1.5 s batching delay
        server.process.send_signal(signal.SIGTERM)
        waiting.join()
        assert server.process.wait(30) == 0, server.output()
    assert len(answers) == 1 and answers[0].tolist() == [[1.0, 1.0]]


def test_the_grpc_adapter_imports_no_web_framework():
    probe = ("import sys, edgerun.adapters.grpc.server; "
             "print(sorted({'fastapi', 'starlette', 'uvicorn', 'pydantic'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
