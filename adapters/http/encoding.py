"""Request bodies sent compressed: `Content-Encoding: gzip` or `deflate`, as tritonclient sends
them with `request_compression_algorithm` and Triton reads them.

The size limit holds for the decompressed body too, so a small bomb cannot fill the memory.
"""

from __future__ import annotations

import zlib

from edgerun.runtime.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

#: Content coding -> zlib's wbits for it (HTTP's "deflate" is the zlib format, RFC 9110).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(body: bytes, coding: str | None, limit: int) -> bytes:
    """The body as sent before its content coding; refused past `limit` bytes decompressed."""
    if coding is None:
        return body
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise UnsupportedMediaType(f"Content-Encoding {coding[:40]!r} is not supported (gzip, "
                                   "deflate or identity)")
    decompressor = zlib.decompressobj(wbits)
    try:
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {coding} request body is corrupt: {exc}") from None
    if len(plain) > limit:
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit once "
                              "decompressed")
    if not decompressor.eof:
        raise InvalidInput(f"the {coding} request body is truncated")
    return plain
