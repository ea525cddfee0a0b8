"""Baseline: the Lambda function most users write first (Mangum + FastAPI + ONNX Runtime).

    EDGERUN_BENCH_MODEL=model.onnx, handler = naive_lambda.handler

The plain FastAPI server of `plain_fastapi.py` (FastAPI, pydantic, numpy and ONNX Runtime
imported eagerly, the session made at import, a sync route with a pydantic-validated OIP v2
body) behind Mangum with its default lifespan handling: the idiomatic version, never a
tuned-down one.
"""

from mangum import Mangum
from plain_fastapi import app

handler = Mangum(app)
