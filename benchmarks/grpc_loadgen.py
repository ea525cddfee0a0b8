"""A closed-loop async gRPC load generator for OIP v2 ModelInfer, the gRPC twin of loadgen.py.

    python benchmarks/grpc_loadgen.py --port 8081 --model mlp --input x=row.npy \
        [--connections 64] [--channels 1] [--seconds 5] [--warmup 1] [--first-output out.npy]

Keeps N ModelInfer calls in flight (grpc.aio, uvloop when importable) over `--channels`
HTTP/2 connections, each call sent again as soon as it returns. The request is encoded once,
with every tensor in `raw_input_contents` as tritonclient sends it, from edgerun's committed
stubs; it is sent and answered as bytes (no per-call serialization or parsing, as loadgen.py
never parses its response bodies). One call is made and parsed first: `--first-output` saves
its first output tensor (.npy) so a harness can compare the answer with bare ONNX Runtime.

Prints one JSON line with loadgen.py's keys: `non_2xx` counts non-OK status codes (`statuses`
by code name), `errors` the calls that failed without a status or were still unanswered when
the run ended. tritonclient registers the same protobuf package (`inference`): this process
must never import it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np

from edgerun.adapters.codecs import oip
from edgerun.adapters.grpc import grpc_predict_v2_pb2 as pb
from edgerun.adapters.grpc.codec import CONTENTS_FIELD

METHOD = "/inference.GRPCInferenceService/ModelInfer"
DRAIN_TIMEOUT_S = 10.0  # how long in-flight calls may take to finish after the window
#: Each channel gets its own TCP connection (channels with equal arguments share one otherwise);
#: a load generator never retries, so it skips the retry machinery's per-call bookkeeping.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0),
                   ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]


def build_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> bytes:
    """A serialized ModelInferRequest with every tensor in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=oip.datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(oip.encode_binary(array))
    return request.SerializeToString()


def first_output(response: bytes) -> np.ndarray:
    """The first output tensor of a serialized ModelInferResponse (raw or typed)."""
    message = pb.ModelInferResponse.FromString(response)
    tensor = message.outputs[0]
    if message.raw_output_contents:
        return oip.decode_binary(tensor.name, tensor.datatype, list(tensor.shape),
                                 memoryview(message.raw_output_contents[0]))
    values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
    return np.asarray(values).reshape(list(tensor.shape))


class _Stats:
    def __init__(self, start: float, stop: float) -> None:
        self.start, self.stop = start, stop
        self.latencies: list[float] = []
        self.total = 0  # every answered call, warm-up and drain included (for CPU per call)
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()


async def _drive(infer: grpc.aio.UnaryUnaryMultiCallable, request: bytes,
                 stats: _Stats) -> None:
    """One in-flight call at a time until the window closes."""
    perf_counter = time.perf_counter
    while True:
        sent = perf_counter()
        if sent >= stats.stop:
            return
        try:
            await infer(request)
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
            stats.errors[f"{type(exc).__name__}: {exc}"] += 1
            await asyncio.sleep(0.05)
            continue
        now = perf_counter()
        stats.total += 1
        if stats.start <= now < stats.stop:
            stats.latencies.append(now - sent)
            stats.statuses[status] += 1


async def run_load(host: str, port: int, request: bytes, connections: int, channels: int,
                   seconds: float, warmup: float) -> tuple[dict[str, Any], bytes]:
    """Closed loop from `connections` concurrent calls; measured after `warmup` seconds.

    Returns the result and the first (unmeasured) call's serialized response.
    """
    opened = [grpc.aio.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS)
              for _ in range(channels)]
    try:
        # bytes in, bytes out: no (de)serializer on either side of the measured calls
        stubs = [channel.unary_unary(METHOD) for channel in opened]
        answer = await stubs[0](request, timeout=60)
        start = time.perf_counter() + warmup
        stats = _Stats(start, start + seconds)
        tasks = [asyncio.ensure_future(_drive(stubs[i % channels], request, stats))
                 for i in range(connections)]
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        done, pending = await asyncio.wait(tasks, timeout=seconds + DRAIN_TIMEOUT_S)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)  # includes the drain: an upper bound
        if pending:
            stats.errors["unanswered when the run ended"] += len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for channel in opened:
            await channel.close()
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    count = len(stats.latencies)
    ok = stats.statuses.get("OK", 0)
    if count:
        p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(stats.latencies) * 1000,
                                                          (50, 95, 99)))
    else:
        p50 = p95 = p99 = float("nan")
    return {"connections": connections, "channels": channels, "seconds": seconds,
            "requests": count, "rps": count / seconds, "ok_rps": ok / seconds, "p50": p50,
            "p95": p95, "p99": p99, "non_2xx": count - ok,
            "errors": sum(stats.errors.values()), "total": stats.total,
            "statuses": dict(sorted(stats.statuses.items())),
            "error_kinds": dict(stats.errors),
            "client_cpu_us": cpu / count * 1e6 if count else float("nan")}, answer


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _input(spec: str) -> tuple[str, np.ndarray]:
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--input wants NAME=FILE.npy, got {spec!r}")
    return name, np.load(path, allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-version", default="")
    parser.add_argument("--input", type=_input, action="append", required=True,
                        metavar="NAME=FILE.npy", help="an input tensor (repeat for each)")
    parser.add_argument("--connections", type=int, default=64, help="calls in flight")
    parser.add_argument("--channels", type=int, default=1,
                        help="HTTP/2 connections the calls share")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured period")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded period first")
    parser.add_argument("--first-output", help="save the first call's first output (.npy)")
    args = parser.parse_args(argv)
    request = build_request(args.model, dict(args.input), args.model_version)
    channels = max(1, min(args.channels, args.connections))
    result, answer = _run(run_load(args.host, args.port, request, args.connections, channels,
                                   args.seconds, args.warmup))
    if args.first_output:
        np.save(args.first_output, first_output(answer), allow_pickle=False)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
