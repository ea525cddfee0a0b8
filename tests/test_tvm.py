"""TVM compilation for device profiles: x86 artifacts run here and match ONNX Runtime, aarch64
artifacts run for real under qemu-user in an arm64 Debian root, CUDA artifacts carry device code
compiled here for their arch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgerun.devices import load_profile
from edgerun.examples import digits_classifier_onnx, mlp_onnx
from edgerun.optimizers import cuda_device_code, tvm_tuning
from edgerun.optimizers.tvm import (CompileError, SlowerThanOnnxRuntime, UnsupportedOperator,
                                    compile_bundle)
from edgerun.runtime import Bundle, BundleError, Model
from edgerun.runtime.backends.tvm import library_arch
from edgerun.runtime.cache import cache_dir
from tests.cli import edgerun
from tests.serving import free_port

REPO = Path(__file__).resolve().parents[1]
CUDA_PROFILES = ["jetson-nano", "jetson-xavier-nx", "jetson-orin", "cloud-gpu", "nvidia-t4",
                 "nvidia-a10g", "nvidia-l4", "nvidia-a100", "nvidia-h100"]


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_onnx([8, 16, 4]))
    return path


def cuda_elf_archs(data: bytes) -> list[str]:
    """The sm_XX named by the ELF header (EM_CUDA, e_flags) of every uncompressed cubin."""
    archs, start = [], 0
    while (start := data.find(b"\x7fELF\x02\x01\x01\x33", start)) >= 0:  # 64-bit, CUDA ABI
        (machine,) = struct.unpack_from("<H", data, start + 18)
        (flags,) = struct.unpack_from("<I", data, start + 48)
        if machine == 190:
            archs.append(f"sm_{flags & 0xff}")
        start += 4
    return archs


def onnxruntime_run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def test_x86_artifact_matches_onnxruntime_for_any_batch(tmp_path, mlp_path):
    report = compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b", name="mlp",
                            version="1.0.0", force=True, optimizations=("prune",))
    assert report.runs_here and report.batch == "dynamic"
    assert report.max_abs_error is not None and report.max_abs_error <= 1e-4
    assert report.tvm_latency_ms > 0 and report.onnxruntime_latency_ms > 0
    assert library_arch(report.artifact) == "x86_64"
    model = Model.load(tmp_path / "b", "x86-64")
    assert model.describe()["backend"] == "tvm"
    model.check_golden()
    rng = np.random.default_rng(3)
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, 8)).astype(np.float32)
        got = model.predict({"x": x})["y"]
        np.testing.assert_allclose(got, onnxruntime_run(mlp_path, {"x": x})[0], atol=1e-4)
    manifest = Bundle.open(tmp_path / "b").manifest
    assert manifest.backend == "tvm" and manifest.model_file == "model.so"
    assert manifest.device["accelerator"] == "cpu" and manifest.device["target"] == "x86_64"
    assert json.loads(manifest.device["tvm_target"])["mcpu"] == "haswell"
    assert manifest.created["optimizations"] == ["prune", "tvm"]
    assert manifest.created["tvm"]["forced_slower"] == report.slower_than_onnxruntime
    verified = edgerun("bundle", "verify", str(tmp_path / "b"))
    assert verified.returncode == 0 and "tvm:cpu" in verified.stdout, verified.stderr


def test_a_new_library_at_a_reused_path_is_the_one_that_runs(tmp_path):
    # an OTA update installs into the slot the version before last used: the same path; the
    # loader once handed back the library it had loaded from there first
    first, second = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    first.write_bytes(mlp_onnx([8, 16, 4], seed=1))
    second.write_bytes(mlp_onnx([8, 16, 4], seed=2))
    slot = tmp_path / "slot"
    x = np.ones((1, 8), np.float32)
    for source in (first, second):
        if slot.exists():
            shutil.rmtree(slot)
        compile_bundle(source, load_profile("x86-64"), slot, name="m", version="1", force=True)
        model = Model.load(slot, "x86-64")
        np.testing.assert_allclose(model.predict({"x": x})["y"],
                                   onnxruntime_run(source, {"x": x})[0], atol=1e-4)
        model.close()


def test_concurrent_requests_get_their_own_answers(tmp_path, mlp_path):
    compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b", name="mlp", version="1",
                   force=True)
    model = Model.load(tmp_path / "b", "x86-64")
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((i + 1, 8)).astype(np.float32) for i in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = model.predict({"x": inputs[i]})["y"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], onnxruntime_run(mlp_path, {"x": x})[0], atol=1e-4)


@pytest.fixture
def parallel_bundle(tmp_path: Path, mlp_path: Path, monkeypatch) -> Path:
    """An x86 bundle whose kernels run their outer loop on TVM's thread pool, as tuned kernels
    do (untuned ones are serial): built in a second, where tuning takes minutes."""
    from tvm import relax, s_tir, tirx

    from edgerun.optimizers import tvm_build

    compile_module = tvm_build._compile

    def with_parallel_loops(mod, tvm_tgt, *args, **kwargs):
        with tvm_tgt:
            mod = relax.get_pipeline("zero")(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                schedule = s_tir.Schedule(func)
                for block in schedule.get_child_blocks(schedule.get_sblock("root")):
                    schedule.parallel(schedule.get_loops(block)[0])
                mod[gv] = schedule.mod["main"]
        return compile_module(mod, tvm_tgt, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tvm_build, "_compile", with_parallel_loops)
        compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "parallel", name="mlp",
                       version="1", force=True)
    assert b"TVMBackendParallelLaunch" in (tmp_path / "parallel" / "model.so").read_bytes()
    return tmp_path / "parallel"


def run_on_a_thread_of_its_own(model: Model, x: np.ndarray) -> dict[str, Any]:
    """The output, the threads the run started, the size of TVM's pool and whether the
    thread's CPUs changed, from a new thread: TVM's pool belongs to the thread calling it."""
    import tvm

    seen: dict[str, Any] = {}

    def serve() -> None:
        before, cpus = set(os.listdir("/proc/self/task")), os.sched_getaffinity(0)
        seen["y"] = model.predict({"x": x})["y"]
        seen["started"] = len(set(os.listdir("/proc/self/task")) - before)
        seen["pinned"] = os.sched_getaffinity(0) != cpus
        seen["pool"] = tvm.get_global_func("runtime.NumThreads")()  # last: it makes a pool

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    return seen


def test_tvm_runs_on_the_profiles_thread_count(parallel_bundle, mlp_path, monkeypatch):
    """TVM sized its pool by itself (half the host's logical CPUs on x86), whatever the
    profile's intra_op_threads said, as ONNX Runtime and LiteRT follow it."""
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tvm_default = max(1, (os.cpu_count() or 1) // 2)
    threads = 3 if tvm_default != 3 else 2
    monkeypatch.delenv("TVM_BIND_THREADS", raising=False)
    x = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    want = onnxruntime_run(mlp_path, {"x": x})[0]
    for count in (threads, 1):
        model = Model.load(parallel_bundle, "x86-64", intra_op_threads=count)
        seen = run_on_a_thread_of_its_own(model, x)
        np.testing.assert_allclose(seen["y"], want, atol=1e-4)
        # the calling thread is the pool's first worker, and stays on the CPUs it had: TVM
        # bound it to the first `count` cores (and its workers one to a core, every pool alike)
        assert (seen["pool"], seen["started"], seen["pinned"]) == (count, count - 1, False)
        assert model.describe()["threads"] == count


def test_tvm_threads_follow_the_cpus_a_container_leaves(parallel_bundle):
    """With no intra_op_threads in the profile, the CPUs the process may use (its cgroup quota
    and affinity) size the pool, not TVM's count of the host's CPUs."""
    machine = os.cpu_count() or 1
    script = (f"import os; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
              f"import numpy as np, tvm; from edgerun.runtime import Model; "
              f"m = Model.load({str(parallel_bundle)!r}, 'x86-64'); "
              f"m.predict({{'x': np.ones((4, 8), np.float32)}}); "
              f"print(m.describe()['threads'], tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    described, pool = map(int, done.stdout.split()[-2:])
    assert (described, pool) == ((1, 1) if machine > 1 else (0, 1))  # pinned to one CPU


def test_the_speed_check_times_both_at_the_profiles_thread_count(tmp_path, mlp_path,
                                                                monkeypatch):
    """The verdict "slower than ONNX Runtime" timed ONNX Runtime at the profile's
    intra_op_threads and TVM at its own default (half the host's logical CPUs on x86), or at
    the size a pool the compiling thread already had: TVM's pool keeps its first size."""
    import dataclasses

    import tvm

    from edgerun.optimizers import tvm as tvm_compile

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tvm_default = max(1, (os.cpu_count() or 1) // 2)
    threads = 3 if tvm_default != 3 else 2
    timed: list[tuple[str, int]] = []
    measuring = threading.local()
    real_median, real_run = tvm_compile.median_latency_ms, ort.InferenceSession.run

    def onnxruntime_run(self, *args, **kwargs):
        if getattr(measuring, "on", False):
            measuring.ort = self.get_session_options().intra_op_num_threads
        return real_run(self, *args, **kwargs)

    def median(run, *args, **kwargs):
        measuring.on, measuring.ort = True, None
        try:
            return real_median(run, *args, **kwargs)
        finally:
            measuring.on = False
            timed.append(("onnxruntime", measuring.ort) if measuring.ort is not None else
                         ("tvm", tvm.get_global_func("runtime.NumThreads")()))

    monkeypatch.setattr(ort.InferenceSession, "run", onnxruntime_run)
    monkeypatch.setattr(tvm_compile, "median_latency_ms", median)
    # one thread compiles for a 1-thread profile, then for one of `threads`: its TVM pool,
    # first made with 1 thread, must not cap the second measurement
    reports = {}
    for count in (1, threads):
        profile = dataclasses.replace(load_profile("x86-64"), intra_op_threads=count)
        reports[count] = compile_bundle(mlp_path, profile, tmp_path / f"b{count}", name="mlp",
                                        version="1", force=True)
    assert timed == [("tvm", 1), ("onnxruntime", 1), ("tvm", threads), ("onnxruntime", threads)]
    # the figures say the thread count they were measured at
    for count, report in reports.items():
        assert report.threads == count
        assert Bundle.open(report.bundle).manifest.created["tvm"]["threads"] == count


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, np.ndarray]:
    onnx_bytes, images, _ = digits_classifier_onnx()
    return onnx_bytes, images


def test_digits_classifier_tvm_artifact_matches_onnxruntime(tmp_path, digits):
    onnx_bytes, images = digits
    model = onnx.load_from_string(onnx_bytes)
    path = tmp_path / "digits.onnx"
    onnx.save(onnx.utils.Extractor(model).extract_model(
        [i.name for i in model.graph.input], ["probabilities"]), str(path))
    compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="digits", version="1",
                   force=True)
    got = Model.load(tmp_path / "b", "x86-64").predict({"X": images})["probabilities"]
    expected = onnxruntime_run(path, {"X": images})[0]
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_a_slower_artifact_is_refused_with_the_figures(tmp_path):
    path = tmp_path / "wide.onnx"
    path.write_bytes(mlp_onnx([256, 1024, 1024, 10]))
    with pytest.raises(SlowerThanOnnxRuntime, match=r"slower than ONNX Runtime.* ms against") \
            as caught:
        compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="wide", version="1")
    report = caught.value.report
    assert report.tvm_latency_ms > report.onnxruntime_latency_ms
    assert report.speedup < 1
    assert not (tmp_path / "b").exists()


def test_the_refusal_names_the_batch_it_timed(tmp_path):
    """Both sides are timed on the golden input; the refusal called that a batch-1 call
    whatever its rows (a real sample of 16 rows, a model with a fixed batch of 8)."""
    path = tmp_path / "wide.onnx"
    path.write_bytes(mlp_onnx([256, 1024, 1024, 10]))
    sample = {"x": np.random.default_rng(7).standard_normal((16, 256)).astype(np.float32)}
    with pytest.raises(SlowerThanOnnxRuntime, match=r" ms per call on x \[16, 256\] at ") \
            as caught:
        compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="wide", version="1",
                       golden_inputs=sample)
    assert "batch-1" not in str(caught.value)


def argmax_onnx() -> bytes:
    """MatMul -> ArgMax: a classifier whose only output is an int64 label."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
         onnx.helper.make_node("ArgMax", ["h"], ["label"], axis=1, keepdims=0)], "argmax",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch"])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_with_only_integer_outputs_compiles_and_they_must_be_equal(tmp_path):
    path = tmp_path / "argmax.onnx"
    path.write_bytes(argmax_onnx())
    report = compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="a",
                            version="1", force=True)
    assert report.runs_here and report.max_abs_error == 0.0
    x = np.random.default_rng(5).standard_normal((7, 8)).astype(np.float32)
    got = Model.load(tmp_path / "b", "x86-64").predict({"x": x})["label"]
    np.testing.assert_array_equal(got, onnxruntime_run(path, {"x": x})[0])
    # labels are compared exactly, whatever the float tolerance
    from edgerun.optimizers.tvm import _compare

    want = {"label": np.array([1, 2, 3]), "p": np.zeros(3, np.float32)}
    with pytest.raises(CompileError, match=r"output 'label' differs from ONNX Runtime's in 1 "
                                           r"of 3 values"):
        _compare({"label": np.array([1, 0, 3]), "p": want["p"]}, want, "int8",
                 load_profile("x86-64"))


def test_an_fp16_artifact_is_held_to_fp16_tolerance_not_fp32(tmp_path):
    from edgerun.optimizers.pipeline import OptimizeOptions, optimize
    from edgerun.optimizers.quantize import quantize
    from edgerun.optimizers.tvm import TOLERANCE, _compare, _precision

    source = tmp_path / "mlp.onnx"
    source.write_bytes(mlp_onnx([64, 128, 10]))
    half = tmp_path / "half.onnx"
    quantize(source, half, "fp16")
    assert (_precision(source, ()), _precision(half, ())) == ("fp32", "fp16")
    # precision from the graph: an fp16 model made elsewhere, no quantize tag
    direct = compile_bundle(half, load_profile("x86-64"), tmp_path / "direct", name="m",
                            version="1", force=True)
    assert TOLERANCE < direct.max_abs_error < 1e-2
    # precision from the tag: `edgerun optimize --quantize fp16 --compile tvm --force`
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        device="x86-64", quantize="fp16", compile="tvm", force=True, latency_seconds=0.02))
    assert report.optimizations == ["quantize:fp16"]
    assert Bundle.open(tmp_path / "out").manifest.created["tvm"]["max_abs_error"] > TOLERANCE
    assert report.compile_report.artifact == tmp_path / "out" / "model.so"
    # the fp32 tolerance still holds fp32 models
    want = {"y": np.array([1.0, -2.0], np.float32)}
    with pytest.raises(CompileError, match=r"by 0.001\d* in output 'y' \(tolerance 0.00012 "
                                           r"at fp32: atol 0.0001 \+ rtol 1e-05"):
        _compare({"y": want["y"] + np.float32(1e-3)}, want, "fp32", load_profile("x86-64"))


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
def test_tuning_runs_and_its_records_are_reused(tmp_path, mlp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    first = compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b1", name="mlp",
                           version="1", tune_trials=2, force=True)
    assert first.batch == "1" and first.max_abs_error <= 1e-4
    assert any("0 trials cached, 2 run now (measured on this host) on 2 of 2 kernels" in note
               for note in first.notes), first.notes
    assert metaschedule_trials(tmp_path / "cache") == recorded_trials(tmp_path / "cache") == 2
    records = list((tmp_path / "cache" / "tvm-tuning" / "x86-64").rglob("database_tuning_record.json"))
    assert records and records[0].stat().st_size > 0
    second = compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b2", name="mlp",
                            version="1", tune_trials=2, force=True)
    assert any("2 trials cached, 0 run now" in note for note in second.notes)
    model = Model.load(tmp_path / "b2", "x86-64")
    assert model.signature.inputs[0].shape == (1, 8)
    x = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(model.predict({"x": x})["y"],
                               onnxruntime_run(mlp_path, {"x": x})[0], atol=1e-4)


def tuning_note(notes: tuple[str, ...]) -> str:
    (note,) = [note for note in notes if note.startswith("tuning records ")]
    return note


def metaschedule_trials(cache: Path) -> int:
    """The trials MetaSchedule's own log says it ran, over every tuning folder in `cache`."""
    logs = (cache / "tvm-tuning").rglob("*task_scheduler.log")
    return sum(int(re.findall(r"Total trials: (\d+)", log.read_text())[-1]) for log in logs)


def recorded_trials(cache: Path) -> int:
    """The trials the tuning cache records as done, over every tuning folder in `cache`."""
    files = (cache / "tvm-tuning").rglob(tvm_tuning.TRIALS_FILE)
    return sum(json.loads(file.read_text())["trials"] for file in files)


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
def test_a_model_with_only_symbolic_kernels_is_told_nothing_was_tuned(tmp_path, monkeypatch):
    """MetaSchedule cannot tune a kernel with a symbolic shape (its log: "Total trials: 0"), yet
    the note said "0 trials cached, 2 run now (measured on this host)" and the cache recorded
    2 trials done, so the next compile said "2 trials cached" of a library never tuned."""
    from tests.helpers import centered_onnx

    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "centered.onnx"
    path.write_bytes(centered_onnx())
    for folder in ("b1", "b2"):
        report = compile_bundle(path, load_profile("x86-64"), tmp_path / folder, name="seq",
                                version="1", tune_trials=2, force=True, max_batch_size=0)
        assert tuning_note(report.notes).endswith(
            ": 0 trials cached, 0 run now: nothing to tune, every kernel (1) has a symbolic "
            "shape; the library keeps TVM's default schedules"), report.notes
    assert metaschedule_trials(tmp_path / "cache") == recorded_trials(tmp_path / "cache") == 0
    Model.load(tmp_path / "b2", "x86-64").check_golden()


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
def test_local_tuning_times_candidates_at_the_profiles_thread_count(tmp_path, mlp_path,
                                                                   monkeypatch):
    """MetaSchedule timed the candidates on the compiling thread's TVM pool (TVM's default:
    half the host's logical CPUs on x86, or whatever size that thread's pool first had), while
    the artifact runs at the profile's intra_op_threads: it picked the schedules fastest at
    another thread count. The spy only reads the pool size and runs TVM's own timing."""
    import dataclasses

    import tvm
    from tvm.s_tir.meta_schedule.runner import local_runner

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    tvm_default = max(1, (os.cpu_count() or 1) // 2)
    threads = 3 if tvm_default != 3 else 2
    pools: list[int] = []
    time_candidate = local_runner._worker_func

    def timed_at(*args, **kwargs):
        pools.append(tvm.get_global_func("runtime.NumThreads")())
        return time_candidate(*args, **kwargs)

    monkeypatch.setattr(local_runner, "_worker_func", timed_at)
    profile = dataclasses.replace(load_profile("x86-64"), intra_op_threads=threads)
    report = compile_bundle(mlp_path, profile, tmp_path / "b", name="mlp", version="1",
                            tune_trials=2, force=True)
    assert len(pools) == 2 and set(pools) == {threads} == {report.threads}, pools


def test_an_empty_edgerun_cache_is_unset_for_every_reader(tmp_path, mlp_path, monkeypatch):
    """`EDGERUN_CACHE=` (empty, as a unit or compose file leaves it) put tuning records (and
    TensorRT's engines) in whatever folder the command ran in, while Lambda's wheels went to
    ~/.cache/edgerun: each reader takes empty as unset."""
    from edgerun.adapters.aws_lambda import packaging
    from edgerun.optimizers.tvm_build import tuning_dir

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / ".cache" / "edgerun"
    for value, root in (("", home), (None, home), (str(tmp_path / "c"), tmp_path / "c")):
        if value is None:
            monkeypatch.delenv("EDGERUN_CACHE", raising=False)
        else:
            monkeypatch.setenv("EDGERUN_CACHE", value)
        assert cache_dir() == root
        records = tuning_dir(load_profile("x86-64"), {"kind": "llvm"}, mlp_path, 1)
        assert records.parents[1] == root / "tvm-tuning", (value, records)
        assert packaging._default_cache() == root / "wheels"


def tokens_onnx() -> bytes:
    """ids [N, T] -> embedding Gather -> mean over T -> MatMul: any sequence length T."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["e", "ids"], ["emb"]),
         onnx.helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
         onnx.helper.make_node("MatMul", ["pooled", "w"], ["y"])], "tokens",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "T"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "e"),
         onnx.numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
def fail_symbolic_batches(monkeypatch) -> None:
    """TVM's import fails for a symbolic batch, as it does for some models: the compile falls
    back to a fixed batch."""
    from edgerun.optimizers import tvm_build

    real = tvm_build.import_onnx

    def symbolic_batch_fails(model, batch):
        if batch is None:
            raise RuntimeError("simulated: symbolic batch unsupported")
        return real(model, batch)

    monkeypatch.setattr(tvm_build, "import_onnx", symbolic_batch_fails)


@pytest.mark.parametrize("trials", [0, 2])
def test_a_fixed_batch_keeps_the_sequence_length_symbolic(tmp_path, monkeypatch, trials):
    """Tuned, only the MatMul has static shapes: the budget was split over all 4 kernels, 1
    trial ran and the note and the cache said 2."""
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    if not trials:  # untuned: the batch is fixed only where a symbolic one fails
        fail_symbolic_batches(monkeypatch)
    path = tmp_path / "tokens.onnx"
    path.write_bytes(tokens_onnx())
    report = compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="tok",
                            version="1", tune_trials=trials, force=True)
    assert report.batch == "1"
    if trials:
        assert "0 trials cached, 2 run now (measured on this host) on 1 of 4 kernels, 3 with " \
            "a symbolic shape left untuned" in tuning_note(report.notes), report.notes
        assert metaschedule_trials(tmp_path / "cache") == recorded_trials(tmp_path / "cache") \
            == 2
    model = Model.load(tmp_path / "b", "x86-64")
    assert model.signature.inputs[0].shape == (1, -1)
    model.check_golden()
    for length in (1, 7):
        ids = np.arange(length, dtype=np.int64).reshape(1, length) % 10
        np.testing.assert_allclose(model.predict({"ids": ids})["y"],
                                   onnxruntime_run(path, {"ids": ids})[0], atol=1e-4)


@pytest.mark.parametrize("model, named, limit", [
    ("tokens", "input 'ids' dim 1 'T'", None),
    # a batched model falls back to batch 1 where a symbolic batch fails; for one with no
    # batch axis that would be a library for sequences of length 1 under a [-1] signature
    ("centered", "input 'x' dim 0 'seq'", 0)])
def test_a_symbolic_dim_tvm_cannot_compile_is_named(tmp_path, monkeypatch, model, named, limit):
    from edgerun.optimizers import tvm_build
    from tests.helpers import centered_onnx

    def fails(model, batch):
        raise RuntimeError("simulated: symbolic shapes unsupported")

    monkeypatch.setattr(tvm_build, "import_onnx", fails)
    path = tmp_path / f"{model}.onnx"
    path.write_bytes(tokens_onnx() if model == "tokens" else centered_onnx())
    with pytest.raises(CompileError, match=rf"{model}.onnx: TVM cannot compile it for x86-64 "
                                           rf"with {named} symbolic: simulated"):
        compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="m", version="1",
                       max_batch_size=limit)
    assert not (tmp_path / "b").exists()


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
@pytest.mark.parametrize("trials", [0, 2])
def test_max_batch_size_0_keeps_dim_0_a_sequence_that_is_never_stacked(tmp_path, monkeypatch,
                                                                     trials):
    """`optimize --max-batch-size 0 --compile tvm` never passed the limit to compile_bundle:
    the TVM bundle said batch_axis 0, so a server stacked two callers' sequences into one call
    (each centred on the other's tokens too), and tuning fixed dim 0, the sequence, to 1."""
    from edgerun.adapters.dataplane import DataPlane
    from edgerun.optimizers.pipeline import OptimizeOptions, optimize
    from edgerun.runtime import MicroBatcher, create_bundle
    from edgerun.runtime.metrics import Registry
    from edgerun.runtime.repository import Repository
    from tests.helpers import Recording, centered_onnx
    from tests.test_batcher import queued_together

    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "centered.onnx"
    path.write_bytes(centered_onnx())
    unbatched = create_bundle(path, tmp_path / "onnx", name="seq", version="1",
                              max_batch_size=0).signature  # as `bundle create` declares it
    report = optimize(path, tmp_path / "api", OptimizeOptions(
        device="x86-64", quantize="fp32", compile="tvm", tune_trials=trials, force=True,
        max_batch_size=0, latency_seconds=0.02))
    assert report.compile_report.batch == "dynamic"
    bundles = [tmp_path / "api"]
    if not trials:  # the command too, into a repository as `edgerun serve` loads it
        made = edgerun("optimize", str(path), "--device", "x86-64", "--quantize", "fp32",
                       "--compile", "tvm", "--force", "--max-batch-size", "0",
                       "--name", "seq", "-o", str(tmp_path / "repo" / "seq" / "1"))
        assert made.returncode == 0, made.stderr
        bundles.append(tmp_path / "repo" / "seq" / "1")
        repository = Repository(tmp_path / "repo", "x86-64", registry=Registry())
        repository.load_all()
        try:
            served = repository.get("seq")
            assert served.model.describe()["backend"] == "tvm"
            assert not served.signature.batchable
            assert DataPlane(repository).model_metadata("seq")["parameters"] == \
                {"max_batch_size": 0}
        finally:
            repository.close()
    for folder in bundles:
        assert Bundle.open(folder).manifest.signature == unbatched
        model = Recording(Model.load(folder, "x86-64"))
        mine, theirs = np.array([1, 2, 3], np.float32), np.array([10, 30], np.float32)
        with MicroBatcher(model, registry=Registry(), max_queue_delay_us=1000) as batcher:
            pending = queued_together(batcher, model, mine, (mine, theirs))
            for x, answer in zip((mine, theirs), pending):
                np.testing.assert_allclose(answer.result()["centered"], x - x.mean(),
                                           atol=1e-6)
        assert [b["x"].shape for b in model.batches] == [(3,), (3,), (2,)]
        model.close()


def test_a_max_batch_size_reaches_the_tvm_bundle(tmp_path, mlp_path):
    # as `bundle create --max-batch-size 4` and optimize's ONNX path write it; the TVM path
    # dropped it, so the bundle said unlimited
    from edgerun.optimizers.pipeline import OptimizeOptions, optimize
    from edgerun.runtime import InvalidInput

    compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b", name="mlp", version="1",
                   force=True, max_batch_size=4)
    optimize(mlp_path, tmp_path / "o", OptimizeOptions(
        device="x86-64", quantize="fp32", compile="tvm", force=True, max_batch_size=4,
        latency_seconds=0.02))
    for folder in (tmp_path / "b", tmp_path / "o"):
        assert Bundle.open(folder).manifest.signature.max_batch_size == 4
        model = Model.load(folder, "x86-64")
        assert model.predict({"x": np.ones((4, 8), np.float32)})["y"].shape == (4, 4)
        with pytest.raises(InvalidInput, match="batch of 5 exceeds the model's max_batch_size 4"):
            model.predict({"x": np.ones((5, 8), np.float32)})
        model.close()
    with pytest.raises(CompileError, match="or 0 for a model with no batch axis"):
        compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "c", name="mlp",
                       version="1", max_batch_size=-1)
    assert not (tmp_path / "c").exists()


def test_a_batch_limit_a_tuned_library_cannot_keep_is_refused_or_noted(tmp_path, mlp_path,
                                                                       monkeypatch):
    """A tuned library takes batch 1 only: `--max-batch-size 4 --tune-trials 2` tuned, then
    wrote a bundle of x [1, 8] with no limit and said nothing, so every caller's batch of 2..4
    was refused when served. Refused before any work now; where an untuned library falls back
    to batch 1 (a symbolic batch TVM cannot compile), a note says the limit was not kept."""
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    made = edgerun("optimize", str(mlp_path), "--device", "x86-64", "--quantize", "fp32",
                   "--compile", "tvm", "--tune-trials", "2", "--force", "--max-batch-size", "4",
                   "-o", str(tmp_path / "o"), env={"EDGERUN_CACHE": str(tmp_path / "cache")})
    assert made.returncode == 2 and "--max-batch-size 4 with --tune-trials: a tuned TVM " \
        "library takes batch 1 only" in " ".join(made.stderr.split()), made.stderr
    assert "bundling" not in made.stdout and not (tmp_path / "o").exists()
    with pytest.raises(CompileError, match=r"^max_batch_size 4 with tune_trials: a tuned TVM "
                                           r"library takes batch 1 only .*compile untuned$"):
        compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b", name="mlp",
                       version="1", tune_trials=2, force=True, max_batch_size=4)
    assert not (tmp_path / "b").exists() and not (tmp_path / "cache").exists()
    fail_symbolic_batches(monkeypatch)
    report = compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "c", name="mlp",
                            version="1", force=True, max_batch_size=4)
    assert report.batch == "1" and report.notes[-1] == \
        "max_batch_size 4 is not kept: the library takes batch 1 only", report.notes


def test_tuning_for_another_cpu_is_refused(tmp_path, mlp_path):
    with pytest.raises(CompileError, match="tuning needs to measure on the device"):
        compile_bundle(mlp_path, load_profile("raspberry-pi-4"), tmp_path / "b", name="m",
                       version="1", tune_trials=8)


def test_an_operator_tvm_cannot_import_is_named(tmp_path, digits):
    path = tmp_path / "digits.onnx"
    path.write_bytes(digits[0])  # skl2onnx maps class indices to labels with an ai.onnx.ml op
    with pytest.raises(UnsupportedOperator, match="ai.onnx.ml.ArrayFeatureExtractor") as caught:
        compile_bundle(path, load_profile("x86-64"), tmp_path / "b", name="d", version="1")
    assert caught.value.operators == ("ai.onnx.ml.ArrayFeatureExtractor",)
    assert not (tmp_path / "b").exists()


def test_an_unknown_device_name_lists_the_shipped_ones(tmp_path, mlp_path):
    with pytest.raises(ValueError, match="unknown device profile 'jetson-tx9'.*raspberry-pi-5"):
        compile_bundle(mlp_path, "jetson-tx9", tmp_path / "b", name="m", version="1")


def test_an_artifact_for_another_cpu_is_refused_naming_both(tmp_path, mlp_path):
    compile_bundle(mlp_path, load_profile("raspberry-pi-5"), tmp_path / "b", name="m",
                   version="1")
    with pytest.raises(BundleError, match=r"compiled for aarch64 \(profile raspberry-pi-5.*"
                                          r"cortex-a76.*this host is x86_64"):
        Model.load(tmp_path / "b")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 CPU features")
def test_a_cpu_profile_artifact_is_refused_on_a_host_without_its_cpu_features(tmp_path,
                                                                              mlp_path,
                                                                              monkeypatch):
    from edgerun.runtime.backends import tvm as backend

    compile_bundle(mlp_path, load_profile("cpu"), tmp_path / "b", name="m", version="1",
                   force=True)
    device = Bundle.open(tmp_path / "b").manifest.device
    mcpu = json.loads(device["tvm_target"])["mcpu"]  # this host's CPU, AVX-512 here
    assert {"avx", "sse4.2"} <= set(device["cpu_features"].split(","))
    Model.load(tmp_path / "b").close()  # this host has them
    # an older x86 CPU: SSE4.2, no AVX
    monkeypatch.setattr(backend, "host_cpu_flags", lambda: {"sse41", "sse42", "ssse3"})
    with pytest.raises(BundleError, match=rf"compiled for .*{mcpu}.*profile cpu.*uses CPU "
                                          r"features this host lacks: .*avx, avx2"):
        Model.load(tmp_path / "b")
    monkeypatch.setattr(backend, "host_cpu_flags", lambda: None)  # flags unknown: not refused
    Model.load(tmp_path / "b").close()


def test_a_cpu_profile_records_only_the_features_its_build_host_has(monkeypatch):
    """LLVM names this host's CPU model, whose features a VM may hide (AMX, say): recorded,
    they made the build host refuse its own artifact. A profile's own target keeps them all."""
    from edgerun.optimizers import tvm as compiler
    from edgerun.optimizers import tvm_target
    from edgerun.runtime.backends import tvm as backend

    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}
    nominal = tvm_target.cpu_features(target)
    assert {"amx-tile", "avx512f", "avx2"} <= set(nominal)
    hidden = {backend.normalized_flag(f) for f in nominal} - {"amxtile", "amxbf16", "amxint8"}
    monkeypatch.setattr(backend, "host_cpu_flags", lambda: hidden)
    recorded = compiler._features(target, host_detected=True)["cpu_features"].split(",")
    assert "avx512f" in recorded and not any(f.startswith("amx") for f in recorded)
    assert compiler._features(target, host_detected=False)["cpu_features"].split(",") == nominal
    # features Linux never lists in /proc/cpuinfo are not recorded: no host could show them
    assert not {"avxneconvert", "avxvnniint8"} & set(tvm_target.cpu_features(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sierraforest"}))


@pytest.mark.parametrize("name", CUDA_PROFILES)
def test_cuda_artifact_carries_device_code_for_its_arch(tmp_path, mlp_path, name):
    profile = load_profile(name)
    arch = profile.tvm_target["arch"]
    report = compile_bundle(mlp_path, profile, tmp_path / "b", name="m", version="1")
    compute = arch.replace("sm_", "compute_")
    assert report.device_code == (f"cubin {arch}", f"ptx {compute}")
    library = report.artifact.read_bytes()
    assert ("cubin", arch) in cuda_device_code.fatbin_entries(library)
    assert ("ptx", compute) in cuda_device_code.fatbin_entries(library)
    assert b"#include <cuda" not in library  # no CUDA source left to compile on the device
    assert library_arch(report.artifact) == profile.arch
    (note,) = [n for n in report.notes if n.startswith(f"device code for {arch}: ")]
    if arch in ("sm_53", "sm_72"):  # CUDA 13's nvcc dropped them: CUDA 12's NVRTC compiles
        assert "NVRTC 12." in note and "fatbinary" in note, note
        assert cuda_elf_archs(library) == [arch]  # the cubin itself, uncompressed
    with pytest.raises(BundleError, match=f"compiled for (cuda:{arch}|{profile.arch})"):
        Model.load(tmp_path / "b")


def test_fp16_jetson_nano_bundle_from_the_cli_carries_sm53_code(tmp_path, mlp_path):
    # jetson-nano's default precision is fp16: TVM's kernels then include cuda_fp16.h
    result = edgerun("optimize", str(mlp_path), "--device", "jetson-nano", "--compile", "tvm",
                     "-o", str(tmp_path / "nano"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Bundle.open(tmp_path / "nano").manifest
    assert manifest.created["optimizations"] == ["quantize:fp16", "tvm"]
    assert manifest.created["tvm"]["device_code"] == ["cubin sm_53", "ptx compute_53"]
    entries = cuda_device_code.fatbin_entries((tmp_path / "nano" / "model.so").read_bytes())
    assert ("cubin", "sm_53") in entries and ("ptx", "compute_53") in entries


def test_an_arch_no_compiler_here_targets_is_refused_naming_it():
    source = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    with pytest.raises(cuda_device_code.DeviceCodeError,
                       match=r"no CUDA compiler here targets sm_35: nvcc 1[0-9.]+ .*NVRTC 12"):
        cuda_device_code.compile_fatbin(source, "sm_35")


def test_fatbin_reader_matches_nvcc_output():
    source = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    fatbin = cuda_device_code.compile_fatbin(source, "sm_86")
    assert cuda_device_code.fatbin_entries(fatbin) in (
        [("cubin", "sm_86"), ("ptx", "compute_86")], [("ptx", "compute_86"), ("cubin", "sm_86")])


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """An arm64 Debian root with python3.11, numpy and apache-tvm; built once, then cached."""
    root = cache_dir() / "arm64-root"
    subprocess.run(["bash", str(REPO / "devices" / "qemu" / "make-arm64-root.sh"), str(root),
                    sys.executable], check=True, timeout=600)
    return root


@pytest.mark.timeout(900)  # includes building the arm64 root when it is not cached
def test_aarch64_artifact_runs_under_qemu_and_matches_onnxruntime(tmp_path, mlp_path, arm64_root):
    compile_bundle(mlp_path, load_profile("raspberry-pi-4"), tmp_path / "b", name="mlp",
                   version="1")
    assert library_arch(tmp_path / "b" / "model.so") == "aarch64"
    x = np.random.default_rng(5).standard_normal((6, 8)).astype(np.float32)
    got, described = run_under_qemu(arm64_root, tmp_path / "b", x, tmp_path)
    assert described["backend"] == "tvm" and "cortex-a72" in described["target"]
    np.testing.assert_allclose(got, onnxruntime_run(mlp_path, {"x": x})[0], atol=1e-4)


def run_under_qemu(arm64_root: Path, bundle: Path, x: np.ndarray,
                   scratch: Path) -> tuple[np.ndarray, dict]:
    """Serve `bundle` (raspberry-pi-4) in the arm64 root under qemu-user: its output for `x`,
    and what the backend says of itself."""
    np.savez(scratch / "in.npz", x=x)
    result = subprocess.run(
        ["qemu-aarch64", "-L", str(arm64_root), str(arm64_root / "usr/bin/python3.11"),
         str(REPO / "devices" / "qemu" / "run_bundle.py"), str(REPO), str(bundle),
         "raspberry-pi-4", str(scratch / "in.npz"), str(scratch / "out.npz")],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return (np.load(scratch / "out.npz")["y"],
            json.loads(result.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def rpc_server(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A TVM RPC server in a process group of its own, its output in `log`. Afterwards the
    whole group (the server, its worker and their sessions) is killed, stopped or not."""
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        yield server
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


def qemu_rpc_server(arm64_root: Path, log: Path, *options: str
                    ) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """TVM's RPC server from the aarch64 wheel, in the arm64 root under qemu-user, on a
    loopback port: an emulated Raspberry Pi to tune on."""
    return rpc_server(["qemu-aarch64", "-L", str(arm64_root),
                       str(arm64_root / "usr/bin/python3.11"),
                       str(REPO / "devices" / "qemu" / "rpc_server.py"), str(arm64_root),
                       *options], log)


def wait_for(ready: Callable[[], bool], server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300  # two TVM imports under emulation: ~1 min when idle
    while not ready():
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "RPC server did not start: " + log.read_text()
        time.sleep(1)


@contextlib.contextmanager
def host_rpc_server(log: Path) -> Iterator[int]:
    """This host's TVM RPC server on a loopback port, once it accepts a session: the port."""
    from tvm import rpc

    port = free_port()

    def accepts() -> bool:
        try:
            rpc.connect("127.0.0.1", port)
        except Exception:  # noqa: BLE001 - TVM's error while the server starts
            return False
        return True

    with rpc_server([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                     "--port", str(port), "--port-end", str(port + 1)], log) as server:
        wait_for(accepts, server, log)
        yield port


@pytest.fixture(scope="module")
def arm64_rpc_server(arm64_root, tmp_path_factory):
    """The emulated board's RPC server, reached directly. Yields (HOST:PORT, its log file)."""
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "server.log"
    with qemu_rpc_server(arm64_root, log, "--host", "127.0.0.1", "--port", str(port),
                         "--port-end", str(port + 1)) as server:
        wait_for(lambda: f"bind to 127.0.0.1:{port}" in log.read_text(), server, log)
        yield f"127.0.0.1:{port}", log


TRACKER_KEY = "qemu-rpi4"


@pytest.fixture(scope="module")
def arm64_tracker(arm64_root, tmp_path_factory):
    """TVM's RPC tracker on loopback with the emulated board registered under TRACKER_KEY,
    as a farm of boards is shared. Yields (the tracker's HOST:PORT, the board's log file)."""
    scratch = tmp_path_factory.mktemp("tracker")
    tracker_port, port = free_port(), free_port()
    with (scratch / "tracker.log").open("w") as out:
        tracker = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
             str(tracker_port), "--port-end", str(tracker_port + 1)],
            stdout=out, stderr=subprocess.STDOUT)

    try:
        log = scratch / "server.log"
        with qemu_rpc_server(arm64_root, log, "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1), "--tracker",
                             f"127.0.0.1:{tracker_port}", "--key", TRACKER_KEY) as server:
            wait_for(lambda: TRACKER_KEY in registered_keys(tracker_port), server, log)
            yield f"127.0.0.1:{tracker_port}", log
    finally:
        tracker.terminate()
        tracker.wait(timeout=30)


def registered_keys(tracker_port: int) -> set[str]:
    """The device keys registered at the loopback tracker (none while it is not up)."""
    try:
        return set(tvm_tuning.tracker_keys("127.0.0.1", tracker_port))
    except (OSError, RuntimeError):
        return set()


def tune_two_trials_over_rpc(tmp_path: Path, mlp_path: Path, address: str,
                             server_log: Path) -> None:
    """`edgerun optimize` for raspberry-pi-4 tuning 2 trials with `--rpc address` into
    tmp_path/b: both measured on the emulated board and recorded."""
    cache = tmp_path / "cache"
    result = edgerun("optimize", str(mlp_path), "--device", "raspberry-pi-4", "--quantize",
                     "fp32", "--compile", "tvm", "--tune-trials", "2", "--rpc", address,
                     "-o", str(tmp_path / "b"), env={"EDGERUN_CACHE": str(cache)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"0 trials cached, 2 run now (measured on {address} over TVM RPC)" in \
        " ".join(result.stdout.split()), result.stdout[-3000:]
    # every candidate was linked here for aarch64 and loaded and timed by the board's server
    assert server_log.read_text().count("candidate.so") >= 2, server_log.read_text()[-3000:]
    (records,) = (cache / "tvm-tuning" / "raspberry-pi-4").rglob("database_tuning_record.json")
    run_secs = [json.loads(line)[1][1] for line in records.read_text().splitlines()]
    assert len(run_secs) == 2 and all(0 < s[0] < 1 for s in run_secs), run_secs


@pytest.mark.timeout(900)  # includes building the arm64 root and starting the server
def test_tuning_over_rpc_measures_on_the_arm64_device(tmp_path, mlp_path, arm64_root,
                                                      arm64_rpc_server):
    tune_two_trials_over_rpc(tmp_path, mlp_path, *arm64_rpc_server)
    manifest = Bundle.open(tmp_path / "b").manifest
    assert manifest.created["tvm"]["tune_trials"] == 2
    assert manifest.signature.inputs[0].shape == (1, 8)
    # the tuned library runs on the "device" and agrees with ONNX Runtime on x86
    x = np.random.default_rng(6).standard_normal((1, 8)).astype(np.float32)
    got, _ = run_under_qemu(arm64_root, tmp_path / "b", x, tmp_path)
    np.testing.assert_allclose(got, onnxruntime_run(mlp_path, {"x": x})[0], atol=1e-4)


@pytest.mark.timeout(900)  # includes building the arm64 root and starting the server
def test_tuning_through_a_tracker_measures_on_a_device_under_the_key(tmp_path, mlp_path,
                                                                     arm64_tracker):
    tracker, server_log = arm64_tracker
    # the tracker hands the board out for every candidate
    tune_two_trials_over_rpc(tmp_path, mlp_path, f"{TRACKER_KEY}@{tracker}", server_log)


def test_a_key_no_device_registered_is_refused_naming_the_keys(tmp_path, mlp_path,
                                                               arm64_tracker):
    tracker, _ = arm64_tracker
    with pytest.raises(CompileError, match=re.escape(
            f"no device is registered under key 'rpi5' at the TVM RPC tracker {tracker} "
            f"(keys there: {TRACKER_KEY}); on the device: python -m tvm.exec.rpc_server "
            f"--tracker {tracker} --key rpi5")):
        compile_bundle(mlp_path, load_profile("raspberry-pi-4"), tmp_path / "b", name="m",
                       version="1", tune_trials=2, rpc=f"rpi5@{tracker}")
    assert not (tmp_path / "b").exists()


@pytest.mark.timeout(300)
def test_a_frozen_device_is_named_not_waited_for_forever(tmp_path, arm64_tracker, monkeypatch):
    """A board whose server is stopped while its TCP stack still accepts (as a hung board's
    does): reached directly or handed out by the tracker, it is refused after the connect
    timeout, naming it."""
    tracker = arm64_tracker[0]
    tracker_port, port = int(tracker.rsplit(":", 1)[1]), free_port()
    log = tmp_path / "frozen.log"
    # a host RPC server: only its handshake matters here
    with rpc_server([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                     "--port", str(port), "--port-end", str(port + 1), "--tracker", tracker,
                     "--key", "frozen"], log) as board:
        wait_for(lambda: "frozen" in registered_keys(tracker_port), board, log)
        os.killpg(board.pid, signal.SIGSTOP)  # the server and the worker that listens
        monkeypatch.setattr(tvm_tuning, "RPC_CONNECT_TIMEOUT_S", 3.0)
        started = time.monotonic()
        with pytest.raises(CompileError, match=re.escape(
                f"the TVM RPC server at 127.0.0.1:{port} did not accept a session within 3 s "
                "(a hung device?); restart the device's RPC server")):
            tvm_tuning.RpcDevice.parse(f"127.0.0.1:{port}").check()
        with pytest.raises(CompileError, match=re.escape(
                f"the 'frozen' device at 127.0.0.1:{port} the tracker handed out did not "
                "accept a session within 3 s (a hung device?); restart the device's RPC "
                "server")):
            tvm_tuning.RpcDevice.parse(f"frozen@{tracker}").check()
        assert time.monotonic() - started < 60


def fake_tracker(handed_out: list[list]) -> tuple[int, list[str]]:
    """A TVM RPC tracker on loopback that answers each device request with the next of
    `handed_out` ([host, port, match key]). Returns its port and the keys requested."""
    from tvm.rpc import base

    listener = socket.create_server(("127.0.0.1", 0))
    requested: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.sendall(base.recvall(conn, 4))  # the magic number, echoed
            while handed_out:
                code, key, *_ = base.recvjson(conn)
                assert code == base.TrackerCode.REQUEST
                requested.append(key)
                base.sendjson(conn, [base.TrackerCode.SUCCESS, handed_out.pop(0)])

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], requested


@pytest.mark.timeout(300)
def test_a_device_that_refuses_the_session_is_asked_for_again(tmp_path):
    """The tracker hands out a device whose match key went stale (its server made a new one,
    as TVM's servers do when a handed-out key goes unused): the next device is asked for, as
    TVM's own TrackerSession.request does, and after five refusals the error names them."""
    with host_rpc_server(tmp_path / "board.log") as port:
        stale, fresh = ["127.0.0.1", port, "stale"], ["127.0.0.1", port, ""]
        tracker_port, requested = fake_tracker([stale, fresh])
        session = tvm_tuning.RpcDevice.parse(f"rpi4@127.0.0.1:{tracker_port}").connect()
        assert session.cpu(0).exist and requested == ["rpi4", "rpi4"]
        del session  # the server holds one session at a time: end it

        tracker_port, requested = fake_tracker([stale] * 5)
        with pytest.raises(RuntimeError, match=re.escape(
                "every 'rpi4' device the tracker handed out refused the session "
                f"(127.0.0.1:{port}: ")) as refused:
            tvm_tuning.RpcDevice.parse(f"rpi4@127.0.0.1:{tracker_port}").connect()
        assert requested == ["rpi4"] * 5 and str(refused.value).count(f"127.0.0.1:{port}: ") == 5


@pytest.mark.timeout(900)  # MetaSchedule imports its tensor intrinsics once: minutes on a busy box
def test_rpc_tuning_times_candidates_at_the_profiles_thread_count(tmp_path, mlp_path,
                                                                 monkeypatch):
    """Over RPC the candidates were timed on the device's TVM pool at the server's default
    size (half the logical CPUs on x86), while the bundle is served there at the profile's
    intra_op_threads. A real RPC server on loopback; the spy only reads the remote pool size
    and runs TVM's own timing."""
    import dataclasses

    from tvm.s_tir.meta_schedule.runner import rpc_runner

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    tvm_default = max(1, (os.cpu_count() or 1) // 2)
    threads = 3 if tvm_default != 3 else 2
    pools: list[int] = []
    time_candidate = rpc_runner.default_run_evaluator

    def timed_at(session, *args, **kwargs):
        pools.append(session.get_function("runtime.NumThreads")())
        return time_candidate(session, *args, **kwargs)

    monkeypatch.setattr(rpc_runner, "default_run_evaluator", timed_at)
    profile = dataclasses.replace(load_profile("x86-64"), intra_op_threads=threads)
    with host_rpc_server(tmp_path / "server.log") as port:
        report = compile_bundle(mlp_path, profile, tmp_path / "b", name="mlp", version="1",
                                tune_trials=2, force=True, rpc=f"127.0.0.1:{port}")
    assert f"2 run now (measured on 127.0.0.1:{port} over TVM RPC)" in \
        tuning_note(report.notes)
    assert pools == [threads, threads], pools


@pytest.mark.timeout(600)
def test_candidates_the_rpc_device_cannot_load_stop_the_compile(tmp_path, mlp_path,
                                                                arm64_rpc_server, monkeypatch):
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path / "cache"))
    address, _ = arm64_rpc_server  # an aarch64 device asked to measure x86-64 libraries
    with pytest.raises(CompileError, match=rf"every tuning candidate \(2\) failed on the device "
                                           rf"at {address}.*x86_64"):
        compile_bundle(mlp_path, load_profile("x86-64"), tmp_path / "b", name="m",
                       version="1", tune_trials=2, rpc=address, force=True)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("profile", "trials", "rpc", "message"), [
    ("raspberry-pi-4", 0, "127.0.0.1:9",
     "rpc measures tuning candidates on the device: pass tune_trials N too"),
    ("jetson-orin", 2, "127.0.0.1:9", "CUDA targets get dlight's default GPU schedules"),
    ("raspberry-pi-4", 2, "pi.local", "'pi.local': expected HOST:PORT"),
    ("raspberry-pi-4", 2, f"127.0.0.1:{free_port()}", "no TVM RPC server answers at 127.0.0.1"),
    ("raspberry-pi-4", 2, "@127.0.0.1:9190", "expected HOST:PORT of a TVM RPC server, or KEY@"),
    ("raspberry-pi-4", 2, f"rpi4@127.0.0.1:{free_port()}",
     "no TVM RPC tracker answers at 127.0.0.1"),
])
def test_rpc_tuning_refusals_name_the_culprit(tmp_path, mlp_path, profile, trials, rpc, message):
    with pytest.raises(CompileError, match=re.escape(message)):
        compile_bundle(mlp_path, load_profile(profile), tmp_path / "b", name="m", version="1",
                       tune_trials=trials, rpc=rpc)
    assert not (tmp_path / "b").exists()


def test_readme_tvm_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    (snippet,) = re.findall(r"```py\n(.*?)```", readme, re.S)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["aarch64 cpu (cortex-a76) False",
                                          "('cubin sm_87', 'ptx compute_87')", "True"]
    devices = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S)
                   if "edgerun devices" in b)
    for line in devices.splitlines():
        command = line.split("#")[0].split()
        result = edgerun(*command[1:])
        assert result.returncode == 0 and "jetson-orin" in result.stdout
