"""uvicorn's httptools protocol, each response's head and body leaving in one send.

uvicorn writes a response's status line and headers, then its body: two `send` calls, two TCP
segments and two wake-ups of the client for every small inference answer. Here the head waits
for the body's first write (or the response's end, or the connection's close) and leaves with
it. Interim answers (`100 Continue`) are never held: the client waits for them.

A client that goes away while its request waits for a batch has the request withdrawn: uvicorn
only marks the request disconnected, so it would take its place in a forward pass for nobody.
The connection reads on while a request waits (uvicorn pauses reading behind a big body or a
pipelined request), since a paused transport never sees the close.

A request uvicorn cannot parse is answered as every other: a JSON error and an X-Request-Id;
behind whole requests still to be answered (pipelined, or after a body longer than its
Content-Length), only once they are, in order, so it is never read as their answer.
A connection that sends nothing is closed after the keep-alive timeout, as an idle one is.
A request head must be whole within `HEAD_TIMEOUT_S` (at most the keep-alive timeout) of its
first byte, else it is answered 408 and the connection closes (nginx's client_header_timeout):
uvicorn has none, and a client trickling a head held its connection for good. A body's upload
is not timed.

Once the server stops (`shutdown`, called at the signal), every answer says `Connection: close`
and closes its connection, and an idle connection closes at once: a client reusing a
connection after its answer would otherwise send a request that nobody reads. A request whose
head is still coming is not idle: it is answered, closing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from edgerun.adapters.dataplane.hooks import request_id
from edgerun.adapters.http.asgi import CLIENT_GONE

INTERIM = b"HTTP/1.1 1"
#: nginx's client_header_timeout: the most a request head may take from its first byte.
HEAD_TIMEOUT_S = 60.0


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

    #: Between a request's first byte and its whole head (no timer: it came in one read).
    in_head: bool = False
    head_timer: asyncio.TimerHandle | None = None
    #: The 400 owed for bytes that are no request, once the requests before them are answered.
    refused: str | None = None
    #: The server stops: each request parsed from here on is answered with the close.
    draining: bool = False

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

    def data_received(self, data: bytes) -> None:
        """A head still incomplete after a read gets its deadline (one timer per such head;
        one that came whole, the usual case, costs none)."""
        if self.refused is not None:  # past bytes the parser refused, nothing is read
            return
        super().data_received(data)
        if self.in_head and self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(
                min(HEAD_TIMEOUT_S, self.timeout_keep_alive), self.head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True

    def head_timed_out(self) -> None:
        """408 and close; behind a request still being answered (pipelined), only the close,
        once it is answered, so no answer is cut or overtaken."""
        self.head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        else:
            self.send_error(b"408 Request Timeout", "the request head did not arrive in time")

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        cycle, task = self.running, self.tasks.newest  # type: ignore[attr-defined]
        self.cancel_head_timer()
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
        self.in_head = False
        if self.head_timer is not None:  # only a head that came in pieces has one
            self.cancel_head_timer()
        super().on_headers_complete()
        if self.draining:
            self.cycle.keep_alive = False
        if not self.pipeline:  # started at once: the running request
            self.running = self.cycle
        elif len(self.pipeline) == 1:
            self.flow.resume_reading()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if len(self.pipeline) <= 1:
            self.flow.resume_reading()

    def shutdown(self) -> None:
        """The server stops: uvicorn's (idle, the connection closes now; else its newest
        request's answer says `Connection: close`), a head still coming awaited, not cut."""
        self.draining = True
        if not self.in_head:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as a request (then it closes). Behind
        whole requests not yet answered, it waits for their answers: written at once, it came
        first, read as the answer to the first of them, and the close withdrew them. Bytes
        inside a request's body leave that request unanswerable: refused at once."""
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            self.refused = msg
            self.in_head = False
            self.cancel_head_timer()
            return
        self.send_error(b"400 Bad Request", msg)

    def send_error(self, status: bytes, msg: str) -> None:
        """An answer of the connection's own, then the close: an OIP error body and a new
        request id (nothing of an unparsed request is trusted), as the app answers."""
        body = orjson.dumps({"error": msg})
        head = [b"HTTP/1.1 %s\r\n" % status]
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
        if self.refused is not None and self.cycle.response_complete \
                and not self.transport.is_closing():  # the last whole request is answered
            self.send_error(b"400 Bad Request", self.refused)
