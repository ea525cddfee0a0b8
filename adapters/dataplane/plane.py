"""The data plane: every adapter's requests are decoded, routed, run and answered here.

    call -> hooks.before -> decode (codecs) -> route (repository) -> MicroBatcher -> encode
         -> hooks.after -> metrics -> reply

Adapters only translate their transport to a `Call` and a `Reply` back: HTTP maps the reply's
error to a status code, MQTT to an error message, Lambda to `batchItemFailures`. `handle` is for
callers on plain threads (paho-mqtt callbacks, Lambda handlers) and blocks; `handle_async` is
for callers on an event loop and never blocks it. Transports with their own tensor encoding
(gRPC) call `infer`/`infer_async` with a decoded request and get arrays back, or their own
encoding of them (`encode`: gRPC's message, a Lambda queue record's JSON), made and counted
inside the call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import CoroutineType
from typing import Any, TypeVar, overload

import numpy as np
import orjson

from edgerun import __version__
from edgerun.adapters.codecs import oip, prometheus, tfserving
from edgerun.adapters.dataplane.call import (BINARY, INFER, INFERENCE_ROUTES, JSON, LIVE, LOAD,
                                             METRICS, MODEL_METADATA, MODEL_READY,
                                             MODEL_STATUS, PREDICT, READY, REPOSITORY_INDEX,
                                             SERVER_METADATA, UNLOAD, Call, Reply)
from edgerun.adapters.dataplane.hooks import HookChain, RequestId
from edgerun.runtime.errors import (Cancelled, DeadlineExceeded, EdgerunError, InferenceError,
                                    InvalidInput, ModelNotReady, PayloadTooLarge)
from edgerun.runtime.metrics import LATENCY_BUCKETS
from edgerun.runtime.repository import READY as READY_STATE
from edgerun.runtime.repository import Repository
from edgerun.runtime.router import Routed

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_ATTRIBUTE = "x-request-timeout-ms"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
#: A function that decodes a request, for `infer` to call once the hooks have let it through.
Decoder = Callable[[], oip.InferRequest]
#: A coroutine function that decodes a request, for `infer_async` to await likewise.
AsyncDecoder = Callable[[], Awaitable[oip.InferRequest]]
#: A coroutine function that reads a call's body, for `handle_async` to await likewise.
BodyReader = Callable[[], Awaitable[bytes]]
#: What a transport passes on of a call's reply: None where it sets no limit, else the bytes it
#: would send for the reply and the most it passes on (see `DataPlane.limit_answers`).
AnswerLimit = Callable[[Call, Reply], "tuple[int, int] | None"]
#: The message of the PayloadTooLarge in place of a reply over its transport's limit, of the
#: reply's bytes, the limit and the call (see `DataPlane.limit_answers`).
TooLargeMessage = Callable[[int, int, Call], str]
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite", "tvm": "tvm"}
#: Inference bodies from this size up are decoded, and their answers encoded, on a worker
#: thread: a 60 MB JSON body takes seconds to read, and on the event loop every other caller,
#: HTTP and gRPC, waited for it. Common requests are far smaller. One thread: big bodies are
#: decoded one at a time, so their decoding's peak (a JSON body of small numbers takes 20
#: times its size) is never multiplied.
OFF_LOOP_BYTES = 1 << 20


@dataclass(frozen=True)
class InferResult:
    """A decoded request's answer: the version that ran it and the outputs it asked for."""

    model: str
    version: str
    request: oip.InferRequest
    outputs: dict[str, np.ndarray]

    def json(self) -> bytes:
        """The OIP v2 response all in JSON, whatever binary outputs the request asked for: a
        queue message, a log line or an event answer carries no binary part."""
        request = self.request
        as_json = dataclasses.replace(request, binary_outputs=False, outputs=None
                                      if request.outputs is None
                                      else [oip.RequestedOutput(o.name, False)
                                            for o in request.outputs])
        return oip.encode_response(self.model, self.version, as_json, self.outputs)[0]


#: Makes a transport's answer of a result, or a coroutine making it (on a worker thread, say),
#: for `infer_async` to return.
Encoder = Callable[[InferResult], T | Coroutine[Any, Any, T]]


class DataPlane:
    """Decode, route, run, encode, count: one path for every transport."""

    def __init__(self, repository: Repository, *, hooks: HookChain | None = None) -> None:
        self.repository = repository
        self.hooks = hooks if hooks is not None else HookChain([RequestId()])
        registry = repository.registry
        self._requests = registry.family(
            "edgerun_requests_total", "Inference requests by model, version, transport and "
            "outcome (ok or the error kind)", "counter",
            ("model", "version", "transport", "outcome"))
        self._latency = registry.family(
            "edgerun_request_duration_seconds", "Inference request latency in the data plane, "
            "decode to encode", "histogram", ("model", "version", "transport"), LATENCY_BUCKETS)
        self._routes: dict[str, Callable[[Call], Reply]] = {
            INFER: self._infer_call, PREDICT: self._predict_call, LIVE: self._live,
            READY: self._ready, SERVER_METADATA: self._server_metadata,
            MODEL_METADATA: self._model_metadata, MODEL_READY: self._model_ready,
            MODEL_STATUS: self._model_status, REPOSITORY_INDEX: self._index,
            LOAD: self._load, UNLOAD: self._unload, METRICS: self._metrics}
        self._async_routes: dict[str, Callable[[Call], Awaitable[Reply]]] = {
            INFER: self._infer_call_async, PREDICT: self._predict_call_async,
            LOAD: self._off_loop(self._load), UNLOAD: self._off_loop(self._unload)}
        self._big_bodies = ThreadPoolExecutor(1, thread_name_prefix="edgerun-big-body")
        self._answer_limit: AnswerLimit | None = None
        self._too_large: TooLargeMessage = _answer_too_large

    # ------------------------------------------------------------ bytes in, bytes out
    def handle(self, call: Call) -> Reply:
        """Answer a call from a plain thread (blocks until answered)."""
        started = time.perf_counter()
        try:
            self.hooks.before(call)
            reply = self._routes[call.route](call)
        except Exception as exc:
            reply = _error_reply(exc, call)
        return self._done(call, reply, started)

    async def handle_async(self, call: Call, body: BodyReader | None = None) -> Reply:
        """Answer a call from an event loop; nothing blocking runs on the loop.

        `body`, when given, reads the call's body once the hooks have let it through (its
        refusals, over the size limit say, are answered as any error): a caller without a key
        never makes the server buffer a body, nor inflate a compressed one.
        """
        started = time.perf_counter()
        try:
            self.hooks.before(call)
            if body is not None:
                call.body = await body()
                started = time.perf_counter()  # latency from here on, not the upload
            route = self._async_routes.get(call.route)
            reply = await route(call) if route is not None else self._routes[call.route](call)
        except asyncio.CancelledError:  # the caller went away: hooks and metrics still see it
            error = _cancelled(call)
            self._done(call, Reply(b"", error=error, version=call.routed_version), started)
            raise
        except Exception as exc:
            reply = _error_reply(exc, call)
        return self._done(call, reply, started)

    def refuse(self, call: Call, error: EdgerunError) -> Reply:
        """Answer a call its transport refused before it could be handled (a body over the
        limit, say): through the hooks and the metrics all the same, so it carries a request
        id and is counted. A hook's own refusal (no credentials) comes first."""
        started = time.perf_counter()
        try:
            self.hooks.before(call)
        except Exception as exc:
            return self._done(call, _error_reply(exc, call), started)
        return self._done(call, _error_reply(error, call), started)

    def limit_answers(self, limit: AnswerLimit, message: TooLargeMessage | None = None) -> None:
        """Answer PayloadTooLarge (413) in place of a reply larger than its transport passes
        on (a serverless platform's response limit, an MQTT broker's Maximum Packet Size):
        checked as the route answers, before the hooks' after-step and the metrics, so both
        see the error the caller gets, not an `ok` it never got. `message` words the error (by
        default, a serverless function's, logged). For a plane a function or daemon owns: a
        later limit replaces this one. The check wraps the routes, so a plane without a limit
        (the fleet server's) pays nothing a call.
        """
        wrap = self._answer_limit is None
        self._answer_limit = limit
        self._too_large = message or _answer_too_large
        if not wrap:
            return

        def fitting(call: Call, reply: Reply) -> Reply:
            assert self._answer_limit is not None
            measured = self._answer_limit(call, reply)
            if measured is None or measured[0] <= measured[1]:
                return reply
            error = PayloadTooLarge(self._too_large(*measured, call))
            error.version = reply.version or None  # counted against the version that answered
            raise error

        def sync(route: Callable[[Call], Reply]) -> Callable[[Call], Reply]:
            return lambda call: fitting(call, route(call))

        def on_loop(route: Callable[[Call], Awaitable[Reply]]
                    ) -> Callable[[Call], Awaitable[Reply]]:
            async def run(call: Call) -> Reply:
                return fitting(call, await route(call))
            return run

        self._routes = {name: sync(route) for name, route in self._routes.items()}
        self._async_routes = {name: on_loop(route) for name, route in self._async_routes.items()}

    def _done(self, call: Call, reply: Reply, started: float) -> Reply:
        self.hooks.after(call, reply.error)
        if call.response_headers:
            reply.headers.update(call.response_headers)
        if call.route in INFERENCE_ROUTES:
            self._record(call, reply.version, reply.error, started)
        return reply

    # ------------------------------------------------------ decoded tensors (gRPC, ...)
    @overload
    def infer(self, call: Call, request: oip.InferRequest | Decoder) -> InferResult: ...

    @overload
    def infer(self, call: Call, request: oip.InferRequest | Decoder,
              encode: Callable[[InferResult], T]) -> T: ...

    def infer(self, call: Call, request: oip.InferRequest | Decoder,
              encode: Callable[[InferResult], T] | None = None) -> InferResult | T:
        """Run a decoded OIP request from a plain thread; raises the core's errors.

        `request` may be the function that decodes it: then it runs after the hooks, so a
        refused call is never decoded and a malformed one is counted like any other. `encode`,
        as `infer_async`'s, makes the transport's answer inside the counted call.
        """
        with self._admitted(call) as routed:
            if callable(request):
                request = request()
            oip.check_outputs(request, routed.signature)
            outputs = routed.run(request.inputs, self._timeout(call, request.timeout_us))
            result = _result(call, request, routed.version, outputs)
            return result if encode is None else encode(result)

    @overload
    async def infer_async(self, call: Call,
                          request: oip.InferRequest | Decoder | AsyncDecoder) -> InferResult: ...

    @overload
    async def infer_async(self, call: Call, request: oip.InferRequest | Decoder | AsyncDecoder,
                          encode: Encoder[T]) -> T: ...

    async def infer_async(self, call: Call, request: oip.InferRequest | Decoder | AsyncDecoder,
                          encode: Encoder[T] | None = None) -> InferResult | T:
        """Run a decoded OIP request from an event loop; see `infer`. Its decoder may also be
        a coroutine function (one that decodes a big request on a worker thread, say): it too
        is awaited only once the hooks let the call through and it is routed; the call's
        `timeout` is read after it, so it may leave there the budget its decoding left.

        `encode`, when given, makes the transport's answer of the result (or a coroutine that
        makes it), and that is returned: it runs before the hooks' after-step and the metrics, as an
        HTTP answer is encoded, so an answer that cannot be encoded is counted as the error
        its caller gets, not as `ok`."""
        with self._admitted(call) as routed:
            if callable(request):
                request = request()
                if not isinstance(request, oip.InferRequest):
                    request = await request
            oip.check_outputs(request, routed.signature)
            outputs = await routed.run_async(request.inputs,
                                             self._timeout(call, request.timeout_us))
            result = _result(call, request, routed.version, outputs)
            if encode is None:
                return result
            answer = encode(result)
            # a type check, not inspect.isawaitable: ten times quicker, every call pays it
            return await answer if type(answer) is CoroutineType else answer

    @contextmanager
    def _admitted(self, call: Call) -> Iterator[Routed]:
        """Hooks and route around a decoded request's handling; metrics and errors after it."""
        started = time.perf_counter()
        version, error = "", None
        try:
            self.hooks.before(call)
            with self.repository.route(call.model, call.version, call.attributes) as routed:
                version = routed.version  # routed first: an unknown model is NOT_FOUND
                yield routed
        except asyncio.CancelledError:  # the caller went away (a gRPC deadline, a disconnect)
            error = _cancelled(call)
            raise
        except Exception as exc:
            error = _as_error(exc, call)
            version = error.version or version
            raise error from (None if error is exc else exc)
        finally:
            self.hooks.after(call, error)
            self._record(call, version, error, started)

    # ------------------------------------------------------------------ inference
    # Bodies are routed before they are decoded: an unknown model or version is a 404 whatever
    # the body holds, as the OpenAPI document promises (a resource that does not exist comes
    # before a request it could not take).
    def _infer_call(self, call: Call) -> Reply:
        with self.repository.route(call.model, call.version, call.attributes) as routed:
            request = self._decode_infer(call, routed)
            outputs = routed.run(request.inputs, self._timeout(call, request.timeout_us))
        return _infer_reply(call, request, routed.version, outputs)

    # A big body is decoded and its answer encoded on the big-body thread, one at a time; it
    # still waits for its batch on the loop, so big requests are batched together as others.
    async def _infer_call_async(self, call: Call) -> Reply:
        big = len(call.body) >= OFF_LOOP_BYTES
        with self.repository.route(call.model, call.version, call.attributes) as routed:
            call.routed_version = routed.version
            request = (await self._on_big_body_thread(self._decode_infer, call, routed) if big
                       else self._decode_infer(call, routed))
            outputs = await routed.run_async(request.inputs,
                                             self._timeout(call, request.timeout_us))
        if big:
            return await self._on_big_body_thread(_infer_reply, call, request, routed.version,
                                                  outputs)
        return _infer_reply(call, request, routed.version, outputs)

    @staticmethod
    def _decode_infer(call: Call, routed: Routed) -> oip.InferRequest:
        request = oip.decode_request(call.body, call.attributes(oip.HEADER_LENGTH), call.kept)
        oip.check_outputs(request, routed.signature)
        return request

    def _predict_call(self, call: Call) -> Reply:
        with self.repository.route(call.model, call.version, call.attributes) as routed:
            timeout = self._timeout(call, None)
            inputs, rows = tfserving.decode_predict(call.body, routed.signature)
            outputs = routed.run(inputs, timeout)
        return Reply(tfserving.encode_predict(outputs, rows), version=routed.version)

    async def _predict_call_async(self, call: Call) -> Reply:
        big = len(call.body) >= OFF_LOOP_BYTES
        with self.repository.route(call.model, call.version, call.attributes) as routed:
            call.routed_version = routed.version
            timeout = self._timeout(call, None)
            inputs, rows = (
                await self._on_big_body_thread(tfserving.decode_predict, call.body,
                                               routed.signature) if big
                else tfserving.decode_predict(call.body, routed.signature))
            outputs = await routed.run_async(inputs, timeout)
        body = (await self._on_big_body_thread(tfserving.encode_predict, outputs, rows) if big
                else tfserving.encode_predict(outputs, rows))
        return Reply(body, version=routed.version)

    async def convert(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`, a transport's own conversion of `size` bytes (an MQTT `.npz`
        payload, or its answer): from OFF_LOOP_BYTES up on the big-body thread, as the plane's
        own codecs convert big bodies, so it stalls no other caller; else here, at once."""
        if size >= OFF_LOOP_BYTES:
            return await self._on_big_body_thread(work, *args)
        return work(*args)

    async def _on_big_body_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._big_bodies, work, *args)

    @staticmethod
    def _timeout(call: Call, timeout_us: float | None) -> float | None:
        """The queueing budget in seconds: the transport's, the attribute's (ms) or OIP's (us)."""
        budget = None
        value = call.attributes(TIMEOUT_ATTRIBUTE)
        if value is not None:
            try:
                milliseconds = float(value)
            except ValueError:
                milliseconds = math.nan
            if not 0 < milliseconds < math.inf:
                raise InvalidInput(f"{TIMEOUT_ATTRIBUTE} must be a positive, finite number of "
                                   f"milliseconds, got {value[:32]!r}")
            budget = milliseconds / 1000
        elif timeout_us is not None:
            budget = timeout_us / 1e6
        if call.timeout is not None:
            budget = call.timeout if budget is None else min(budget, call.timeout)
        return budget

    def _record(self, call: Call, version: str, error: EdgerunError | None,
                started: float) -> None:
        # Only names and versions the repository serves (or served when the request was routed,
        # before an unload) become labels, so whatever callers send, series stay bounded.
        model = call.model if version or call.model in self.repository else ""
        outcome = "ok" if error is None else error.kind
        self._requests.labels(model, version, call.transport, outcome).inc()
        self._latency.labels(model, version, call.transport).observe(
            time.perf_counter() - started)

    # --------------------------------------------------------------- the rest of OIP
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgerun", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """OIP model metadata of the named version; unnamed, the model's: every served version
        in `versions`, and the signature of the version requests naming none are routed to
        (under a split, the largest weight's), as a client builds those requests from it."""
        served = self.repository.get(name, version)
        versions = [served.version] if version else self.repository.versions(name)
        sig = served.signature
        return {
            "name": name, "versions": versions,
            "platform": PLATFORMS.get(served.model.bundle.manifest.backend,
                                      served.model.bundle.manifest.backend),
            "inputs": [oip.metadata_tensor(s.name, s.dtype, s.shape) for s in sig.inputs],
            "outputs": [oip.metadata_tensor(s.name, s.dtype, s.shape) for s in sig.outputs],
            "parameters": {"max_batch_size": served.batcher.max_batch_size
                           if sig.batchable else 0}}

    def _live(self, call: Call) -> Reply:
        return _json({"live": True})

    def _ready(self, call: Call) -> Reply:
        if not self.repository.ready:
            raise ModelNotReady("models are still loading or failed to load; see "
                                "POST /v2/repository/index")
        return _json({"ready": True})

    def _server_metadata(self, call: Call) -> Reply:
        return _json(self.server_metadata())

    def _model_metadata(self, call: Call) -> Reply:
        return _json(self.model_metadata(call.model, call.version))

    def _model_ready(self, call: Call) -> Reply:
        self.repository.get(call.model, call.version)
        return _json({"name": call.model, "ready": True})

    def _model_status(self, call: Call) -> Reply:
        versions = [self.repository.get(call.model, call.version).version] if call.version \
            else self.repository.versions(call.model)
        return Reply(tfserving.status(versions))

    def _index(self, call: Call) -> Reply:
        ready = oip.decode_index_request(call.body)
        return _json([{"name": s.name, "version": s.version, "state": s.state,
                       "reason": s.reason} for s in self.repository.index()
                      if not ready or s.state == READY_STATE])

    def _load(self, call: Call) -> Reply:
        oip.check_load_request(call.body)
        self.repository.load(call.model)
        return _json({})

    def _unload(self, call: Call) -> Reply:
        self.repository.unload(call.model)
        return _json({})

    def _metrics(self, call: Call) -> Reply:
        return Reply(prometheus.render(self.repository.registry).encode(),
                     prometheus.CONTENT_TYPE)

    @staticmethod
    def _off_loop(route: Callable[[Call], Reply]) -> Callable[[Call], Awaitable[Reply]]:
        """Loading and draining block for seconds: run them on a worker thread."""
        async def run(call: Call) -> Reply:
            return await asyncio.get_running_loop().run_in_executor(None, route, call)
        return run


def _json(content: Any) -> Reply:
    return Reply(orjson.dumps(content))


def _infer_reply(call: Call, request: oip.InferRequest, version: str,
                 outputs: dict[str, np.ndarray]) -> Reply:
    body, headers = oip.encode_response(call.model, version, request, outputs)
    return Reply(body, BINARY if headers else JSON, headers, version=version)


def _result(call: Call, request: oip.InferRequest, version: str,
            outputs: dict[str, np.ndarray]) -> InferResult:
    if request.outputs is not None:
        outputs = {o.name: outputs[o.name] for o in request.outputs}
    return InferResult(call.model, version, request, outputs)


def _cancelled(call: Call) -> EdgerunError:
    """The error of a call whose caller stopped waiting: its deadline passed (a gRPC client
    then sees DEADLINE_EXCEEDED, wherever the call was: queued, running or being answered),
    or it went away."""
    if call.deadline is not None and time.monotonic() >= call.deadline:
        return DeadlineExceeded("the request's deadline passed before it was answered")
    return Cancelled("the caller cancelled the request")


def _as_error(exc: Exception, call: Call) -> EdgerunError:
    if isinstance(exc, EdgerunError):
        return exc
    # with the id the caller got in its 500, so the traceback can be found from its end
    log.error("request %s (%s %r over %s) failed unexpectedly", call.request_id, call.route,
              call.model, call.transport, exc_info=exc)
    return InferenceError(f"internal error: {type(exc).__name__}: {exc}")


def _answer_too_large(size: int, limit: int, call: Call) -> str:
    """The message of the 413 a serverless function answers with in place of an answer larger
    than its platform passes on (which would be a bare 5xx, met again at every retry), logged
    with the request id."""
    log.error(orjson.dumps({"message": "answer too large", "request_id": call.request_id,
                            "bytes": size, "limit": limit}).decode())
    return (f"the answer of {size} bytes is over the {limit}-byte limit on what this function "
            "can answer; send fewer rows a request, or ask for binary outputs")


def _error_reply(exc: Exception, call: Call) -> Reply:
    error = _as_error(exc, call)
    return Reply(oip.encode_error(str(error)), error=error, version=error.version or "")
