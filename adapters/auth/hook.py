"""API keys on the data plane: one hook, so HTTP routes, the fast path, gRPC and MQTT all check.

Which scope each route needs, as a platform team runs it:

- open: liveness and readiness (`/v2/health/live`, `/v2/health/ready`, gRPC ServerLive and
  ServerReady): kubelet and load balancer probes carry no credentials. A model's own ready
  route is not a probe; it names models, so it needs a key like the other metadata.
- `read`: inference (OIP infer, TF Serving predict), server and model metadata, model ready and
  status, the repository index; and the Prometheus metrics unless `metrics_open`.
- `deploy`: loading and unloading models (changes what the server serves).
- anything else (a route added later and not listed here): `admin`, so new routes fail closed.

The OpenAPI document (`/docs`, `/openapi.json`) is served beside the data plane and stays open:
it describes the protocol and names no model.

Metrics are closed by default once keys are on: they name every model and version and reveal
traffic. Prometheus scrapes with a `read` token (`authorization: {credentials_file: ...}` in its
scrape config); `metrics_open=True` (`edgerun serve --metrics open`) is for scrapers that cannot.
"""

from __future__ import annotations

import logging

from edgerun.adapters.auth.tokens import TokenStore, bearer
from edgerun.adapters.dataplane.call import (INFER, LIVE, LOAD, METRICS, MODEL_METADATA,
                                             MODEL_READY, MODEL_STATUS, PREDICT, READY,
                                             REPOSITORY_INDEX, SERVER_METADATA, UNLOAD, Call)
from edgerun.adapters.dataplane.hooks import Hook
from edgerun.runtime.errors import PermissionDenied, Unauthenticated
from edgerun.runtime.metrics import REGISTRY, Registry

log = logging.getLogger(__name__)

OPEN = None
ROUTE_SCOPES: dict[str, str | None] = {
    LIVE: OPEN, READY: OPEN,
    INFER: "read", PREDICT: "read", SERVER_METADATA: "read", MODEL_METADATA: "read",
    MODEL_READY: "read", MODEL_STATUS: "read", REPOSITORY_INDEX: "read", METRICS: "read",
    LOAD: "deploy", UNLOAD: "deploy"}


def route_scope(route: str, *, metrics_open: bool = False) -> str | None:
    """The scope a data-plane route needs, or None when it is open."""
    if route == METRICS and metrics_open:
        return OPEN
    return ROUTE_SCOPES.get(route, "admin")


class ApiKeyHook(Hook):
    """Refuse calls without a valid `authorization: Bearer <key>` of a sufficient scope.

    The caller's token name becomes `call.identity` (for logs and later hooks). Refusals are
    counted in `edgerun_auth_refusals_total{transport,reason}` and logged at debug level by
    route and token name only: a flood of bad keys can neither fill the log nor leak a key.
    """

    attribute = "authorization"

    def __init__(self, store: TokenStore, *, metrics_open: bool = False,
                 registry: Registry = REGISTRY) -> None:
        self.store = store
        self.metrics_open = metrics_open
        self._refusals = registry.family(
            "edgerun_auth_refusals_total", "Calls refused by API key checks, by transport and "
            "reason (missing, invalid, scope)", "counter", ("transport", "reason"))

    def before(self, call: Call) -> None:
        needed = route_scope(call.route, metrics_open=self.metrics_open)
        if needed is OPEN:
            return
        token = bearer(call.attributes(self.attribute))
        try:
            entry = self.store.check(token, needed)
        except (Unauthenticated, PermissionDenied) as exc:
            reason = ("scope" if isinstance(exc, PermissionDenied)
                      else "missing" if token is None else "invalid")
            self._refusals.labels(call.transport, reason).inc()
            # the messages name a token at most, never its secret
            log.debug("refused %s %s over %s (%s): %s", call.route, call.model or "-",
                      call.transport, reason, exc)
            raise
        call.identity = entry.name
