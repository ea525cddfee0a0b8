"""Resumable downloads over HTTP Range, with urllib (no extra dependency on a device).

Bytes land in `DEST.part`; a restarted download asks for the rest (`Range: bytes=N-`) with
`If-Range` naming the expected ETag (the bundle's sha256), so if the registry's file changed
it answers 200 with the whole file and the part is started over. The finished file must have
the expected sha256 and size before it is renamed into place; a registry that sends more than
the expected size is cut off there, so a download never fills the disk past it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgerun.adapters.auth.redirects import open_url
from edgerun.runtime.errors import BundleError

_CHUNK = 1 << 16


class DownloadInterrupted(BundleError):
    """The registry could not be reached or the transfer broke off: worth another try."""


def _open(request: urllib.request.Request, timeout: float) -> Any:
    """The response, or None for a 416; what may pass (a 5xx, a dropped connection) is
    DownloadInterrupted, to be retried; any other refusal is BundleError."""
    try:
        return open_url(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return None
        kind = DownloadInterrupted if exc.code >= 500 else BundleError
        raise kind(f"download of {request.full_url} failed: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadInterrupted(f"download of {request.full_url} failed: {exc}") from exc


def _read(response: Any, url: str, transferred: int) -> bytes:
    """The next chunk; the transfer breaking off is DownloadInterrupted (worth another try)."""
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadInterrupted(f"download of {url} broke off after {transferred} bytes: "
                                  f"{exc}") from exc


def download(url: str, dest: Path, sha256: str, size: int = 0, timeout: float = 30.0,
             headers: dict[str, str] | None = None) -> int:
    """Fetch `url` into `dest`, resuming a previous part; returns the bytes transferred.
    `headers` carry the device's credential (`Authorization: Basic ...`)."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size and have > size:
        have = 0
    transferred = 0
    if not (size and have == size):
        request = urllib.request.Request(url, headers=headers or {})
        if have:
            request.add_header("Range", f"bytes={have}-")
            request.add_header("If-Range", f'"{sha256}"')
        response = _open(request, timeout)
        if response is None:  # 416: the part is no prefix of this file; start over
            have = 0
            response = _open(urllib.request.Request(url, headers=headers or {}), timeout)
            if response is None:
                raise BundleError(f"download of {url} failed: HTTP 416 without a Range")
        resumed = have if have and response.status == 206 else 0
        try:
            with response, open(part, "ab" if resumed else "wb") as out:
                while chunk := _read(response, url, transferred):
                    if size and resumed + transferred + len(chunk) > size:
                        raise BundleError(f"download of {url} is over the job's {size} bytes "
                                          "(corrupt or tampered artifact)")
                    out.write(chunk)
                    transferred += len(chunk)
                # http.client ends a body cut short as if it were whole: the length tells
                announced = response.headers.get("Content-Length", "")
                if announced.isdigit() and transferred < int(announced):
                    raise DownloadInterrupted(f"download of {url} broke off after "
                                              f"{transferred} of {announced} bytes")
                out.flush()
                os.fsync(out.fileno())
        except DownloadInterrupted:
            raise  # the part stays: resumed
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
