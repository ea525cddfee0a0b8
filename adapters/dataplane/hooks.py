"""The hook chain every call passes, whatever its transport or route.

A hook sees a call before it runs (raise one of the core's errors, `Unauthenticated` say, to
refuse it) and after it is answered (with the error, if any). Hooks run on the data plane, not
in a web framework's middleware, so HTTP routes, the fast path, gRPC, MQTT and Lambda events all
pass the same chain: auth, request ids and tracing cannot be skipped by a faster way in.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable

from edgerun.adapters.dataplane.call import Call
from edgerun.runtime.errors import EdgerunError

log = logging.getLogger(__name__)


class Hook:
    """Override either method; both run on the caller's thread or loop, so keep them quick."""

    def before(self, call: Call) -> None:
        """Inspect or annotate the call; raise an EdgerunError to refuse it."""

    def after(self, call: Call, error: EdgerunError | None) -> None:
        """The call was answered (`error` is None on success)."""


class HookChain:
    """Hooks in order before a call, in reverse order after it."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks: tuple[Hook, ...] = tuple(hooks)

    def add(self, hook: Hook) -> None:
        self.hooks = (*self.hooks, hook)

    def before(self, call: Call) -> None:
        for hook in self.hooks:
            hook.before(call)

    def after(self, call: Call, error: EdgerunError | None) -> None:
        for hook in reversed(self.hooks):
            try:
                hook.after(call, error)
            except Exception:  # the answer is made; a hook's bug must not lose it
                log.exception("hook %s failed after request %s", type(hook).__name__,
                              call.request_id)


_REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}")


class RequestId(Hook):
    """Every call gets an id (the caller's `x-request-id` if sane, else a new one), echoed back."""

    attribute = "x-request-id"

    def before(self, call: Call) -> None:
        call.request_id = request_id(call.attributes(self.attribute))

    def after(self, call: Call, error: EdgerunError | None) -> None:
        if call.request_id is not None:
            call.response_headers["X-Request-Id"] = call.request_id


def request_id(given: str | None) -> str:
    """The caller's id if it is sane, else a new one (also for answers no route reaches)."""
    return given if given and _REQUEST_ID.fullmatch(given) else _new_id()


def _new_id() -> str:
    """128 random bits as 32 hex digits, like uuid4().hex without a syscall per request.

    Ids need to be unique, not secret: `random` is seeded from the OS at start and again in
    each forked worker, and makes one in a few microseconds without releasing the GIL (uuid4's
    `os.urandom` did, and under load the event loop then waited for the batcher's thread).
    """
    return f"{random.getrandbits(128):032x}"
