"""Real `edgerun serve` processes on loopback, over model repositories built in tmp folders."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from edgerun.runtime import create_bundle
from tests.cli import edgerun_command


def add_version(repo: Path, name: str, version: str, onnx_bytes: bytes) -> Path:
    """Bundle `onnx_bytes` as `repo/name/version/`, written beside and renamed into place."""
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".staging-{name}-{version}"
    source = repo / f".{name}-{version}.onnx"
    source.write_bytes(onnx_bytes)
    create_bundle(source, staging, name=name, version=version)
    source.unlink()
    target = repo / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path,
                 grpc_port: int | None = None) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}" if grpc_port else None
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(repo: Path, *args: str, ready: bool = True,
                   grpc: bool = False) -> Iterator[Server]:
    """`edgerun serve --repository repo ARGS` until the block ends (then SIGTERM, drained)."""
    with running_process([*edgerun_command(), "serve", "--repository", str(repo)], *args,
                         log_dir=repo.parent, ready=ready, grpc=grpc) as server:
        yield server


@contextmanager
def running_process(command: list[str], *args: str, log_dir: Path, ready: bool = True,
                    grpc: bool = False) -> Iterator[Server]:
    """`COMMAND --port P [--grpc-port G] ARGS` (an `edgerun serve`) until the block ends."""
    port = free_port()
    grpc_port = free_port() if grpc else None
    log = log_dir / f"server-{port}.log"
    extra = ["--grpc-port", str(grpc_port)] if grpc_port else []
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--port", str(port), *extra, "--log-level", "warning", *args],
            stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, port, log, grpc_port)
    try:
        wait_until(server, "/v2/health/ready" if ready else "/v2/health/live")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(server: Server, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"edgerun serve exited:\n{server.output()}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{path} never answered 200:\n{server.output()}")
