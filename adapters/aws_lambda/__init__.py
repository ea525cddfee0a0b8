"""AWS Lambda: one handler for HTTP events (through Mangum), SQS and Kinesis batches, and direct
invocation, all on the data plane; the model loads once per execution environment.

`from_environment()` builds the handler a function module exposes (see functions/inference/);
`LambdaHandler` is the same handler over a data plane you built yourself. Importing this package
imports neither a web framework nor a backend.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LambdaHandler", "from_environment"]


def __getattr__(name: str) -> Any:
    if name == "LambdaHandler":
        from edgerun.adapters.aws_lambda.handler import LambdaHandler
        return LambdaHandler
    if name == "from_environment":
        from edgerun.adapters.aws_lambda.environment import from_environment
        return from_environment
    raise AttributeError(name)
