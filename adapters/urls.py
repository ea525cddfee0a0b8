"""URLs in logs and error messages."""

from __future__ import annotations


def redact(url: str) -> str:
    """`url` with its password (`scheme://user:SECRET@host/...`) shown as `***`, the rest as
    written: never parsed into a port or a path, so a malformed URL is shown, not raised on."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    netloc, slash, path = rest.partition("/")
    user, at, host = netloc.rpartition("@")  # as urlsplit, the last @: a password may hold one
    if not at or ":" not in user:
        return url
    return f"{scheme}{sep}{user.split(':', 1)[0]}:***@{host}{slash}{path}"
