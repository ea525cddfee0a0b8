"""Baseline (b): the Open Inference Protocol server most users write first.

    EDGERUN_BENCH_MODEL=model.onnx uvicorn plain_fastapi:app --no-access-log

A sync FastAPI endpoint (so it runs in Starlette's thread pool), a pydantic-validated body,
numpy conversion, one `InferenceSession.run` per request with default session options, JSON
out. No batching and no tricks on purpose: this is what the fleet server has to beat, so it
must stay the idiomatic version, never a tuned-down one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Response
from pydantic import BaseModel

PROVIDERS = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
             if p in ort.get_available_providers()]
session = ort.InferenceSession(os.environ["EDGERUN_BENCH_MODEL"], providers=PROVIDERS)
output_names = [output.name for output in session.get_outputs()]

app = FastAPI()


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    inputs: list[InferInput]


@app.get("/v2/health/ready")
def ready() -> Response:
    return Response(status_code=200)


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict[str, Any]:
    feed = {i.name: np.array(i.data, dtype=np.float32).reshape(i.shape) for i in request.inputs}
    outputs = session.run(None, feed)
    return {"model_name": name,
            "outputs": [{"name": out_name, "datatype": "FP32", "shape": list(y.shape),
                         "data": y.ravel().tolist()}
                        for out_name, y in zip(output_names, outputs)]}
