"""`edgerun optimize`: an ONNX model to a bundle for a device profile, measured before and after.

Steps, each optional: prune (structured or magnitude), quantize (the profile's precision unless
told otherwise), compile with TVM; then bundle, and measure the original and the result on this
host (sizes, latency where the artifact runs here, max abs error, accuracy given labels). A
result that gives inf or NaN where the original's outputs are finite is refused.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgerun.devices import DeviceProfile, load_profile
from edgerun.optimizers import fp16, measure
from edgerun.optimizers.errors import OptimizeError
from edgerun.optimizers.prune import PruneReport, prune_structured, prune_unstructured
from edgerun.optimizers.quantize import (Calibration, check_options, kept_float32, load_onnx,
                                         quantize)
from edgerun.runtime import Bundle, Model, archive, create_bundle, staging
from edgerun.runtime.bundle import (check_name, check_version, read_manifest, sha256_file,
                                    write_manifest)
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature

if TYPE_CHECKING:
    from edgerun.optimizers.tvm_tuning import RpcDevice

LATENCY_BATCHES = (1, 64)


@dataclass(frozen=True)
class OptimizeOptions:
    """What to do; `quantize=None` takes the device profile's precision."""

    device: str | Path | DeviceProfile = "cpu"
    quantize: str | None = None
    calibration: Calibration | None = None
    per_channel: bool = False
    prune: float | None = None
    structured: bool = False
    compile: str | None = None
    tune_trials: int = 0
    #: HOST:PORT of a TVM RPC server on the device that measures the tuning candidates, or
    #: KEY@HOST:PORT of a TVM RPC tracker that hands out devices registered under KEY.
    rpc: str | None = None
    force: bool = False
    eval_data: Path | None = None
    #: Seconds of timing per latency figure (per batch size, before and after).
    latency_seconds: float = 0.5
    name: str | None = None
    version: str = "1"
    #: fp16: refuse a model float16 cannot hold, rather than keep those nodes float32.
    strict_fp16: bool = False
    #: The bundle's limit, as `bundle create --max-batch-size`; 0: the model has no batch
    #: axis (its dim 0 is a sequence, say), so its callers' requests are never stacked.
    max_batch_size: int | None = None


@dataclass
class Measured:
    """One side of the report: the original model's bundle, or the optimized one."""

    sizes: measure.Sizes
    latency_ms: dict[int, float | None] = field(default_factory=dict)
    accuracy: float | None = None
    outputs: dict[str, Any] | None = field(default=None, repr=False)
    runs_here: bool = True


@dataclass
class OptimizeReport:
    """What `optimize` made and measured; `compile_report` is TVM's, when it compiled."""

    bundle: Path
    device: str
    optimizations: list[str]
    before: Measured
    after: Measured
    max_abs_error: float | None
    prune: PruneReport | None = None
    compile_report: Any = None
    notes: list[str] = field(default_factory=list)
    #: fp16: the nodes kept float32, as float16 cannot hold their values, and why.
    fp16_kept_float32: dict[str, str] = field(default_factory=dict)
    #: {output: (rows whose values differ, rows)} for integer, bool and string outputs
    #: (labels, ids), which `max_abs_error` (float outputs only; None if there are none) skips.
    changed_rows: dict[str, tuple[int, int]] = field(default_factory=dict)


Progress = Callable[[str], None]


def _profile(device: str | Path | DeviceProfile) -> DeviceProfile:
    try:
        return load_profile(device)
    except (ValueError, OSError) as exc:
        raise OptimizeError(str(exc)) from exc


def api_name(option: str, value: str | None = None) -> str:
    """An option as the Python API spells it: `tune_trials`, `compile="tvm"`."""
    return option if value is None else f'{option}="{value}"'


def check_combination(options: OptimizeOptions, spell: Callable[..., str] = api_name) -> None:
    """Options that cannot work, alone or together, refused before any work, each named as
    its caller spells it (`spell`: the API's names, or the command's flags); an RPC address
    where nothing accepts a connection among them (a probe of a few seconds at most)."""
    if options.compile is None:  # TVM's options do nothing without TVM: say so, not ignore them
        given = [spell(name) for name in ("tune_trials", "rpc", "force")
                 if getattr(options, name)]
        if given:
            raise OptimizeError(f"{', '.join(given)} apply to TVM compilation only: add "
                                f"{spell('compile', 'tvm')}, or leave them out")
    if options.tune_trials < 0:
        raise OptimizeError(f"{spell('tune_trials')} {options.tune_trials}: the number of "
                            "tuning trials is 0 (no tuning) or more")
    if options.prune is not None and not 0 < options.prune < 1:
        raise OptimizeError(f"{spell('prune')} {options.prune:g}: the fraction to prune lies "
                            "strictly between 0 and 1")
    if options.max_batch_size is not None and options.max_batch_size < 0:
        raise OptimizeError(f"{spell('max_batch_size')} {options.max_batch_size}: a limit >= 1, "
                            "or 0 for a model with no batch axis")
    if options.compile == "tvm" and options.tune_trials and (options.max_batch_size or 0) > 1:
        raise OptimizeError(f"{spell('max_batch_size')} {options.max_batch_size} with "
                            f"{spell('tune_trials')}: a tuned TVM library takes batch 1 only "
                            "(MetaSchedule tunes static shapes), so the bundle could not take "
                            f"batches of {options.max_batch_size}; leave "
                            f"{spell('max_batch_size')} out, or compile untuned")
    if options.compile == "tvm" and options.rpc is not None:
        if not options.tune_trials:  # as compile_bundle says, but before the original is bundled
            raise OptimizeError(f"{spell('rpc')} measures tuning candidates on the device: "
                                f"pass {spell('tune_trials')} N too")
        from edgerun.optimizers.tvm_tuning import RpcDevice  # imports no TVM

        try:  # compile_bundle refused a malformed address only after the original was bundled
            device = RpcDevice.parse(options.rpc, spell("rpc"))
        except ValueError as exc:
            raise OptimizeError(str(exc)) from None
        _check_reachable(device, f"{spell('rpc')} {options.rpc}")


def _check_reachable(device: RpcDevice, given: str) -> None:
    """OptimizeError naming the address when nothing accepts a connection there: compile_bundle
    found out only after the original was bundled, pruned and quantized (minutes)."""
    why = device.unreachable()
    if why is None:
        return
    if device.key is None:
        raise OptimizeError(f"{given}: no TVM RPC server answers there ({why}); start "
                            "one on the device: python -m tvm.exec.rpc_server --host 0.0.0.0 "
                            f"--port {device.port}")
    raise OptimizeError(f"{given}: no TVM RPC tracker answers at {device.host}:"
                        f"{device.port} ({why}); start one: python -m tvm.exec.rpc_tracker "
                        f"--host 0.0.0.0 --port {device.port}")


def optimize(model_path: str | Path, output: str | Path,
             options: OptimizeOptions = OptimizeOptions(),
             progress: Progress = lambda step: None) -> OptimizeReport:
    """Run the steps `options` ask for and write the bundle to `output` (a folder, or an
    archive when it ends in .tar.gz); returns the measured report."""
    model_path, output = Path(model_path), Path(output)
    profile = _profile(options.device)
    load_onnx(model_path)  # an ONNX model, or a clear error before any work
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OptimizeError(f"{output}: output exists and is not an empty folder")
    if options.compile not in (None, "tvm"):
        raise OptimizeError(f"--compile {options.compile!r}: only tvm is supported")
    check_combination(options)
    precision = options.quantize or profile.precision
    check_options(precision, calibration=options.calibration, per_channel=options.per_channel,
                  strict=options.strict_fp16)
    name = options.name or model_path.stem
    check_name(name), check_version(options.version)  # before the work, not at its end
    why = staging.unwritable(output)  # not an errno of a hidden folder, after all the work
    if why:
        raise OptimizeError(f"{output}: the output cannot be written there: {why}")
    # runs killed by a signal (SIGKILL, the OOM killer) left their temporaries beside the
    # output, each as large as a bundle: removed before this run needs the room
    staging.sweep(output.parent)
    with tempfile.TemporaryDirectory(prefix="edgerun-optimize-") as scratch_name:
        scratch = Path(scratch_name)
        signature = _signature(model_path)
        if options.max_batch_size == 0:
            signature = signature.unbatched()
        whole = options.max_batch_size == 0  # each eval sample is one call's inputs
        data = measure.load_eval(options.eval_data, signature, whole) if options.eval_data \
            else measure.synthetic_eval(signature, whole=whole)
        # the eval data's first call is the golden sample of every bundle: a generated one has
        # dynamic dims of 1, which a model with dynamic H/W or lengths may not run
        first = None if not options.eval_data else data.sample(0) if whole else \
            {n: a[:measure.rows_per_call(signature)] for n, a in data.inputs.items()}
        progress("bundling the original")
        original = _bundle_original(model_path, scratch / "original", name, profile,
                                    signature, first, options.max_batch_size)

        current, tags, pruned, kept = model_path, [], None, {}
        reference, converted = model_path, None  # the model fp16 converted, and the result
        if options.prune is not None:
            progress(f"pruning {options.prune:g} "
                     f"{'structured' if options.structured else 'unstructured'}")
            model = onnx.load(str(current))
            pruned = prune_structured(model, options.prune) if options.structured \
                else prune_unstructured(model, options.prune)
            current = scratch / "pruned.onnx"
            onnx.save(model, str(current))
            tags.append(pruned.tag)
        if precision != "fp32" or options.calibration is not None or options.per_channel:
            progress(f"quantizing to {precision}")
            target = scratch / "quantized.onnx"
            feeds = [data.sample(i) for i in range(min(data.rows, fp16.RANGE_ROWS))] \
                if whole else fp16.chunks(data.inputs, signature.batchable,
                                          per_call=measure.rows_per_call(signature))
            fp16_only = {"feeds": feeds, "strict": options.strict_fp16} \
                if precision == "fp16" else {}
            tag = quantize(current, target, precision, calibration=options.calibration,
                           per_channel=options.per_channel, **fp16_only)
            if tag:
                if precision == "fp16":
                    reference, converted, kept = current, target, kept_float32(target)
                current = target
                tags.append(tag)

        # built and measured in scratch, moved to `output` only when all went well: a failure
        # leaves no bundle behind that looks complete, and the rerun finds `output` free
        folder = scratch / "bundle"
        golden = first if first is not None else \
            data.take(1) if signature.batchable else None
        compiled = None
        if options.compile == "tvm":
            progress(f"compiling with TVM for {profile.name}")
            compiled = _compile_tvm(current, profile, folder, name, options, tuple(tags), first)
            _record_source(folder, model_path, kept)
        else:
            progress("bundling")
            create_bundle(current, folder, name=name, version=options.version, device=profile,
                          max_batch_size=options.max_batch_size,
                          golden_inputs=golden, optimizations=tuple(tags),
                          source_file=model_path.name, source_sha256=sha256_file(model_path))
            if kept:
                _record_source(folder, model_path, kept)
        progress("measuring the original and the result")
        with Bundle.open(folder) as result:
            before, after = _measure((original, result), profile, data,
                                     options.latency_seconds)
        if after.runs_here:
            _check_finite(model_path.name, data, before, after, reference, converted)
        _deliver(folder, output)
    if compiled is not None and not archive.is_archive_name(output.name):
        compiled = dataclasses.replace(compiled, bundle=output,
                                       artifact=output / compiled.artifact.name)
    error, changed = None, {}
    notes = []
    if after.runs_here:
        outputs = before.outputs or {}
        if any(array.dtype.kind == "f" for array in outputs.values()):
            error = measure.max_abs_error(outputs, after.outputs or {})
        changed = measure.changed_rows(outputs, after.outputs or {})
    else:
        notes.append(f"the artifact for {profile.name} does not run on this host: latency, "
                     "error and accuracy after are not measured here")
    if pruned is not None and pruned.method == "unstructured" and pruned.skipped:
        notes.append("pruning left whole: " + "; ".join(pruned.skipped))
    if data.dropped:
        notes.append(f"the model takes a fixed batch of {measure.rows_per_call(signature)} "
                     f"rows: the last {data.dropped} eval rows (less than one batch) were not "
                     "measured")
    if kept:
        notes.append("fp16: kept float32, as float16 cannot hold their values: " + "; ".join(
            f"{node} ({why})" for node, why in kept.items()))
    return OptimizeReport(output, profile.name, tags, before, after, error, pruned, compiled,
                          notes, kept, changed)


def _signature(model_path: Path) -> Signature:
    from edgerun.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend.inspect(model_path)


def _bundle_original(model_path: Path, folder: Path, name: str, profile: DeviceProfile,
                     signature: Signature, golden: dict[str, np.ndarray] | None,
                     max_batch_size: int | None = None) -> Bundle:
    """The original model as a bundle, its golden sample `golden` (the eval data's first row)
    or else generated; OptimizeError asking for --eval when the generated one fails to run."""
    try:
        return create_bundle(model_path, folder, name=name, version="0", device=profile,
                             max_batch_size=max_batch_size, golden_inputs=golden)
    except BundleError as exc:
        if golden is not None:
            raise
        dynamic = [spec for spec in signature.inputs
                   if any(d < 0 for i, d in enumerate(spec.shape) if i != spec.batch_axis)]
        named = ", ".join(f"{spec.name!r} {list(spec.shape)}"
                          for spec in dynamic or signature.inputs)
        raise OptimizeError(
            f"{model_path.name}: a generated input (dynamic dims of 1) does not run on it "
            f"({exc.__cause__ or exc}). Pass --eval (eval_data=) with real inputs for "
            f"{named}: its first row is the bundles' golden sample") from exc


def _check_finite(name: str, data: measure.EvalData, before: Measured, after: Measured,
                  reference: Path, converted: Path | None) -> None:
    """OptimizeError when the result gives inf or NaN where the original's outputs are finite:
    such a bundle is broken, whatever its error figure says. For an fp16 model the message
    names the node where float16 first gives inf/NaN (`converted`, made from `reference`).

    ONNX Runtime's CPU kernels compute most float16 ops in float32, so on this host float16
    overflow shows only at some ops (LayerNormalization, Concat, ...); on a GPU it shows at all
    of them: fp16 conversion keeps float32 what the eval data shows float16 cannot hold.
    """
    for output, want in (before.outputs or {}).items():
        got = (after.outputs or {}).get(output)
        if got is None or want.dtype.kind != "f" or got.shape != want.shape:
            continue
        bad = ~np.isfinite(got) & np.isfinite(want)
        if not bad.any():
            continue
        rows = np.unique(np.nonzero(bad)[0]) if bad.ndim else np.array([0])
        first = int(rows[0])
        where = ""
        if converted is not None:
            culprit = _fp16_culprit(reference, converted, data, first)
            where = (f"; in float16 it starts at {culprit.describe()}" if culprit else "") + \
                ("; fp16 conversion keeps float32 what float16 cannot hold on the first "
                 f"{fp16.RANGE_ROWS} eval rows: put rows that reach these values among them, "
                 "or choose another precision")
        raise OptimizeError(f"{name}: the optimized model gives inf or NaN in output "
                            f"{output!r} on {len(rows)} of {data.rows} eval rows (first: row "
                            f"{first}) where the original model's values are finite{where}")


def _fp16_culprit(reference: Path, converted: Path, data: measure.EvalData,
                  row: int) -> fp16.NonFinite | None:
    """The first node whose float16 output is inf/NaN on eval row `row`, None if not found."""
    from edgerun.optimizers.quantize import _identity_casts_to_identity

    original = onnx.load(str(reference))
    _identity_casts_to_identity(original)  # as convert_fp16 did: the node names it gave
    fp16.prepare(original)
    try:
        return fp16.first_non_finite(original, onnx.load(str(converted)),
                                     data.sample(row) if data.whole else
                                     {n: a[row:row + 1] for n, a in data.inputs.items()})
    except Exception:  # naming the node only helps; the error stands without it
        return None


def _deliver(folder: Path, output: Path) -> None:
    """Pack the finished bundle into the archive `output`, or move it to the folder `output`
    (which is absent or empty: `optimize` checked), through `staging.replacing`: an
    interrupted pack or a move across filesystems (a copy) leaves no partial `output` that a
    rerun would refuse, and what a kill left is removed by the next run's sweep."""
    with staging.replacing(output) as temporary:  # removed if not renamed
        if archive.is_archive_name(output.name):
            archive.pack(folder, temporary)  # the same suffix: the same format
        else:
            # a folder replaces only an empty one: fails, rather than merging, if something
            # appeared there meanwhile
            shutil.move(str(folder), str(temporary))


def _measure(bundles: tuple[Bundle, ...], profile: DeviceProfile, data: measure.EvalData,
             seconds: float, rounds: int = 3) -> list[Measured]:
    """Sizes, outputs and accuracy of each bundle, and latencies timed in interleaved rounds
    (medians) so that a busy host slows every candidate alike."""
    measured, models = [], []
    for bundle in bundles:
        sizes = measure.sizes(bundle.path, bundle.manifest.model_file)
        try:
            model = Model.load(bundle, profile)
        except BundleError:  # an artifact for another target
            measured.append(Measured(sizes, runs_here=False))
            models.append(None)
            continue
        outputs = measure.predict_all(model, data)
        accuracy = measure.accuracy(outputs, data.labels) if data.labels is not None else None
        measured.append(Measured(sizes, {}, accuracy, outputs))
        models.append(model)
    try:
        samples: dict[tuple[int, int], list[float | None]] = {}
        for _ in range(rounds):
            for i, model in enumerate(models):
                for batch in LATENCY_BATCHES if model is not None else ():
                    samples.setdefault((i, batch), []).append(
                        measure.latency_ms(model, data, batch, seconds / rounds))
        for (i, batch), values in samples.items():
            measured[i].latency_ms[batch] = None if None in values else statistics.median(values)
    finally:
        for model in models:
            if model is not None:
                model.close()
    return measured


def _record_source(folder: Path, model_path: Path, kept: dict[str, str]) -> None:
    """The manifest names the model the user gave, not the intermediate file TVM compiled, and
    the nodes an fp16 model keeps float32 (`fp16_kept_float32`: {node: why})."""
    manifest = read_manifest(folder)
    created = {**manifest.created, "source_file": model_path.name,
               "source_sha256": sha256_file(model_path)}
    if kept:
        created["fp16_kept_float32"] = dict(kept)
    write_manifest(folder, dataclasses.replace(manifest, created=created))


def _compile_tvm(model_path: Path, profile: DeviceProfile, out_dir: Path, name: str,
                 options: OptimizeOptions, tags: tuple[str, ...],
                 golden: dict[str, np.ndarray] | None = None) -> Any:
    try:
        from edgerun.optimizers.tvm import compile_bundle
    except ImportError as exc:
        raise OptimizeError(f"TVM compilation needs edgerun[tvm] (pip install 'edgerun[tvm]'): "
                            f"{exc}") from exc
    try:
        return compile_bundle(model_path, profile, out_dir, name=name, version=options.version,
                              tune_trials=options.tune_trials, force=options.force,
                              optimizations=tags, rpc=options.rpc, golden_inputs=golden,
                              max_batch_size=options.max_batch_size)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
