"""The fleet HTTP server: Open Inference Protocol v2, TF Serving REST, Prometheus metrics.

Handlers read bytes, hand `dict[str, np.ndarray]` to the repository and write bytes back;
errors from the core map to status codes with a `{"error": ...}` body. No middleware sits on
the infer path and nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgerun import __version__
from edgerun.adapters.http import oip, prometheus, tfserving
from edgerun.runtime.errors import (BundleError, Cancelled, DeadlineExceeded, EdgerunError,
                                    InferenceError, InvalidInput, ModelNotFound, ModelNotReady,
                                    Overloaded)
from edgerun.runtime.metrics import LATENCY_BUCKETS
from edgerun.runtime.repository import Repository

log = logging.getLogger(__name__)

STATUS = {InvalidInput: 400, BundleError: 400, ModelNotFound: 404, ModelNotReady: 503,
          Overloaded: 503, DeadlineExceeded: 504, Cancelled: 499, InferenceError: 500}
TIMEOUT_HEADER = "x-request-timeout-ms"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
JSON = "application/json"


class BodyTooLarge(Exception):
    pass


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None,
                  ) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON,
                    headers=headers)


def error_response(exc: Exception) -> Response:
    """The core's error vocabulary on HTTP: a status code and `{"error": message}`."""
    if isinstance(exc, BodyTooLarge):
        return json_response({"error": str(exc)}, 413)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    message = str(exc) if isinstance(exc, EdgerunError) else f"internal error: {exc}"
    return json_response({"error": message}, status, headers)


class HttpMetrics:
    """Requests by model, version and status code, and their end-to-end latency."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        registry = repository.registry
        self.requests = registry.family(
            "edgerun_http_requests_total", "Inference requests by model, version and code",
            "counter", ("model", "version", "code"))
        self.latency = registry.family(
            "edgerun_http_request_duration_seconds",
            "Inference request latency, body read to response", "histogram",
            ("model", "version"), LATENCY_BUCKETS)

    def record(self, model: str, version: str, status: int, started: float) -> None:
        if status == 404 and model not in self.repository:
            model = ""  # arbitrary unknown names must not grow the series without bound
        self.requests.labels(model, version, str(status)).inc()
        self.latency.labels(model, version).observe(time.perf_counter() - started)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"request body of {length} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def timeout_of(request: Request, timeout_us: float | None = None) -> float | None:
    """The queueing budget in seconds: the timeout header (ms) or OIP parameters.timeout (us)."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            value = float(header)
        except ValueError:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
        if value <= 0:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be positive")
        return value / 1000
    return None if timeout_us is None else timeout_us / 1e6


def create_app(repository: Repository, *, max_body_bytes: int = 64 << 20,
               poll_interval: float | None = None) -> FastAPI:
    """The ASGI app; on startup the repository loads in the background (ready turns 200)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def load() -> None:
            repository.load_all()
            if poll_interval:
                repository.start_polling(poll_interval)

        threading.Thread(target=load, name="edgerun-repository-load", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, repository.close)

    app = FastAPI(title="edgerun", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol v2 and TF Serving REST on the edgerun "
                              "inference core.")
    metrics = HttpMetrics(repository)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": str(exc.errors())}, 400)

    # ---------------------------------------------------------------- health
    @app.get("/v2/health/live", tags=["health"])
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> Response:
        if repository.ready:
            return json_response({"ready": True})
        return json_response({"error": "models are still loading or failed to load; see "
                                       "POST /v2/repository/index"}, 400)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> Response:
        return json_response({"name": "edgerun", "version": __version__,
                              "extensions": EXTENSIONS})

    # ------------------------------------------------------------- metadata
    def model_metadata(name: str, version: str | None) -> Response:
        try:
            served = repository.get(name, version)
            versions = [served.version] if version else repository.versions(name)
        except EdgerunError as exc:
            return error_response(exc)
        sig = served.signature
        return json_response({
            "name": name, "versions": versions, "platform": _platform(served.model.bundle),
            "inputs": [oip.metadata_tensor(s.name, s.dtype, s.shape) for s in sig.inputs],
            "outputs": [oip.metadata_tensor(s.name, s.dtype, s.shape) for s in sig.outputs],
            "parameters": {"max_batch_size": served.batcher.config.max_batch_size
                           if sig.batchable else 0}})

    @app.get("/v2/models/{name}", tags=["metadata"])
    async def metadata(name: str) -> Response:
        return model_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"])
    async def metadata_version(name: str, version: str) -> Response:
        return model_metadata(name, version)

    def model_ready(name: str, version: str | None) -> Response:
        try:
            repository.get(name, version)
        except ModelNotFound as exc:
            return json_response({"error": str(exc)}, 404)
        except EdgerunError as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"name": name, "ready": True})

    @app.get("/v2/models/{name}/ready", tags=["health"])
    async def ready_model(name: str) -> Response:
        return model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["health"])
    async def ready_version(name: str, version: str) -> Response:
        return model_ready(name, version)

    # ------------------------------------------------------------ inference
    async def infer(request: Request, name: str, version: str | None) -> Response:
        started = time.perf_counter()
        served_version = version or ""
        try:
            body = await read_body(request, max_body_bytes)
            decoded = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
            result = await repository.infer(
                name, version, decoded.inputs, key_source=request.headers.get,
                timeout=timeout_of(request, decoded.timeout_us))
            served_version = result.version
            content, headers = oip.encode_response(name, result.version, decoded,
                                                   result.outputs)
        except (EdgerunError, BodyTooLarge) as exc:
            served_version = getattr(exc, "version", None) or served_version
            response = error_response(exc)
        else:
            media = "application/octet-stream" if headers else JSON
            response = Response(content, media_type=media, headers=headers)
        metrics.record(name, served_version, response.status_code, started)
        return response

    infer_doc = {"requestBody": {"required": True, "content": {
        JSON: {"schema": {"type": "object", "description": "OIP v2 inference request"}},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "JSON header (Inference-Header-Content-Length bytes) followed by "
                           "binary tensor data"}}}}}

    @app.post("/v2/models/{name}/infer", tags=["inference"], openapi_extra=infer_doc)
    async def infer_latest(name: str, request: Request) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["inference"],
              openapi_extra=infer_doc)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    # ------------------------------------------------------------- TF Serving
    async def predict(request: Request, name: str, version: str | None) -> Response:
        started = time.perf_counter()
        served_version = version or ""
        try:
            body = await read_body(request, max_body_bytes)
            signature = repository.get(name, version).signature
            inputs, rows = tfserving.decode_predict(body, signature)
            result = await repository.infer(name, version, inputs,
                                            key_source=request.headers.get,
                                            timeout=timeout_of(request))
            served_version = result.version
            response = Response(tfserving.encode_predict(result.outputs, rows),
                                media_type=JSON)
        except (EdgerunError, BodyTooLarge) as exc:
            served_version = getattr(exc, "version", None) or served_version
            response = error_response(exc)
        metrics.record(name, served_version, response.status_code, started)
        return response

    predict_doc = {"requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "description": "{\"instances\": [...]} or {\"inputs\": ...}"}}}}}

    @app.post("/v1/models/{name}:predict", tags=["tf-serving"], openapi_extra=predict_doc)
    async def predict_latest(name: str, request: Request) -> Response:
        return await predict(request, name, None)

    @app.post("/v1/models/{name}/versions/{version}:predict", tags=["tf-serving"],
              openapi_extra=predict_doc)
    async def predict_version(name: str, version: str, request: Request) -> Response:
        return await predict(request, name, version)

    @app.get("/v1/models/{name}", tags=["tf-serving"])
    async def tf_status(name: str) -> Response:
        try:
            return Response(tfserving.status(repository.versions(name)), media_type=JSON)
        except EdgerunError as exc:
            return error_response(exc)

    @app.get("/v1/models/{name}/versions/{version}", tags=["tf-serving"])
    async def tf_status_version(name: str, version: str) -> Response:
        try:
            repository.get(name, version)
        except EdgerunError as exc:
            return error_response(exc)
        return Response(tfserving.status([version]), media_type=JSON)

    # ------------------------------------------------------------ repository
    @app.post("/v2/repository/index", tags=["repository"])
    async def index() -> Response:
        return json_response([{"name": s.name, "version": s.version, "state": s.state,
                               "reason": s.reason} for s in repository.index()])

    @app.post("/v2/repository/models/{name}/load", tags=["repository"])
    async def load(name: str) -> Response:
        try:
            await asyncio.get_running_loop().run_in_executor(None, repository.load, name)
        except EdgerunError as exc:
            return json_response({"error": str(exc)}, 404 if isinstance(exc, ModelNotFound)
                                 else 400)
        return json_response({})

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"])
    async def unload(name: str) -> Response:
        try:
            await asyncio.get_running_loop().run_in_executor(None, repository.unload, name)
        except EdgerunError as exc:
            return error_response(exc)
        return json_response({})

    # --------------------------------------------------------------- metrics
    @app.get("/metrics", tags=["metrics"])
    async def prometheus_metrics() -> Response:
        return Response(prometheus.render(repository.registry),
                        media_type=prometheus.CONTENT_TYPE)

    return app


def _platform(bundle: Any) -> str:
    backend = bundle.manifest.backend
    return {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite",
            "tvm": "tvm"}.get(backend, backend)
