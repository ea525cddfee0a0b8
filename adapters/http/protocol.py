"""uvicorn's httptools protocol, each response's head and body leaving in one send.

uvicorn writes a response's status line and headers, then its body: two `send` calls, two TCP
segments and two wake-ups of the client for every small inference answer. Here the head waits
for the body's first write (or the response's end, or the connection's close) and leaves with
it. Interim answers (`100 Continue`) are never held: the client waits for them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class OneSendProtocol(HttpToolsProtocol):
    """HTTP/1.1 on httptools, one send per response (websocket upgrades are not served)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneSendTransport(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self.transport.response_done()  # type: ignore[attr-defined]
        super().on_response_complete()
