"""The TVM steps of `compile_bundle`: import, schedule or tune, compile, export."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun.devices import DeviceProfile
from edgerun.optimizers import cuda_device_code, tvm_target
from edgerun.optimizers.tvm import CompileError, UnsupportedOperator
from edgerun.runtime.bundle import sha256_file
from edgerun.runtime.cache import cache_dir

#: Batch size compiled when the batch dim cannot stay symbolic (tuning needs static shapes).
#: Other dynamic dims (a sequence length, H and W) stay symbolic: MetaSchedule tunes the
#: kernels whose shapes are static and leaves the others untuned. A model with no batch axis
#: (max_batch_size 0) keeps its dim 0 symbolic too: it is a sequence, not a batch of 1.
FIXED_BATCH = 1


@dataclass(frozen=True)
class Built:
    export: Callable[[Path], None]
    batch: int | None
    device_code: tuple[str, ...]
    notes: tuple[str, ...]


def build(model_path: Path, profile: DeviceProfile, target: dict[str, Any], *,
          tune_trials: int = 0, rpc: Any = None, batched: bool = True) -> Built:
    """The compiled module; `batched=False` (dim 0 is no batch) never fixes dim 0."""
    import onnx
    import tvm

    model = onnx.load(str(model_path))
    check_operators(model)
    notes: list[str] = []
    tvm_tgt = tvm.target.Target(target)
    cuda = tvm_target.is_cuda(target)
    batch = FIXED_BATCH if tune_trials and batched else None
    try:
        mod = import_onnx(model, batch)
        executable = _compile(mod, tvm_tgt, cuda, target, model_path, profile, tune_trials, batch,
                              notes, rpc)
    except CompileError:
        raise
    except Exception as exc:  # TVM raises many types; a symbolic batch is the usual culprit
        if batch is not None or not batched:
            raise CompileError(f"{model_path.name}: TVM cannot compile it for {profile.name}"
                               f"{_symbolic(model, batched)}: {_last_line(exc)}") from exc
        notes.append(f"symbolic batch failed ({_last_line(exc)}); compiled for batch "
                     f"{FIXED_BATCH}")
        batch = FIXED_BATCH
        try:
            mod = import_onnx(model, batch)
            executable = _compile(mod, tvm_tgt, cuda, target, model_path, profile, 0, batch,
                                  notes)
        except Exception as again:
            raise CompileError(f"{model_path.name}: TVM cannot compile it for {profile.name}"
                               f"{_symbolic(model)}: {_last_line(again)}") from again
    fatbins: dict[str, bytes] = {}
    device_code: tuple[str, ...] = ()
    if cuda:
        sources = cuda_device_code.cuda_sources(executable.mod)
        arch = target["arch"]
        try:
            compiler = cuda_device_code.compiler_for(arch)
            notes.append(f"device code for {arch}: "
                         f"{cuda_device_code.describe_compiler(compiler)}")
            fatbins = {s: cuda_device_code.compile_fatbin(s, arch, compiler) for s in sources}
        except cuda_device_code.DeviceCodeError as exc:
            raise CompileError(f"{profile.name}: {exc}") from exc
        device_code = tuple(sorted({f"{kind} {arch}" for data in fatbins.values()
                                    for kind, arch in cuda_device_code.fatbin_entries(data)}))
    fcompile = _linker(profile, target)

    def export(path: Path) -> None:
        options: dict[str, Any] = {}
        if fatbins:
            options["fpack_imports"] = cuda_device_code.pack_imports_with(fatbins)
        executable.export_library(str(path), fcompile=fcompile, **options)

    return Built(export, batch, device_code, tuple(notes))


def check_operators(model: Any) -> None:
    """Fail before importing when the frontend has no converter for some node."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"Constant", "If"}
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in known:
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") \
                else node.op_type
            missing.setdefault(op, []).append(node.name or "(unnamed)")
    if missing:
        listed = "; ".join(f"{op} (node {', '.join(nodes[:3])})" for op, nodes in missing.items())
        raise UnsupportedOperator(
            f"TVM's ONNX frontend cannot import {len(missing)} operator(s): {listed}. Remove "
            "them from the graph (e.g. keep the tensor outputs of a classifier) or serve the "
            "model with ONNX Runtime", tuple(missing))


def import_onnx(model: Any, batch: int | None) -> Any:
    """Relax module with weights folded in; symbolic dims kept, or the batch dim (a symbolic
    first dim, as the signature's batch axis) set to `batch` and the others kept symbolic,
    as the manifest's signature then says (`tvm._fixed_batch`)."""
    from tvm import tirx
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = None
    if batch is not None:
        symbols: dict[str, Any] = {}

        def dim(name: str, axis: int, d: Any) -> Any:
            if d.HasField("dim_value"):
                return d.dim_value
            if axis == 0:
                return batch
            key = d.dim_param or f"{name}_{axis}"  # one var per named dim, as the frontend
            return symbols.setdefault(key, tirx.Var(key, "int64"))

        shape_dict = {
            i.name: [dim(i.name, axis, d) for axis, d in enumerate(i.type.tensor_type.shape.dim)]
            for i in _fed_inputs(model)}
    return from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)


def _fed_inputs(model: Any) -> list[Any]:
    """The graph inputs a caller feeds: not those that are initializers too."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _symbolic(model: Any, batched: bool = True) -> str:
    """" with input 'ids' dim 1 'T' symbolic": the dims that stay symbolic with a fixed
    batch (dim 0 too for a model with none), for a message naming them when TVM cannot
    compile that; "" when there are none."""
    dims = [f"input {i.name!r} dim {axis}" + (f" {d.dim_param!r}" if d.dim_param else "")
            for i in _fed_inputs(model) for axis, d in enumerate(i.type.tensor_type.shape.dim)
            if (axis or not batched) and not d.HasField("dim_value")]
    return f" with {', '.join(dims)} symbolic" if dims else ""


def _compile(mod: Any, tvm_tgt: Any, cuda: bool, target: dict[str, Any], model_path: Path,
             profile: DeviceProfile, tune_trials: int, batch: int | None,
             notes: list[str], rpc: Any = None) -> Any:
    import tvm
    from tvm import relax

    if cuda:
        from tvm.s_tir import dlight

        with tvm_tgt:
            mod = relax.get_pipeline("zero")(mod)
            mod = dlight.ApplyDefaultSchedule(
                dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())(mod)
        with cuda_device_code.nvcc_callback(target["arch"]):
            return tvm.compile(mod, target=tvm_tgt)
    if tune_trials:
        from edgerun.optimizers import tvm_tuning
        from edgerun.runtime.backends.tvm import threads_for

        # timed at the thread count the artifact is served at: the device's is the profile's
        # intra_op_threads, else its own default
        mod = tvm_tuning.tune(mod, tvm_tgt, tuning_dir(profile, target, model_path, batch),
                              tune_trials, notes, rpc=rpc,
                              fcompile=_linker(profile, target) if rpc else None,
                              threads=profile.intra_op_threads if rpc else threads_for(profile))
    return tvm.compile(mod, target=tvm_tgt)


def tuning_dir(profile: DeviceProfile, target: dict[str, Any], model_path: Path,
               batch: int | None) -> Path:
    """Where tuning records are cached: per device profile, target, model sha256 and batch."""
    cache = cache_dir()
    target_hash = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:8]
    return (cache / "tvm-tuning" / profile.name /
            f"{sha256_file(model_path)[:16]}-{target_hash}-b{batch or 'dyn'}")


def _linker(profile: DeviceProfile, target: dict[str, Any]) -> Any:
    from tvm.support import cc

    if tvm_target.cpu_arch(target) == tvm_target.host_arch():
        return cc.create_shared
    compiler = profile.cross_compiler
    if not compiler:
        raise CompileError(f"device profile {profile.name!r} targets "
                           f"{tvm_target.cpu_arch(target)} but names no cross_compiler")
    if shutil.which(compiler) is None:
        raise CompileError(f"{compiler} is not installed; it links {profile.name}'s library "
                           f"(Debian: apt-get install g++-{tvm_target.cpu_arch(target)}-linux-gnu)")
    return cc.cross_compiler(compiler)


def _last_line(exc: BaseException) -> str:
    """An error in one line for a note: its last non-blank line, cut to 300 characters (an
    error that carries a traceback ends with its message)."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
