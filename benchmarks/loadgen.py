"""A closed-loop HTTP/1.1 load generator, cheap enough to share two cores with the server.

    python benchmarks/loadgen.py --host 127.0.0.1 --port 8000 --path /v2/models/mlp/infer \
        --body-file body.json [--header "Name: value" ...] [--connections 64] [--seconds 5] \
        [--warmup 1]

Opens N keep-alive connections; each sends one pre-encoded POST, reads the whole response
(status line, headers, Content-Length body), records latency and status, and sends the next
one at once. Built on asyncio protocols (uvloop when importable) rather than an HTTP client
library: the generator runs on the same cores as the server it measures, so its own cost per
request has to stay small. `client_cpu_us` is the process's whole CPU time per response over
the measured window: the Python side is a few microseconds, the rest is the kernel (syscalls,
wake-ups, and on loopback the TCP work of delivering the request to the server). Prints one
JSON line.

Throughput counts responses completed inside the measured window (as wrk does); `ok_rps`
counts only 2xx. Latency percentiles cover every completed response, 2xx or not. `errors`
counts failed connects, connections lost mid-request and requests still unanswered when the
run ends, over warm-up and measurement both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

DRAIN_TIMEOUT_S = 10.0  # how long in-flight requests may take to finish after the window


def build_request(host: str, port: int, path: str, body: bytes,
                  headers: list[str] | None = None) -> bytes:
    """The request bytes, encoded once and resent as they are (JSON unless a header says)."""
    extra = list(headers or [])
    if not any(h.lower().startswith("content-type:") for h in extra):
        extra.insert(0, "Content-Type: application/json")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            + "".join(f"{h}\r\n" for h in extra) + f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _Stats:
    """Shared by all connections of a run; the window bounds are set by run_load."""

    def __init__(self, start: float, stop: float) -> None:
        self.start, self.stop = start, stop
        self.latencies: list[float] = []
        self.total = 0  # every response, warm-up and drain included (for CPU per request)
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()


class _Connection(asyncio.Protocol):
    """One keep-alive connection running its closed loop inside the event loop callbacks."""

    def __init__(self, request: bytes, stats: _Stats, finished: asyncio.Future[None]) -> None:
        self.request, self.stats, self.finished = request, stats, finished
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_end = -1  # end of the current response in buffer, once its head is parsed
        self.status = 0
        self.closing = False  # the server said `Connection: close`
        self.sent_at = 0.0
        self.in_flight = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.send()

    def send(self) -> None:
        self.in_flight = True
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.body_end < 0:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                if not self.parse_head(bytes(buffer[:head_end]), head_end):
                    return
            if len(buffer) < self.body_end:
                return
            now = time.perf_counter()
            del buffer[:self.body_end]
            self.body_end = -1
            self.in_flight = False
            stats = self.stats
            stats.total += 1
            if now >= stats.start:
                if now >= stats.stop:
                    self.close()
                    return
                stats.latencies.append(now - self.sent_at)
                stats.statuses[self.status] += 1
            if self.closing:  # _drive reconnects
                self.close()
                return
            self.send()

    def parse_head(self, head: bytes, head_end: int) -> bool:
        """Status code and Content-Length; a malformed head ends this connection as an error."""
        try:
            self.status = int(head[9:12])
            lower = head.lower()
            at = lower.index(b"\r\ncontent-length:") + 17
            line_end = lower.find(b"\r\n", at)
            length = int(lower[at:line_end if line_end >= 0 else None])
        except ValueError:
            self.fail("malformed response head (no status or Content-Length)")
            return False
        self.body_end = head_end + 4 + length
        self.closing = b"\r\nconnection: close" in lower
        return True

    def fail(self, reason: str) -> None:
        self.stats.errors[reason] += 1
        self.in_flight = False
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:
            self.stats.errors[f"connection lost mid-request ({exc or 'closed by server'})"] += 1
            self.in_flight = False
        if not self.finished.done():
            self.finished.set_result(None)


async def _drive(host: str, port: int, request: bytes, stats: _Stats) -> None:
    """Keep one connection busy until the window closes, reconnecting after failures."""
    loop = asyncio.get_running_loop()
    while time.perf_counter() < stats.stop:
        finished: asyncio.Future[None] = loop.create_future()
        try:
            transport, protocol = await loop.create_connection(
                lambda: _Connection(request, stats, finished), host, port)
        except OSError as exc:
            stats.errors[f"connect failed ({exc.__class__.__name__})"] += 1
            await asyncio.sleep(0.05)
            continue
        remaining = stats.stop - time.perf_counter() + DRAIN_TIMEOUT_S
        try:
            await asyncio.wait_for(asyncio.shield(finished), max(remaining, 0.001))
        except asyncio.TimeoutError:
            stats.errors["unanswered when the run ended"] += 1
            protocol.in_flight = False
            transport.abort()
            return


async def run_load(host: str, port: int, path: str, body: bytes, connections: int,
                   seconds: float, warmup: float,
                   headers: list[str] | None = None) -> dict[str, Any]:
    """Closed loop from `connections` keep-alive connections; measured after `warmup` seconds."""
    request = build_request(host, port, path, body, headers)
    start = time.perf_counter() + warmup
    stats = _Stats(start, start + seconds)
    tasks = [asyncio.ensure_future(_drive(host, port, request, stats))
             for _ in range(connections)]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*tasks)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)  # includes the drain: an upper bound
    # only the sum is exact: with tick-based accounting the user/system split is sampled
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    count = len(stats.latencies)
    ok = sum(n for status, n in stats.statuses.items() if 200 <= status < 300)
    if count:
        p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(stats.latencies) * 1000,
                                                          (50, 95, 99)))
    else:
        p50 = p95 = p99 = float("nan")
    return {"connections": connections, "seconds": seconds, "requests": count,
            "rps": count / seconds, "ok_rps": ok / seconds, "p50": p50, "p95": p95, "p99": p99,
            "non_2xx": count - ok, "errors": sum(stats.errors.values()), "total": stats.total,
            "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
            "error_kinds": dict(stats.errors),
            "client_cpu_us": cpu / count * 1e6 if count else float("nan")}


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body-file", required=True, help="the request body, sent as it is")
    parser.add_argument("--header", action="append", default=[], help="extra request header")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured period")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded period first")
    args = parser.parse_args(argv)
    with open(args.body_file, "rb") as handle:
        body = handle.read()
    result = _run(run_load(args.host, args.port, args.path, body, args.connections,
                           args.seconds, args.warmup, args.header))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
