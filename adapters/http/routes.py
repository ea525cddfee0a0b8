"""The one route table of the HTTP adapter: the lean ASGI app and the FastAPI app both use it.

Each route maps a method and a path template onto a data-plane route, and says what the
OpenAPI document needs: the request body it takes, the answer it gives (schema and media type)
and the error kinds it can answer with (their status codes come from `status.status_of`, the
mapping the server answers with). The lean app matches paths with the compiled patterns; the
FastAPI app registers and documents the templates, so the documented API and the served one
cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgerun.adapters.codecs import prometheus
from edgerun.adapters.dataplane import call as routes
from edgerun.runtime.errors import (BundleError, DeadlineExceeded, EdgerunError, InferenceError,
                                    InvalidInput, ModelNotFound, ModelNotReady, Overloaded,
                                    PayloadTooLarge, PermissionDenied, Unauthenticated,
                                    UnsupportedMediaType)

#: Any route: a hook may refuse the call (auth), and anything unexpected is an internal error.
EVERY = (Unauthenticated, PermissionDenied, InferenceError)
#: Routes that read a request body (every POST): it is refused past the size limit, in a
#: content coding the server does not read, or corrupt in one it does.
BODY = (PayloadTooLarge, UnsupportedMediaType, InvalidInput)
#: Routes that name a model: it may be unknown, or still loading.
MODEL = (ModelNotFound, ModelNotReady)
#: Routes that run a model: bad tensors, a full queue, a deadline passed in the queue.
RUN = (InvalidInput, Overloaded, DeadlineExceeded)


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # FastAPI-style: /v2/models/{name}/versions/{version}/infer
    route: str     # the data-plane route
    tag: str
    summary: str
    #: The 200 answer's schema name (`openapi.SCHEMAS`) and media type.
    answer: str
    errors: tuple[type[EdgerunError], ...] = ()
    #: The request body's name in `openapi.BODIES`, when the route takes one.
    body: str | None = None
    media: str = routes.JSON
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/:]+)", self.template)
        object.__setattr__(self, "pattern", re.compile(regex))


_INFER = (*EVERY, *BODY, *MODEL, *RUN)
_MODEL_GET = (*EVERY, *MODEL)

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v2/models/{name}/infer", routes.INFER, "inference",
          "OIP v2 inference on the version the traffic policy picks", "InferResponse",
          _INFER, "infer"),
    Route("POST", "/v2/models/{name}/versions/{version}/infer", routes.INFER, "inference",
          "OIP v2 inference on one version", "InferResponse", _INFER, "infer"),
    Route("POST", "/v1/models/{name}:predict", routes.PREDICT, "tf-serving",
          "TF Serving REST predict", "PredictResponse", _INFER, "predict"),
    Route("POST", "/v1/models/{name}/versions/{version}:predict", routes.PREDICT, "tf-serving",
          "TF Serving REST predict on one version", "PredictResponse", _INFER, "predict"),
    Route("GET", "/v2/health/live", routes.LIVE, "health", "Liveness", "Live", EVERY),
    Route("GET", "/v2/health/ready", routes.READY, "health", "Readiness: every model loaded",
          "Ready", (*EVERY, ModelNotReady)),
    Route("GET", "/v2", routes.SERVER_METADATA, "metadata", "Server metadata", "ServerMetadata",
          EVERY),
    Route("GET", "/v2/models/{name}", routes.MODEL_METADATA, "metadata", "Model metadata",
          "ModelMetadata", _MODEL_GET),
    Route("GET", "/v2/models/{name}/versions/{version}", routes.MODEL_METADATA, "metadata",
          "Model version metadata", "ModelMetadata", _MODEL_GET),
    Route("GET", "/v2/models/{name}/ready", routes.MODEL_READY, "health", "Model readiness",
          "ModelReady", _MODEL_GET),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", routes.MODEL_READY, "health",
          "Model version readiness", "ModelReady", _MODEL_GET),
    Route("GET", "/v1/models/{name}", routes.MODEL_STATUS, "tf-serving", "TF Serving status",
          "ModelStatus", _MODEL_GET),
    Route("GET", "/v1/models/{name}/versions/{version}", routes.MODEL_STATUS, "tf-serving",
          "TF Serving version status", "ModelStatus", _MODEL_GET),
    Route("POST", "/v2/repository/index", routes.REPOSITORY_INDEX, "repository",
          "Every model version and its state", "RepositoryIndex", (*EVERY, *BODY)),
    Route("POST", "/v2/repository/models/{name}/load", routes.LOAD, "repository",
          "Load or hot-swap a model", "Empty",
          (*EVERY, *BODY, ModelNotFound, BundleError, ModelNotReady)),
    Route("POST", "/v2/repository/models/{name}/unload", routes.UNLOAD, "repository",
          "Drain and unload a model", "Empty", (*EVERY, *BODY, ModelNotFound)),
    Route("GET", "/metrics", routes.METRICS, "metrics", "Prometheus metrics", "Metrics", EVERY,
          media=prometheus.CONTENT_TYPE),
)


#: Every route but load and unload, for hosts whose model is fixed when they are deployed
#: (Lambda, Cloud Functions): there any caller could otherwise unload the function's model.
READ_ONLY_ROUTES = tuple(r for r in ROUTES if r.route not in (routes.LOAD, routes.UNLOAD))


def match(method: str, path: str, table: tuple[Route, ...] = ROUTES
          ) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for a request in `table`, its path parameters, and the methods the path
    allows.

    HEAD is GET without the body, as HTTP wants of every GET resource.
    """
    allowed: list[str] = []
    for route in table:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, found.groupdict(), []
        allowed += ("GET", "HEAD") if route.method == "GET" else (route.method,)
    return None, {}, allowed
