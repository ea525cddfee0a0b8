"""The fleet HTTP server: Open Inference Protocol v2 and TF Serving REST.

`asgi.EdgerunASGI` (no web framework) serves every route on the data plane; `app.create_app`
is the same route table on FastAPI, for the OpenAPI docs; `server.serve` runs both on uvicorn.
Importing this package imports neither FastAPI nor uvicorn until they are asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EdgerunASGI", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "EdgerunASGI":
        from edgerun.adapters.http.asgi import EdgerunASGI
        return EdgerunASGI
    if name == "create_app":
        from edgerun.adapters.http.app import create_app
        return create_app
    if name == "serve":
        from edgerun.adapters.http.server import serve
        return serve
    raise AttributeError(name)
