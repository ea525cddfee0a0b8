"""The Lambda adapter: real event shapes through the handler, batches, destinations, init, and
the container entry point (`python -m awslambdaric`) against a Runtime API served on loopback."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import onnxruntime as ort
import pytest
from botocore.awsrequest import AWSResponse
from botocore.stub import ANY, Stubber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.adapters.aws_lambda.destinations import (S3Destination, SqsDestination,
                                                      destination_from)
from edgerun.adapters.aws_lambda.environment import from_environment, vcpus_for
from edgerun.adapters.aws_lambda.handler import (MAX_PAYLOAD_BYTES, STREAM_WINDOW,
                                                 LambdaHandler)
from edgerun.adapters.aws_lambda.model_location import cached_download, locate
from edgerun.adapters.dataplane import Call, Hook
from edgerun.examples import mlp_onnx
from edgerun.runtime import create_bundle
from edgerun.runtime.bundle import MANIFEST, sha256_file
from edgerun.runtime.errors import (BundleError, EdgerunError, InvalidInput, ModelNotFound,
                                    Overloaded, PayloadTooLarge)
from edgerun.runtime.sources import BundleSource
from tests.lambda_runtime_api import RuntimeAPI
from tests.staging_peer import held_elsewhere

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).with_name("fixtures") / "lambda"
FUNCTION = ROOT / "functions" / "inference"
HEAVY = ("fastapi", "starlette", "pydantic", "uvicorn", "flask", "onnx", "tvm", "tflite_runtime",
         "ai_edge_litert", "boto3")


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def infer_body(rows: np.ndarray, name: str = "x", **extra) -> str:
    return json.dumps({**extra, "inputs": [{"name": name, "datatype": "FP32",
                                            "shape": list(rows.shape),
                                            "data": rows.ravel().tolist()}]})


class Context:
    """The fields of Lambda's context object the handler reads."""

    function_name = "edgerun-inference"
    memory_limit_in_mb = 2048
    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lambda")
    source = work / "mlp.onnx"
    source.write_bytes(mlp_onnx([8, 16, 4]))
    create_bundle(source, work / "mlp", name="mlp", version="3")
    return work / "mlp"


@pytest.fixture(scope="module")
def bundle_archive(bundle_dir) -> Path:
    from edgerun.runtime import Bundle
    with Bundle.open(bundle_dir) as bundle:
        return bundle.pack(bundle_dir.with_name("mlp-3.tar.gz"))


@pytest.fixture(scope="module")
def handler(bundle_archive, tmp_path_factory) -> LambdaHandler:
    handler = from_environment({"EDGERUN_MODEL": str(bundle_archive),
                                "EDGERUN_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
                                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008"})
    yield handler
    handler.plane.repository.close()


@pytest.fixture(scope="module")
def reference(bundle_dir):
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda rows: session.run(["y"], {"x": rows})[0]


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def outputs(body: str | bytes) -> np.ndarray:
    answer = json.loads(body)
    (output,) = answer["outputs"]
    return np.array(output["data"], np.float32).reshape(output["shape"])


def http_event(name: str, body: str | bytes, method: str = "POST",
               path: str = "/v2/models/mlp/infer") -> dict:
    event = fixture(name)
    raw = body.encode() if isinstance(body, str) else body
    if event.get("isBase64Encoded"):
        event["body"] = base64.b64encode(raw).decode()
    else:
        event["body"] = raw.decode()
    if "rawPath" in event:
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["headers"]["content-length"] = str(len(raw))
    else:
        event["path"] = path
        event["httpMethod"] = method
    return event


# ------------------------------------------------------------------------------------- HTTP
@pytest.mark.parametrize("name", ["apigw_v1", "apigw_v2", "function_url", "alb"])
def test_http_events_answer_oip_inference(handler, reference, name):
    x = rows(3, seed=len(name))
    answer = handler(http_event(name, infer_body(x)), Context())
    assert answer["statusCode"] == 200
    body = base64.b64decode(answer["body"]) if answer.get("isBase64Encoded") else answer["body"]
    assert json.loads(body)["model_version"] == "3"
    np.testing.assert_allclose(outputs(body), reference(x), rtol=1e-5, atol=1e-6)
    headers = answer.get("headers") or {k: v[-1] for k, v in answer["multiValueHeaders"].items()}
    assert headers["x-request-id"] == f"{name.replace('_', '-')}-request"


def test_rest_api_behind_a_custom_domains_base_path_is_routed(handler, reference):
    """Through a custom domain with the base path mapping `ml`, API Gateway's REST event has
    `path` /ml/v2/models/mlp/infer (the `{proxy+}` parameter holds the API's own path): it
    was answered 404, no route."""
    x = rows(2, seed=11)
    event = http_event("apigw_v1", infer_body(x), path="/ml/v2/models/mlp/infer")
    event["requestContext"]["path"] = "/ml/v2/models/mlp/infer"
    event["requestContext"]["domainName"] = event["headers"]["Host"] = "api.example.com"
    event["multiValueHeaders"]["Host"] = ["api.example.com"]
    answer = handler(event, Context())
    assert answer["statusCode"] == 200, answer["body"]
    np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5, atol=1e-6)
    event = http_event("apigw_v1", "", "GET", "/ml/v2/health/ready")
    event["pathParameters"] = {"proxy": "v2/health/ready"}
    assert handler(event, Context())["statusCode"] == 200


def http_api_on_stage(stage: str, body: str, method: str = "POST",
                      path: str = "/v2/models/mlp/infer", domain: str | None = None) -> dict:
    """An HTTP API (payload 2.0) event for a request to a named stage: at the API's own
    endpoint, https://API_ID.execute-api.REGION.amazonaws.com/STAGE/..., API Gateway keeps the
    stage in front of `rawPath` and `requestContext.http.path`; through a custom domain the
    stage is not in the path."""
    event = http_event("apigw_v2", body, method,
                       path if domain else f"/{stage}{path}")
    event["requestContext"]["stage"] = stage
    if domain:
        event["requestContext"]["domainName"] = event["headers"]["host"] = domain
        event["requestContext"]["domainPrefix"] = domain.split(".")[0]
    return event


@pytest.mark.parametrize("stage", ["prod", "v2"])
def test_http_api_on_a_named_stage_is_routed(handler, reference, stage):
    """Deployed to a stage other than $default, the HTTP API's event has `rawPath`
    /prod/v2/models/mlp/infer: no route matched it, and every request was answered 404."""
    x = rows(2, seed=12)
    event = http_api_on_stage(stage, infer_body(x))
    assert event["rawPath"] == event["requestContext"]["http"]["path"] == \
        f"/{stage}/v2/models/mlp/infer"
    answer = handler(event, Context())
    assert answer["statusCode"] == 200, answer["body"]
    np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5, atol=1e-6)
    ready = handler(http_api_on_stage(stage, "", "GET", "/v2/health/ready"), Context())
    assert ready["statusCode"] == 200, ready["body"]
    unknown = handler(http_api_on_stage(stage, "", "GET", "/v2/nothing"), Context())
    assert unknown["statusCode"] == 404
    # through a custom domain the path has no stage, even one named like a route's start
    answer = handler(http_api_on_stage(stage, infer_body(x), domain="api.example.com"),
                     Context())
    assert answer["statusCode"] == 200, answer["body"]
    # the same API on its $default stage and a Function URL are served as they were
    assert handler(http_event("apigw_v2", infer_body(x)), Context())["statusCode"] == 200
    assert handler(http_event("function_url", infer_body(x)), Context())["statusCode"] == 200


def test_http_api_payload_1_on_a_named_stage_is_routed(handler, reference):
    """An HTTP API integration may ask for payload format 1.0: then `path` has the stage in
    front, and the $default route gives no {proxy+} parameter to take the path from."""
    x = rows(1, seed=13)
    event = http_event("apigw_v1", infer_body(x), path="/prod/v2/models/mlp/infer")
    event.update({"version": "1.0", "resource": "$default", "pathParameters": None})
    event["requestContext"].update({"stage": "prod", "resourcePath": "$default",
                                    "path": "/prod/v2/models/mlp/infer"})
    answer = handler(event, Context())
    assert answer["statusCode"] == 200, answer["body"]
    np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["models", "ml/v1", "v2"])
def test_http_api_behind_a_custom_domains_api_mapping_is_routed(handler, reference, key):
    """Through a custom domain's API mapping (https://api.example.com/models/v2/... with the
    key `models`), the HTTP API's event has the key in front of `rawPath` and
    `requestContext.http.path` (payload 2.0) or `path` (1.0), and no field naming it: every
    request was answered 404. The key is configured; it is never guessed."""
    x = rows(2, seed=14)
    mapped = LambdaHandler(handler.plane, default_model="mlp", base_path=f"/{key}/")
    event = http_api_on_stage("prod", infer_body(x), path=f"/{key}/v2/models/mlp/infer",
                              domain="api.example.com")
    assert event["rawPath"] == event["requestContext"]["http"]["path"] == \
        f"/{key}/v2/models/mlp/infer"
    answer = mapped(event, Context())
    assert answer["statusCode"] == 200, answer["body"]
    np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5, atol=1e-6)
    ready = mapped(http_api_on_stage("prod", "", "GET", f"/{key}/v2/health/ready",
                                     domain="api.example.com"), Context())
    assert ready["statusCode"] == 200, ready["body"]
    legacy = http_event("apigw_v1", infer_body(x), path=f"/{key}/v2/models/mlp/infer")
    legacy.update({"version": "1.0", "resource": "$default", "pathParameters": None})
    answer = mapped(legacy, Context())
    assert answer["statusCode"] == 200, answer["body"]
    # the API's own endpoint and a named stage are served as they were
    assert mapped(http_event("apigw_v2", infer_body(x)), Context())["statusCode"] == 200
    assert mapped(http_api_on_stage("prod", infer_body(x)), Context())["statusCode"] == 200
    # another prefix is not taken off, and what follows the key must be a route
    for path in ("/other/v2/models/mlp/infer", f"/{key}/other/v2/models/mlp/infer"):
        unknown = mapped(http_api_on_stage("prod", infer_body(x), path=path,
                                           domain="api.example.com"), Context())
        assert unknown["statusCode"] == 404, path


def test_edgerun_base_path_configures_the_api_mapping_key(bundle_archive, tmp_path):
    """The function reads the key from EDGERUN_BASE_PATH, which the template sets."""
    from samtranslator.yaml_helper import yaml_parse

    mapped = from_environment({"EDGERUN_MODEL": str(bundle_archive),
                               "EDGERUN_CACHE_DIR": str(tmp_path),
                               "EDGERUN_BASE_PATH": "models"})
    try:
        event = http_api_on_stage("$default", "", "GET", "/models/v2/health/ready",
                                  domain="api.example.com")
        assert mapped(event, Context())["statusCode"] == 200
    finally:
        mapped.plane.repository.close()
    template = yaml_parse((ROOT / "template.yaml").read_text())
    function = template["Resources"]["InferenceFunction"]["Properties"]
    assert function["Environment"]["Variables"]["EDGERUN_BASE_PATH"] == {"Ref": "BasePath"}
    assert template["Parameters"]["BasePath"]["Default"] == ""


def test_http_routes_and_errors_match_the_fleet_server(handler):
    ready = handler(http_event("apigw_v2", "", "GET", "/v2/health/ready"), Context())
    assert (ready["statusCode"], json.loads(ready["body"])) == (200, {"ready": True})
    metadata = handler(http_event("apigw_v2", "", "GET", "/v2/models/mlp"), Context())
    assert metadata["statusCode"] == 200
    assert json.loads(metadata["body"])["inputs"][0]["shape"] == [-1, 8]
    predict = handler(http_event("apigw_v1", json.dumps({"instances": rows(2).tolist()}),
                                 path="/v1/models/mlp:predict"), Context())
    assert predict["statusCode"] == 200 and len(json.loads(predict["body"])["predictions"]) == 2
    wrong = handler(http_event("apigw_v2", infer_body(rows(1), name="z")), Context())
    assert wrong["statusCode"] == 400 and "'z'" in json.loads(wrong["body"])["error"]
    unknown = handler(http_event("apigw_v2", infer_body(rows(1)),
                                 path="/v2/models/nope/infer"), Context())
    assert unknown["statusCode"] == 404
    method = handler(http_event("alb", "", "GET", "/v2/models/mlp/infer"), Context())
    assert method["statusCode"] == 405


def test_no_caller_can_unload_the_functions_model(handler, reference):
    for action in ("unload", "load"):
        refused = handler(http_event("apigw_v2", "", path=f"/v2/repository/models/mlp/{action}"),
                          Context())
        assert refused["statusCode"] == 404, refused
    x = rows(1)
    answer = handler(http_event("apigw_v2", infer_body(x)), Context())
    assert answer["statusCode"] == 200
    np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5, atol=1e-6)


def test_a_body_over_6_mb_gets_413(handler):
    body = infer_body(rows(1)) + " " * (MAX_PAYLOAD_BYTES - len(infer_body(rows(1))) + 1)
    answer = handler(http_event("apigw_v2", body), Context())
    assert answer["statusCode"] == 413
    assert "limit" in json.loads(answer["body"])["error"]
    just_under = infer_body(rows(1)) + " " * 1000
    assert handler(http_event("apigw_v2", just_under), Context())["statusCode"] == 200


def as_multi_value(event: dict) -> dict:
    """An ALB event as a target group with multi-value headers sends it."""
    event["multiValueHeaders"] = {name: [value] for name, value in event.pop("headers").items()}
    event["multiValueQueryStringParameters"] = {}
    return event


def answer_headers(answer: dict) -> dict:
    return answer.get("headers") or {k: v[-1] for k, v in answer["multiValueHeaders"].items()}


# (event source, a well-formed event's change, how it is spoiled, what the 400 names)
MALFORMED_HTTP = [
    ("apigw_v2", None, lambda e: e["headers"].update({"x-trace": 5}),
     "headers['x-trace'] is int, not a string"),
    ("apigw_v1", None, lambda e: e["headers"].update({"X-Trace": ["a", "b"]}),
     "headers['X-Trace'] is list, not a string"),
    ("apigw_v1", None, lambda e: e.update(requestContext="prod"),
     "requestContext of an HTTP event is not an object"),
    ("apigw_v2", None, lambda e: e.update(requestContext=[]),
     "requestContext of an HTTP event is not an object"),
    ("alb", None, lambda e: e.update(requestContext=7),
     "requestContext of an HTTP event is not an object"),
    ("function_url", None, lambda e: e.update(body="not base64 at all!"),
     "body is not base64, as isBase64Encoded says"),
    ("apigw_v2", None, lambda e: e.update(isBase64Encoded=True, body="{\"inputs\": []}"),
     "body is not base64"),
    ("apigw_v2", None, lambda e: e.update(body={"inputs": []}), "body is dict, not a string"),
    ("apigw_v1", None, lambda e: e.update(body='{"id": "\ud800"}'), "body is not valid Unicode"),
    ("alb", None, lambda e: e["headers"].update(host="h:"), "port '' is not a number"),
    ("alb", None, lambda e: e["headers"].update(host="::1:80"), "'::1:80' is not NAME:PORT"),
    ("apigw_v2", None, lambda e: e["headers"].update(host="[::1"), "'[::1' is not NAME:PORT"),
    ("apigw_v2", None, lambda e: e["headers"].update(host="[::g]:80"),
     "'[::g]:80' is not NAME:PORT"),
    ("function_url", None, lambda e: e["headers"].update(host="[::1]:x"),
     "port 'x' is not a number"),
    ("alb", None, lambda e: e["headers"].update(host="[::1]80"), "'[::1]80' is not NAME:PORT"),
    ("apigw_v2", None, lambda e: e["headers"].update({"x-forwarded-port": "https"}),
     "port 'https' is not a number"),
    ("apigw_v1", None, lambda e: e["multiValueHeaders"].update(Accept="application/json"),
     "multiValueHeaders['Accept'] is str, not a list of strings"),
    ("apigw_v1", None, lambda e: e["multiValueHeaders"].update(Accept=[None]),
     "multiValueHeaders['Accept'][0] is NoneType, not a string"),
    ("alb", as_multi_value, lambda e: e.update(multiValueHeaders=["accept"]),
     "multiValueHeaders is list, not an object"),
    ("alb", as_multi_value, lambda e: e["multiValueHeaders"].update(accept=3),
     "multiValueHeaders['accept'] is int, not a list of strings"),
    ("alb", as_multi_value, lambda e: e.update(multiValueQueryStringParameters="a=1"),
     "multiValueQueryStringParameters is str, not an object"),
    ("apigw_v2", None, lambda e: e.pop("version"), "the HTTP event names no source"),
    ("apigw_v2", None, lambda e: e["requestContext"].update(http=None),
     "requestContext.http of an HTTP API (payload 2.0) event is not an object"),
    ("function_url", None, lambda e: e.update(rawQueryString=None),
     "rawQueryString is NoneType, not a string"),
    ("alb", None, lambda e: e.update(httpMethod=None), "httpMethod is NoneType, not a string"),
]


@pytest.mark.parametrize("name, prepare, spoil, named", MALFORMED_HTTP,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(MALFORMED_HTTP)])
def test_a_malformed_http_event_is_a_400_naming_what_is_wrong(handler, name, prepare, spoil,
                                                             named):
    """API Gateway, Function URLs and ALBs never send these, but hand invocations, test events,
    custom integrations and forwarded events do: Mangum raised a bare TypeError, AttributeError
    or ValueError building the request from them, and the invoker got Lambda's unhandled error
    with nothing naming the field. The answer is a 400 in the shape the event's source expects
    (the same fields as a well-formed event's answer), the JSON error naming the field, with
    the caller's X-Request-Id, and Lambda's runtime client can write it."""
    from awslambdaric.lambda_runtime_marshaller import to_json

    event = http_event(name, infer_body(rows(1)))
    if prepare is not None:
        event = prepare(event)
    good = handler(json.loads(json.dumps(event)), Context())
    assert good["statusCode"] == 200
    spoil(event)
    answer = handler(event, Context())
    assert answer["statusCode"] == 400, answer
    assert named in json.loads(answer["body"])["error"]
    assert set(answer) == set(good)
    headers = answer_headers(answer)
    assert headers["content-type"] == "application/json"
    if isinstance(event.get("headers") or event.get("multiValueHeaders"), dict):
        assert headers["x-request-id"] == f"{name.replace('_', '-')}-request"
    else:  # no header is left to give one: a new id, as the data plane makes
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert json.loads(to_json(answer))["statusCode"] == 400


class HostSeen(Hook):
    """Records the Host header each call's hooks see."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def before(self, call: Call) -> None:
        self.seen.append(call.attributes("host"))


def with_host(event: dict, host: str) -> dict:
    """The event with its Host header (each of its values) set to `host`."""
    for field in ("headers", "multiValueHeaders"):
        for name in event.get(field) or {}:
            if name.lower() == "host":
                event[field][name] = [host] if field == "multiValueHeaders" else host
    return event


@pytest.mark.parametrize("name, prepare", [("function_url", None), ("apigw_v2", None),
                                           ("apigw_v1", None), ("alb", None),
                                           ("alb", as_multi_value)])
@pytest.mark.parametrize("host", ["[::1]:8443", "[2001:db8::1]"])
def test_an_http_event_whose_host_is_an_ipv6_address_is_answered(handler, reference, name,
                                                                 prepare, host):
    """Mangum reads the server from the Host header split at its colons, so an IPv6 literal
    ([::1]:8443) made it raise ValueError, and the event was refused as malformed: it is
    answered, and the hooks see the Host header as sent."""
    x = rows(2)
    event = http_event(name, infer_body(x))
    event = with_host(prepare(event) if prepare is not None else event, host)
    seen = HostSeen()
    hooks = handler.plane.hooks.hooks
    handler.plane.hooks.add(seen)
    try:
        answer = handler(event, Context())
    finally:
        handler.plane.hooks.hooks = hooks
    assert answer["statusCode"] == 200, answer
    body = base64.b64decode(answer["body"]) if answer.get("isBase64Encoded") else answer["body"]
    np.testing.assert_allclose(outputs(body), reference(x), rtol=1e-5, atol=1e-6)
    assert answer_headers(answer)["x-request-id"] == f"{name.replace('_', '-')}-request"
    assert seen.seen == [host]


def test_an_error_inside_edgerun_on_a_well_formed_event_is_not_called_bad_input(handler):
    """The check is of the event, before Mangum: a failure while answering a well-formed event
    (a TypeError, as Mangum's own were) is still the internal error it is, not a 400."""

    class Broken:
        def __init__(self, plane) -> None:
            self.plane = plane

        def __getattr__(self, name: str):
            return getattr(self.plane, name)

        async def handle_async(self, call, body=None):
            raise TypeError("a bug in the data plane")

    broken = LambdaHandler(Broken(handler.plane), default_model="mlp")
    answer = broken(http_event("apigw_v2", infer_body(rows(1))), Context())
    assert answer["statusCode"] == 500


@pytest.fixture(scope="module")
def wide_handler(tmp_path_factory) -> LambdaHandler:
    """A model whose answer is 32 times its request: 8 numbers in, 256 out a row."""
    work = tmp_path_factory.mktemp("wide")
    (work / "wide.onnx").write_bytes(mlp_onnx([8, 256]))
    create_bundle(work / "wide.onnx", work / "mlp", name="mlp", version="1")
    handler = from_environment({"EDGERUN_MODEL": str(work / "mlp")})
    yield handler
    handler.plane.repository.close()


@pytest.mark.parametrize("name, limit", [("apigw_v1", 6 * 1024 * 1024),
                                         ("apigw_v2", 6 * 1024 * 1024),
                                         ("function_url", 6 * 1024 * 1024),
                                         ("alb", 1_000_000)])
def test_an_answer_too_large_for_lambda_is_a_413_not_a_502(wide_handler, name, limit):
    """Lambda returns at most 6 MB from a synchronous invocation and an ALB takes 1 MB from a
    Lambda target; a larger answer (a 0.5 MB request here) was handed on, refused by Lambda,
    and the caller got a bare 502 without its request id, at every retry."""
    for n, fits in ((300, True), (3000, False)):
        answer = wide_handler(http_event(name, infer_body(rows(n))), Context())
        assert len(json.dumps(answer)) <= limit
        assert answer["statusCode"] == (200 if fits else 413), answer["statusCode"]
    body = base64.b64decode(answer["body"]) if answer.get("isBase64Encoded") else answer["body"]
    assert f"{limit}-byte limit" in json.loads(body)["error"]
    headers = answer.get("headers") or {k: v[-1] for k, v in answer["multiValueHeaders"].items()}
    assert headers["x-request-id"] == f"{name.replace('_', '-')}-request"
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name, limit", [("apigw_v1", 6 * 1024 * 1024),
                                         ("apigw_v2", 6 * 1024 * 1024),
                                         ("function_url", 6 * 1024 * 1024),
                                         ("alb", 1_000_000)])
def test_an_answer_that_just_fits_lambdas_limit_is_answered(wide_handler, name, limit, binary):
    """The answer's size was estimated with about 850 bytes to spare (headers counted twice
    for every event, and a 1 KB envelope): an answer within that margin of the limit, which
    Lambda would have passed on, was refused with a 413. The answer is measured as the Lambda
    runtime interface client writes it (`to_json`); one byte (a base64 quantum) more is the
    413. The request's `id`, echoed in the answer, moves its size a byte at a time."""
    from awslambdaric.lambda_runtime_marshaller import to_json

    extra = {"outputs": [{"name": "y", "parameters": {"binary_data": True}}]} if binary else {}

    def answer(n: int, request_id: str) -> tuple[int, int]:
        got = wide_handler(http_event(name, infer_body(rows(n), id=request_id, **extra)),
                           Context())
        return got["statusCode"], len(to_json(got).encode())

    status, small = answer(100, "p")
    assert status == 200
    n = 100 * (limit - 20_000) // small  # an answer some 20 KB under the limit
    status, probe = answer(n, "p")
    assert status == 200 and 0 < limit - probe < 100_000, probe
    # the id's characters the answer takes up to the limit: 4 bytes of base64 for 3 of them
    step, quantum = (3, 4) if binary else (1, 1)
    pad = 1 + (limit - probe - quantum) // quantum * step
    status, size = answer(n, "p" * pad)
    assert status == 200, f"an answer that fits the {limit}-byte limit was refused"
    for _ in range(3):  # a step or two more for base64's rounding, then the 413
        status, more = answer(n, "p" * (pad + step))
        if status != 200:
            break
        pad, size = pad + step, more
    assert status == 413 and limit - quantum < size <= limit, (status, size)


class Outcomes(Hook):
    """Records what the hooks' after-step sees of each call: its error's kind, or ok."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def after(self, call: Call, error: EdgerunError | None) -> None:
        self.seen.append("ok" if error is None else error.kind)


def requests_counted(handler: LambdaHandler, outcome: str, transport: str = "lambda") -> float:
    """edgerun_requests_total of model mlp (version 1) over `transport` (Lambda HTTP events
    unless named) with `outcome`, as the function's own /metrics route shows it."""
    text = handler(http_event("apigw_v2", "", "GET", "/metrics"), Context())["body"]
    labels = f'model="mlp",version="1",transport="{transport}",outcome="{outcome}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edgerun_requests_total{") and labels in line)


def test_a_direct_answer_too_large_for_lambda_is_a_payload_too_large(wide_handler):
    """A direct invocation's answer was returned unmeasured: one over Lambda's 6 MB came to
    the invoker as Lambda's bare ResponseSizeTooLarge, counted `ok`. It is now the call's
    PayloadTooLarge naming the size and the limit, counted so; one that fits is answered."""
    from awslambdaric.lambda_runtime_marshaller import to_json

    ok, too_large = (requests_counted(wide_handler, outcome, "lambda")
                     for outcome in ("ok", "payload_too_large"))
    fits = wide_handler(json.loads(infer_body(rows(1000))), Context())
    assert len(to_json(fits).encode()) < 6 * 1024 * 1024
    with pytest.raises(PayloadTooLarge, match=r"answer of \d+ bytes is over the 6291456-byte"):
        wide_handler(json.loads(infer_body(rows(3000))), Context())
    assert requests_counted(wide_handler, "ok", "lambda") == ok + 1
    assert requests_counted(wide_handler, "payload_too_large", "lambda") == too_large + 1


@pytest.mark.parametrize("name", ["apigw_v2", "alb"])
def test_an_answer_too_large_for_lambda_is_counted_as_the_413_it_is(wide_handler, name):
    """The answer was checked against Lambda's limit after the data plane had counted it `ok`
    and its hooks had seen it succeed: the metrics and an audit hook said ok while the caller
    got a 413. Now both see payload_too_large, the kind the 413 maps to."""
    outcomes = Outcomes()
    hooks = wide_handler.plane.hooks.hooks
    wide_handler.plane.hooks.add(outcomes)
    try:
        ok, too_large = (requests_counted(wide_handler, kind)
                         for kind in ("ok", "payload_too_large"))
        answer = wide_handler(http_event(name, infer_body(rows(3000))), Context())
        assert answer["statusCode"] == 413
        body = base64.b64decode(answer["body"]) if answer.get("isBase64Encoded") \
            else answer["body"]
        assert "-byte limit on what this function can answer" in json.loads(body)["error"]
        assert outcomes.seen[-1] == "payload_too_large"
        assert requests_counted(wide_handler, "payload_too_large") == too_large + 1
        assert requests_counted(wide_handler, "ok") == ok
    finally:
        wide_handler.plane.hooks.hooks = hooks


# ---------------------------------------------------------------------------------- batches
class BusyPlane:
    """The handler's data plane, but for the model `busy`, which is overloaded: an error a
    retry may fix, which an ordered batch reports (bad input it acknowledges)."""

    def __init__(self, plane) -> None:
        self.plane = plane

    def __getattr__(self, name: str):
        return getattr(self.plane, name)

    async def infer_async(self, call, request, encode=None):
        if call.model == "busy":
            raise Overloaded("the queue is full")
        return await self.plane.infer_async(call, request, encode)


def busy_handler(handler: LambdaHandler, **options) -> LambdaHandler:
    return LambdaHandler(BusyPlane(handler.plane), default_model="mlp", **options)


def sqs_event(bodies: list[str], attributes: dict[int, dict] | None = None) -> dict:
    template = fixture("sqs")["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        record = json.loads(json.dumps(template))
        record["messageId"] = f"message-{i}"
        record["body"] = body
        record["messageAttributes"] = (attributes or {}).get(i, {})
        records.append(record)
    return {"Records": records}


def string_attribute(value: str) -> dict:
    return {"stringValue": value, "stringListValues": [], "binaryListValues": [],
            "dataType": "String"}


def test_sqs_fixture_reports_only_its_bad_record(handler):
    """A standard queue's bad message is reported too: its redrive policy moves it to the
    dead-letter queue after its receives, the body kept there (acknowledged, it was lost)."""
    event = fixture("sqs")
    event["Records"][0]["body"] = infer_body(rows(1))
    event["Records"][1]["body"] = "{not json"
    assert handler(event, Context()) == {"batchItemFailures": [
        {"itemIdentifier": "2e1424d4-f796-459a-8184-9c92662be6da"}]}


GOOD_BODY = infer_body(rows(1))
#: What an SQS body may be in a hand-written or forwarded event: any text, a lone surrogate
#: (the event's JSON carries "\\ud800"), NUL, numbers past 64 bits, OIP with the wrong shapes.
ODD_BODIES = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=30),
    st.sampled_from(["", "\ud800", '{"inputs": "\udfff"}', "\x00", "null", "[]", "1e999",
                     '{"model_name": 5, "inputs": []}', '{"model_name": "\ud800"}',
                     json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                             "data": [2 ** 70] * 8}]})]),
    st.builds(lambda at, odd: GOOD_BODY[:at] + odd + GOOD_BODY[at:], st.integers(0, 120),
              st.sampled_from(["\ud800", "\x00", "\\"])))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(st.none(), ODD_BODIES), min_size=1, max_size=5))
def test_any_sqs_body_fails_its_own_record_alone(handler, bodies):
    """Whatever a record's body holds, the batch answers, naming only records that failed and
    never a good one (None here). A body with a lone surrogate raised UnicodeEncodeError out
    of the handler: the whole batch failed, good records with it, at every receive."""
    event = sqs_event([GOOD_BODY if body is None else body for body in bodies])
    failed = {item["itemIdentifier"] for item in handler(event, Context())["batchItemFailures"]}
    assert failed <= {f"message-{i}" for i, body in enumerate(bodies) if body is not None}


def test_an_sqs_body_with_a_lone_surrogate_is_its_records_invalid_input(handler, caplog):
    event = sqs_event([infer_body(rows(1)), '{"id": "\ud800", "inputs": []}'])
    assert handler(event, Context()) == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    (line,) = [json.loads(r.message) for r in caplog.records if "record failed" in r.message]
    assert line["kind"] == "invalid_input" and "message-1" in line["error"]
    assert "not valid Unicode" in line["error"]


def test_sqs_batch_is_micro_batched_and_names_exactly_the_failed_records(handler):
    good = [infer_body(rows(1, seed=i)) for i in range(48)]
    bodies = good + ["{not json", infer_body(rows(1), name="z"),
                     json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                             "data": [1, 2, 3]}]}), infer_body(rows(1)),
                     infer_body(rows(1))]
    attributes = {51: {"model": string_attribute("missing-model")},
                  52: {"model": string_attribute("busy")}}
    batch_size = handler.plane.repository.get("mlp").batcher.metrics.batch_size
    passes, rows_before = batch_size.count, batch_size.sum
    answer = busy_handler(handler)(sqs_event(bodies, attributes), Context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": f"message-{i}"}
                                            for i in (48, 49, 50, 51, 52)]}
    assert batch_size.sum - rows_before == 48
    # 48 records queued together, not 48 forward passes (after an idle spell the batcher's
    # adaptive delay runs the first few of a burst at once, before its gap estimate adapts)
    assert batch_size.count - passes <= 24


def test_a_failed_records_log_line_names_its_request_id(handler, caplog):
    """SQS attributes are the request's attributes, `x-request-id` among them; the failure's
    log line named only the message id, so a sender could not find its request's error."""
    bodies = [infer_body(rows(1), name="z"), "{not json", infer_body(rows(1))]
    attributes = {i: {"x-request-id": string_attribute(f"sender-{i}")} for i in range(3)}
    attributes[2]["model"] = string_attribute("missing-model")
    with caplog.at_level("ERROR", logger="edgerun.adapters.aws_lambda.handler"):
        answer = handler(sqs_event(bodies, attributes), Context())
    assert len(answer["batchItemFailures"]) == 3
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "edgerun.adapters.aws_lambda.handler"]
    assert {(line["item"], line["request_id"], line["retried"]) for line in lines} == {
        (f"message-{i}", f"sender-{i}", True) for i in range(3)}


FIFO_ARN = "arn:aws:sqs:us-east-2:123456789012:edgerun-requests.fifo"


def fifo_event(bodies: list[str], arn: str | None = FIFO_ARN, group: str | None = "tenant-1",
               attributes: dict[int, dict] | None = None) -> dict:
    """An SQS batch as Lambda delivers a FIFO queue's: the queue's ARN ends in .fifo and each
    record carries its group, sequence number and deduplication id."""
    event = sqs_event(bodies, attributes)
    for i, record in enumerate(event["Records"]):
        if arn is None:
            del record["eventSourceARN"]
        else:
            record["eventSourceARN"] = arn
        if group is not None:
            record["attributes"].update({
                "MessageGroupId": group, "MessageDeduplicationId": f"dedup-{i}",
                "SequenceNumber": f"186472918648920090{i:02d}"})
    return event


def rows_run(handler) -> float:
    return handler.plane.repository.get("mlp").batcher.metrics.batch_size.sum


@pytest.mark.parametrize("arn, group", [(FIFO_ARN, "tenant-1"), (FIFO_ARN, None),
                                        (None, "tenant-1")])
def test_a_fifo_batch_stops_at_its_first_failed_record(handler, caplog, arn, group):
    """AWS: with partial batch responses on a FIFO queue, the function stops at the first
    failure and reports it and every later record. Each record was judged alone, so the
    records after a failed one were run and deleted from the queue before it: its message
    group processed out of order."""
    bodies = [infer_body(rows(1, seed=i)) for i in range(2)] + \
        [infer_body(rows(1), model_name="busy")] + [infer_body(rows(2, seed=i)) for i in range(3)]
    before = rows_run(handler)
    with caplog.at_level("ERROR", logger="edgerun.adapters.aws_lambda.handler"):
        answer = busy_handler(handler)(fifo_event(bodies, arn, group), Context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": f"message-{i}"}
                                            for i in range(2, 6)]}
    assert rows_run(handler) - before == 2  # the records after the failure were not run
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "edgerun.adapters.aws_lambda.handler"]
    assert [line["item"] for line in lines if line["message"] == "record failed"] == \
        ["message-2"]
    (skipped,) = [line for line in lines if line["message"] == "records not done"]
    assert skipped["items"] == ["message-3", "message-4", "message-5"] and skipped["count"] == 3
    assert "message-2" in skipped["reason"]
    # a FIFO batch that all succeeds reports nothing, and an undecodable first record is
    # acknowledged, not a stop: reported, it and every later record came back until the redrive
    # policy sent them all, the good ones too, to the dead-letter queue
    assert handler(fifo_event(bodies[:2], arn, group), Context()) == {"batchItemFailures": []}
    before = rows_run(handler)
    assert handler(fifo_event(["{not json", *bodies[:2]], arn, group), Context()) == {
        "batchItemFailures": []}
    assert rows_run(handler) - before == 2


def test_a_fair_standard_queue_with_message_groups_still_judges_each_record(handler):
    """A standard queue's fair queueing groups messages by MessageGroupId without ordering
    them: only the ARN's .fifo makes a batch ordered, and a fair queue keeps every record."""
    bodies = [infer_body(rows(1), model_name="busy")] + \
        [infer_body(rows(1, seed=i)) for i in range(3)]
    before = rows_run(handler)
    answer = busy_handler(handler)(fifo_event(bodies, "arn:aws:sqs:us-east-2:123456789012:fair"),
                                   Context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
    assert rows_run(handler) - before == 3


def test_a_fifo_batch_sends_results_in_order_and_stops_at_one_unsent(handler, reference):
    """A result that cannot be sent fails its record; on a FIFO queue the records after it
    must not run nor have their results sent, or the results queue gets them first."""
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    forward = LambdaHandler(handler.plane, default_model="mlp",
                            destination=SqsDestination(url, client))
    bodies = [infer_body(rows(1, seed=i)) for i in range(4)]
    sent: list[list[dict]] = []
    before = rows_run(handler)
    with Stubber(client) as stub:
        stub.add_response("send_message_batch", {"Successful": [
            {"Id": "0", "MessageId": "a", "MD5OfMessageBody": "x"}], "Failed": []})
        stub.add_response("send_message_batch", {"Successful": [], "Failed": [
            {"Id": "0", "SenderFault": False, "Code": "InternalError", "Message": "again"}]})
        client.meta.events.register("before-parameter-build.sqs.SendMessageBatch",
                                    lambda params, **_: sent.append(params["Entries"]))
        answer = forward(fifo_event(bodies), Context())
        stub.assert_no_pending_responses()
    assert answer == {"batchItemFailures": [{"itemIdentifier": f"message-{i}"}
                                            for i in (1, 2, 3)]}
    assert [[e["MessageAttributes"]["source-id"]["StringValue"] for e in call]
            for call in sent] == [["message-0"], ["message-1"]]
    np.testing.assert_allclose(outputs(sent[0][0]["MessageBody"]), reference(rows(1, seed=0)),
                               rtol=1e-5, atol=1e-6)
    assert rows_run(handler) - before == 2


class EndingContext(Context):
    """An invocation with 400 ms left (less than the handler keeps back to answer) once the
    model has run a row."""

    def __init__(self, handler: LambdaHandler) -> None:
        self.handler = handler
        self.start = rows_run(handler)

    def get_remaining_time_in_millis(self) -> int:
        return 30_000 if rows_run(self.handler) == self.start else 400


def test_a_fifo_batch_stops_before_the_invocation_runs_out_of_time(handler):
    """One record after another, a FIFO batch could outlast the invocation: Lambda would end
    it and deliver every record again, the done ones too. It answers with what is done."""
    before = rows_run(handler)
    answer = handler(fifo_event([infer_body(rows(1, seed=i)) for i in range(3)]),
                     EndingContext(handler))
    assert answer == {"batchItemFailures": [{"itemIdentifier": f"message-{i}"}
                                            for i in (1, 2)]}
    assert rows_run(handler) - before == 1


def test_a_record_without_an_id_fails_the_batch(handler):
    with pytest.raises(InvalidInput, match="no id"):
        handler({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]}, Context())


@pytest.mark.parametrize("kind", ["sqs", "kinesis"])
@pytest.mark.parametrize("bad_id, named, why", [(17, "17", "is int, not a string"),
                                                ("m\ud800", "m\ud800", "not valid Unicode")])
def test_a_record_whose_id_is_not_a_string_fails_alone(handler, caplog, kind, bad_id, named,
                                                        why):
    """A hand-written record's `"messageId": 17` (or Kinesis `sequenceNumber`) was taken as
    its id: its result's size check on the way to the results queue failed on it, an
    internal error that reported the record (a stream stopped there) as `17`, not the string
    Lambda wants. An id with a lone surrogate (the event's JSON carries "\\ud800") failed the
    same check with UnicodeEncodeError, an internal error with a traceback, retried (a FIFO
    queue's or a stream's batch stopped there at every delivery). Either is the record's
    InvalidInput alone, by its id as text; the batch's other records are answered and their
    results sent."""
    from awslambdaric.lambda_runtime_marshaller import to_json

    bodies = [infer_body(rows(1, seed=i)) for i in range(2)]
    if kind == "sqs":
        event = sqs_event(bodies)
        event["Records"][1]["messageId"] = bad_id
        good = "message-0"
    else:
        event = kinesis_event([body.encode() for body in bodies])
        event["Records"][1]["kinesis"]["sequenceNumber"] = bad_id
        good = sequences(event)[0]
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    forward = LambdaHandler(handler.plane, default_model="mlp",
                            destination=SqsDestination(url, client))
    sent: list[dict] = []
    with Stubber(client) as stub:
        stub.add_response("send_message_batch", {"Successful": [
            {"Id": "0", "MessageId": "a", "MD5OfMessageBody": "x"}], "Failed": []})
        client.meta.events.register("before-parameter-build.sqs.SendMessageBatch",
                                    lambda params, **_: sent.extend(params["Entries"]))
        answer = forward(event, Context())
    # a queue's bad record is reported, for its dead-letter queue; a stream's acknowledged
    assert answer == {"batchItemFailures": [{"itemIdentifier": named}] if kind == "sqs" else []}
    assert json.loads(to_json(answer)) == answer
    assert [e["MessageAttributes"]["source-id"]["StringValue"] for e in sent] == [good]
    (line,) = [json.loads(r.message) for r in caplog.records if "record failed" in r.message]
    assert line["kind"] == "invalid_input" and line["item"] == named and why in line["error"]
    assert not [r for r in caplog.records if r.exc_info]


def test_records_of_other_sources_are_refused_naming_the_source(handler):
    sns = {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0",
                        "Sns": {"MessageId": "95df01b4", "Message": infer_body(rows(1))}}]}
    with pytest.raises(InvalidInput, match="records from 'aws:sns' are not served"):
        handler(sns, Context())
    with pytest.raises(InvalidInput, match="records from 'aws:s3' are not served"):
        handler({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]},
                Context())


def kinesis_event(bodies: list[bytes]) -> dict:
    """A Kinesis batch as Lambda delivers a shard's records: each payload base64, sequence
    numbers rising."""
    event = fixture("kinesis")
    template = event["Records"][0]
    event["Records"] = []
    for i, data in enumerate(bodies):
        record = json.loads(json.dumps(template))
        sequence = f"4959033827149025660855969253836157109592157598913{i:07d}"
        record["kinesis"].update(sequenceNumber=sequence, data=base64.b64encode(data).decode())
        record["eventID"] = f"shardId-000000000006:{sequence}"
        event["Records"].append(record)
    return event


def sequences(event: dict) -> list[str]:
    return [record["kinesis"]["sequenceNumber"] for record in event["Records"]]


def test_kinesis_records_are_base64_and_may_name_their_model(handler):
    event = kinesis_event([infer_body(rows(2), model_name="mlp").encode(),
                           infer_body(rows(1), model_name="other").encode(),
                           infer_body(rows(1)).encode()])
    before = rows_run(handler)
    assert handler(event, Context()) == {"batchItemFailures": []}  # `other`: no such model
    assert rows_run(handler) - before == 3
    event = kinesis_event([b"", infer_body(rows(1)).encode()])
    event["Records"][0]["kinesis"]["data"] = "not base64 at all!"
    assert handler(event, Context()) == {"batchItemFailures": []}
    assert rows_run(handler) - before == 4


def test_a_kinesis_record_no_retry_can_fix_does_not_block_its_shard(handler, caplog):
    """Each failure stopped a stream's batch and was reported: with Lambda's default
    MaximumRetryAttempts of -1 one malformed record was delivered again and again, blocking its
    shard until it expired. Bad input is logged and passed over; a retryable error still stops
    the batch there, and only the results before it are sent."""
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    forward = busy_handler(handler, destination=SqsDestination(url, client))
    bad = [b"{not json", infer_body(rows(1), name="z").encode(),
           infer_body(rows(1), model_name="missing").encode(), b"base64 is replaced below"]
    event = kinesis_event([*bad, infer_body(rows(1)).encode(),
                           infer_body(rows(1), model_name="busy").encode(),
                           infer_body(rows(1)).encode()])
    event["Records"][3]["kinesis"]["data"] = "not base64 at all!"
    sent: list[list[str]] = []
    client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", lambda params, **_:
                                sent.append([e["MessageAttributes"]["source-id"]["StringValue"]
                                             for e in params["Entries"]]))
    with Stubber(client) as stub, \
            caplog.at_level("ERROR", logger="edgerun.adapters.aws_lambda.handler"):
        stub.add_response("send_message_batch", {"Successful": [
            {"Id": "0", "MessageId": "a", "MD5OfMessageBody": "x"}], "Failed": []})
        answer = forward(event, Context())
        stub.assert_no_pending_responses()
    assert answer == {"batchItemFailures": [{"itemIdentifier": sequences(event)[5]}]}
    assert sent == [[sequences(event)[4]]]
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "edgerun.adapters.aws_lambda.handler"]
    failed = {line["item"]: line["retried"] for line in lines
              if line["message"] == "record failed"}
    assert failed == {**{sequence: False for sequence in sequences(event)[:4]},
                      sequences(event)[5]: True}
    # a batch of bad records only is done with: the shard moves on
    assert handler(kinesis_event(bad[:3]), Context()) == {"batchItemFailures": []}


def test_a_kinesis_batch_stops_at_its_first_failure_and_sends_no_later_result(handler):
    """Lambda retries a shard from the lowest sequence number reported and delivers every
    record after it again. The records after a failed one were run and their results sent,
    so every retry sent them again; now the batch stops there, sends the results before it,
    and reports that record alone (the first whose result could not be sent, too)."""
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    forward = busy_handler(handler, destination=SqsDestination(url, client))
    bodies = [infer_body(rows(1, seed=i)).encode() for i in range(5)]
    bodies[2] = infer_body(rows(1), model_name="busy").encode()
    event = kinesis_event(bodies)
    sent: list[list[str]] = []
    client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", lambda params, **_:
                                sent.append([e["MessageAttributes"]["source-id"]["StringValue"]
                                             for e in params["Entries"]]))
    def answer(failed: int | None = None, count: int = 2) -> dict:
        return {"Successful": [{"Id": str(i), "MessageId": "a", "MD5OfMessageBody": "x"}
                               for i in range(count) if i != failed],
                "Failed": [] if failed is None else [{"Id": str(failed), "SenderFault": False,
                                                      "Code": "InternalError", "Message": "again"}]}

    with Stubber(client) as stub:
        stub.add_response("send_message_batch", answer())
        reply = forward(event, Context())
        stub.assert_no_pending_responses()
        assert reply == {"batchItemFailures": [{"itemIdentifier": sequences(event)[2]}]}
        assert sent == [sequences(event)[:2]]  # the results before it, in one send
        # Lambda's retry, from the failed record on, sends nothing the first one did
        retry = {"Records": event["Records"][2:]}
        assert forward(retry, Context()) == reply
        assert len(sent) == 1
        # a result that cannot be sent stops the batch the same way
        event = kinesis_event(bodies[:2] + bodies[3:])
        stub.add_response("send_message_batch", answer(failed=1, count=4))
        reply = forward(event, Context())
        stub.assert_no_pending_responses()
    assert reply == {"batchItemFailures": [{"itemIdentifier": sequences(event)[1]}]}
    assert sent[1:] == [sequences(event)]


def test_a_kinesis_windows_results_are_sent_in_order_and_in_time(handler):
    """A window's results went to the destination in one call, which went on past a refused
    chunk (the queue then held records 10 to 19 before 0 to 9) and past the invocation's end
    (64 results to S3 are 64 PUTs). They go in steps now, in order, each with time left."""
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results.fifo"
    forward = LambdaHandler(handler.plane, default_model="mlp",
                            destination=SqsDestination(url, client))
    event = kinesis_event([infer_body(rows(1, seed=i)).encode() for i in range(20)])
    sent: list[list[str]] = []
    client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", lambda params, **_:
                                sent.append([e["MessageAttributes"]["source-id"]["StringValue"]
                                             for e in params["Entries"]]))
    ok = {"Successful": [{"Id": str(i), "MessageId": "a", "MD5OfMessageBody": "x"}
                         for i in range(10)], "Failed": []}

    class SendingContext(Context):  # time is nearly up once the first step is sent
        def get_remaining_time_in_millis(self) -> int:
            return 400 if sent else 30_000

    with Stubber(client) as stub:
        stub.add_client_error("send_message_batch", "InternalError", http_status_code=500)
        stub.add_response("send_message_batch", ok)  # not asked for: the batch stopped
        assert forward(event, Context()) == {
            "batchItemFailures": [{"itemIdentifier": sequences(event)[0]}]}
        assert sent == [sequences(event)[:10]]  # records 10 to 19 were not sent before them
        sent.clear()
        assert forward(event, SendingContext()) == {
            "batchItemFailures": [{"itemIdentifier": sequences(event)[10]}]}
        stub.assert_no_pending_responses()
    assert sent == [sequences(event)[:10]]


def test_a_kinesis_batch_is_micro_batched_and_stops_before_time_runs_out(handler):
    """A stream's batch (up to 10,000 records) is queued STREAM_WINDOW records at a time, in
    few forward passes; once the invocation is nearly out of time no later record is done,
    and the one it stopped at is the only one reported: Lambda resumes the shard there."""
    batch_size = handler.plane.repository.get("mlp").batcher.metrics.batch_size
    event = kinesis_event([infer_body(rows(1, seed=i)).encode()
                           for i in range(STREAM_WINDOW + 6)])
    passes, before = batch_size.count, rows_run(handler)
    assert handler(event, Context()) == {"batchItemFailures": []}
    assert rows_run(handler) - before == STREAM_WINDOW + 6
    assert batch_size.count - passes <= 24
    before = rows_run(handler)
    answer = handler(event, EndingContext(handler))
    assert answer == {"batchItemFailures": [{"itemIdentifier": sequences(event)[STREAM_WINDOW]}]}
    assert rows_run(handler) - before == STREAM_WINDOW  # the second window never ran


def sqs_client(service: str):
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


def test_results_go_on_to_sqs_and_an_unsent_one_is_retried(handler, reference):
    client = sqs_client("sqs")
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    forward = LambdaHandler(handler.plane, default_model="mlp",
                            destination=SqsDestination(url, client))
    bodies = [infer_body(rows(1, seed=i)) for i in range(3)] + ["{bad"]
    sent: list[dict] = []
    with Stubber(client) as stub:
        stub.add_response("send_message_batch",
                          {"Successful": [{"Id": "0", "MessageId": "a", "MD5OfMessageBody": "x"},
                                          {"Id": "1", "MessageId": "b", "MD5OfMessageBody": "x"}],
                           "Failed": [{"Id": "2", "SenderFault": False, "Code": "InternalError",
                                       "Message": "try again"}]})
        client.meta.events.register("before-parameter-build.sqs.SendMessageBatch",
                                    lambda params, **_: sent.extend(params["Entries"]))
        answer = forward(sqs_event(bodies), Context())
        stub.assert_no_pending_responses()
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-3"},
                                            {"itemIdentifier": "message-2"}]}
    assert [e["MessageAttributes"]["source-id"]["StringValue"] for e in sent] == \
        ["message-0", "message-1", "message-2"]
    np.testing.assert_allclose(outputs(sent[1]["MessageBody"]), reference(rows(1, seed=1)),
                               rtol=1e-5, atol=1e-6)


def test_large_results_go_to_sqs_in_batches_it_takes(handler):
    """SendMessageBatch takes 256 KiB in all: ten 100 KB results in one call failed whole
    (BatchRequestTooLong), at every retry, until the records went to the dead-letter queue."""
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    row = [0.1234567] * 9_000
    results = [(f"message-{i}", json.dumps({"outputs": [{"name": "y", "data": row, "n": i}]})
                .encode()) for i in range(10)]
    assert all(90_000 < len(body) < 110_000 for _, body in results)
    calls = sent_batches(url, results, [2] * 5)  # two results fit in each call
    assert all(sum(len(e["MessageBody"]) for e in call) <= 256 * 1024 for call in calls)
    assert [e["MessageAttributes"]["source-id"]["StringValue"] for call in calls
            for e in call] == [item_id for item_id, _ in results]


def test_results_to_a_fifo_queue_carry_a_group_and_a_deduplication_id():
    """A FIFO queue refuses a message without a MessageGroupId (and, unless content-based
    deduplication is on, without a MessageDeduplicationId): every result failed, and with it
    every record."""
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results.fifo"
    results = [("059f36b4-87a3-44ab-83d2-661975830a7d", b'{"n": 0}'), ("x" * 200, b'{"n": 1}')]
    [entries] = sent_batches(url, results, [2])
    assert [e["MessageGroupId"] for e in entries] == ["edgerun-results"] * 2
    assert entries[0]["MessageDeduplicationId"] == results[0][0]
    assert len(entries[1]["MessageDeduplicationId"]) == 64  # too long for SQS: its sha256
    [standard] = sent_batches(url.removesuffix(".fifo"), results[:1], [1])
    assert "MessageGroupId" not in standard[0]


def sent_batches(url: str, results: list[tuple[str, bytes]],
                 answered: list[int]) -> list[list[dict]]:
    """The SendMessageBatch entries an SqsDestination sends, one list per call, each call
    answered as successful for that many entries."""
    client = sqs_client("sqs")
    calls: list[list[dict]] = []
    with Stubber(client) as stub:
        for count in answered:
            stub.add_response("send_message_batch", {"Successful": [
                {"Id": str(i), "MessageId": str(i), "MD5OfMessageBody": "x"}
                for i in range(count)], "Failed": []})
        client.meta.events.register("before-parameter-build.sqs.SendMessageBatch",
                                    lambda params, **_: calls.append(params["Entries"]))
        assert SqsDestination(url, client).send(results) == set()
        stub.assert_no_pending_responses()
    return calls


class FaithfulSqs:
    """An SQS client whose SendMessageBatch is answered as SQS answers it, not as a test queued
    the answers: a call whose entries come to more than 256 KiB (each body and each message
    attribute's name, type and value, in UTF-8, as SQS counts a message) fails whole,
    BatchRequestTooLong; any other call sends every entry, recorded with the size SQS counted."""

    LIMIT = 256 * 1024

    def __init__(self) -> None:
        self.client = sqs_client("sqs")
        self.sent: list[tuple[dict, int]] = []
        self._entries: list[dict] = []
        events = self.client.meta.events
        events.register("before-parameter-build.sqs.SendMessageBatch", self._take)
        events.register("before-call.sqs.SendMessageBatch", self._answer)

    def _take(self, params: dict, **_) -> None:
        self._entries = params["Entries"]

    def _answer(self, **_) -> tuple[AWSResponse, dict]:
        sizes = [len(entry["MessageBody"].encode()) + sum(
            len(name.encode()) + len(value["DataType"].encode())
            + len(value["StringValue"].encode())
            for name, value in entry.get("MessageAttributes", {}).items())
            for entry in self._entries]
        if sum(sizes) > self.LIMIT:
            return AWSResponse(None, 400, {}, None), {
                "Error": {"Code": "AWS.SimpleQueueService.BatchRequestTooLong",
                          "Message": f"Batch requests cannot be longer than {self.LIMIT} "
                                     f"bytes. You have sent {sum(sizes)} bytes."},
                "ResponseMetadata": {"HTTPStatusCode": 400}}
        self.sent += zip(self._entries, sizes)
        return AWSResponse(None, 200, {}, None), {"Successful": [
            {"Id": entry["Id"], "MessageId": f"{len(self.sent)}-{entry['Id']}",
             "MD5OfMessageBody": "x"} for entry in self._entries], "Failed": []}


@pytest.mark.parametrize("kind", ["sqs", "kinesis"])
def test_a_result_too_large_for_an_sqs_message_is_sent_as_its_error(wide_handler, kind):
    """A result larger than one SQS message holds could never be sent: its record was a batch
    item failure, delivered again and its model run again, until the queue's redrive policy
    took it to the dead-letter queue (on a stream it held its shard back until it expired), and
    its sender never learned why. Its error result, naming the size and the limit, is sent in
    its place and counted as payload_too_large; a result exactly at the limit is sent as is."""
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    sqs = FaithfulSqs()
    forward = LambdaHandler(wide_handler.plane, default_model="mlp",
                            destination=SqsDestination(url, sqs.client))
    small = [rows(2, seed=0), rows(2, seed=1)]

    def run(n: int, ids: list[str]) -> tuple[dict, dict[str, tuple[dict, int]]]:
        """The batch: a small request, one of n rows of zeros (each row of its answer the
        model's bias, exactly, however it is batched) per id, another small request."""
        bodies = [infer_body(small[0]), *(infer_body(np.zeros((n, 8), np.float32), id=i)
                                          for i in ids), infer_body(small[1])]
        event = sqs_event(bodies) if kind == "sqs" else \
            kinesis_event([body.encode() for body in bodies])
        sqs.sent.clear()
        answer = forward(event, Context())
        items = [r["messageId"] if kind == "sqs" else r["kinesis"]["sequenceNumber"]
                 for r in event["Records"]]
        sent = {entry["MessageAttributes"]["source-id"]["StringValue"]: (entry, size)
                for entry, size in sqs.sent}
        return answer, {item: sent[item] for item in items if item in sent}

    def size(n: int) -> int:  # of the zeros' result with the id "p", as SQS counts it
        answer, sent = run(n, ["p"])
        assert answer == {"batchItemFailures": []}
        return list(sent.values())[1][1]

    limit = FaithfulSqs.LIMIT
    n = 10 * (limit - 20_000) // size(10)  # a result some 20 KB under the limit
    pad = limit - size(n)  # the id's characters, echoed in the result, up to the limit
    assert 0 < pad < 40_000
    outcomes = Outcomes()
    hooks = wide_handler.plane.hooks.hooks
    wide_handler.plane.hooks.add(outcomes)
    try:
        ok, too_large = (requests_counted(forward, outcome, kind)
                         for outcome in ("ok", "payload_too_large"))
        answer, sent = run(n, ["p" * (1 + pad), "p" * (2 + pad)])
        assert answer == {"batchItemFailures": []}
        assert outcomes.seen.count("payload_too_large") == 1
        assert requests_counted(forward, "payload_too_large", kind) == too_large + 1
        assert requests_counted(forward, "ok", kind) == ok + 3
    finally:
        wide_handler.plane.hooks.hooks = hooks
    (first, _), (fits, fits_size), (error, error_size), (last, _) = sent.values()
    for (entry, request) in ((first, small[0]), (last, small[1])):  # sent as they were
        direct = forward(json.loads(infer_body(request)), Context())
        np.testing.assert_allclose(outputs(entry["MessageBody"]),
                                   np.array(direct["outputs"][0]["data"], np.float32)
                                   .reshape(direct["outputs"][0]["shape"]), rtol=1e-5,
                                   atol=1e-6)
    assert fits_size == limit
    result = json.loads(fits["MessageBody"])
    assert result["id"] == "p" * (1 + pad) and result["outputs"][0]["shape"] == [n, 256]
    message = json.loads(error["MessageBody"])["error"]
    assert error_size < 1000
    assert f"{limit + 1} bytes" in message and f"{limit}-byte" in message, message
    assert "s3://" in message


def test_a_results_queue_of_larger_messages_takes_larger_results(bundle_archive):
    """SQS messages may hold up to 1 MiB since 2025 (MaximumMessageSize; the template's results
    queue is made so): with EDGERUN_RESULTS_MAX_BYTES saying so, a 600 KB result is sent, in a
    call of its own, where the 256 KiB default every queue takes makes it its error; a result
    over the queue's limit is still its error, naming that limit. A bad value fails init."""
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/edgerun-results"
    body = json.dumps({"outputs": [{"name": "y", "data": [0.1234567] * 60_000}]}).encode()
    assert 600_000 < len(body) < 700_000
    assert "262144-byte" in str(SqsDestination(url, None).too_large("m-0", body))
    large = SqsDestination(url, None, max_bytes=1024 * 1024)
    assert large.too_large("m-0", body) is None
    assert "1048576-byte" in str(large.too_large("m-0", body * 2))
    client = sqs_client("sqs")
    calls: list[list[dict]] = []
    with Stubber(client) as stub:
        for _ in range(2):
            stub.add_response("send_message_batch", {"Successful": [
                {"Id": "0", "MessageId": "0", "MD5OfMessageBody": "x"}], "Failed": []})
        client.meta.events.register("before-parameter-build.sqs.SendMessageBatch",
                                    lambda params, **_: calls.append(params["Entries"]))
        assert SqsDestination(url, client, max_bytes=1024 * 1024).send(
            [("m-0", body), ("m-1", body)]) == set()
        stub.assert_no_pending_responses()
    assert [len(call) for call in calls] == [1, 1]  # 1 MiB a call at most
    for bad in ("lots", "1000", "2097152"):
        with pytest.raises(ValueError, match=f"EDGERUN_RESULTS_MAX_BYTES='{bad}'.*1048576"):
            from_environment({"EDGERUN_MODEL": str(bundle_archive),
                              "EDGERUN_RESULTS_MAX_BYTES": bad})


def test_results_go_on_to_s3(handler):
    client = sqs_client("s3")
    forward = LambdaHandler(handler.plane, default_model="mlp",
                            destination=S3Destination("results", "edgerun/out/", client))
    with Stubber(client) as stub:
        for i in range(2):
            stub.add_response("put_object", {"ETag": '"x"'},
                              {"Bucket": "results", "Key": f"edgerun/out/message-{i}.json",
                               "Body": ANY, "ContentType": "application/json"})
        stub.add_client_error("put_object", "SlowDown", http_status_code=503)
        answer = forward(sqs_event([infer_body(rows(1, seed=i)) for i in range(3)]), Context())
        stub.assert_no_pending_responses()
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-2"}]}


def test_a_destination_without_boto3_fails_at_init(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(RuntimeError, match="EDGERUN_RESULTS.*boto3"):
        destination_from("s3://bucket/prefix/")
    with pytest.raises(ValueError, match="EDGERUN_RESULTS"):
        destination_from("ftp://elsewhere")


# ----------------------------------------------------------------------------------- direct
def test_direct_invocation_takes_and_gives_oip_json(handler, reference):
    x = rows(2, seed=7)
    answer = handler(json.loads(infer_body(x)), Context())
    assert answer["model_name"] == "mlp"
    np.testing.assert_allclose(outputs(json.dumps(answer)), reference(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInput, match="'z'"):
        handler(json.loads(infer_body(x, name="z")), Context())
    with pytest.raises(ModelNotFound):
        handler(json.loads(infer_body(x, model_name="other")), Context())
    with pytest.raises(InvalidInput, match="none of"):
        handler({"hello": "world"}, Context())
    # binary outputs asked for: the answer is still all JSON (it once failed to parse)
    for extra in ({"parameters": {"binary_data_output": True}},
                  {"outputs": [{"name": "y", "parameters": {"binary_data": True}}]}):
        answer = handler(json.loads(infer_body(x, **extra)), Context())
        np.testing.assert_allclose(outputs(json.dumps(answer)), reference(x), rtol=1e-5,
                                   atol=1e-6)
    # outputs that overflow: the answer writes NaN or Infinity, which orjson cannot read back
    answer = handler(json.loads(infer_body(np.full((1, 8), 3e38, np.float32))), Context())
    assert not np.isfinite(answer["outputs"][0]["data"]).all()
    # NaN in the event (the runtime reads it with json): orjson wrote it back as null
    event = json.loads(infer_body(x))
    event["inputs"][0]["data"][0] = float("nan")
    answer = handler(event, Context())
    assert answer["model_name"] == "mlp" and np.isnan(answer["outputs"][0]["data"]).any()


@pytest.mark.parametrize("event, message", [
    ('{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], '
     '"data": [100000000000000000000000000000]}]}',
     "input 'x': integer 100000000000000000000000000000 is out of range for INT64"),
    ('{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["\\udcff"]}]}',
     "not valid JSON"),
    # with NaN too, json read the body again and took the surrogate: the model ran, and its
    # answer, with the id, could not be written (an internal error)
    ('{"id": "\\udcff", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], '
     '"data": [NaN, 0, 0, 0, 0, 0, 0, 0]}]}', "not valid JSON"),
])
def test_direct_events_orjson_cannot_write_again_are_invalid_input(handler, event, message):
    """The runtime reads the event with json, which takes integers past 64 bits and lone
    surrogates; orjson refused to write them again (a TypeError, Lambda's errorType)."""
    with pytest.raises(InvalidInput, match=re.escape(message)):
        handler(json.loads(event), Context())


def test_a_direct_event_whose_id_is_an_integer_past_64_bits_is_answered(handler):
    """Valid JSON, and an id as any other integer id is taken: once refused as an integer that
    "does not fit in 64 bits" (simdjson's limit), naming nothing."""
    event = json.loads(infer_body(np.zeros((1, 8), np.float32)))
    event["id"] = 10 ** 29
    assert handler(event, Context())["id"] == str(10 ** 29)


# ------------------------------------------------------------------------ init and the model
def test_vcpus_follow_memory_like_lambda():
    assert [vcpus_for(m) for m in (128, 1769, 1770, 3008, 5307, 8845, 10240)] == \
        [1, 1, 2, 2, 3, 5, 6]


def test_init_sizes_threads_and_logs_one_json_line(handler, capsys):
    session = handler.plane.repository.get("mlp").model.backend.session
    assert session.get_session_options().intra_op_num_threads == 2  # 3008 MB
    again = from_environment({"EDGERUN_MODEL": str(handler.plane.repository.source.path),
                              "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "10240"})
    try:
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["message"] == "edgerun init" and line["intra_op_threads"] == 6
        assert line["model"] == "mlp" and line["version"] == "3"
        assert line["init_ms"] >= line["load_ms"] > 0
    finally:
        again.plane.repository.close()


@pytest.mark.parametrize("spec, reason", [
    ("", "EDGERUN_MODEL is not set"),
    ("missing/bundle.tar.gz", "no such bundle"),
    ("s3://bucket/model.tar.gz", "EDGERUN_MODEL_SHA256"),
])
def test_a_missing_model_fails_init_naming_edgerun_model(tmp_path, spec, reason):
    with pytest.raises(BundleError, match=reason) as failure:
        from_environment({"EDGERUN_MODEL": spec, "LAMBDA_TASK_ROOT": str(tmp_path)})
    assert "EDGERUN_MODEL" in str(failure.value)


def test_a_corrupt_model_fails_init_naming_edgerun_model(tmp_path, bundle_dir):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + os.urandom(300))
    with pytest.raises(BundleError, match="EDGERUN_MODEL=.*garbage.tar.gz.*not a readable"):
        from_environment({"EDGERUN_MODEL": str(garbage)})
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in bundle_dir.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    model = tampered / "model.onnx"
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="EDGERUN_MODEL=.*sha256.*tampered or corrupt"):
        from_environment({"EDGERUN_MODEL": str(tampered)})


def test_s3_model_is_downloaded_once_verified_and_reused(tmp_path, bundle_archive):
    downloads: list[str] = []

    def download(uri: str, destination: Path) -> None:  # stands in for boto3's download_file
        downloads.append(uri)
        destination.write_bytes(bundle_archive.read_bytes())

    digest = sha256_file(bundle_archive)
    uri = "s3://models/mlp/3.tar.gz"
    first = locate(uri, sha256=digest.upper(), cache=tmp_path, download=download)
    assert first == tmp_path / digest and (first / MANIFEST).is_file()
    assert BundleSource(first).models() == ["mlp"]
    # a later cold start of the same environment: no download, no extraction
    assert locate(uri, sha256=digest, cache=tmp_path, download=download) == first
    assert downloads == [uri]
    assert sorted(p.name for p in tmp_path.iterdir()) == [digest]  # nothing partial left

    wrong = "0" * 64
    with pytest.raises(BundleError, match=f"sha256 is {digest}.*EDGERUN_MODEL_SHA256 is {wrong}"):
        cached_download(uri, wrong, tmp_path / "other", download)
    assert not (tmp_path / "other" / wrong).exists()
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(BundleError, match="EDGERUN_MODEL_SHA256"):
        cached_download(uri, "abc", tmp_path, download)


CUT_OFF_START = """
import sys, time
from pathlib import Path
from edgerun.adapters.aws_lambda.model_location import cached_download

def download(uri, destination):  # half the archive is in when Lambda ends the init
    destination.write_bytes(Path(sys.argv[1]).read_bytes()[:1000])
    print("downloading", flush=True)
    time.sleep(120)

cached_download("s3://models/mlp/3.tar.gz", sys.argv[2], Path(sys.argv[3]), download)
"""


def test_a_start_cut_off_mid_download_leaves_nothing_in_tmp(tmp_path, bundle_archive):
    """/tmp outlives the process: an init killed while it downloads (over Lambda's 10 s init,
    a timeout) left its partial archive there, one more at each start, until a start had no
    room for its own copy and every later start of the environment failed out of space."""
    digest = sha256_file(bundle_archive)
    for _ in range(2):
        start = subprocess.Popen([sys.executable, "-c", CUT_OFF_START, str(bundle_archive),
                                  digest, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                 cwd=ROOT)
        assert start.stdout.readline().strip() == "downloading"
        start.kill()
        start.wait()
    with held_elsewhere(tmp_path) as alive:  # another live process's download is its own
        folder = cached_download("s3://models/mlp/3.tar.gz", digest, tmp_path,
                                 lambda uri, path: path.write_bytes(bundle_archive.read_bytes()))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, digest])
        assert folder == tmp_path / digest and (folder / MANIFEST).is_file()


KILLED_AFTER_INIT = """
import time
from edgerun.adapters.aws_lambda.environment import from_environment

handler = from_environment()  # EDGERUN_MODEL: a local archive, as in a layer
print("initialized", flush=True)
time.sleep(120)  # Lambda kills it here: an init over its limit, a timeout, out of memory
"""


def test_a_start_killed_after_init_leaves_no_unpacked_archive_in_tmp(tmp_path, bundle_archive):
    """Lambda reuses /tmp in an execution environment after it kills a start. A local archive
    (a layer's) was unpacked there at each init and never removed once the start was killed,
    until the copies filled /tmp's 512 MB. The next start removes those of dead processes."""
    tmp = tmp_path / "tmp"  # the environment's /tmp
    cache = tmp / "edgerun"
    tmp.mkdir()
    env = function_env(TMPDIR=str(tmp), EDGERUN_MODEL=str(bundle_archive),
                       EDGERUN_CACHE_DIR=str(cache))
    for _ in range(2):
        start = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_INIT], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert "initialized\n" in iter(start.stdout.readline, "")  # the init line, then this
        start.kill()
        start.wait()
        start.stdout.close()
    assert list(tmp.rglob(MANIFEST))  # the killed starts' unpacked copies: not cleaned up
    with held_elsewhere(cache) as alive:  # another live process's staging is its own
        handler = from_environment({"EDGERUN_MODEL": str(bundle_archive),
                                    "EDGERUN_CACHE_DIR": str(cache)})
        try:
            assert handler.plane.repository.ready
            (copy,) = tmp.rglob(MANIFEST)  # this start's, for as long as it serves
            staged = copy.parent.parent
            assert staged.parent == cache and staged.name.startswith(f".partial-{os.getpid()}-")
            assert {p.name for p in cache.iterdir()} == {staged.name, alive.name}
        finally:
            handler.plane.repository.close()


def test_bundle_source_serves_one_bundle_folder_or_archive(bundle_dir, bundle_archive, tmp_path):
    for path in (bundle_dir, bundle_archive):
        source = BundleSource(path)
        assert source.models() == ["mlp"] and source.name == "mlp"
        assert source.wanted("mlp", source.config("mlp")) == ["3"]
        assert source.bundle_path("mlp", "3") == path
        assert source.fingerprint("mlp", "3")
        with pytest.raises(ModelNotFound, match="'other'"):
            source.config("other")
    empty = tmp_path / "empty.tar.gz"
    import tarfile
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(BundleError, match="no manifest.json"):
        BundleSource(empty)


# ---------------------------------------------------------------------- fresh processes
def function_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EDGERUN_"))}
    env.update(extra)
    return env


def test_the_function_imports_no_web_framework_and_only_its_backend(bundle_archive, tmp_path):
    script = ("import json, sys, app\n"
              f"event = json.loads({json.dumps(json.dumps(http_event('apigw_v2', infer_body(rows(1)))))})\n"
              "assert app.handler(event, None)['statusCode'] == 200\n"
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=FUNCTION, capture_output=True,
                          text=True, timeout=120,
                          env=function_env(EDGERUN_MODEL=str(bundle_archive),
                                           EDGERUN_CACHE_DIR=str(tmp_path),
                                           AWS_LAMBDA_FUNCTION_MEMORY_SIZE="1769"))
    assert done.returncode == 0, done.stderr
    init, modules = done.stdout.strip().splitlines()[-2:]
    assert json.loads(init)["intra_op_threads"] == 1
    loaded = set(json.loads(modules))
    assert "onnxruntime" in loaded and "mangum" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_awslambdaric_serves_invocations_end_to_end(bundle_archive, reference, tmp_path):
    with RuntimeAPI() as api:
        process = subprocess.Popen(
            [sys.executable, "-m", "awslambdaric", "app.handler"], cwd=FUNCTION,
            env=function_env(AWS_LAMBDA_RUNTIME_API=api.address,
                             EDGERUN_MODEL=str(bundle_archive),
                             EDGERUN_CACHE_DIR=str(tmp_path)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            x = rows(2, seed=3)
            kind, answer = api.invoke(http_event("apigw_v2", infer_body(x)))
            assert kind == "response" and answer["statusCode"] == 200
            np.testing.assert_allclose(outputs(answer["body"]), reference(x), rtol=1e-5,
                                       atol=1e-6)
            # bad input: reported on a standard queue (to its dead-letter queue in the end),
            # acknowledged (logged) on a FIFO one, where it would take its group with it
            kind, answer = api.invoke(sqs_event([infer_body(x), "{bad"]))
            assert (kind, answer) == ("response", {"batchItemFailures": [
                {"itemIdentifier": "message-1"}]})
            kind, answer = api.invoke(fifo_event(["{bad", infer_body(x)]))
            assert (kind, answer) == ("response", {"batchItemFailures": []})
            kind, answer = api.invoke(http_api_on_stage("prod", infer_body(x)))
            assert kind == "response" and answer["statusCode"] == 200, answer
            kind, answer = api.invoke(json.loads(infer_body(x, name="z")))
            assert kind == "error" and answer["errorType"] == "InvalidInput"
            assert "'z'" in answer["errorMessage"]
            kind, answer = api.invoke(json.loads(infer_body(x)))
            assert kind == "response" and answer["model_version"] == "3"
        finally:
            process.kill()
            process.wait(timeout=30)


def test_awslambdaric_reports_a_bad_model_as_an_init_error(tmp_path):
    with RuntimeAPI() as api:
        done = subprocess.run(
            [sys.executable, "-m", "awslambdaric", "app.handler"], cwd=FUNCTION,
            env=function_env(AWS_LAMBDA_RUNTIME_API=api.address,
                             EDGERUN_MODEL=str(tmp_path / "nothing-here")),
            capture_output=True, timeout=120)
        assert done.returncode != 0
        error = api.init_errors.get(timeout=5)
    assert error["errorType"] == "BundleError"
    assert "EDGERUN_MODEL=" in error["errorMessage"]
    assert "no such bundle folder or archive" in error["errorMessage"]


def test_an_archive_model_with_a_cache_dir_it_cannot_be_unpacked_in_names_the_cache(
        bundle_archive, tmp_path):
    """EDGERUN_CACHE_DIR naming a file failed the start with a bare FileExistsError, as if
    the model were at fault: the cache is named, with why."""
    (tmp_path / "notes").write_text("mine")
    cache = tmp_path / "notes" / "cache"
    with pytest.raises(BundleError) as refused:
        locate(str(bundle_archive), cache=cache)
    assert str(refused.value) == (f"EDGERUN_CACHE_DIR={str(cache)!r}: the archive cannot be "
                                  f"unpacked there: {tmp_path / 'notes'} is not a folder")
    assert (tmp_path / "notes").read_text() == "mine"
