"""Byte ranges of a file as RFC 9110 (section 14) has them: what a download may ask for.

Starlette's `FileResponse` answers a Range header it cannot use in plain text: a malformed one
or another unit with 400, where the RFC says to ignore it (the whole file, 200), and one past the
end with an empty 416. `RangedFile` reads the header first and hands `FileResponse` only the
ranges it can serve; a range set none of which the file holds is a JSON 416 that names it, with
`Content-Range: bytes */SIZE`.
"""

from __future__ import annotations

import os
import re

import orjson
from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
#: More ranges than this in one header are ignored (the whole file): a download resumes with
#: one, and Starlette's merging of many took time quadratic in their number before 1.5.1.
MAX_RANGES = 100


def byte_ranges(header: str, size: int) -> list[str] | None:
    """The range specs of `header` that a file of `size` bytes holds; [] when it holds none
    (416); None for a header to ignore (RFC 9110 14.2): another unit than bytes, or a range
    set that is malformed (a spec not `first-[last]` or `-suffix`, or a last before its first),
    or one of more than `MAX_RANGES` ranges."""
    unit, equals, specs = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    kept: list[str] = []
    parts = [part.strip() for part in specs.split(",")]
    if not any(parts) or len(parts) > MAX_RANGES:
        return None
    for part in filter(None, parts):  # empty list elements are allowed (RFC 9110 5.6.1)
        match = _SPEC.fullmatch(part)
        if match is None:
            return None
        first, last, suffix = match.groups()
        if first is not None and last and int(last) < int(first):
            return None
        if (int(first) < size) if first is not None else (int(suffix) > 0 and size > 0):
            kept.append(part)
    return kept


class RangedFile(FileResponse):
    """A file, its Range header read as `byte_ranges` reads it (the file's `stat` given)."""

    def __init__(self, path: str | os.PathLike, stat: os.stat_result, name: str,
                 media_type: str, headers: dict[str, str]) -> None:
        super().__init__(path, media_type=media_type, headers=headers, stat_result=stat)
        self.name = name  # what the 416 calls the file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Headers(scope=scope)
        asked = request.get("range")
        if asked is not None:
            size = self.stat_result.st_size
            ranges = byte_ranges(asked, size)
            if_range = request.get("if-range")
            # an If-Range that no longer holds asks for the whole file: no 416 then
            if ranges == [] and (if_range is None or if_range in (
                    self.headers.get("etag"), self.headers.get("last-modified"))):
                error = {"error": f"range {asked[:200]!r} is not satisfiable: {self.name} is "
                                  f"{size} bytes"}
                await Response(orjson.dumps(error), 416, media_type="application/json",
                               headers={"Content-Range": f"bytes */{size}"})(scope, receive, send)
                return
            headers = [(key, value) for key, value in scope["headers"] if key != b"range"]
            if ranges:
                headers.append((b"range", f"bytes={','.join(ranges)}".encode("latin-1")))
            scope = {**scope, "headers": headers}
        await super().__call__(scope, receive, send)
