"""The echo ceiling: a raw ASGI app on uvicorn that reads the body and answers a canned response.

    EDGERUN_ECHO_BODY=response.json uvicorn echo_asgi:app --no-access-log

No framework, no decoding, no model: under the same load generator this is what HTTP on these
cores costs, the harness alone. `EDGERUN_ECHO_BODY` names a file holding the answer to send (the
server's real answer to the benchmark request, so both send the same bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

BODY = Path(os.environ["EDGERUN_ECHO_BODY"]).read_bytes()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):  # noqa: ANN001, ANN201 - the bare ASGI signature
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
