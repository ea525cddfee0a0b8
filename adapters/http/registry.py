"""The fleet registry's HTTP face (Starlette): bundles, devices and rollouts.

    POST /bundles                       a signed .tar.gz; verified before it is accepted (201)
    GET  /bundles                       the versions the registry holds
    GET  /bundles/{model}/{version}     the archive, ETag = "<sha256>", Range and If-Range
                                        (a Range it cannot read: the whole archive)
    GET  /devices                       devices as their status and telemetry last said
    POST /rollouts                      start a rollout (JSON: model, version, targets, waves...)
    GET  /rollouts[/{id}]               rollouts and their devices by state
    POST /rollouts/{id}/abort           abort and roll every updated device back
    POST /rollouts/{id}/rollback        a running or completed rollout's devices back (admin)
    POST /devices/{id}/enroll           a new device secret (JSON: groups), returned once
    POST /devices/{id}/revoke           the device's credential stops working at once
    GET  /credentials                   enrolled devices' password hashes, for the broker files
    GET  /health                        open, for probes

Every other route passes `authorize(request, scope)` before it acts. `fleet serve --tokens`
makes it `FleetAccess`: a bearer token of scope `read` (listings, status), `deploy` (start or
abort a rollout) or `admin` (push, roll back, enrol, revoke, broker files); a bundle download also takes a
device's own credential (HTTP Basic, device id + secret), for the bundles of its own jobs only.
A rollout's or enrolment's JSON body is at most `MAX_JSON_BYTES` (413 past it, the rest unread).
Every refusal is JSON `{"error": ...}`: an unknown route's 404 and a wrong method's 405 (with
`Allow`) too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgerun.adapters.auth.devices import DeviceCredentials
from edgerun.adapters.auth.tokens import TokenStore, basic
from edgerun.adapters.fleet.orchestrator import MqttLink, Orchestrator, broker_username
from edgerun.adapters.fleet.registry import BundleRegistry, unstorable
from edgerun.adapters.fleet.store import Store
from edgerun.adapters.fleetdb import Lease, Leadership
from edgerun.adapters.http.listening import NamedBindErrors
from edgerun.adapters.http.ranges import RangedFile
from edgerun.adapters.http.status import error_headers, status_of
from edgerun.runtime.bundle import check_name, check_version
from edgerun.runtime.errors import EdgerunError, InvalidInput, PayloadTooLarge, PermissionDenied

log = logging.getLogger(__name__)

Authorize = Callable[[Request, str], None]
DEVICE = "device"  # a bundle download: a device's credential, or a read token
#: A rollout's or enrolment's JSON body: a rollout naming some ten thousand devices fits.
MAX_JSON_BYTES = 1 << 20


class FleetAccess:
    """Bearer tokens for people and scripts; device credentials for bundle downloads.

    Tokens are checked by `TokenStore` (constant time, reloaded when the file changes); a
    device's Basic credential against the fleet database, then the job table: a device may
    fetch only the versions of jobs addressed to it. Refusals name no secret.
    """

    def __init__(self, tokens: TokenStore, store: Store,
                 credentials: DeviceCredentials | None = None) -> None:
        self.tokens = tokens
        self.store = store
        self.credentials = credentials

    def __call__(self, request: Request, scope: str) -> None:
        header = request.headers.get("authorization")
        if scope == DEVICE and basic(header) is not None and self.credentials is not None:
            device = self.credentials.authenticate(header)
            model, version = request.path_params["model"], request.path_params["version"]
            check_name(model)  # named as what is wrong with them, before any lookup
            check_version(version)
            if not self.store.device_has_job(device, model, version):
                raise PermissionDenied(f"device {device!r} has no job for {model} version "
                                       f"{version}")
            return
        self.tokens.check_header(header, "read" if scope == DEVICE else scope)


async def _bounded(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    """The request's body in chunks, refused (PayloadTooLarge) once over `limit` bytes: from
    its Content-Length before a byte is read, else as it comes; the rest is never read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} of {declared} bytes is over the {limit}-byte limit")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the {limit}-byte limit")
        yield chunk


async def _body(request: Request, limit: int, what: str) -> bytes:
    """A JSON request's whole body, at most `limit` bytes (`_bounded`)."""
    return b"".join([chunk async for chunk in _bounded(request, limit, what)])


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def _error(exc: EdgerunError) -> Response:
    return Response(orjson.dumps({"error": str(exc)}), status_of(exc),
                    headers=error_headers(exc), media_type="application/json")


def create_registry_app(registry: BundleRegistry, orchestrator: Orchestrator,
                        authorize: Authorize = lambda request, scope: None,
                        credentials: DeviceCredentials | None = None) -> Starlette:
    def guarded(scope: str, handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:  # off the loop: a device secret's check is a deliberately slow hash
                await run_in_threadpool(authorize, request, scope)
            except EdgerunError as exc:  # refused, or a path no bundle can have (400)
                # by route and token or device name only, never a secret
                log.debug("refused %s %s: %s", request.method, request.url.path, exc)
                return _error(exc)
            try:
                return await handler(request)
            except EdgerunError as exc:
                return _error(exc)
        return endpoint

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def push(request: Request) -> Response:
        with tempfile.SpooledTemporaryFile(8 << 20, dir=registry.root) as upload:  # big: disk
            async for chunk in _bounded(request, registry.max_bytes, "bundle"):
                try:
                    upload.write(chunk)
                except OSError as exc:  # a full disk, as the push's own file: said so
                    raise unstorable(exc, registry.root) from exc
            upload.seek(0)
            stored, created = await run_in_threadpool(registry.push, upload)
        return _json({**stored.to_json(), "created": created}, 201 if created else 200)

    async def bundles(request: Request) -> Response:
        return _json(registry.store.versions())

    async def bundle(request: Request) -> Response:
        stored = registry.get(request.path_params["model"], request.path_params["version"])
        return RangedFile(stored.path, await run_in_threadpool(os.stat, stored.path),
                          f"{stored.model} version {stored.version}", "application/gzip",
                          {"etag": f'"{stored.sha256}"'})

    async def devices(request: Request) -> Response:
        return _json(registry.store.devices())

    async def deploy(request: Request) -> Response:
        body = await _body(request, MAX_JSON_BYTES, "rollout")
        try:
            spec = orjson.loads(body)
            model, version = str(spec.pop("model")), str(spec.pop("version"))
        except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            # TypeError: a JSON array's pop("model"); an answer of 400, not a 500
            raise InvalidInput(f"a rollout needs a JSON body with model and version ({exc})") \
                from exc
        allowed = {"group", "devices", "waves", "max_failures", "gate", "job_timeout",
                   "gate_timeout"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise InvalidInput(f"unknown rollout fields: {', '.join(unknown)}")
        status = await run_in_threadpool(lambda: orchestrator.deploy(model, version, **spec))
        return _json(status, 201)

    async def rollouts(request: Request) -> Response:
        status = await run_in_threadpool(orchestrator.status)
        return _json({**status, "models": registry.store.versions()})

    async def rollout(request: Request) -> Response:
        return _json(await run_in_threadpool(orchestrator.status, request.path_params["id"]))

    async def abort(request: Request) -> Response:
        await run_in_threadpool(orchestrator.abort, request.path_params["id"])
        return _json(await run_in_threadpool(orchestrator.status, request.path_params["id"]))

    async def rollback(request: Request) -> Response:
        await run_in_threadpool(orchestrator.rollback, request.path_params["id"])
        return _json(await run_in_threadpool(orchestrator.status, request.path_params["id"]))

    def needs_credentials() -> DeviceCredentials:
        if credentials is None:
            raise InvalidInput("this registry keeps no device credentials")
        return credentials

    async def enroll(request: Request) -> Response:
        body = await _body(request, MAX_JSON_BYTES, "enrolment")
        try:
            groups = (orjson.loads(body) if body else {}).get("groups", [])
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise InvalidInput(f"enrol takes a JSON body like {{\"groups\": [...]}} ({exc})") \
                from exc
        # names only: a string would be iterated into one-letter groups, each a grant
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise InvalidInput("groups must be a list of group names, like "
                               "{\"groups\": [\"field\"]}")
        device = request.path_params["id"]
        secret = await run_in_threadpool(needs_credentials().enroll, device, groups)
        return _json({"device_id": device, "groups": groups, "secret": secret}, 201)

    async def revoke(request: Request) -> Response:
        device = request.path_params["id"]
        await run_in_threadpool(needs_credentials().revoke, device)
        return _json({"device_id": device, "revoked": True})

    async def enrolled(request: Request) -> Response:
        rows = await run_in_threadpool(needs_credentials().devices)
        return _json([{"device_id": d.device_id, "password_hash": d.password_hash,
                       "groups": list(d.groups)} for d in rows])

    routes = [
        Route("/health", health),
        Route("/bundles", guarded("admin", push), methods=["POST"]),
        Route("/bundles", guarded("read", bundles), methods=["GET"]),
        Route("/bundles/{model}/{version}", guarded(DEVICE, bundle), methods=["GET", "HEAD"]),
        Route("/devices", guarded("read", devices)),
        Route("/devices/{id}/enroll", guarded("admin", enroll), methods=["POST"]),
        Route("/devices/{id}/revoke", guarded("admin", revoke), methods=["POST"]),
        Route("/credentials", guarded("admin", enrolled)),
        Route("/rollouts", guarded("deploy", deploy), methods=["POST"]),
        Route("/rollouts", guarded("read", rollouts), methods=["GET"]),
        Route("/rollouts/{id}", guarded("read", rollout)),
        Route("/rollouts/{id}/abort", guarded("deploy", abort), methods=["POST"]),
        Route("/rollouts/{id}/rollback", guarded("admin", rollback), methods=["POST"]),
    ]

    async def refused(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no route, wrong method) as JSON, like the registry's
        others and the inference server's; a 405's Allow names every route of the path (one
        route per method here: Starlette names the first one's alone)."""
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 404:
            return _json({"error": f"no route {path}"}, 404)
        if exc.status_code == 405:
            allowed = sorted({method for route in routes if route.path_regex.match(path)
                              for method in route.methods or ()})
            return Response(orjson.dumps({"error": f"method {request.method} is not allowed "
                                                   f"on {path}"}), 405,
                            headers={"Allow": ", ".join(allowed)},
                            media_type="application/json")
        return Response(orjson.dumps({"error": str(exc.detail)}), exc.status_code,
                        headers=exc.headers, media_type="application/json")

    return Starlette(routes=routes, exception_handlers={HTTPException: refused})


def serve_fleet(data_dir: str, broker: str, *, host: str = "127.0.0.1", port: int = 8700,
                public_url: str | None = None, trusted: list | None = None,
                tokens: Path | None = None, broker_password: str | None = None,
                db: str | None = None, lease_ttl: float = 15.0,
                log_level: str = "warning") -> None:
    """`edgerun fleet serve`: store, registry, orchestrator on MQTT, HTTP; until SIGTERM.

    Several processes may share one database (`db`, PostgreSQL) and the bundles folder: each
    serves the API and records what devices say of themselves, and the holder of the "rollouts"
    lease alone acts on their job reports and drives rollouts; when it dies another takes over
    within `lease_ttl` seconds."""
    root = logging.getLogger()  # --log-level for the registry's own messages too
    root.setLevel(min(root.level, logging.getLevelName(log_level.upper())))
    token_store = TokenStore(tokens) if tokens is not None else None
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    store = Store.open(db or root / "fleet.db")
    # no device or group may take the orchestrator's own MQTT username
    credentials = DeviceCredentials(store.db, [u for u in (broker_username(broker),) if u])
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    leadership = Leadership(Lease(store.db, "rollouts", holder, ttl=lease_ttl))
    registry = BundleRegistry(root, store, trusted or [])
    orchestrator = Orchestrator(
        store, registry, public_url or f"http://{host}:{port}", leader=leadership,
        enrolled=credentials.groups)
    link = MqttLink(broker, orchestrator, password=broker_password)
    leadership.on_change = link.on_leadership
    link.start()
    leadership.start()
    try:
        authorize = (FleetAccess(token_store, store, credentials) if token_store is not None
                     else lambda request, scope: None)
        app = create_registry_app(registry, orchestrator, authorize, credentials)
        # uvicorn.run's steps, on a server that names an address it cannot listen on (it
        # logged "Name or service not known" and exited 3)
        server = NamedBindErrors(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                access_log=False, timeout_graceful_shutdown=10))
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        if not server.started:
            raise SystemExit(3)  # uvicorn's status for a start-up that failed
    finally:
        link.stop()
        leadership.stop()
        store.close()
