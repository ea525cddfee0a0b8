"""What runs is what was verified: a bundle folder changed after `Bundle.open` (and its
signature check) is refused, or served as it was verified; never as it was changed.

Each test opens a real bundle, changes the folder the way someone who can write a repository
folder would (a file renamed over the verified one), then calls the next public step.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

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
