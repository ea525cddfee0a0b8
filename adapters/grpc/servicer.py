"""`inference.GRPCInferenceService` on the data plane, served by grpc.aio.

Only the transport lives here: RPCs become `Call`s (gRPC metadata is the attribute lookup, so
sticky routing keys, `x-request-id` and credentials come from it; the deadline is the queueing
budget), messages go through `codec`, and the core's error kinds become status codes. Inference
runs through `DataPlane.infer_async`, so versions, canary and sticky routing, shadow copies,
metrics and the hook chain are the HTTP server's; the other RPCs pass the hook chain too.

A request with many elements to convert one Python object at a time (typed integers or BOOL,
BYTES) is decoded, and a big answer encoded, on a worker thread, as the data plane does with big
HTTP bodies: on the event loop, 4 million INT64 took 0.8 s that every other caller, HTTP and
gRPC, waited. Either way the data plane calls the decoder once its hooks let the call through
and it is routed: a caller without a key never makes the server decode its message.

The service's handlers are registered here, not by the generated `add_..._to_server`, for one
difference: bytes that are not the RPC's protobuf message become an `Undecodable` the servicer
refuses through the data plane (INVALID_ARGUMENT, hooked, with a request id, counted), where
grpcio's own deserializer raised, answered UNKNOWN and logged a traceback per message. And a
big ModelInferRequest is parsed only once the hooks let its call through: its deserializer reads
just the model and version the call is routed by (48 MB of INT64 contents took 0.12 s to parse,
which any caller, with a key or without, could make the server spend; reading the two fields
takes a seventh of that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, TypeVar

import grpc

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Call, DataPlane
from edgerun.adapters.dataplane.call import (INFER, LIVE, MODEL_METADATA, MODEL_READY, READY,
                                             SERVER_METADATA)
from edgerun.adapters.dataplane.plane import AsyncDecoder, Decoder, InferResult
from edgerun.adapters.grpc import codec
from edgerun.adapters.grpc import grpc_predict_v2_pb2 as pb
from edgerun.adapters.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceServicer
from edgerun.adapters.grpc.status import code_of, error_metadata
from edgerun.runtime.errors import (EdgerunError, InferenceError, InvalidInput, ModelNotFound,
                                    ModelNotReady)

log = logging.getLogger(__name__)
TRANSPORT = "grpc"
#: The protocol extensions this service serves: none. Its repository RPCs are UNIMPLEMENTED
#: and the binary tensor data extension is HTTP's (gRPC has raw contents), so the HTTP
#: server's list would promise what a gRPC client cannot call.
EXTENSIONS: list[str] = []
#: Kept from the caller's deadline so an expired request's error still reaches the caller.
ANSWER_MARGIN_S = 0.01
#: The most UTF-8 bytes of an error message sent as status details: percent-encoded (up to
#: three bytes each), they stay under the 8 KiB metadata limit of a default client.
MAX_DETAILS_BYTES = 2000
#: Requests and answers with this many elements converted one at a time (`codec.decode_work`,
#: `codec.encode_work`) are converted on the worker thread: 65,536 INT64 take 2 to 3 ms each
#: way, the hop there and back some 50 us.
OFF_LOOP_ELEMENTS = 1 << 16
#: ModelInferRequests from this size up are parsed once the data plane lets their call through;
#: smaller ones, the common case, as grpcio deserializes them.
UNPARSED_BYTES = 1 << 20
Response = TypeVar("Response")
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: The data plane's route of each RPC (each is unary-unary).
ROUTES = {"ServerLive": LIVE, "ServerReady": READY, "ModelReady": MODEL_READY,
          "ServerMetadata": SERVER_METADATA, "ModelMetadata": MODEL_METADATA,
          "ModelInfer": INFER}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What an RPC gets in place of its request when the bytes sent are not that message."""

    message: str  #: the message's full name
    size: int

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request is not a valid {self.message} message ({self.size} "
                            "bytes that do not parse as protobuf)")


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A big ModelInferRequest as it came, with what its call is routed by."""

    data: bytes
    model_name: str
    model_version: str


class InferenceServicer(GRPCInferenceServiceServicer):
    """The six OIP v2 RPCs over one DataPlane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        #: One thread: big messages are converted one at a time, their peak never multiplied.
        self._big_messages = ThreadPoolExecutor(1, thread_name_prefix="edgerun-grpc-big")

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return await self._answer(context, _call(context, LIVE),
                                  lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return await self._answer(
            context, _call(context, READY),
            lambda: pb.ServerReadyResponse(ready=self.plane.repository.ready))

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            # As Triton answers: a model that is missing or loading is "not ready", no error.
            try:
                self.plane.repository.get(request.name, request.version or None)
            except (ModelNotFound, ModelNotReady):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return await self._answer(context, _call(context, MODEL_READY, request.name,
                                                 request.version), ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return await self._answer(context, _call(context, SERVER_METADATA),
                                  lambda: pb.ServerMetadataResponse(
                                      **{**self.plane.server_metadata(),
                                         "extensions": EXTENSIONS}))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        def metadata() -> pb.ModelMetadataResponse:
            found = self.plane.model_metadata(request.name, request.version or None)
            return pb.ModelMetadataResponse(
                name=found["name"], versions=found["versions"], platform=found["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in found["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t)
                         for t in found["outputs"]])
        return await self._answer(context, _call(context, MODEL_METADATA, request.name,
                                                 request.version), metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        call = _call(context, INFER, request.model_name, request.model_version)
        remaining = context.time_remaining()
        if remaining is not None:  # when the client gives up: DEADLINE_EXCEEDED, counted so
            call.deadline = time.monotonic() + remaining
        decode: Decoder | AsyncDecoder
        if isinstance(request, Unparsed):
            decode = partial(self._parse_then_decode, call, request.data)
        elif codec.decode_work(request) >= OFF_LOOP_ELEMENTS:
            decode = partial(self._decode_off_loop, call, request)
        else:
            decode = partial(codec.decode_request, request)
            _set_budget(call)
        try:
            # encoded in the data plane, so a failure to encode is counted as the error sent
            response = await self.plane.infer_async(call, decode, self._encode)
        except Exception as exc:
            await _abort(context, call, _as_error(exc, call))
        _send_headers(context, call)
        return response

    def _encode(self, result: InferResult
                ) -> pb.ModelInferResponse | Coroutine[Any, Any, pb.ModelInferResponse]:
        """The answer, or for a big one the coroutine encoding it on the worker thread."""
        answer = (result.model, result.version, result.request, result.outputs)
        if codec.encode_work(result.request, result.outputs) >= OFF_LOOP_ELEMENTS:
            return self._off_loop(codec.encode_response, *answer)
        return codec.encode_response(*answer)

    async def _parse_then_decode(self, call: Call, data: bytes) -> oip.InferRequest:
        """A big request's message, parsed where grpcio would have parsed it (on the loop: on
        the worker, the parse holds the GIL all the same, and waits behind big conversions),
        but only now that the data plane has let its call through."""
        message = _parse_infer(data)
        if isinstance(message, Undecodable):
            raise message.error()
        if codec.decode_work(message) >= OFF_LOOP_ELEMENTS:
            return await self._decode_off_loop(call, message)
        decoded = codec.decode_request(message)
        _set_budget(call)
        return decoded

    async def _decode_off_loop(self, call: Call,
                               request: pb.ModelInferRequest) -> oip.InferRequest:
        """A big request decoded on the worker, once the data plane has let its call through
        (its errors raised there, after routing, as a small request's are)."""
        decoded = await self._off_loop(codec.decode_request, request)
        _set_budget(call)  # after decoding: the budget left to queue
        return decoded

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._big_messages, work, *args)

    def handler(self, name: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """RPC `name`, whose request may be `Undecodable`: refused through the data plane, so
        its hooks (a caller without a key is told so first) and metrics see it."""
        rpc, route = getattr(self, name), ROUTES[name]

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                call = _call(context, route)
                error = request.error()
                await _abort(context, call, self.plane.refuse(call, error).error or error)
            return await rpc(request, context)
        return handle

    async def _answer(self, context: grpc.aio.ServicerContext, call: Call,
                      make: Callable[[], Response]) -> Response:
        """A non-inference RPC through the hook chain, its errors as status codes."""
        hooks = self.plane.hooks
        try:
            hooks.before(call)
            response = make()
        except Exception as exc:
            error = _as_error(exc, call)
            hooks.after(call, error)
            await _abort(context, call, error)
        hooks.after(call, None)
        _send_headers(context, call)
        return response


def _call(context: grpc.aio.ServicerContext, route: str, model: str = "",
          version: str = "") -> Call:
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # "-bin" keys carry bytes: never attributes
            metadata[key] = value
    return Call(route, model, version or None, attributes=metadata.get, transport=TRANSPORT)


def _set_budget(call: Call) -> None:
    """The caller's deadline as the call's queueing budget, less the margin to answer."""
    if call.deadline is not None:
        call.timeout = max(0.0, call.deadline - time.monotonic() - ANSWER_MARGIN_S)


def _lenient(message: Any) -> Callable[[bytes], Any]:
    """A deserializer of `message` that never raises: grpcio answered a request its
    deserializer raised on UNKNOWN ("Unexpected DecodeError"), logging a traceback each time,
    and no hook or metric saw it."""
    parse, name = message.FromString, message.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, whatever protobuf's implementation: the bytes' fault
            return Undecodable(name, len(data))
    return deserialize


_parse_infer = _lenient(pb.ModelInferRequest)


def _infer_request(data: bytes) -> pb.ModelInferRequest | Unparsed | Undecodable:
    """ModelInfer's deserializer: a big request is left unparsed but for its model name and
    version (bytes that do not parse even so are no ModelInferRequest: refused at once)."""
    if len(data) < UNPARSED_BYTES:
        return _parse_infer(data)
    named = codec.model_of(data)
    if named is None:
        return Undecodable(pb.ModelInferRequest.DESCRIPTOR.full_name, len(data))
    return Unparsed(data, *named)


def _send_headers(context: grpc.aio.ServicerContext, call: Call) -> None:
    if call.response_headers:
        context.set_trailing_metadata(
            tuple((key.lower(), value) for key, value in call.response_headers.items()))


def _as_error(exc: Exception, call: Call) -> EdgerunError:
    """The core's error for a failure; anything unexpected is logged (with the request id the
    caller gets) and becomes INTERNAL."""
    if isinstance(exc, EdgerunError):
        return exc
    log.error("gRPC call %s (%s %r) failed unexpectedly", call.request_id, call.route,
              call.model, exc_info=exc)
    return InferenceError(f"internal error: {type(exc).__name__}: {exc}")


async def _abort(context: grpc.aio.ServicerContext, call: Call,
                 error: EdgerunError) -> NoReturn:
    metadata = {**call.response_headers, **error_metadata(error)}
    await context.abort(code_of(error), _details(str(error)),
                        tuple((key.lower(), value) for key, value in metadata.items()))


def _details(message: str) -> str:
    """The message cut to `MAX_DETAILS_BYTES`: it travels as the `grpc-message` trailer, and a
    client refuses trailers over its metadata limit (8 KiB by default), so an error that
    echoes a long model or input name would reach it as RESOURCE_EXHAUSTED, not as itself."""
    raw = message.encode()
    if len(raw) <= MAX_DETAILS_BYTES:
        return message
    return (raw[:MAX_DETAILS_BYTES].decode(errors="ignore")
            + f"... ({len(raw) - MAX_DETAILS_BYTES} more bytes cut)")


def add_to_server(server: grpc.aio.Server, plane: DataPlane) -> None:
    """Register the service as the generated `add_GRPCInferenceServiceServicer_to_server`
    does (a generic handler and registered methods, every RPC of the .proto), its requests
    deserialized by `_lenient` (ModelInfer's by `_infer_request`)."""
    servicer = InferenceServicer(plane)
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            servicer.handler(method.name),
            request_deserializer=_infer_request if method.name == "ModelInfer"
            else _lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString)
        for method in SERVICE.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
