"""The one route table of the HTTP adapter: the lean ASGI app and the FastAPI app both use it.

Each route maps a method and a path template onto a data-plane route. The lean app matches
paths with the compiled patterns; the FastAPI app registers the templates, so the documented
API and the served one cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgerun.adapters.dataplane import call as routes


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # FastAPI-style: /v2/models/{name}/versions/{version}/infer
    route: str     # the data-plane route
    tag: str
    summary: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/:]+)", self.template)
        object.__setattr__(self, "pattern", re.compile(regex))


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v2/models/{name}/infer", routes.INFER, "inference",
          "OIP v2 inference on the version the traffic policy picks"),
    Route("POST", "/v2/models/{name}/versions/{version}/infer", routes.INFER, "inference",
          "OIP v2 inference on one version"),
    Route("POST", "/v1/models/{name}:predict", routes.PREDICT, "tf-serving",
          "TF Serving REST predict"),
    Route("POST", "/v1/models/{name}/versions/{version}:predict", routes.PREDICT, "tf-serving",
          "TF Serving REST predict on one version"),
    Route("GET", "/v2/health/live", routes.LIVE, "health", "Liveness"),
    Route("GET", "/v2/health/ready", routes.READY, "health", "Readiness: every model loaded"),
    Route("GET", "/v2", routes.SERVER_METADATA, "metadata", "Server metadata"),
    Route("GET", "/v2/models/{name}", routes.MODEL_METADATA, "metadata", "Model metadata"),
    Route("GET", "/v2/models/{name}/versions/{version}", routes.MODEL_METADATA, "metadata",
          "Model version metadata"),
    Route("GET", "/v2/models/{name}/ready", routes.MODEL_READY, "health", "Model readiness"),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", routes.MODEL_READY, "health",
          "Model version readiness"),
    Route("GET", "/v1/models/{name}", routes.MODEL_STATUS, "tf-serving", "TF Serving status"),
    Route("GET", "/v1/models/{name}/versions/{version}", routes.MODEL_STATUS, "tf-serving",
          "TF Serving version status"),
    Route("POST", "/v2/repository/index", routes.REPOSITORY_INDEX, "repository",
          "Every model version and its state"),
    Route("POST", "/v2/repository/models/{name}/load", routes.LOAD, "repository",
          "Load or hot-swap a model"),
    Route("POST", "/v2/repository/models/{name}/unload", routes.UNLOAD, "repository",
          "Drain and unload a model"),
    Route("GET", "/metrics", routes.METRICS, "metrics", "Prometheus metrics"),
)


def match(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for a request, its path parameters, and the methods the path allows."""
    allowed: list[str] = []
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict(), []
        allowed.append(route.method)
    return None, {}, allowed
