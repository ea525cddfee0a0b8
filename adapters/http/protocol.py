"""uvicorn's httptools protocol, each response's head and body leaving in one send.

uvicorn writes a response's status line and headers, then its body: two `send` calls, two TCP
segments and two wake-ups of the client for every small inference answer. Here the head waits
for the body's first write (or the response's end, or the connection's close) and leaves with
it. Interim answers (`100 Continue`) are never held: the client waits for them.

A client that goes away while its request waits for a batch has the request withdrawn: uvicorn
only marks the request disconnected, so it would take its place in a forward pass for nobody.
The connection reads on while a request waits (uvicorn pauses reading behind a big body or a
pipelined request), since a paused transport never sees the close.

A request uvicorn cannot parse is answered as every other: a JSON error and an X-Request-Id.
A connection that sends nothing is closed after the keep-alive timeout, as an idle one is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.asgi import CLIENT_GONE

INTERIM = b"HTTP/1.1 1"


class _OneSendTransport:
    """Delegates to the real transport, holding back a response head until its body."""

    __slots__ = ("transport", "head", "expect_head")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None
        self.expect_head = True

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.writelines((head, data))
        elif self.expect_head and not data.startswith(INTERIM):
            self.expect_head = False
            self.head = data
        else:
            self.transport.write(data)

    def response_done(self) -> None:
        self.flush()
        self.expect_head = True

    def flush(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Tasks:
    """The server's set of request tasks, remembering the connection's newest one (pipelined
    requests start one at a time, so it is the one running)."""

    __slots__ = ("tasks", "newest")

    def __init__(self, tasks: set[asyncio.Task[None]]) -> None:
        self.tasks = tasks
        self.newest: asyncio.Task[None] | None = None

    def add(self, task: asyncio.Task[None]) -> None:
        self.newest = task
        self.tasks.add(task)

    def discard(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)

    def __len__(self) -> int:
        return len(self.tasks)


class OneSendProtocol(HttpToolsProtocol):
    """HTTP/1.1 on httptools, one send per response (websocket upgrades are not served)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneSendTransport(transport))  # type: ignore[arg-type]
        self.tasks = _Tasks(self.server_state.tasks)  # type: ignore[assignment]
        #: The request whose task runs: with requests pipelined behind it, `self.cycle` is
        #: the newest one parsed, not this one.
        self.running: RequestResponseCycle | None = None
        # Idle from the start, as after an answer: uvicorn arms the keep-alive timer only once
        # a response is done, so a client that connected and sent nothing held its socket
        # (and a file descriptor) for good. Its first bytes disarm it.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        cycle, task = self.running, self.tasks.newest  # type: ignore[attr-defined]
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete and task is not None:
            # uvicorn marks only `self.cycle` disconnected; unmarked, the cancelled request
            # would be answered with a 500 written to the closed transport.
            cycle.disconnected = True
            task.cancel(CLIENT_GONE)

    # Both read on while a request waits, so a client that goes away is seen: a paused
    # transport never reads the close. uvicorn pauses reading for a request pipelined behind
    # the running one and past a body's 64 KiB high-water mark, and resumes it only for the
    # answer. Here a whole body, or the head of one pipelined request, reads on; a body still
    # coming over the mark, or a second pipelined request, keeps it paused: the bound on
    # what one connection buffers.
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.pipeline:  # started at once: the running request
            self.running = self.cycle
        elif len(self.pipeline) == 1:
            self.flow.resume_reading()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if len(self.pipeline) <= 1:
            self.flow.resume_reading()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as a request (then it closes): an OIP error
        body and a new request id (nothing of a malformed request is trusted), as the app
        answers."""
        body = orjson.dumps({"error": msg})
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"x-request-id: %s\r\nconnection: close\r\n\r\n"
                    % (len(body), request_id(None).encode()))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def on_response_complete(self) -> None:
        self.transport.response_done()  # type: ignore[attr-defined]
        if self.pipeline:  # the next one starts now (or never: the connection is closing)
            self.running = self.pipeline[-1][0]
        super().on_response_complete()
