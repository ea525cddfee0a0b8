"""A grpc.aio server for the data plane, started on the caller's event loop."""

from __future__ import annotations

import logging

import grpc

from edgerun.adapters.dataplane import DataPlane
from edgerun.adapters.grpc.servicer import add_to_server

log = logging.getLogger(__name__)

#: The largest answer gRPC may send, as Triton's default: a protobuf message's own limit. Tied
#: to the request limit, an answer bigger than its request (an expanding model) failed after
#: the model had run.
MAX_SEND_MESSAGE_BYTES = 2 ** 31 - 1


async def start(plane: DataPlane, host: str, port: int, *,
                max_message_bytes: int = 64 << 20) -> grpc.aio.Server:
    """Listen on host:port (h2c, no TLS: a mesh or ingress terminates it) and serve.

    Requests over `max_message_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED), the
    counterpart of the HTTP server's body limit; answers may be as big as a message can be.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),  # a port in use is an error, never silently shared
    ])
    add_to_server(server, plane)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpcio raises where older ones returned 0
        raise OSError(f"gRPC could not listen on {address}: {exc}") from None
    if not bound:
        raise OSError(f"gRPC could not listen on {address}")
    await server.start()
    log.info("OIP v2 gRPC (inference.GRPCInferenceService) on %s", address)
    return server
