"""The fleet HTTP server: Open Inference Protocol v2, TF Serving REST, Prometheus metrics.

Every route is a documented FastAPI route; infer and predict delegate to `InferenceHandler`,
which `fastpath.py` also calls directly so that uvicorn reaches it without the framework's
per-request layers. Errors are `{"error": ...}` with the status the core's error maps to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgerun import __version__
from edgerun.adapters.http import oip, prometheus, tfserving
from edgerun.adapters.http.inference import (JSON, InferenceHandler, Reply, error_reply,
                                             json_reply)
from edgerun.runtime.errors import EdgerunError, ModelNotFound
from edgerun.runtime.repository import Repository

EXTENSIONS = ["binary_tensor_data", "model_repository"]


def response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type,
                    headers=reply.headers)


def json_response(content: Any, status: int = 200) -> Response:
    return response(json_reply(content, status))


def error_response(exc: Exception) -> Response:
    return response(error_reply(exc))


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
    handler = app.state.inference = InferenceHandler(repository, max_body_bytes)

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
            "name": name, "versions": versions, "platform": _platform(served.model.bundle.manifest.backend),
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
    infer_doc = {"requestBody": {"required": True, "content": {
        JSON: {"schema": {"type": "object", "description": "OIP v2 inference request"}},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "JSON header (Inference-Header-Content-Length bytes) followed by "
                           "binary tensor data"}}}}}

    @app.post("/v2/models/{name}/infer", tags=["inference"], openapi_extra=infer_doc)
    async def infer_latest(name: str, request: Request) -> Response:
        return response(await handler.infer(name, None, request.headers.get, request.receive))

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["inference"],
              openapi_extra=infer_doc)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return response(await handler.infer(name, version, request.headers.get,
                                            request.receive))

    # ------------------------------------------------------------- TF Serving
    predict_doc = {"requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "description": "{\"instances\": [...]} or {\"inputs\": ...}"}}}}}

    @app.post("/v1/models/{name}:predict", tags=["tf-serving"], openapi_extra=predict_doc)
    async def predict_latest(name: str, request: Request) -> Response:
        return response(await handler.predict(name, None, request.headers.get,
                                              request.receive))

    @app.post("/v1/models/{name}/versions/{version}:predict", tags=["tf-serving"],
              openapi_extra=predict_doc)
    async def predict_version(name: str, version: str, request: Request) -> Response:
        return response(await handler.predict(name, version, request.headers.get,
                                              request.receive))

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

    async def off_loop(action: Callable[[str], Any], name: str) -> Response:
        """Loading and draining block for seconds: run them off the event loop."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, action, name)
        except EdgerunError as exc:
            return error_response(exc)
        return json_response({})

    @app.post("/v2/repository/models/{name}/load", tags=["repository"])
    async def load(name: str) -> Response:
        return await off_loop(repository.load, name)

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"])
    async def unload(name: str) -> Response:
        return await off_loop(repository.unload, name)

    # --------------------------------------------------------------- metrics
    @app.get("/metrics", tags=["metrics"])
    async def prometheus_metrics() -> Response:
        return Response(prometheus.render(repository.registry),
                        media_type=prometheus.CONTENT_TYPE)

    return app


def _platform(backend: str) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite",
            "tvm": "tvm"}.get(backend, backend)
