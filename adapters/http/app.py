"""The FastAPI app: the same route table, documented (OpenAPI at /openapi.json, docs at /docs).

The server runs the lean ASGI app (`asgi.py`) with this one behind it for the docs; a host that
mounts this app itself gets the same answers, since every route calls the same data plane.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgerun import __version__
from edgerun.adapters.dataplane import Call, DataPlane, Reply
from edgerun.adapters.dataplane.call import JSON
from edgerun.adapters.http.asgi import DEFAULT_MAX_BODY_BYTES, read_body
from edgerun.adapters.http.openapi import SCHEMAS, operation
from edgerun.adapters.http.routes import ROUTES, Route
from edgerun.adapters.http.status import error_headers, status_of


def create_app(plane: DataPlane, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Every route of the route table on FastAPI, each calling the data plane."""
    app = FastAPI(title="edgerun", version=__version__,
                  description="Open Inference Protocol v2 and TF Serving REST on the edgerun "
                              "inference core.")
    for index, route in enumerate(ROUTES):
        app.add_api_route(route.template, _endpoint(plane, route, max_body_bytes),
                          methods=[route.method], tags=[route.tag], summary=route.summary,
                          name=f"{route.route}_{index}")

    def document() -> dict[str, Any]:
        """FastAPI's document with each table route's operation exactly as `operation` says.

        FastAPI would add a JSON 200 and a 422 it never sends; the table knows better.
        """
        if app.openapi_schema is None:
            spec = FastAPI.openapi(app)
            for route in ROUTES:
                documented = spec["paths"][route.template][route.method.lower()]
                spec["paths"][route.template][route.method.lower()] = {
                    "tags": [route.tag], "summary": route.summary,
                    "operationId": documented["operationId"], **operation(route)}
            spec["components"] = {"schemas": SCHEMAS}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return Response(orjson.dumps({"error": str(exc.detail)}), status_code=exc.status_code,
                        media_type=JSON, headers=exc.headers)

    return app


def _endpoint(plane: DataPlane, route: Route,
              limit: int) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        params = request.path_params
        call = Call(route.route, params.get("name", ""), params.get("version"),
                    attributes=partial(_header, request.headers))
        body = partial(read_body, request.receive, request.headers.get("content-length"),
                       limit, request.headers.get("content-encoding")) \
            if route.method == "POST" else None  # read once the hooks let the call through
        return response(await plane.handle_async(call, body))
    return endpoint


def _header(headers: Headers, name: str) -> str | None:
    """A request header; None for a name no header has (one Starlette cannot encode: a sticky
    key for MQTT's UTF-8 user properties), where the lookup raised, a 500 every request."""
    try:
        return headers.get(name)
    except UnicodeEncodeError:
        return None


def response(reply: Reply) -> Response:
    """A data-plane reply as a Starlette response."""
    headers = {**error_headers(reply.error), **reply.headers}
    return Response(reply.body, status_code=status_of(reply.error),
                    media_type=reply.content_type, headers=headers)
