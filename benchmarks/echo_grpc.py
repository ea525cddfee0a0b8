"""The gRPC echo ceiling: a grpc.aio server whose ModelInfer answers a canned response.

    python benchmarks/echo_grpc.py --port 8081 --answer response.pb

No decoding, no model, no data plane: bytes in, the same bytes out for every call (a
serialized ModelInferResponse, edgerun's real answer to the benchmark request). Under
benchmarks/grpc_loadgen.py this is what grpcio's server and client cost on these cores, the
gRPC twin of echo_asgi.py.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

SERVICE = "inference.GRPCInferenceService"


async def serve(port: int, answer: bytes) -> None:
    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", type=Path, required=True,
                        help="a serialized ModelInferResponse to send to every call")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.answer.read_bytes()))
    else:
        uvloop.run(serve(args.port, args.answer.read_bytes()))


if __name__ == "__main__":
    main()
