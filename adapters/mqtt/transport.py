"""The broker connection under paho, buffered both ways: fewer system calls per message.

paho reads a packet with three or more `recv` calls (the command byte, each byte of the
remaining length, then the rest) and writes every packet with a `send` of its own. A request
costs the daemon two packets in (the PUBLISH, then the broker's PUBACK of the answer) and two
out (our PUBACK, the answer), so about eight system calls, and every `send` wakes the broker
for one packet. `BufferedSocket` is the socket paho sees (paho's own `SocketLike` protocol):
`recv` is served from one large read of what the kernel holds, and `send` only appends to a
buffer that the daemon writes out with one `send` once paho has queued everything the current
turn of the event loop produced (`flush`). Whoever drives it must therefore call `flush` after
`loop_write`, and call `loop_read` again while `pending()` says bytes are buffered (the
selector cannot see them).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 65536
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BufferedSocket:
    """A connected, non-blocking socket (TCP or TLS) with a read buffer and a write buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in = b""
        self._at = 0
        self._out = bytearray()
        self._error: OSError | None = None

    # -------------------------------------------------------------- what paho calls
    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from the buffer, else from one large read of the socket."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._at >= len(self._in):
            if size >= READ_SIZE:
                return self.sock.recv(size)
            data = self.sock.recv(READ_SIZE)  # raises when nothing is there, as paho expects
            if len(data) <= size:
                return data
            self._in, self._at = data, 0
        start = self._at
        self._at = end = min(start + size, len(self._in))
        return self._in[start:end]

    def send(self, data: bytes | bytearray) -> int:
        """Taken: it goes out with the next `flush`."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._out += data
        return len(data)

    def pending(self) -> int:
        """Bytes read from the kernel (or decrypted by TLS) that paho has not taken yet."""
        buffered = len(self._in) - self._at
        if isinstance(self.sock, ssl.SSLSocket):
            buffered += self.sock.pending()
        return buffered

    def close(self) -> None:
        """Closes the socket, after a last try at what is still buffered (a DISCONNECT)."""
        if self._out:
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(self._out)
            except (OSError, ValueError):
                pass
            self._out.clear()
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeercert, ...
        return getattr(self.sock, name)

    # ------------------------------------------------------------ what the daemon calls
    @property
    def failed(self) -> bool:
        """A write failed; paho's next `recv` or `send` raises the error."""
        return self._error is not None

    def flush(self) -> bool:
        """Write what paho sent; True when all of it is out, False when the socket is full.

        A broken connection is raised by paho's next `recv` or `send` on this object, so paho
        sees it where it always does and reconnects.
        """
        out = self._out
        while out:
            try:
                written = self.sock.send(out)
            except _WOULD_BLOCK:
                return False
            except OSError as exc:
                self._error = exc
                out.clear()
                return True
            del out[:written]
        return True


class Client(mqtt.Client):
    """paho's client on a `BufferedSocket` (TCP and TLS; other transports as paho makes them)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        return BufferedSocket(sock) if isinstance(sock, socket.socket) else sock
