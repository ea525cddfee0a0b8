"""Resumable downloads over HTTP Range, with urllib (no extra dependency on a device).

Bytes land in `DEST.part`; a restarted download asks for the rest (`Range: bytes=N-`) with
`If-Range` naming the expected ETag (the bundle's sha256), so if the registry's file changed
it answers 200 with the whole file and the part is started over. The finished file must have
the expected sha256 and size before it is renamed into place; a registry that sends more than
the expected size is cut off there, so a download never fills the disk past it.

A `Stop`, asked from another thread (the daemon stopping), ends a download at once rather
than at its socket timeout; the part stays, to be resumed.

A `SpeedLimit` (curl's --speed-limit/--speed-time) ends a transfer that averages under it,
and an answer whose head has not come within its window: the socket timeout bounds each read,
not the download, and a registry or proxy that sends a byte every 20 s held a download (and
the agent's job thread) for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun.adapters.auth.redirects import open_url
from edgerun.runtime.errors import BundleError
from edgerun.runtime.model_config import finite_number

_CHUNK = 1 << 16
#: How often a download still waiting for the registry's answer looks for a stop.
_POLL_S = 0.05


class DownloadInterrupted(BundleError):
    """The registry could not be reached or the transfer broke off: worth another try."""


class DownloadStopped(DownloadInterrupted):
    """A `Stop` was asked (the daemon stopping): the part stays, to be resumed later."""


class DownloadTooSlow(DownloadInterrupted):
    """The transfer averaged under its `SpeedLimit` (a stalled registry, proxy or link):
    usually passing, so worth another try, resumed from the part. `rate` is what was measured,
    in bytes/s."""

    def __init__(self, message: str, rate: float) -> None:
        super().__init__(message)
        self.rate = rate


class SpeedLimitError(ValueError):
    """A `SpeedLimit` value out of range; `key` names it (`speed_limit`, `speed_time`), so a
    caller can say where the value came from."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key} {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class SpeedLimit:
    """A download averaging under `bytes_per_s` over `seconds` fails (DownloadTooSlow), as
    curl's --speed-limit/--speed-time; `bytes_per_s` 0 turns it off.

    The defaults suit cellular links: 1 KiB/s is far under what even GPRS or NB-IoT carry
    (tens of kbit/s), so only a transfer that has all but stopped trips it, and 60 s rides out
    a cell handover or a short loss of coverage (and is longer than the 30 s read timeout,
    which already ends a link that sends nothing at all). A fixed deadline would instead fail
    large bundles on slow links that are still making progress."""

    bytes_per_s: float = 1024.0
    seconds: float = 60.0

    def __post_init__(self) -> None:
        if not finite_number(self.bytes_per_s) or self.bytes_per_s < 0:
            raise SpeedLimitError("speed_limit", "must be a number of bytes/s of at least 0 "
                                  f"(0 turns it off), got {self.bytes_per_s!r}")
        if not finite_number(self.seconds) or self.seconds <= 0:
            raise SpeedLimitError("speed_time", "must be a number of seconds above 0, got "
                                  f"{self.seconds!r}")


class _Pace:
    """Checks, at each chunk, the average rate over the last `limit.seconds` (from the body's
    start on): samples of (time, bytes so far), at most about 32 a window, so a fast link
    keeps a few of them rather than one per chunk."""

    def __init__(self, limit: SpeedLimit, url: str) -> None:
        self.limit, self.url = limit, url
        self.start = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque([(self.start, 0)])

    def check(self, transferred: int) -> None:
        if not self.limit.bytes_per_s:
            return
        now, window = time.monotonic(), self.limit.seconds
        if now - self.start >= window:
            # the newest sample at least a window old starts the span measured (reads come at
            # least every socket timeout, so the span is not much longer than the window)
            while len(self.samples) > 1 and self.samples[1][0] <= now - window:
                self.samples.popleft()
            since, then = self.samples[0]
            rate = (transferred - then) / (now - since)
            if rate < self.limit.bytes_per_s:
                raise DownloadTooSlow(
                    f"download of {self.url} stalled: {rate:.1f} bytes/s over the last "
                    f"{now - since:.1f} s, under the limit of {self.limit.bytes_per_s:g} "
                    f"bytes/s over {window:g} s ({transferred} bytes this try)", rate)
        if now - self.samples[-1][0] >= window / 32:
            self.samples.append((now, transferred))


class Stop:
    """Ends a download from another thread at once, not at its socket timeout (30 s, and a
    registry that stalls could hold a daemon's stop that long): one still opening has its
    connection cut (one still looking up a name is left to its own thread, which closes what
    it gets); one reading has its connection shut down, so the read returns at once.
    One download at a time (as the agent runs its jobs) may use it."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def set(self) -> None:
        """Ask every download given this stop to end now (and any later one at its start)."""
        with self._lock:
            self._asked.set()
            self._shut_down()

    def is_set(self) -> bool:
        return self._asked.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` (a retry's backoff) unless a stop comes first: True if it did."""
        return self._asked.wait(seconds)

    def _shut_down(self) -> None:
        if self._socket is not None:
            _shut(self._socket)

    @contextlib.contextmanager
    def _watch(self, response: Any) -> Iterator[None]:
        """While `response`'s body is read, a stop shuts its connection down. Through a
        duplicate of its descriptor: http.client closes its own at the body's end, and a
        number closed and reused meanwhile could be another connection."""
        try:  # (the family named is only the object's: shutdown acts on the descriptor)
            sock = socket.fromfd(response.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        except (AttributeError, OSError, ValueError):  # closed already: no read to wait for
            sock = None
        with self._lock:
            self._socket = sock
            if self._asked.is_set():
                self._shut_down()
        try:
            yield
        finally:
            with self._lock:
                self._socket = None
            if sock is not None:
                sock.close()


class _Connections:
    """The connections an open makes (a redirect makes another), so that the downloading
    thread can cut one that stalls or that a stop ends. Held as duplicates of their
    descriptors, as `Stop._watch` holds a body's (TLS takes the socket object over), and closed
    by the opening thread once its open is over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = self._over = False
        #: When the newest connection was made (monotonic); None before the first.
        self.connected_at: float | None = None

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if self._over:
                return
            duplicate = sock.dup()
            self._sockets.append(duplicate)
            self.connected_at = time.monotonic()
            if self._cut:
                _shut(duplicate)

    def cut(self) -> None:
        """End the open now: its read fails at once, and the opening thread ends."""
        with self._lock:
            self._cut = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        with self._lock:
            self._over = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _open(request: urllib.request.Request, timeout: float,
          connections: _Connections | None = None) -> Any:
    """The response, or None for a 416; what may pass (a 5xx, 408 or 429, a dropped
    connection) is DownloadInterrupted, to be retried; any other refusal is BundleError."""
    try:
        return open_url(request, timeout=timeout,
                        on_socket=None if connections is None else connections.add)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return None
        # a registry (or the CDN or proxy before it) that is busy: 408, 429 and 5xx pass
        kind = DownloadInterrupted if exc.code >= 500 or exc.code in (408, 429) \
            else BundleError
        raise kind(f"download of {request.full_url} failed: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadInterrupted(f"download of {request.full_url} failed: {exc}") from exc


def _open_unless_stopped(request: urllib.request.Request, timeout: float, stop: Stop,
                         within: float | None) -> Any:
    """`_open` on a thread of its own, so that a stop need not wait for it: a name lookup, a
    connect and a registry's answer may each take up to `timeout`, and a head trickled a byte
    at a time longer still. An answer whose head has not come `within` seconds of its
    connection (a redirect's, of the newest; a lookup or connect is bounded by `timeout`, as
    curl's speed limit leaves them to its connect timeout) is DownloadTooSlow; then, or at a
    stop, the connection is cut, so the opening thread ends too. A response that comes after
    either is closed."""
    opened: futures.Future[Any] = futures.Future()
    connections = _Connections()
    threading.Thread(target=_opening, args=(opened, request, timeout, connections),
                     name="edgerun-download-open", daemon=True).start()
    while not stop.is_set():
        if futures.wait([opened], timeout=_POLL_S).done:
            try:
                return opened.result()  # or its error, raised
            finally:
                del opened  # as in `_opening`: an error's traceback keeps this frame
        connected = connections.connected_at
        if within is not None and connected is not None and \
                time.monotonic() > connected + within:
            connections.cut()
            opened.add_done_callback(_close_unused)
            raise DownloadTooSlow(f"download of {request.full_url} stalled: no answer within "
                                  f"{within:g} s of connecting (the speed limit's window)", 0.0)
    connections.cut()
    opened.add_done_callback(_close_unused)
    raise DownloadStopped(f"download of {request.full_url} stopped")


def _opening(opened: futures.Future[Any], request: urllib.request.Request,
             timeout: float, connections: _Connections) -> None:
    try:
        opened.set_result(_open(request, timeout, connections))
    except BaseException as exc:  # raised again on the downloading thread
        opened.set_exception(exc)
    finally:
        connections.close()
    # An error's traceback keeps this frame: holding the future, which holds the error, it
    # made a cycle that kept an HTTP error's socket open until the cycle collector ran.
    del opened


def _close_unused(opened: futures.Future[Any]) -> None:
    if opened.exception() is None and opened.result() is not None:
        opened.result().close()


def _read(response: Any, url: str, transferred: int) -> bytes:
    """The next chunk, as soon as any of it came (`read` waited for a whole chunk: a trickle
    never reached the speed check); the transfer breaking off is DownloadInterrupted (worth
    another try)."""
    try:
        return response.read1(_CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadInterrupted(f"download of {url} broke off after {transferred} bytes: "
                                  f"{exc}") from exc


def download(url: str, dest: Path, sha256: str, size: int = 0, timeout: float = 30.0,
             headers: dict[str, str] | None = None, stop: Stop | None = None,
             speed_limit: SpeedLimit = SpeedLimit()) -> int:
    """Fetch `url` into `dest`, resuming a previous part; returns the bytes transferred.
    `headers` carry the device's credential (`Authorization: Basic ...`); `stop` ends it
    early (DownloadStopped), its part kept for resuming; a body that comes slower than
    `speed_limit` ends it (DownloadTooSlow), its part kept too."""
    stop = stop or Stop()
    if stop.is_set():
        raise DownloadStopped(f"download of {url} stopped before it began")
    part = dest.with_name(dest.name + ".part")
    if dest.exists():  # whole, from a job a stop cut short after its download: hashed again
        os.replace(dest, part)
    have = part.stat().st_size if part.exists() else 0
    if size and have > size:
        have = 0
    transferred = 0
    if not (size and have == size):
        request = urllib.request.Request(url, headers=headers or {})
        if have:
            request.add_header("Range", f"bytes={have}-")
            request.add_header("If-Range", f'"{sha256}"')
        within = speed_limit.seconds if speed_limit.bytes_per_s else None
        response = _open_unless_stopped(request, timeout, stop, within)
        if response is None:  # 416: the part is no prefix of this file; start over
            have = 0
            response = _open_unless_stopped(urllib.request.Request(url, headers=headers or {}),
                                            timeout, stop, within)
            if response is None:
                raise BundleError(f"download of {url} failed: HTTP 416 without a Range")
        resumed = have if have and response.status == 206 else 0
        pace = _Pace(speed_limit, url)
        try:
            with response, open(part, "ab" if resumed else "wb") as out, stop._watch(response):
                while not stop.is_set() and (chunk := _read(response, url, transferred)):
                    if size and resumed + transferred + len(chunk) > size:
                        raise BundleError(f"download of {url} is over the job's {size} bytes "
                                          "(corrupt or tampered artifact)")
                    out.write(chunk)
                    transferred += len(chunk)
                    pace.check(transferred)
                if stop.is_set():  # a connection shut down ends a body as if it were whole
                    raise DownloadStopped(f"download of {url} stopped after {transferred} "
                                          "bytes")
                # http.client ends a body cut short as if it were whole: the length tells
                announced = response.headers.get("Content-Length", "")
                if announced.isdigit() and transferred < int(announced):
                    raise DownloadInterrupted(f"download of {url} broke off after "
                                              f"{transferred} of {announced} bytes")
                out.flush()
                os.fsync(out.fileno())
        except DownloadInterrupted as exc:  # the part stays: resumed
            if stop.is_set() and not isinstance(exc, DownloadStopped):  # the read cut off
                raise DownloadStopped(f"download of {url} stopped after {transferred} "
                                      "bytes") from exc
            raise
        except BundleError:  # more than the job's size: nothing of it is worth keeping
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            # the device's own disk (full, read-only): no retry mends it, and a part that
            # cannot grow would only keep the space from everything else on the device
            with contextlib.suppress(OSError):  # a read-only folder keeps it, as it must
                part.unlink(missing_ok=True)
            raise BundleError(f"cannot store the download of {url} in {dest.parent}: "
                              f"{exc}") from exc
    digest = hashlib.sha256()
    with open(part, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        part.unlink()
        raise BundleError(f"downloaded bundle's sha256 {digest.hexdigest()[:12]}… does not "
                          f"match the job's {sha256[:12]}… (corrupt or tampered artifact)")
    os.replace(part, dest)
    return transferred
