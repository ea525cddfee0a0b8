"""Model: predictions equal a bare ONNX Runtime session; options come from profiles or arguments."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edgerun.devices import DeviceProfile, load_profile
from edgerun.runtime import BundleError, InferenceError, InvalidInput, Model
from edgerun.runtime.backends.cpus import cgroup_quota, cpu_limit
from edgerun.runtime.backends.onnxruntime import providers_for
from tests.helpers import gather_onnx, masked_sum_onnx, two_input_onnx


def test_predict_equals_bare_onnxruntime(mlp_bundle, mlp_model):
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    bare = ort.InferenceSession(str(mlp_bundle.model_path), providers=["CPUExecutionProvider"])
    expected = bare.run(None, {"x": x})[0]
    got = mlp_model.predict({"x": x})
    assert list(got) == ["y"]
    np.testing.assert_allclose(got["y"], expected, rtol=1e-6)


def test_predict_async_matches_predict(mlp_model):
    x = np.ones((3, 8), np.float32)
    got = asyncio.run(mlp_model.predict_async({"x": x}))
    np.testing.assert_array_equal(got["y"], mlp_model.predict({"x": x})["y"])


def test_two_inputs_with_lossless_casts(make_bundle):
    model = Model.load(make_bundle(two_input_onnx()))
    out = model.predict({"a": [[0.5, 1, 2, 3]], "b": [[1, 2, 3, 4]]})["out"]
    np.testing.assert_array_equal(out, np.float32([[1.5, 3, 5, 7]]))
    with pytest.raises(InvalidInput, match="input 'b': expected int32, got float64"):
        model.predict({"a": [[0, 0, 0, 0]], "b": [[0.5, 0, 0, 0]]})


def test_validation_happens_before_anything_runs(make_bundle):
    model = Model.load(make_bundle(two_input_onnx()))
    calls = []
    model._run = lambda arrays: calls.append(arrays)  # noqa: SLF001 - observe the backend
    with pytest.raises(InvalidInput, match="missing input 'b'"):
        model.predict({"a": np.zeros((1, 4), np.float32)})
    assert calls == []


def test_backend_failure_is_a_typed_error_naming_the_model(make_bundle):
    model = Model.load(make_bundle(gather_onnx(), name="lookup"))
    np.testing.assert_array_equal(model.predict({"idx": [2]})["rows"], [[6, 7, 8]])
    with pytest.raises(InferenceError, match="model 'lookup' version 1"):
        model.predict({"idx": [99]})


def test_dims_the_model_names_alike_must_agree_before_anything_runs(make_bundle):
    # ONNX Runtime does not check them: a mask one long was broadcast over the whole sequence
    # (a plausible answer to a request nobody sent), a shorter one failed inside the Mul as an
    # InferenceError (a 500) naming no input
    model = Model.load(make_bundle(masked_sum_onnx()))
    x = np.float32([[1, 2, 3, 4]])
    np.testing.assert_array_equal(model.predict({"x": x, "mask": [[1, 1, 0, 0]]})["total"], [3])
    for mask in ([[1]], [[1, 1, 1]]):
        with pytest.raises(InvalidInput, match=r"input 'mask': dim 1 \('seq'\) is \d, but input "
                                               r"'x' dim 1 \('seq'\) is 4") as caught:
            model.predict({"x": x, "mask": mask})
        assert caught.value.tensor == "mask"
    np.testing.assert_array_equal(model.predict({"x": x, "mask": [[0, 0, 1, 1]]})["total"], [7])
    model.close()


def test_session_options_follow_arguments(mlp_bundle):
    model = Model.load(mlp_bundle, intra_op_threads=1, graph_optimization_level="basic")
    options = model.backend.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert model.describe()["providers"] == ["CPUExecutionProvider"]


def test_session_options_follow_a_device_profile(mlp_bundle):
    model = Model.load(mlp_bundle, "raspberry-pi-5")
    options = model.backend.session.get_session_options()
    assert options.intra_op_num_threads == 4
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert model.device.name == "raspberry-pi-5"


def cgroups(tmp_path, membership: str, files: dict[str, str]):
    """A cgroup tree as the kernel lays it out, and this process's /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "self").write_text(membership)
    return root, tmp_path / "self"


@pytest.mark.parametrize("membership, files, quota", [
    # v2 in a pod: the pod's 1.5 CPUs bound the container's unlimited cgroup
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/cpu.max": "150000 100000\n",
                                "kubepods/pod1/c1/cpu.max": "max 100000\n"}, 1.5),
    # v2 in a cgroup namespace (a container's own view)
    ("0::/\n", {"cpu.max": "300000 100000\n"}, 3.0),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v1 (Docker on an older host)
    ("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
])
def test_a_containers_cpu_quota_is_read_from_its_cgroup(tmp_path, membership, files, quota):
    assert cgroup_quota(*cgroups(tmp_path, membership, files)) == quota


def test_onnx_runtime_threads_follow_the_cpus_a_container_leaves(mlp_bundle, tmp_path):
    """ONNX Runtime's default (0) sizes its pool to the host's physical cores, blind to a
    container's limit: a pod limited to 2 CPUs on a 64-core node ran dozens of threads,
    throttled in every period. A quota below one CPU still gets one thread."""
    machine = os.cpu_count() or 1
    root, membership = cgroups(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert cpu_limit(root, membership) == (1 if machine > 1 else None)
    script = (f"import os; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
              f"from edgerun.runtime import Model; "
              f"m = Model.load({str(mlp_bundle.path)!r}, 'cpu'); "
              f"print(m.backend.session.get_session_options().intra_op_num_threads)")
    threads = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout.split()[-1]
    assert int(threads) == (1 if machine > 1 else 0)  # pinned to one CPU: one thread


def test_accelerators_first_when_present_cpu_otherwise():
    profile = load_profile("jetson-orin")
    chosen = providers_for(profile)
    available = ort.get_available_providers()
    names = [p if isinstance(p, str) else p[0] for p in chosen]
    assert names[-1] == "CPUExecutionProvider"
    assert names == [p for p in profile.execution_providers if p in available]
    gpu = DeviceProfile("fake", execution_providers=("CUDAExecutionProvider",
                                                     "CPUExecutionProvider"))
    if "CUDAExecutionProvider" not in available:
        assert providers_for(gpu) == ["CPUExecutionProvider"]


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="jetson-orin"):
        load_profile("no-such-device")


def test_golden_check_detects_a_wrong_build(mlp_bundle, make_bundle):
    from edgerun.examples import mlp_onnx

    Model.load(mlp_bundle).check_golden()
    other = make_bundle(mlp_onnx([8, 16, 4], seed=7), name="other")
    # serve the other weights against this bundle's golden sample
    impostor = Model(mlp_bundle, Model.load(other).backend, load_profile())
    with pytest.raises(BundleError, match="golden check: output 'y' differs"):
        impostor.check_golden()


def test_the_golden_check_allows_what_reduced_precision_differs_by(make_bundle):
    # an fp16 or int8 bundle, or one served by a GPU provider, differs from the build host's
    # output by more than fp32 on a CPU does; a smoke test that fails it rolls back an OTA
    import dataclasses

    from edgerun.examples import mlp_onnx
    from edgerun.runtime.bundle import GOLDEN, FileEntry, sha256_file, write_manifest
    from edgerun.runtime.model import CLOSE_TOLERANCE, LOOSE_TOLERANCE

    plain = make_bundle(mlp_onnx([8, 16, 4]))
    reduced = make_bundle(mlp_onnx([8, 16, 4]), optimizations=("quantize:fp16",))
    for bundle in (plain, reduced):  # the build's claim, 0.5 % off (as fp16 kernels may be)
        path = bundle.path / GOLDEN
        with np.load(path) as golden:
            arrays = dict(golden)
        np.savez(path, **{**arrays, "output_0": arrays["output_0"] * 1.005})
        files = {**bundle.manifest.files, GOLDEN: FileEntry(sha256_file(path),
                                                            path.stat().st_size)}
        write_manifest(bundle.path, dataclasses.replace(bundle.manifest, files=files))
    plain, reduced = plain.path, reduced.path  # opened (and verified) again by Model.load
    assert Model.load(plain).golden_tolerance() == CLOSE_TOLERANCE
    with pytest.raises(BundleError, match="golden check: output 'y' differs"):
        Model.load(plain).check_golden()
    assert Model.load(reduced).golden_tolerance() == LOOSE_TOLERANCE
    Model.load(reduced).check_golden()
    with pytest.raises(BundleError, match="differs"):  # tolerances given are used
        Model.load(reduced).check_golden(rtol=1e-3, atol=1e-4)
