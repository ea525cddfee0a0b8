"""What runs is what was verified: a bundle folder changed after `Bundle.open` (and its
signature check) is refused, or served as it was verified; never as it was changed.

Each test opens a real bundle, changes the folder the way someone who can write a repository
folder would (a file renamed over the verified one), then calls the next public step.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgerun.devices import load_profile
from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, BundleError, Model, create_bundle
from edgerun.runtime.bundle import FileEntry, sha256_file, write_manifest
from edgerun.runtime.signing import generate_keys, load_public_key, sign_folder, verify_folder
from tests.tflite_models import int8_dense_tflite

X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    return private, load_public_key(public)


def swap(path: Path, data: bytes) -> None:
    """Replace a file as a writer of the folder would: a new file renamed over it."""
    temporary = path.with_name(f".{path.name}.swap")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def answer(model: bytes | str, x: np.ndarray = X) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def relist(folder: Path) -> Bundle:
    """Rewrite the manifest's entries for every file now in `folder` (as whoever made an
    unsigned bundle would) and open it."""
    manifest = Bundle.open(folder, verify=False).manifest
    files = {p.relative_to(folder).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
             for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in ("manifest.json", "signature.sig")}
    write_manifest(folder, dataclasses.replace(manifest, files=files))
    return Bundle.open(folder)


# ---------------------------------------------------------------- ONNX Runtime
def test_an_onnx_model_swapped_after_the_signature_check_is_refused(make_bundle, keys):
    private, public = keys
    signed_model, other_model = mlp_onnx([8, 16, 4], seed=1), mlp_onnx([8, 16, 4], seed=2)
    signed = make_bundle(signed_model, name="m")
    sign_folder(signed.path, private)

    bundle = Bundle.open(signed.path)  # every hash checked
    assert verify_folder(bundle, [public]) == public.key_id  # and the signature
    swap(bundle.model_path, other_model)  # then, before the backend loads it
    assert not np.allclose(answer(str(bundle.model_path)), answer(signed_model))  # it matters
    with pytest.raises(BundleError, match="model.onnx changed after the bundle was verified"):
        Model.load(bundle)

    # swapped after the load: the model keeps serving the bytes that were verified
    swap(bundle.model_path, signed_model)
    model = Model.load(bundle)
    swap(bundle.model_path, other_model)
    np.testing.assert_allclose(model.predict({"x": X})["y"], answer(signed_model), rtol=1e-5)
    model.close()


def test_a_cpu_session_keeps_no_second_copy_of_the_model_bytes(make_bundle):
    """ONNX Runtime's wrapper holds the bytes a session was made from (to make it again on
    the CPU after a provider fails); a CPU session lets them go, its own copy is what runs."""
    bundle = make_bundle(mlp_onnx([8, 256, 256, 4]), name="m")
    model = Model.load(bundle, "cpu")
    size = bundle.manifest.files["model.onnx"].size
    held = gc.get_referents(model.backend.session)  # its attributes (or its __dict__)
    held += gc.get_referents(*held)
    assert not [o for o in held if isinstance(o, bytes) and len(o) == size]
    np.testing.assert_allclose(model.predict({"x": X})["y"],
                               answer(mlp_onnx([8, 256, 256, 4])), rtol=1e-5)
    model.close()


@pytest.mark.skipif("AzureExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a provider besides the CPU in this ONNX Runtime build")
def test_sessions_that_keep_the_model_bytes_share_one_copy(make_bundle):
    """A session on a provider besides the CPU (CUDA, TensorRT; here the Azure provider the
    PyPI wheel has) keeps the bytes it was made from, to fall back to the CPU; instances of
    one version (cloud GPU profiles serve two) keep one copy between them, not one each."""
    bundle = make_bundle(mlp_onnx([8, 64, 4]), name="m")
    profile = load_profile("cpu").replace(
        execution_providers=("AzureExecutionProvider", "CPUExecutionProvider"))
    first, second = Model.load(bundle, profile), Model.load(bundle, profile)
    assert first.describe()["providers"][0] == "AzureExecutionProvider"
    kept = first.backend.session._model_bytes
    shared = kept is not None and second.backend.session._model_bytes is kept
    assert shared, "each session keeps a copy of the model of its own"
    np.testing.assert_allclose(second.predict({"x": X})["y"], answer(mlp_onnx([8, 64, 4])),
                               rtol=1e-5)
    first.close()
    second.close()


def external_data_bundle(make_bundle, seed: int = 3, location: str = "model.onnx.data"
                         ) -> tuple[Bundle, bytes]:
    """A bundle whose model.onnx keeps its weights in `location` beside it (as models over
    2 GB must), the manifest listing both; and the model's self-contained bytes."""
    source = mlp_onnx([8, 16, 4], seed=seed)
    bundle = make_bundle(source, name="m")
    onnx.save_model(onnx.load_from_string(source), bundle.model_path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    if location != "model.onnx.data":  # named as written: onnx itself refuses to write "../"
        proto = onnx.load(bundle.model_path, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        bundle.model_path.write_bytes(proto.SerializeToString())
        (bundle.path / "model.onnx.data").unlink()
    return relist(bundle.path), source


def test_external_data_is_read_verified_and_never_from_the_working_directory(
        make_bundle, tmp_path, monkeypatch):
    bundle, source = external_data_bundle(make_bundle)
    assert set(bundle.manifest.files) == {"model.onnx", "model.onnx.data", "golden.npz"}
    # from bytes, ONNX Runtime would look for the data file in the working directory
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "model.onnx.data").write_bytes(
        (bundle.path / "model.onnx.data").read_bytes()[::-1])
    monkeypatch.chdir(elsewhere)
    model = Model.load(bundle)
    np.testing.assert_allclose(model.predict({"x": X})["y"], answer(source), rtol=1e-5)
    model.check_golden()
    model.close()


def test_an_external_data_file_swapped_after_verification_is_refused(make_bundle):
    bundle, _ = external_data_bundle(make_bundle)
    data = bundle.path / "model.onnx.data"
    swap(data, np.frombuffer(data.read_bytes(), np.float32)[::-1].tobytes())
    with pytest.raises(BundleError, match="model.onnx.data changed after the bundle was verif"):
        Model.load(bundle)


@pytest.mark.parametrize("location, message", [
    ("weights.bin", "the bundle's manifest does not list 'weights.bin'"),
    ("../weights.bin", "not a file beside the model in the bundle"),
])
def test_external_data_outside_the_manifest_is_refused_naming_it(make_bundle, tmp_path,
                                                                 monkeypatch, location, message):
    bundle, _ = external_data_bundle(make_bundle, location=location)
    assert set(bundle.manifest.files) == {"model.onnx", "golden.npz"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 4096)  # where bytes would be looked for
    with pytest.raises(BundleError, match=message):
        Model.load(bundle)


def function_default_external_model(location: str) -> bytes:
    """A model whose local function F(x) = x + Constant(value_ref=val) gives `val` a default
    tensor kept in the file `location` (FunctionProto.attribute_proto)."""
    constant = helper.make_node("Constant", [], ["c"])
    constant.attribute.append(onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR,
                                                  ref_attr_name="val"))
    function = helper.make_function("custom", "F", ["x"], ["y"], [
        constant, helper.make_node("Add", ["x", "c"], ["y"])], [helper.make_opsetid("", 17)])
    default = onnx.TensorProto(name="val", data_type=TensorProto.FLOAT, dims=[8],
                               data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        default.external_data.add(key=key, value=value)
    function.attribute_proto.append(helper.make_attribute("val", default))
    graph = helper.make_graph([helper.make_node("F", ["x"], ["y"], domain="custom")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    model.ir_version = 9
    return model.SerializeToString()


@pytest.mark.parametrize("location, message", [
    ("/etc/hostname", "not a file beside the model in the bundle"),
    ("../secret.bin", "not a file beside the model in the bundle"),
    ("weights.bin", "the bundle's manifest does not list 'weights.bin'")])
def test_external_data_of_a_function_attributes_default_is_found(make_bundle, location, message):
    """A function's attribute defaults can keep their data in a file too; they were not
    looked at, so an ONNX Runtime without its own path check (before 1.24) read any file of
    the host named there into the model, and the answers gave its bytes back."""
    from edgerun.runtime.backends.onnxruntime import external_data_files

    model = function_default_external_model(location)
    assert external_data_files(model, "model.onnx") == {location: True}
    bundle = make_bundle(mlp_onnx([8, 16, 4], seed=3), name="m")
    bundle.model_path.write_bytes(model)
    with pytest.raises(BundleError, match=message):
        Model.load(relist(bundle.path))


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "outputs": []},
     r"output 'y': the model has it, the manifest does not list it"),
    (lambda m: {**m, "inputs": [{**m["inputs"][0], "dtype": "int64"}]},
     r"input 'x' is int64 of rank 2 in the manifest, float32 of rank 2 in the model"),
    (lambda m: {**m, "inputs": [{**m["inputs"][0], "name": "pixels"}]},
     r"input 'pixels': the manifest lists it, the model has no such tensor")])
def test_a_manifest_that_disagrees_with_its_model_is_refused(make_bundle, edit, message):
    """Requests are checked against the manifest and the golden check compares the outputs it
    lists: a manifest listing no outputs made the golden check compare nothing, and a wrong
    dtype let requests through to fail inside ONNX Runtime (a 500, not a 400)."""
    bundle = make_bundle(mlp_onnx([8, 16, 4], seed=3), name="m")
    manifest = bundle.path / "manifest.json"
    manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    with pytest.raises(BundleError, match=message):
        Model.load(bundle.path)


def test_an_output_whose_rank_only_constant_folding_finds_loads(make_bundle, tmp_path):
    """`bundle create` reads outputs unoptimized: an output of a Squeeze whose axes are computed
    has no rank there (reported as rank 0), and one once constants are folded at load. The
    manifest check compared ranks and refused every such bundle."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["axes"]),
         helper.make_node("Squeeze", ["x", "axes"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "a"),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    bundle = make_bundle(model.SerializeToString(), name="squeeze")
    assert Bundle.open(bundle.path).signature.outputs[0].shape == ()
    loaded = Model.load(bundle.path)
    loaded.check_golden()
    assert loaded.predict({"x": np.ones((3, 1, 4), np.float32)})["y"].shape == (3, 4)
    loaded.close()


# ---------------------------------------------------------------- golden sample
def test_a_golden_sample_swapped_after_verification_is_refused(make_bundle):
    bundle = make_bundle(mlp_onnx([8, 16, 4], seed=1), name="m")
    other = make_bundle(mlp_onnx([8, 16, 4], seed=2), name="m")
    opened = Bundle.open(bundle.path)
    swap(opened.path / "golden.npz", (other.path / "golden.npz").read_bytes())
    with pytest.raises(BundleError, match="golden.npz changed after the bundle was verified"):
        opened.golden()


# ---------------------------------------------------------------- signatures
def test_the_signature_is_checked_over_the_manifest_the_bundle_holds(make_bundle, keys,
                                                                      tmp_path):
    """Opened while the folder held an unsigned bundle (consistent hashes are no trust), then
    the signed manifest and signature put in place for the check: the check must be of the
    manifest the bundle holds, whose hashes its files are held to."""
    private, public = keys
    signed = make_bundle(mlp_onnx([8, 16, 4], seed=1), name="m")
    sign_folder(signed.path, private)
    assert verify_folder(signed, [public]) == public.key_id  # as made: its written bytes
    assert verify_folder(Bundle.open(signed.path), [public]) == public.key_id
    unsigned = make_bundle(mlp_onnx([8, 16, 4], seed=2), name="m")
    folder = tmp_path / "repository" / "m" / "1"
    shutil.copytree(unsigned.path, folder)

    bundle = Bundle.open(folder)
    for name in ("manifest.json", "signature.sig"):
        swap(folder / name, (signed.path / name).read_bytes())
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_folder(bundle, [public])
    # a Bundle made without reading a manifest is held to the file, which must match it
    with pytest.raises(BundleError, match="not the manifest the bundle holds"):
        verify_folder(Bundle(folder, bundle.manifest), [public])


# ---------------------------------------------------------------- TFLite
def dense(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return int8_dense_tflite(rng.uniform(-1, 1, (4, 8)).astype(np.float32),
                             np.zeros(4, np.float32))


def tflite_bundle(tmp_path: Path, seed: int = 1) -> Bundle:
    source = tmp_path / f"dense{seed}.tflite"
    source.write_bytes(dense(seed))
    return create_bundle(source, tmp_path / f"tflite{seed}", name="dense", version="1")


def test_a_tflite_model_swapped_after_verification_is_refused(tmp_path):
    bundle = Bundle.open(tflite_bundle(tmp_path).path)
    swap(bundle.model_path, dense(2))
    with pytest.raises(BundleError, match="model.tflite changed after the bundle was verified"):
        Model.load(bundle)


def test_tflite_interpreters_made_later_run_the_verified_model(tmp_path):
    """The interpreter pool grows under concurrent calls, long after the load: each new
    interpreter is made from the verified bytes, not from the file as it is by then."""
    bundle = Bundle.open(tflite_bundle(tmp_path).path)
    model = Model.load(bundle, intra_op_threads=1, instances=8)
    expected = model.predict({"x": X})["y"]
    swap(bundle.model_path, dense(2))
    wrong: list[np.ndarray] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(200):
            got = model.predict({"x": X})["y"]
            if not np.array_equal(got, expected):
                wrong.append(got)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(model.backend._idle) > 1, "the pool never grew; the test proves nothing"
    assert not wrong
    model.close()


def test_instances_of_one_bundle_share_the_verified_model_bytes(tmp_path):
    """Serving loads a version once per instance (`Model.load` each). From its path every
    LiteRT interpreter mapped the one file; from bytes, which LiteRT uses in place, each
    instance held a copy of its own: N instances, N copies of the model in memory."""
    bundle = Bundle.open(tflite_bundle(tmp_path).path)
    first, second = Model.load(bundle), Model.load(bundle)
    shared = first.backend._model is second.backend._model
    assert shared, "each instance holds a copy of the model of its own"
    np.testing.assert_array_equal(first.predict({"x": X})["y"], second.predict({"x": X})["y"])
    swap(bundle.model_path, dense(2))  # still read and checked on every load
    with pytest.raises(BundleError, match="model.tflite changed after the bundle was verified"):
        Model.load(bundle)
    first.close()
    second.close()


# ---------------------------------------------------------------- TVM
@pytest.fixture(scope="module")
def tvm_libraries(tmp_path_factory) -> tuple[Path, Path]:
    from edgerun.optimizers.tvm import compile_bundle

    folders = []
    for seed in (1, 2):
        work = tmp_path_factory.mktemp(f"tvm{seed}")
        (work / "m.onnx").write_bytes(mlp_onnx([8, 16, 4], seed=seed))
        compile_bundle(work / "m.onnx", load_profile("x86-64"), work / "b", name="m",
                       version="1", force=True)
        folders.append(work / "b")
    return folders[0], folders[1]


def test_a_tvm_library_swapped_after_verification_is_refused(tvm_libraries, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tvm_libraries[0], folder)
    bundle = Bundle.open(folder)
    swap(bundle.model_path, (tvm_libraries[1] / "model.so").read_bytes())
    with pytest.raises(BundleError, match="model.so changed after the bundle was verified"):
        Model.load(bundle, "x86-64")


def test_tvm_takes_the_manifest_the_bundle_holds_not_the_folders(tvm_libraries, tmp_path):
    """The TVM backend read the manifest (its tensor names, its target) from the folder again;
    a manifest swapped in after the check renamed what the model answers."""
    folder = tmp_path / "b"
    shutil.copytree(tvm_libraries[0], folder)
    bundle = Bundle.open(folder)
    manifest = folder / "manifest.json"
    swap(manifest, manifest.read_bytes().replace(b'"name": "y"', b'"name": "z"'))
    model = Model.load(bundle, "x86-64")
    assert set(model.predict({"x": X})) == {"y"}
    model.check_golden()
    model.close()


# ---------------------------------------------------------------- what loading needs
def nested_external_bundle(make_bundle, listed: bool = True) -> tuple[Bundle, np.ndarray]:
    """A bundle whose weights live only inside an If node's branches, each in a file of its
    own (`w_then`, `w_else`); the manifest lists both, or with `listed` False only `w_then`
    (the branch taken). Returns it with the weight the taken branch multiplies by."""
    from onnx import numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    w = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)

    def branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])], name, [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["batch", 4])],
            [numpy_helper.from_array(weight, f"w_{name}")])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", w),
                          else_branch=branch("else", -w))], "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(True), "cond")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    bundle = make_bundle(proto.SerializeToString(), name="m")
    convert_model_to_external_data(proto, all_tensors_to_one_file=False, size_threshold=100)
    onnx.save_model(proto, bundle.model_path)  # writes w_then and w_else beside it
    assert sorted(p.name for p in bundle.path.iterdir()) == [
        "golden.npz", "manifest.json", "model.onnx", "w_else", "w_then"]
    if not listed:
        (bundle.path / "w_else").unlink()
    return relist(bundle.path), w


def test_external_data_inside_subgraphs_is_found_and_handed_over(make_bundle, tmp_path,
                                                                  monkeypatch):
    """ONNX Runtime reads a subgraph's external data from its folder, never from memory:
    loaded from bytes such a model failed ("Data of TensorProto ... should be stored in
    <the empty folder>"), though it loaded from its path."""
    bundle, w = nested_external_bundle(make_bundle)
    monkeypatch.chdir(tmp_path)
    for name in ("w_then", "w_else"):  # where a model from bytes would look: never read
        (tmp_path / name).write_bytes((bundle.path / name).read_bytes()[::-1])
    model = Model.load(bundle)
    np.testing.assert_allclose(model.predict({"x": X})["y"], X @ w, rtol=1e-5)
    model.close()
    unlisted, _ = nested_external_bundle(make_bundle, listed=False)
    with pytest.raises(BundleError, match="does not list 'w_else'"):
        Model.load(unlisted)


def test_loading_a_bundle_never_imports_onnx(make_bundle, tmp_path):
    """The one-file device binary leaves the onnx package out (`edgerun build daemon`); a
    model with external data, or whose bytes merely contain "location" (here its doc string),
    must load without it. It failed there with "No module named 'onnx'"."""
    from edgerun.devices.daemon_build import EXCLUDES

    assert "onnx" in EXCLUDES
    external, _ = external_data_bundle(make_bundle)
    nested, _ = nested_external_bundle(make_bundle)
    proto = onnx.load_from_string(mlp_onnx([8, 16, 4], seed=4))
    proto.doc_string = "boxes by location"
    worded = make_bundle(proto.SerializeToString(), name="m")
    script = ("import sys\nfrom edgerun.runtime import Model\n"
              "for path in sys.argv[1:]:\n    Model.load(path).check_golden()\n"
              "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')))")
    result = subprocess.run([sys.executable, "-c", script, str(external.path), str(nested.path),
                             str(worded.path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_ort_format_model_loads_as_the_ort_format(make_bundle, tmp_path):
    """A bundle's model may be an ORT-format file (`model.ort`): from a path, ONNX Runtime
    reads the format from the name; from bytes it must be told, not told "ONNX"."""
    bundle = make_bundle(mlp_onnx([8, 16, 4], seed=6), name="m")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(bundle.path / "model.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(bundle.model_path), options, providers=["CPUExecutionProvider"])
    bundle.model_path.unlink()
    manifest = Bundle.open(bundle.path, verify=False).manifest
    write_manifest(bundle.path, dataclasses.replace(manifest, model_file="model.ort"))
    bundle = relist(bundle.path)
    assert set(bundle.manifest.files) == {"model.ort", "golden.npz"}
    model = Model.load(bundle)
    model.check_golden()
    np.testing.assert_allclose(model.predict({"x": X})["y"], answer(mlp_onnx([8, 16, 4], seed=6)),
                               rtol=1e-5)
    model.close()


def test_tensorrt_engines_are_cached_per_model(monkeypatch):
    """ONNX Runtime names a cached TensorRT engine by the graph's names, not its weights: two
    versions of one graph shared a cache path, and the new one could run the old one's
    engine. The cache path is the model's own (its sha256). TensorRT is not in this build, so
    the provider list is asked as a build that has it would be."""
    import onnxruntime as ort

    from edgerun.devices import load_profile
    from edgerun.runtime.backends.onnxruntime import providers_for

    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    jetson = load_profile("jetson-orin")
    assert "TensorrtExecutionProvider" in jetson.execution_providers
    paths = set()
    for sha in ("a" * 64, "b" * 64):
        options = dict(p for p in providers_for(jetson, sha) if isinstance(p, tuple))
        paths.add(options["TensorrtExecutionProvider"]["trt_engine_cache_path"])
    assert len(paths) == 2 and all(path.endswith(("a" * 32, "b" * 32)) for path in paths)
