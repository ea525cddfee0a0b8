"""Run the fleet server: HTTP on uvicorn and, if asked, OIP v2 gRPC, in one event loop.

Both listen on the same loop (uvloop when installed) over the same data plane. A SIGTERM or
SIGINT stops both together: neither takes new requests, both answer the ones they hold (the
batchers run what they queue at once, with no batching delay left to wait out; each HTTP answer
says `Connection: close`, and idle connections close), then the repository drains and the
process exits 0. A second signal ends both grace periods at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import DataPlane, Hook, Reply
from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.app import create_app
from edgerun.adapters.http.asgi import ASGIApp, EdgerunASGI, Receive, Scope, Send, send_reply
from edgerun.adapters.http.listening import NamedBindErrors, listen_address
from edgerun.adapters.http.protocol import OneSendProtocol
from edgerun.devices import DeviceProfile
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.errors import BundleError, ModelNotReady
from edgerun.runtime.repository import UNAVAILABLE, Repository
from edgerun.runtime.sources import VersionSource

GRACE_S = 30
log = logging.getLogger(__name__)


def serve(source: VersionSource | str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          grpc_port: int | None = None, device: str | DeviceProfile | None = None,
          poll_interval: float | None = None, batching: BatchingConfig | None = None,
          max_body_bytes: int = 64 << 20, keep_alive_s: float = 75.0,
          access_log: bool = False,
          log_level: str = "info", hooks: Iterable[Hook] = (),
          exit_unless_loaded: bool = False) -> None:
    """Serve every model of `source` (a repository folder, or any VersionSource) until stopped.

    The repository loads in the background once the ports listen (readiness turns true once
    every model is loaded); a port that cannot be listened on raises OSError naming it. The
    app itself never loads or unloads models. `hooks` (auth, tracing) join the request-id
    hook on every route of both transports. With `exit_unless_loaded` (one model, as under
    KServe), a model that fails to load stops the server and raises BundleError with the
    reason: a process serving nothing should end, so its orchestrator shows the failure,
    rather than stay live and never ready. An idle HTTP connection closes after
    `keep_alive_s`: uvicorn's 5 s is under every proxy's idle timeout (an ALB's 60 s, Go's
    90 s), so a proxy reusing a connection the server was closing answered 502. A request
    head must be whole within min(60 s, `keep_alive_s`) of its first byte (else 408 and the
    close). On host `::`, HTTP takes IPv4 clients too, as gRPC does.
    """
    repository = Repository(source, device, default_batching=batching)
    plane = DataPlane(repository)
    for hook in hooks:
        plane.hooks.add(hook)
    app = _CutOff(EdgerunASGI(plane, max_body_bytes=max_body_bytes,
                              fallback=create_app(plane, max_body_bytes=max_body_bytes)))
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log,
                            log_level=log_level, timeout_graceful_shutdown=GRACE_S,
                            proxy_headers=False, lifespan="on", http=OneSendProtocol,
                            ws="none", timeout_keep_alive=keep_alive_s)
    loading: list[threading.Thread] = []

    def start_loading() -> None:
        """Load once both ports listen: a port already taken or a bad --host ends start-up
        before any model began to load. Ending while a model loads, the process could abort
        in ONNX Runtime (SIGABRT) instead of exiting with its error."""
        loading.append(repository.start_loading(poll_interval))
        threading.Thread(target=_freeze_after, args=(loading[0],), name="edgerun-gc-freeze",
                         daemon=True).start()

    http = app.server = _Uvicorn(config, listening=start_loading)
    unloaded: list[str] = []
    try:
        _run(_serve(http, plane, host, grpc_port, max_body_bytes,
                    (loading, unloaded) if exit_unless_loaded else None))
    finally:
        # stopped while a model loads (at start-up, or a hot swap): closing would wait for
        # that load (minutes, for a TensorRT engine build) past the platform's kill timeout;
        # every request was answered, so the process may end with it unfinished (`edgerun
        # serve` does)
        if any(thread.is_alive() for thread in loading) or not repository.close(
                wait_for_loads=False):
            log.warning("stopped while models were still loading; their load is abandoned")
    if unloaded:
        raise BundleError("; ".join(unloaded))


def _freeze_after(loading: threading.Thread) -> None:
    """Move what start-up made (imports, both apps, the loaded models) out of the collector's
    sight, now and once the models are in.

    Otherwise every full collection walks those objects with the event loop stopped: 25 to
    38 ms on the benchmark host, each one a spike in p99 (0.1 to 0.6 ms frozen).
    """
    gc.freeze()
    loading.join()
    gc.collect()
    gc.freeze()


class _CutOff:
    """The app, whose requests a stop cuts off (uvicorn cancels what still runs when the grace
    period ends; the loop's end, after a second signal) are answered 503, as the server stops:
    uvicorn logged each as "Exception in ASGI application", with a traceback, and answered
    500, the status of a failed forward pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.server: uvicorn.Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http" or self.server is None or not self.server.should_exit:
                raise
            error = ModelNotReady("the server stopped before the request was answered")
            # with an X-Request-Id, as every answer: the caller's, else a new one (the one the
            # hook gave went with the cancelled call)
            given = dict(scope["headers"]).get(b"x-request-id")
            headers = {"X-Request-Id": request_id(None if given is None
                                                  else given.decode("latin-1"))}
            # uvicorn refuses a second head (RuntimeError) where the answer had begun
            with contextlib.suppress(RuntimeError, OSError):
                await send_reply(send, Reply(oip.encode_error(str(error)), error=error,
                                             headers=headers))


class _LoopExecutor(ThreadPoolExecutor):
    """The loop's default executor (POST .../load and .../unload run there): at the loop's
    end it waits for nothing. A load whose call the stop cut off can run on for minutes; the
    process ends without it (`serve`, then `exit_if_still_loading`)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)


class _Uvicorn(NamedBindErrors):
    """uvicorn without signal handlers of its own (`_serve` stops HTTP and gRPC together),
    calling `listening` once it listens."""

    def __init__(self, config: uvicorn.Config, listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.listening = listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, a port it cannot listen on an OSError naming the address, as gRPC's is
        (`edgerun serve` says so and exits 2). On `::` it listens dual-stack."""
        own: list[socket.socket] = []
        if sockets is None and _any_ipv6(self.config.host):
            try:
                sockets = own = [_dual_stack_socket(self.config.port)]
            except OSError as exc:
                raise OSError(f"HTTP could not listen on {listen_address(self.config)}: "
                              f"{exc}") from None
        await super().startup(sockets)
        if own:
            self._log_started_message(own)  # uvicorn logs it only for sockets it made
        self.listening()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop_listening(self) -> None:
        """Stop now, not at uvicorn's next tick (up to 0.1 s on): no new connection, idle
        ones closed, every answer from here on with `Connection: close` (`OneSendProtocol`).
        The answers of the requests a stop runs at once went out in that tick, keep-alive,
        and a client reusing their connection lost its next request to the close."""
        for listener in getattr(self, "servers", ()):  # none before start-up listens
            listener.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # forced (a second signal), uvicorn skips the app's lifespan shutdown, and the
        # lifespan task, cancelled as the loop ends, logged a traceback; edgerun's app
        # answers it at once
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            await self.lifespan.shutdown()


def _any_ipv6(host: str) -> bool:
    """Whether `host` is IPv6's any address (`::`)."""
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def _dual_stack_socket(port: int) -> socket.socket:
    """A socket bound to [::]:port that takes IPv4 clients too, as gRPC's on [::] does:
    asyncio's own sets IPV6_V6ONLY, so `--host ::` answered no IPv4 client over HTTP."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(http: uvicorn.Server, plane: DataPlane, host: str, grpc_port: int | None,
                 max_message_bytes: int,
                 must_load: tuple[list[threading.Thread], list[str]] | None) -> None:
    asyncio.get_running_loop().set_default_executor(_LoopExecutor(thread_name_prefix="asyncio"))
    grpc_server = None
    if grpc_port is not None:
        from edgerun.adapters.grpc import server as grpc_serving
        grpc_server = await grpc_serving.start(plane, host, grpc_port,
                                               max_message_bytes=max_message_bytes)
    stopping: list[asyncio.Task[None]] = []
    stopped = False

    def stop() -> None:
        """Take no new requests; answer the ones held, queued ones at once (no batching
        delay left to wait out), within the grace period."""
        nonlocal stopped
        http.should_exit = True
        if stopped:
            return
        stopped = True
        http.stop_listening()
        plane.repository.flush()
        if grpc_server is not None:
            stopping.append(asyncio.ensure_future(grpc_server.stop(GRACE_S)))

    def on_signal() -> None:
        if not stopped:
            stop()
            return
        # a second signal: end both grace periods, abandoning what still runs
        http.force_exit = True
        if grpc_server is not None:
            stopping.append(asyncio.ensure_future(grpc_server.stop(None)))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    watching = None if must_load is None else asyncio.ensure_future(
        _stop_unless_loaded(plane.repository, *must_load, stop))
    try:
        await http.serve()
    finally:
        if watching is not None:
            watching.cancel()
        stop()
        while stopping:  # a second signal may add the gRPC stop that ends the grace
            await stopping.pop(0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _stop_unless_loaded(repository: Repository, loading: list[threading.Thread],
                              unloaded: list[str], stop: Callable[[], None]) -> None:
    """Once loading (started when the ports listen) is over: the reasons its models did not
    load, and the server stopped."""
    # polled: a thread joining it would hold up the loop's shutdown
    while not loading or loading[0].is_alive():
        await asyncio.sleep(0.2)
    if not repository.ready:
        reasons = [f"model {state.name!r} did not load: {state.reason}"
                   for state in repository.index() if state.state == UNAVAILABLE]
        unloaded.extend(reasons or ["no model loaded"])
        stop()


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
