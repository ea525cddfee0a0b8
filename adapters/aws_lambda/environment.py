"""A function's handler from its environment: the model loaded at init, once per environment.

    EDGERUN_MODEL         bundle folder or .tar.gz in the package or a layer, or s3://BUCKET/KEY
    EDGERUN_MODEL_SHA256  the archive's sha256 (required with s3://)
    EDGERUN_RESULTS       optional: SQS queue URL or s3://BUCKET/PREFIX for batch results
    EDGERUN_RESULTS_MAX_BYTES  optional: the results queue's MaximumMessageSize (default
                          262144, what every queue takes; at most 1048576)
    EDGERUN_BASE_PATH     optional: the API mapping key (`models`) of a custom domain the HTTP
                          API is reached through, taken off the front of request paths
    AWS_LAMBDA_FUNCTION_MEMORY_SIZE   set by Lambda; sizes ONNX Runtime's threads

Lambda gives a function CPU in proportion to its memory: one vCPU at 1,769 MB, six at the
10,240 MB maximum. ONNX Runtime gets one intra-op thread per vCPU (rounded up), never spinning:
between multiples of 1,769 MB a function has a fraction of a vCPU, and idle threads spinning
would take it from the thread that answers. Init ends with one JSON line on
stdout (CloudWatch) saying what loaded and where the time went. A missing or broken model fails
init with a message that names EDGERUN_MODEL and the reason, so the first invocation's error
says what to fix.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from edgerun.adapters.aws_lambda.destinations import (SQS_MAX_MESSAGE_BYTES, SQS_MESSAGE_BYTES,
                                                      destination_from)
from edgerun.adapters.aws_lambda.handler import LambdaHandler
from edgerun.adapters.aws_lambda.model_location import DEFAULT_CACHE, SHA256_VARIABLE, locate
from edgerun.adapters.dataplane import DataPlane
from edgerun.adapters.single_bundle import MODEL_VARIABLE, serve_bundle
from edgerun.devices import DeviceProfile
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.model_config import ModelConfig

MB_PER_VCPU = 1769
MAX_VCPUS = 6
#: A Kinesis batch holds up to 10,000 records: all of them may wait in the queue at once.
BATCHING = BatchingConfig(max_batch_size=64, max_queue_delay_us=500, max_queue_size=10_000)


def vcpus_for(memory_mb: int) -> int:
    """The vCPUs Lambda gives a function of `memory_mb` (at least one thread's worth)."""
    return max(1, min(MAX_VCPUS, math.ceil(memory_mb / MB_PER_VCPU)))


def lambda_profile(memory_mb: int) -> DeviceProfile:
    return DeviceProfile(name="aws-lambda", description="AWS Lambda CPU", arch="any",
                         execution_providers=("CPUExecutionProvider",),
                         intra_op_threads=vcpus_for(memory_mb), inter_op_threads=1,
                         allow_spinning=False, instances=1)


def from_environment(environ: Mapping[str, str] | None = None, *,
                     started: float | None = None) -> LambdaHandler:
    """Locate, verify and load the model; the handler that serves it. Raises at init on error."""
    entered = time.perf_counter()
    environ = os.environ if environ is None else environ
    started = entered if started is None else started
    spec = environ.get(MODEL_VARIABLE, "")
    memory_mb = int(environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE") or MB_PER_VCPU)
    profile = lambda_profile(memory_mb)
    located = entered

    def local_path(spec: str) -> Path:
        nonlocal located
        path = locate(spec, sha256=environ.get(SHA256_VARIABLE),
                      cache=Path(environ.get("EDGERUN_CACHE_DIR") or DEFAULT_CACHE),
                      task_root=Path(environ.get("LAMBDA_TASK_ROOT") or Path.cwd()))
        located = time.perf_counter()
        return path

    repository, source = serve_bundle(spec, local_path, device=profile,
                                      config=ModelConfig(batching=BATCHING))
    loaded = time.perf_counter()
    handler = LambdaHandler(DataPlane(repository), default_model=source.name,
                            destination=destination_from(environ.get("EDGERUN_RESULTS", ""),
                                                         max_bytes=_results_max_bytes(environ)),
                            base_path=environ.get("EDGERUN_BASE_PATH", ""))
    served = repository.get(source.name)
    line = {"message": "edgerun init", "model": source.name, "version": served.version,
            "backend": served.model.bundle.manifest.backend, "model_location": spec,
            "memory_mb": memory_mb, "intra_op_threads": profile.intra_op_threads,
            "import_ms": round((entered - started) * 1000, 1),
            "locate_ms": round((located - entered) * 1000, 1),
            "load_ms": round((loaded - located) * 1000, 1),
            "init_ms": round((time.perf_counter() - started) * 1000, 1)}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    return handler


def _results_max_bytes(environ: Mapping[str, str]) -> int:
    """EDGERUN_RESULTS_MAX_BYTES, the results queue's MaximumMessageSize: results up to it are
    sent, a larger one is its record's error. A bad value fails init naming it."""
    text = environ.get("EDGERUN_RESULTS_MAX_BYTES", "").strip()
    if not text:
        return SQS_MESSAGE_BYTES
    if not (text.isascii() and text.isdigit()) or not 1024 <= int(text) <= SQS_MAX_MESSAGE_BYTES:
        raise ValueError(f"EDGERUN_RESULTS_MAX_BYTES={text!r}: expected the results queue's "
                         f"MaximumMessageSize, a number of bytes from 1024 to "
                         f"{SQS_MAX_MESSAGE_BYTES}")
    return int(text)
