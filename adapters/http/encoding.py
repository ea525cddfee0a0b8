"""Request bodies sent compressed: `Content-Encoding: gzip` or `deflate`, as tritonclient sends
them with `request_compression_algorithm` and Triton reads them.

The size limit holds for the decompressed body too, so a small bomb cannot fill the memory.
A server inflates the first `INLINE_BYTES` on its event loop and the rest, if any, on a worker
thread (`start_decoding`): 64 MiB take 0.15 to 0.35 s to inflate, and zlib lets go of the GIL
while it inflates, so there nobody else waits for it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from edgerun.runtime.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

#: Content coding -> zlib's wbits for it (HTTP's "deflate" is the zlib format, RFC 9110).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: Decompressed bytes inflated where the body is read (a millisecond or less): a body that
#: inflates further is finished elsewhere. Decided by what comes out, not by what goes in: a
#: few KiB of deflate can inflate to a thousand times their size.
INLINE_BYTES = 1 << 18


def decode_body(body: bytes, coding: str | None, limit: int) -> bytes:
    """The body as sent before its content coding; refused past `limit` bytes decompressed."""
    decoded = start_decoding(body, coding, limit, inline=limit + 1)
    return decoded if isinstance(decoded, bytes) else decoded()


def start_decoding(body: bytes, coding: str | None, limit: int,
                   inline: int = INLINE_BYTES) -> bytes | Callable[[], bytes]:
    """`decode_body` as far as `inline` decompressed bytes: the body when it ends there, else
    the function that inflates the rest, to call on a worker thread. Either may refuse it."""
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
    room = min(inline, limit + 1)
    head = _inflate(decompressor, coding, body, room)
    if len(head) < room or decompressor.eof or room > limit:
        return _whole(decompressor, coding, head, limit)

    def rest() -> bytes:
        tail = _inflate(decompressor, coding, decompressor.unconsumed_tail,
                        limit + 1 - len(head))
        return _whole(decompressor, coding, b"".join((head, tail)), limit)
    return rest


def _inflate(decompressor: zlib._Decompress, coding: str, data: bytes, room: int) -> bytes:
    try:
        return decompressor.decompress(data, room)
    except zlib.error as exc:
        raise InvalidInput(f"the {coding} request body is corrupt: {exc}") from None


def _whole(decompressor: zlib._Decompress, coding: str, plain: bytes, limit: int) -> bytes:
    if len(plain) > limit:
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit once "
                              "decompressed")
    if not decompressor.eof:
        raise InvalidInput(f"the {coding} request body is truncated")
    return plain
