"""Request bodies: read up to a size limit, and sent compressed (`Content-Encoding: gzip` or
`deflate`, as tritonclient sends them with `request_compression_algorithm` and Triton reads them).

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


def over_limit(limit: int) -> PayloadTooLarge:
    """The refusal of a body that came in over `limit` bytes, whatever its length header said."""
    return PayloadTooLarge(f"request body is over the {limit}-byte limit")


def read_limited(read: Callable[[int], bytes], limit: int) -> bytes:
    """The whole body from a blocking `read(n)` (a WSGI input stream), refused once it passes
    `limit` bytes having read at most `limit + 1`: a chunked body declares no length, and one
    read to its end holds all a sender cares to send in memory."""
    parts, size = [], 0
    while size <= limit:
        part = read(limit + 1 - size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
    parts.clear()  # not kept alive by the traceback while the refusal is answered
    raise over_limit(limit)


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
    inflater = _Inflater(wbits, coding, body)
    room = min(inline, limit + 1)
    head = inflater.inflate(room)
    if len(head) < room or inflater.done or room > limit:
        return _whole(inflater, head, limit)

    def rest() -> bytes:
        tail = inflater.inflate(limit + 1 - len(head))
        return _whole(inflater, b"".join((head, tail)), limit)
    return rest


class _Inflater:
    """Inflates a body member after member: RFC 1952 lets a gzip body be several members one
    after the other (`cat a.gz b.gz`, streaming compressors), and zlib stops at the end of
    the first. Zero bytes after the last member are padding, as the gzip tool reads them."""

    def __init__(self, wbits: int, coding: str, body: bytes) -> None:
        self.wbits, self.coding = wbits, coding
        self.decompressor = zlib.decompressobj(wbits)
        self.pending = body
        self.done = False

    def inflate(self, room: int) -> bytes:
        """Up to `room` more decompressed bytes (fewer once the body ends or is truncated)."""
        parts: list[bytes] = []
        while room > 0 and not self.done:
            decompressor = self.decompressor
            try:
                out = decompressor.decompress(self.pending, room)
            except zlib.error as exc:
                raise InvalidInput(f"the {self.coding} request body is corrupt: {exc}") from None
            parts.append(out)
            room -= len(out)
            if not decompressor.eof:
                self.pending = decompressor.unconsumed_tail
                if not self.pending:  # all read, the member unfinished: `_whole` says so
                    break
                continue
            self.pending = decompressor.unused_data
            if self.wbits == zlib.MAX_WBITS or not self.pending.strip(b"\0"):
                self.done = True  # deflate is one stream; after gzip's last member, padding
            else:
                self.decompressor = zlib.decompressobj(self.wbits)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _whole(inflater: _Inflater, plain: bytes, limit: int) -> bytes:
    if len(plain) > limit:
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit once "
                              "decompressed")
    if not inflater.done:
        raise InvalidInput(f"the {inflater.coding} request body is truncated")
    return plain
