"""urllib, but a redirect to another origin is followed without the request's credential.

urllib copies every header onto a redirect, wherever it points: a device's credential (its MQTT
password too) or an operator's token would go to a CDN, object store or proxy that the registry
redirects to.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
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


_OPENER = urllib.request.build_opener(_CredentialsStayHome)


def open_url(request: urllib.request.Request, timeout: float) -> Any:
    """`urllib.request.urlopen`, keeping `Authorization` to the request's own origin."""
    return _OPENER.open(request, timeout=timeout)
