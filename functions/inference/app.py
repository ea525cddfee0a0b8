"""The SAM function: `handler(event, context)` for HTTP, SQS, Kinesis and direct invocation.

Wiring only; the model named by EDGERUN_MODEL loads here, at init, once per execution
environment (see edgerun.adapters.aws_lambda.environment).
"""

import time

_STARTED = time.perf_counter()

from edgerun.adapters.aws_lambda.environment import from_environment  # noqa: E402

handler = from_environment(started=_STARTED)
