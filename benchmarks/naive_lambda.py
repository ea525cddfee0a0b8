"""Baseline: the Lambda function most users write first (Mangum + FastAPI + ONNX Runtime).

    NAIVE_MODEL=model.onnx, handler = naive_lambda.handler

FastAPI, pydantic, Mangum, numpy and ONNX Runtime imported eagerly at init, the session made
at init too (the usual advice), one sync route with a pydantic-validated OIP v2 body, Mangum
with its default lifespan handling. No tricks on purpose: this is what edgerun's cold start
is compared with, so it must stay the idiomatic version, never a tuned-down one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from mangum import Mangum
from pydantic import BaseModel

session = ort.InferenceSession(os.environ["NAIVE_MODEL"], providers=["CPUExecutionProvider"])
output_names = [output.name for output in session.get_outputs()]

app = FastAPI()


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    inputs: list[InferInput]


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict[str, Any]:
    feed = {i.name: np.array(i.data, dtype=np.float32).reshape(i.shape) for i in request.inputs}
    outputs = session.run(None, feed)
    return {"model_name": name,
            "outputs": [{"name": out_name, "datatype": "FP32", "shape": list(y.shape),
                         "data": y.ravel().tolist()}
                        for out_name, y in zip(output_names, outputs)]}


handler = Mangum(app)
