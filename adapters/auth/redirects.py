"""urllib, but a redirect to another origin is followed without the request's credential.

urllib copies every header onto a redirect, wherever it points: a device's credential (its MQTT
password too) or an operator's token would go to a CDN, object store or proxy that the registry
redirects to.
"""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any


class _CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class _Watching(urllib.request.AbstractHTTPHandler):
    """Hands every connection it makes to `on_socket` as soon as it is connected (before TLS,
    so a handshake that stalls can be cut too)."""

    def __init__(self, on_socket: Callable[[socket.socket], None]) -> None:
        super().__init__()
        self.on_socket = on_socket

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        on_socket = self.on_socket

        class Watched(http_class):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **kw)
                create = self._create_connection

                def created(*a: Any, **k: Any) -> socket.socket:
                    sock = create(*a, **k)
                    on_socket(sock)
                    return sock

                self._create_connection = created

        return super().do_open(Watched, req, **kwargs)


class _WatchedHTTP(_Watching, urllib.request.HTTPHandler):
    pass


_WATCHED: list[type[_Watching]] = [_WatchedHTTP]

# a Python built without ssl (some device images) has no HTTPSHandler: plain http still works
if hasattr(urllib.request, "HTTPSHandler"):
    class _WatchedHTTPS(_Watching, urllib.request.HTTPSHandler):
        pass

    _WATCHED.append(_WatchedHTTPS)


_OPENER = urllib.request.build_opener(_CredentialsStayHome)


def open_url(request: urllib.request.Request, timeout: float,
             on_socket: Callable[[socket.socket], None] | None = None) -> Any:
    """`urllib.request.urlopen`, keeping `Authorization` to the request's own origin. Each
    connection it makes (a redirect makes another) is handed to `on_socket`, so that another
    thread can cut an open that stalls: `timeout` bounds each read, not the answer's head."""
    if on_socket is None:
        return _OPENER.open(request, timeout=timeout)
    watched = [handler(on_socket) for handler in _WATCHED]
    return urllib.request.build_opener(_CredentialsStayHome, *watched).open(request,
                                                                           timeout=timeout)
