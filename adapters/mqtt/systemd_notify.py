"""The sd_notify protocol, with the standard library: how the daemon tells systemd it is ready,
and how long a stop will take.

systemd names its socket in $NOTIFY_SOCKET (an AF_UNIX datagram socket; a leading "@" means
Linux's abstract namespace) and reads newline-separated KEY=VALUE fields from each datagram
(sd_notify(3)). Outside systemd (a terminal, a container, the tests) the variable is unset and
nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
LOADING, SERVING = "loading the models", "serving"


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", ...) in one datagram; False when no service manager listens.

    Never raises: a manager that cannot be told is no reason for the daemon to stop serving.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:  # vsock:... (a VM's manager) and anything else sd_notify(3) itself would refuse
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket; systemd is not notified", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), target)
    except OSError as exc:
        log.warning("could not notify systemd at %s (%s): %s", address, " ".join(fields), exc)
        return False
    return True


def ready() -> bool:
    """Type=notify: the start is over (systemd's start timeout no longer applies); the models
    load after it, as `systemctl status` says."""
    return notify("READY=1", f"STATUS={LOADING}")


def status(text: str) -> bool:
    """What `systemctl status` shows of the daemon."""
    return notify(f"STATUS={text}")


def stopping(seconds: float) -> bool:
    """A stop has begun and may take `seconds`: systemd waits that long from now, or its own
    TimeoutStopSec if that is longer, before it SIGKILLs (EXTEND_TIMEOUT_USEC, systemd >= 236;
    older ones ignore the field)."""
    return notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")
