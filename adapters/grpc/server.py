"""A grpc.aio server for the data plane, started on the caller's event loop."""

from __future__ import annotations

import errno
import logging
import socket

import grpc

from edgerun.adapters.dataplane import DataPlane
from edgerun.adapters.grpc.servicer import add_to_server

log = logging.getLogger(__name__)

#: The largest answer gRPC may send, as Triton's default: a protobuf message's own limit. Tied
#: to the request limit, an answer bigger than its request (an expanding model) failed after
#: the model had run.
MAX_SEND_MESSAGE_BYTES = 2 ** 31 - 1


def _bind_refused(host: str, port: int) -> OSError | None:
    """Why no listener can bind host:port, learnt from a probe socket bound as gRPC binds
    (SO_REUSEADDR, no SO_REUSEPORT) to each address the host resolves to; None where one
    binds. gRPC 1.85 raises only "Failed to bind ...; set GRPC_VERBOSITY=debug" and logs the
    reason itself from C ("E1206 ... add_port.cc ... Address already in use"). Only the errors
    its bind meets too (in use, not permitted) are said; anything else is left to gRPC."""
    if not port:
        return None
    try:
        resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)
    except OSError:
        return None
    refused = None
    for family, kind, proto, _, address in resolved:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            return None
        except OSError as exc:
            refused = refused or exc
    return refused if refused and refused.errno in (errno.EADDRINUSE, errno.EACCES) else None


async def start(plane: DataPlane, host: str, port: int, *,
                max_message_bytes: int = 64 << 20) -> grpc.aio.Server:
    """Listen on host:port (h2c, no TLS: a mesh or ingress terminates it) and serve.

    Requests over `max_message_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED), the
    counterpart of the HTTP server's body limit; answers may be as big as a message can be.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    refused = _bind_refused(host, port)
    if refused is not None:  # said once, with its reason, before gRPC's C log says it too
        raise OSError(f"gRPC could not listen on {address}: {refused.strerror}")
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),  # a port in use is an error, never silently shared
    ])
    add_to_server(server, plane)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpcio raises where older ones returned 0
        raise OSError(f"gRPC could not listen on {address}: {exc}") from None
    if not bound:
        raise OSError(f"gRPC could not listen on {address}")
    await server.start()
    log.info("OIP v2 gRPC (inference.GRPCInferenceService) on %s", address)
    return server
