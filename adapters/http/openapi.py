"""The OpenAPI document's parts: request and answer schemas, and each route's operation.

The document is the contract a client (or an API fuzzer) holds the server to, so everything
here comes from what serves: the route table (methods, paths, bodies, error kinds), the status
mapping the server answers with (`status.status_of`), the codec's datatypes and the
repository's name rules. Request bodies are as the protocols define them: OIP v2 inference
(JSON, or the binary tensor extension: a JSON header of `Inference-Header-Content-Length` bytes,
then the tensors' bytes) and TF Serving REST predict. Plain dicts: no web framework here.
"""

from __future__ import annotations

from typing import Any

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane.call import BINARY, JSON
from edgerun.adapters.http.routes import Route
from edgerun.adapters.http.status import status_of
from edgerun.runtime.bundle import NAME_RE, VERSION_RE
from edgerun.runtime.errors import (BundleError, DeadlineExceeded, EdgerunError, InferenceError,
                                    InvalidInput, ModelNotFound, ModelNotReady, Overloaded,
                                    PayloadTooLarge, PermissionDenied, Unauthenticated,
                                    UnsupportedMediaType)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STRING = {"type": "string"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0},
          "description": "Dimensions, row-major"}
_METADATA_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": -1},
                   "description": "Dimensions; -1 for a dynamic one"}
_SCALAR = [{"type": "number"}, {"type": "string"}, {"type": "boolean"}]

#: components.schemas
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(["error"], error={**_STRING, "description": "What went wrong, naming the "
                                       "culprit (an input, a header, a model)"}),
    "Datatype": {"type": "string", "enum": list(oip.DATATYPES)},
    "TensorData": {"type": "array", "description": "Elements, flat or nested row-major",
                   "items": {"anyOf": [*_SCALAR, {"type": "array"}]}},
    "RequestInput": _object(["name", "shape", "datatype", "data"], name=_STRING, shape=_SHAPE,
                            datatype=_ref("Datatype"), data=_ref("TensorData"),
                            parameters={"type": "object"}),
    "RequestOutput": _object(["name"], name=_STRING, parameters={**_object(
        [], binary_data={"type": "boolean", "description": "Answer this output as binary "
                                                           "tensor data"}),
        "additionalProperties": False}),
    "InferRequest": _object(
        ["inputs"], id=_STRING,
        parameters=_object([], timeout={"type": "number", "exclusiveMinimum": 0,
                                        "description": "Queueing budget in microseconds"},
                           binary_data_output={"type": "boolean"}),
        inputs={"type": "array", "minItems": 1, "items": _ref("RequestInput")},
        outputs={"type": "array", "items": _ref("RequestOutput")}),
    "ResponseOutput": _object(
        ["name", "datatype", "shape"], name=_STRING, datatype=_ref("Datatype"), shape=_SHAPE,
        data=_ref("TensorData"),
        parameters=_object([], binary_data_size={"type": "integer", "minimum": 0})),
    "InferResponse": _object(
        ["model_name", "outputs"], model_name=_STRING, model_version=_STRING, id=_STRING,
        parameters={"type": "object"},
        outputs={"type": "array", "items": _ref("ResponseOutput")}),
    "PredictRequest": {
        **_object([], signature_name=_STRING,
                  instances={"type": "array", "minItems": 1,
                             "description": "Rows: a value per row, or named inputs per row"},
                  inputs={"type": ["array", "object"],
                          "description": "Columns: the whole batch, or named inputs"}),
        "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}]},
    "PredictResponse": {"type": "object", "properties": {"predictions": {"type": "array"},
                                                         "outputs": {}},
                        "oneOf": [{"required": ["predictions"]}, {"required": ["outputs"]}]},
    "Live": _object(["live"], live={"type": "boolean"}),
    "Ready": _object(["ready"], ready={"type": "boolean"}),
    "ServerMetadata": _object(["name", "version", "extensions"], name=_STRING, version=_STRING,
                              extensions={"type": "array", "items": _STRING}),
    "MetadataTensor": _object(["name", "datatype", "shape"], name=_STRING,
                              datatype=_ref("Datatype"), shape=_METADATA_SHAPE),
    "ModelMetadata": _object(
        ["name", "versions", "platform", "inputs", "outputs"], name=_STRING,
        versions={"type": "array", "items": _STRING}, platform=_STRING,
        inputs={"type": "array", "items": _ref("MetadataTensor")},
        outputs={"type": "array", "items": _ref("MetadataTensor")},
        parameters={"type": "object"}),
    "ModelReady": _object(["name", "ready"], name=_STRING, ready={"type": "boolean"}),
    "ModelStatus": _object(["model_version_status"], model_version_status={
        "type": "array", "items": _object(
            ["version", "state", "status"], version=_STRING, state=_STRING,
            status=_object(["error_code", "error_message"], error_code=_STRING,
                           error_message=_STRING))}),
    "RepositoryIndex": {"type": "array", "items": _object(
        ["name", "version", "state"], name=_STRING, version=_STRING,
        state={"type": "string", "enum": ["LOADING", "READY", "UNAVAILABLE", "UNLOADED"]},
        reason=_STRING)},
    "Empty": {"type": "object"},
    "Metrics": {"type": "string", "description": "Prometheus text exposition format"},
}

_BINARY_BODY = {"type": "string", "format": "binary", "description":
                "OIP binary tensor data extension: a JSON inference request of "
                "Inference-Header-Content-Length bytes (inputs carry "
                "parameters.binary_data_size instead of data), then each such input's "
                "little-endian, row-major bytes in order (BYTES elements: a 4-byte length, "
                "then the bytes)"}

#: requestBody per route body name
BODIES: dict[str, dict[str, Any]] = {
    "infer": {"required": True, "content": {
        JSON: {"schema": _ref("InferRequest")},
        BINARY: {"schema": _BINARY_BODY}}},
    "predict": {"required": True, "content": {JSON: {"schema": _ref("PredictRequest")}}},
}

_HEADER_LENGTH = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                  "description": "Binary tensor data extension: the length of the JSON header "
                                 "that starts the body (the body is all JSON without it)",
                  "schema": {"type": "integer", "minimum": 1}}
_TIMEOUT = {"name": "X-Request-Timeout-Ms", "in": "header", "required": False,
            "description": "How long the request may wait in the queue, in milliseconds",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e9}}
_PATH_PATTERNS = {"name": NAME_RE.pattern, "version": VERSION_RE.pattern}

_REQUEST_ID = {"X-Request-Id": {"description": "The caller's id if it sent a sane one, else a "
                                               "new one", "schema": _STRING}}
_WHY: dict[type[EdgerunError], str] = {
    InvalidInput: "the request does not fit the protocol or the model (the message names the "
                  "input, header or parameter)",
    BundleError: "the model's bundle could not be loaded (the message says why)",
    PayloadTooLarge: "the body is over the server's size limit",
    UnsupportedMediaType: "the body's Content-Encoding is none of gzip, deflate or identity",
    ModelNotFound: "no such model or version is loaded",
    ModelNotReady: "the model, version or server is still loading, or draining, or the "
                   "server is stopping",
    Overloaded: "the model's queue is full: retry after Retry-After seconds",
    DeadlineExceeded: "the request's timeout passed while it waited in the queue; it never ran",
    Unauthenticated: "an authentication hook refused the call",
    PermissionDenied: "an authorization hook refused the call",
    InferenceError: "the backend failed, or an internal error",
}
_ERROR_HEADERS: dict[type[EdgerunError], dict[str, Any]] = {
    Overloaded: {"Retry-After": {"description": "Seconds until the queue has room",
                                 "schema": {"type": "integer", "minimum": 1}}},
    Unauthenticated: {"WWW-Authenticate": {"schema": _STRING}},
}


def operation(route: Route) -> dict[str, Any]:
    """The route's parameters, request body and every answer it can give."""
    names = [part[1:-1] for part in route.template.replace(":", "/").split("/")
             if part.startswith("{")]
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": _PATH_PATTERNS[name]}}
                  for name in names]
    if route.body == "infer":
        parameters += [_HEADER_LENGTH, _TIMEOUT]
    elif route.body == "predict":
        parameters.append(_TIMEOUT)
    content: dict[str, Any] = {route.media: {"schema": _ref(route.answer)}}
    headers = dict(_REQUEST_ID)
    if route.body == "infer":
        content[BINARY] = {"schema": {**_BINARY_BODY, "description": "binary_data outputs: "
                                      "a JSON response header, then the outputs' bytes"}}
        headers["Inference-Header-Content-Length"] = {
            "description": "With binary outputs: the length of the JSON header",
            "schema": {"type": "integer", "minimum": 1}}
    responses: dict[str, Any] = {"200": {"description": "OK", "headers": headers,
                                         "content": content}}
    for status, kinds in sorted(_by_status(route.errors).items()):
        error_headers = dict(_REQUEST_ID)
        for kind in kinds:
            error_headers.update(_ERROR_HEADERS.get(kind, {}))
        responses[str(status)] = {
            "description": "; or ".join(_WHY[kind] for kind in kinds).capitalize(),
            "headers": error_headers, "content": {JSON: {"schema": _ref("Error")}}}
    extra: dict[str, Any] = {"parameters": parameters, "responses": responses}
    if route.body is not None:
        extra["requestBody"] = BODIES[route.body]
    return extra


def _by_status(kinds: tuple[type[EdgerunError], ...]) -> dict[int, list[type[EdgerunError]]]:
    statuses: dict[int, list[type[EdgerunError]]] = {}
    for kind in dict.fromkeys(kinds):  # once each, though route groups overlap
        statuses.setdefault(status_of(kind("")), []).append(kind)
    return statuses
