"""A Lambda Runtime API on loopback, as the Lambda service serves it to a function's runtime.

`/2018-06-01/runtime/invocation/next` blocks until the test queues an event and answers it with
the request id, a deadline and the function ARN in headers; the runtime posts the result to
`/invocation/<id>/response` or `/invocation/<id>/error`, or an init failure to `/init/error`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/2018-06-01/runtime"
ARN = "arn:aws:lambda:us-east-1:123456789012:function:edgerun-inference"


class RuntimeAPI:
    def __init__(self, timeout_ms: int = 30_000) -> None:
        self.timeout_ms = timeout_ms
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.results: dict[str, queue.Queue[tuple[str, Any]]] = {}
        self.init_errors: queue.Queue[dict[str, Any]] = queue.Queue()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> RuntimeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def invoke(self, event: Any, timeout: float = 60) -> tuple[str, Any]:
        """Queue an event for the runtime; wait for ("response" or "error", payload)."""
        request_id = str(uuid.uuid4())
        self.results[request_id] = queue.Queue()
        self.events.put((request_id, json.dumps(event).encode()))
        return self.results[request_id].get(timeout=timeout)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    return self._answer(404, b'{"errorMessage": "not found"}')
                request_id, body = api.events.get()  # blocks until there is work
                deadline = int(time.time() * 1000) + api.timeout_ms
                self._answer(200, body, {"Lambda-Runtime-Aws-Request-Id": request_id,
                                         "Lambda-Runtime-Deadline-Ms": str(deadline),
                                         "Lambda-Runtime-Invoked-Function-Arn": ARN,
                                         "Lambda-Runtime-Trace-Id":
                                             "Root=1-5e6722a7-cc56xmpl46db7ae02d4da47e"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                payload = json.loads(body) if body else None
                parts = self.path[len(PREFIX):].strip("/").split("/")
                if parts == ["init", "error"]:
                    api.init_errors.put(payload)
                elif len(parts) == 3 and parts[0] == "invocation" and parts[1] in api.results:
                    api.results[parts[1]].put((parts[2], payload))
                else:
                    return self._answer(404, b'{"errorMessage": "not found"}')
                self._answer(202, b'{"status": "OK"}')

            def _answer(self, status: int, body: bytes,
                        headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler
