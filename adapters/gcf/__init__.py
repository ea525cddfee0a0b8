"""Google Cloud Functions: an HTTP function and a Pub/Sub CloudEvent function on the data plane.

The adapter takes the request and event objects functions-framework passes (a Flask request,
a CloudEvent) by duck typing and imports neither: only the function's entry module
(functions/gcf/main.py) imports functions-framework, and with it Flask.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CloudFunction", "answer_http", "current", "from_environment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgerun.adapters.gcf import function
        return getattr(function, name)
    raise AttributeError(name)
