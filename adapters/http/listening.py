"""uvicorn's server, a port it cannot listen on an OSError naming the address, said once.

uvicorn logs the bare error ("Name or service not known" names no host) and exits with
status 3; `edgerun serve` and `edgerun fleet serve` say it in one line, naming the address,
and exit 2, as for their other errors.
"""

from __future__ import annotations

import logging
import socket

import uvicorn


def listen_address(config: uvicorn.Config) -> str:
    """HOST:PORT, an IPv6 host in brackets."""
    host, port = config.host, config.port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _BindErrorRaised(logging.Filter):
    """uvicorn logs the bind error itself (the exception is the record's message) before it
    exits: it is raised instead, with the address, so not logged a second time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(record.msg, OSError)


class NamedBindErrors(uvicorn.Server):
    """uvicorn.Server whose start-up raises OSError("HTTP could not listen on HOST:PORT: ...")
    where uvicorn would log the bare error and exit 3."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        uvicorn_log = logging.getLogger("uvicorn.error")
        raised = _BindErrorRaised()
        uvicorn_log.addFilter(raised)
        try:
            await super().startup(sockets)
        except SystemExit as exc:
            cause = exc.__context__  # uvicorn exits inside its `except OSError`
            if not isinstance(cause, OSError):
                raise
            raise OSError(f"HTTP could not listen on {listen_address(self.config)}: "
                          f"{cause}") from None
        finally:
            uvicorn_log.removeFilter(raised)
