"""ONNX -> TVM (apache-tvm 0.27, Relax) for a device profile, as a bundle of backend "tvm".

`compile_bundle` imports the model with the Relax ONNX frontend, compiles it for the profile's
target (x86/aarch64 CPUs; CUDA with dlight's default GPU schedules and device code compiled here
by nvcc), links the library with the profile's cross compiler, checks it against ONNX Runtime
where it can run here, and refuses to ship it when it is slower than ONNX Runtime on this host
(the measured case on x86 without tuning, see benchmarks/README.md) unless `force=True`. Both
are timed at the thread count they get when served with the profile here: its
`intra_op_threads`, else the CPUs a container leaves, else each one's own default.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerun import __version__
from edgerun.devices import DeviceProfile, load_profile
from edgerun.optimizers import tvm_target
from edgerun.optimizers.errors import OptimizeError
from edgerun.runtime.bundle import (GOLDEN, FileEntry, Manifest, check_name, check_version,
                                    created_at, golden_input, sha256_file, write_manifest)
from edgerun.runtime.signature import Signature, TensorSpec

MODEL_FILE = "model.so"
#: Float outputs of the TVM artifact and of ONNX Runtime must agree within atol + rtol times
#: the output's largest magnitude, by the model's precision: (rtol, atol). fp32 kernels agree
#: to rounding; fp16 ones differ by a few ulps of fp16 (eps 1e-3) summed over a layer; int8
#: ones may round a value to the neighbouring quantization step. Integer and bool outputs
#: (labels, ids) must be equal.
TOLERANCES = {"fp32": (1e-5, 1e-4), "fp16": (1e-2, 1e-3), "int8": (5e-2, 1e-2)}
#: The fp32 absolute tolerance, as before per-precision tolerances.
TOLERANCE = TOLERANCES["fp32"][1]


class CompileError(OptimizeError):
    """The model cannot be compiled for the profile; the message names the culprit."""


class UnsupportedOperator(CompileError):
    """The ONNX model uses operators the TVM frontend cannot import."""

    def __init__(self, message: str, operators: tuple[str, ...]) -> None:
        super().__init__(message)
        self.operators = operators


class SlowerThanOnnxRuntime(CompileError):
    """The TVM artifact measured slower than ONNX Runtime on this host; nothing was written."""

    def __init__(self, message: str, report: CompileReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class CompileReport:
    """What was built and how it measured on this host (None: it cannot run here)."""

    bundle: Path
    artifact: Path
    profile: str
    target: str
    tvm_target: dict[str, Any]
    batch: str
    tune_trials: int
    compile_s: float
    runs_here: bool
    tvm_latency_ms: float | None = None
    onnxruntime_latency_ms: float | None = None
    max_abs_error: float | None = None
    #: The intra-op thread count both latencies were measured at, as when served with the
    #: profile here (`threads_for`: its intra_op_threads, else the CPUs a container leaves);
    #: 0: each runtime chose its own (TVM: TVM_NUM_THREADS, else half the logical CPUs on x86;
    #: ONNX Runtime: the CPUs a container leaves, else the physical cores). A CUDA artifact's
    #: host code keeps TVM's own, as when served.
    threads: int | None = None
    slower_than_onnxruntime: bool = False
    device_code: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def speedup(self) -> float | None:
        """ONNX Runtime latency / TVM latency (above 1: TVM is faster)."""
        if self.tvm_latency_ms is None or self.onnxruntime_latency_ms is None:
            return None
        return self.onnxruntime_latency_ms / self.tvm_latency_ms


def compile_bundle(model_path: Path, profile: DeviceProfile, out_dir: Path, *, name: str,
                   version: str, tune_trials: int = 0, force: bool = False,
                   optimizations: tuple[str, ...] = (), rpc: str | None = None,
                   golden_inputs: dict[str, np.ndarray] | None = None,
                   max_batch_size: int | None = None) -> CompileReport:
    """Compile an ONNX model for a device profile into a TVM bundle in `out_dir`; with
    `tune_trials`, MetaSchedule measures candidates here, or on the device whose TVM RPC
    server listens at `rpc` (HOST:PORT), or on a device a TVM RPC tracker at `rpc` hands out
    by key (KEY@HOST:PORT). `golden_inputs` (a real sample) is checked and stored as the
    golden input; by default one is generated (dynamic dims of 1). `max_batch_size` is
    `create_bundle`'s: the bundle's limit, or 0 for a model whose dim 0 is no batch (a
    sequence), which then stays symbolic, tuned or not, and is never stacked when served."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    profile = load_profile(profile)
    check_name(name)
    check_version(str(version))
    if not model_path.is_file():
        raise CompileError(f"{model_path}: no such model file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CompileError(f"{out_dir}: output folder exists and is not empty")
    if max_batch_size is not None and max_batch_size < 0:
        raise CompileError("max_batch_size must be >= 1 (omit it for no limit), or 0 for a "
                           "model with no batch axis")
    if tune_trials and max_batch_size is not None and max_batch_size > 1:
        raise CompileError(f"max_batch_size {max_batch_size} with tune_trials: a tuned TVM "
                           "library takes batch 1 only (MetaSchedule tunes static shapes), so "
                           f"the bundle could not take batches of {max_batch_size}; leave "
                           "max_batch_size out, or compile untuned")
    target = tvm_target.target_dict(profile)
    here = tvm_target.runs_here(target)
    device = _rpc_device(rpc, tune_trials, target, profile)
    if tune_trials and not here and device is None:
        raise CompileError(
            f"tuning needs to measure on the device: {tvm_target.describe(target)} does not run "
            f"on this host ({tvm_target.host_arch()}); start TVM's RPC server on a "
            f"{profile.name} and pass its HOST:PORT (rpc= / --rpc; KEY@HOST:PORT for a tracker), "
            "or compile untuned (tune_trials=0)")
    signature = _declared(_onnx_signature(model_path), max_batch_size)
    started = time.perf_counter()
    from edgerun.optimizers import tvm_build

    built = tvm_build.build(model_path, profile, target, tune_trials=tune_trials, rpc=device,
                            batched=max_batch_size != 0)
    notes = built.notes
    if built.batch:
        signature = _fixed_batch(signature, built.batch)
        if max_batch_size and max_batch_size > built.batch:  # where a symbolic batch failed
            notes += (f"max_batch_size {max_batch_size} is not kept: the library takes batch "
                      f"{built.batch} only",)
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        artifact = out_dir / MODEL_FILE
        built.export(artifact)
        compile_s = time.perf_counter() - started
        sample = golden_input(signature) if golden_inputs is None \
            else _golden(signature, golden_inputs)
        reference = _onnxruntime_outputs(model_path, sample)
        report = CompileReport(
            bundle=out_dir, artifact=artifact, profile=profile.name,
            target=tvm_target.describe(target), tvm_target=target,
            batch=str(built.batch or "dynamic"), tune_trials=tune_trials, compile_s=compile_s,
            runs_here=here, device_code=built.device_code, notes=notes)
        golden = reference
        if here:
            report, golden = _measure(report, model_path, profile, signature, sample, reference,
                                      _precision(model_path, optimizations))
            if report.slower_than_onnxruntime and not force:
                raise SlowerThanOnnxRuntime(
                    f"TVM artifact for {profile.name} is slower than ONNX Runtime on this host: "
                    f"{report.tvm_latency_ms:.3f} ms against {report.onnxruntime_latency_ms:.3f} "
                    f"ms per call on {_shapes(sample)} at {_threads(report.threads)} "
                    f"({report.speedup:.2f}x); not shipping it (tune it with "
                    "more trials, or pass force=True / --force)", report)
        np.savez(out_dir / GOLDEN,
                 **{f"input_{i}": sample[s.name] for i, s in enumerate(signature.inputs)},
                 **{f"output_{i}": golden[s.name] for i, s in enumerate(signature.outputs)})
        _write_manifest(out_dir, model_path, profile, target, signature, name, str(version),
                        optimizations, report)
    except BaseException:
        if created_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for child in out_dir.iterdir():
                child.unlink()
        raise
    return report


def _golden(signature: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A given golden sample, checked against the signature of what was compiled."""
    try:
        return signature.validate(inputs)
    except Exception as exc:
        raise CompileError(f"golden input: {exc}") from exc


def _rpc_device(rpc: str | None, tune_trials: int, target: dict[str, Any],
                profile: DeviceProfile) -> Any:
    """The RPC device to tune on, or None; refuses what RPC tuning cannot do."""
    if rpc is None:
        return None
    from edgerun.optimizers.tvm_tuning import RpcDevice

    if not tune_trials:
        raise CompileError("rpc measures tuning candidates on the device: pass tune_trials N "
                           "too")
    if tvm_target.is_cuda(target):
        raise CompileError(f"{profile.name}: CUDA targets get dlight's default GPU schedules; "
                           "MetaSchedule tuning over RPC is for CPU targets")
    try:
        device = RpcDevice.parse(rpc)
    except ValueError as exc:
        raise CompileError(str(exc)) from exc
    device.check()
    return device


def _onnx_signature(model_path: Path) -> Signature:
    from edgerun.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend.inspect(model_path)


def _declared(inspected: Signature, max_batch_size: int | None) -> Signature:
    """The signature the bundle declares, as `create_bundle` writes it: 0, no batch axis
    (servers never stack its callers' requests); N, the limit where there is a batch axis."""
    if max_batch_size == 0:
        return inspected.unbatched()
    return Signature(inspected.inputs, inspected.outputs,
                     max_batch_size if inspected.batchable else None)


def _fixed_batch(signature: Signature, batch: int) -> Signature:
    """The signature of a library compiled for one batch size: no dynamic batch axis left."""
    def fix(spec: TensorSpec) -> TensorSpec:
        if spec.batch_axis is None:
            return spec
        shape = tuple(batch if i == spec.batch_axis else d for i, d in enumerate(spec.shape))
        return TensorSpec(spec.name, spec.dtype, shape, None)

    return Signature(tuple(map(fix, signature.inputs)), tuple(map(fix, signature.outputs)), None)


def _onnxruntime_session(model_path: Path, profile: DeviceProfile | None = None) -> Any:
    import onnxruntime as ort

    from edgerun.runtime.backends.onnxruntime import session_options

    options = session_options(profile or load_profile("x86-64"))
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _onnxruntime_outputs(model_path: Path, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _onnxruntime_session(model_path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, sample)))


def median_latency_ms(run: Callable[[], Any], budget_s: float = 0.5, max_calls: int = 2000) -> float:
    """Median wall time of `run` in ms, after a warm-up, within about `budget_s`."""
    run()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def _precision(model_path: Path, optimizations: tuple[str, ...]) -> str:
    """fp32, fp16 or int8: what the model computes in, from its quantize tag, else its graph
    (float16 weights, quantized operators), for a model quantized elsewhere."""
    for tag in optimizations:
        if tag.startswith("quantize:"):
            return "fp16" if tag.startswith("quantize:fp16") else "int8"
    import onnx

    from edgerun.optimizers.quantize import QUANTIZED_OPS

    model = onnx.load(str(model_path), load_external_data=False)
    if any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def _compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
             precision: str, profile: DeviceProfile) -> float:
    """The largest absolute difference over float outputs; CompileError when a float output
    is outside the precision's tolerance or any other output (integer labels, bools) differs."""
    rtol, atol = TOLERANCES[precision]
    error = 0.0
    for name, want in reference.items():
        got = np.asarray(outputs[name])
        if got.shape != want.shape:
            raise CompileError(f"TVM artifact for {profile.name}: output {name!r} has shape "
                               f"{list(got.shape)}, ONNX Runtime gives {list(want.shape)}; "
                               "not shipping it")
        if want.dtype.kind not in "fc":
            if not np.array_equal(got, want):
                wrong = int(np.count_nonzero(got != want))
                raise CompileError(f"TVM artifact for {profile.name}: output {name!r} differs "
                                   f"from ONNX Runtime's in {wrong} of {want.size} values; "
                                   "not shipping it")
            continue
        if not want.size:
            continue
        want64, got64 = want.astype(np.complex128 if want.dtype.kind == "c" else np.float64), \
            got.astype(np.complex128 if want.dtype.kind == "c" else np.float64)
        diff = float(np.max(np.abs(got64 - want64)))
        allowed = atol + rtol * float(np.max(np.abs(want64)))
        if not diff <= allowed:  # NaN fails too
            raise CompileError(f"TVM artifact for {profile.name} differs from ONNX Runtime by "
                               f"{diff:g} in output {name!r} (tolerance {allowed:g} at "
                               f"{precision}: atol {atol:g} + rtol {rtol:g} x its largest "
                               "magnitude); not shipping it")
        error = max(error, diff)
    return error


def _measure(report: CompileReport, model_path: Path, profile: DeviceProfile,
             signature: Signature, sample: dict[str, np.ndarray],
             reference: dict[str, np.ndarray],
             precision: str = "fp32") -> tuple[CompileReport, dict[str, np.ndarray]]:
    """Run the artifact here: its error against ONNX Runtime and both latencies, each at the
    thread count the profile gives it when served (`threads_for`, `session_options`)."""
    from edgerun.runtime.backends.tvm import TvmBackend, threads_for

    cuda = tvm_target.is_cuda(report.tvm_target)
    threads = threads_for(profile)
    backend = TvmBackend.load_library(report.artifact, signature, report.target, cuda=cuda,
                                      threads=0 if cuda else threads)

    def run_tvm() -> tuple[dict[str, np.ndarray], float, float]:
        outputs = backend.run(sample)
        error = _compare(outputs, reference, precision, profile)
        return outputs, error, median_latency_ms(lambda: backend.run(sample))

    try:
        # on a new thread: TVM's pool belongs to the calling thread and keeps the size it was
        # first made with, which an earlier compile or model there may have set lower
        with ThreadPoolExecutor(1, thread_name_prefix="edgerun-tvm-measure") as pool:
            outputs, error, tvm_ms = pool.submit(run_tvm).result()
    finally:
        backend.close()
    session = _onnxruntime_session(model_path, profile)
    names = [o.name for o in session.get_outputs()]
    ort_ms = median_latency_ms(lambda: session.run(names, sample))
    measured = CompileReport(**{**report.__dict__, "tvm_latency_ms": tvm_ms,
                                "onnxruntime_latency_ms": ort_ms, "max_abs_error": error,
                                "threads": threads, "slower_than_onnxruntime": tvm_ms > ort_ms})
    return measured, outputs


def _threads(count: int | None) -> str:
    """"4 threads", or what 0 means, for a message."""
    return f"{count} thread{'s' * (count != 1)}" if count else \
        "each runtime's default thread count"


def _shapes(sample: dict[str, np.ndarray]) -> str:
    """"x [16, 256]": the inputs both sides were timed on (the golden input), for a message."""
    return ", ".join(f"{name} {list(array.shape)}" for name, array in sample.items())


def _write_manifest(out_dir: Path, model_path: Path, profile: DeviceProfile,
                    target: dict[str, Any], signature: Signature, name: str, version: str,
                    optimizations: tuple[str, ...], report: CompileReport) -> None:
    files = {p.name: FileEntry(sha256_file(p), p.stat().st_size)
             for p in sorted(out_dir.iterdir())}
    measured = {key: getattr(report, key) for key in
                ("tvm_latency_ms", "onnxruntime_latency_ms", "max_abs_error", "threads")
                if getattr(report, key) is not None}
    manifest = Manifest(
        name=name, version=version, backend="tvm", model_file=MODEL_FILE, signature=signature,
        files=files,
        device={"profile": profile.name, "target": tvm_target.cpu_arch(target),
                "accelerator": profile.accelerator if profile.tvm_target else "cpu",
                "tvm_target": json.dumps(target, sort_keys=True),
                **_features(target, host_detected=not profile.tvm_target)},
        created={"tool": "edgerun", "tool_version": __version__,
                 "created_at": created_at(),
                 "source_file": model_path.name, "source_sha256": sha256_file(model_path),
                 "optimizations": [*optimizations, "tvm"],
                 "tvm": {"target": report.target, "batch": report.batch,
                         "tune_trials": report.tune_trials, "device_code": list(report.device_code),
                         "forced_slower": report.slower_than_onnxruntime, **measured}})
    write_manifest(out_dir, manifest)


def _features(target: dict[str, Any], host_detected: bool) -> dict[str, str]:
    """{"cpu_features": "avx,avx2,..."}: what the library needs of an x86 CPU (the `cpu`
    profile compiles for this host's, AVX-512 say), checked when a host loads it. For this
    host's own CPU, only the features it has: LLVM names its model, and a VM may hide some of
    that model's (AMX, say), which the build host would then refuse for its own artifact."""
    from edgerun.runtime.backends.tvm import host_cpu_flags, normalized_flag

    features = tvm_target.cpu_features(target)
    flags = host_cpu_flags() if host_detected else None
    if flags is not None:
        features = [f for f in features if normalized_flag(f) in flags]
    return {"cpu_features": ",".join(features)} if features else {}
