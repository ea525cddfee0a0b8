"""The SAM function: `handler(event, context)` for HTTP, SQS, Kinesis and direct invocation.

Wiring only; the model named by EDGERUN_MODEL loads here, at init, once per execution
environment (see edgerun.adapters.aws_lambda.environment). The package's architecture is
checked first, before numpy or ONNX Runtime is imported (see ...aws_lambda.architecture).
"""

import time

_STARTED = time.perf_counter()

from pathlib import Path  # noqa: E402

from edgerun.adapters.aws_lambda.architecture import check_architecture  # noqa: E402

check_architecture(Path(__file__).parent)

from edgerun.adapters.aws_lambda.environment import from_environment  # noqa: E402

handler = from_environment(started=_STARTED)
