"""Bundles: round trip, every hash verified on load, hostile archives rejected."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, BundleError, Model, archive, create_bundle
from edgerun.runtime.bundle import FileEntry, sha256_file, write_manifest
from edgerun.runtime.sources import BundleSource
from tests.helpers import identity_onnx


def test_create_writes_signature_hashes_and_golden(mlp_bundle):
    manifest = json.loads((mlp_bundle.path / "manifest.json").read_text())
    assert manifest["name"] == "mlp" and manifest["version"] == "1"
    assert manifest["backend"] == "onnxruntime"
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 8],
                                   "batch_axis": 0}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1, 4],
                                    "batch_axis": 0}]
    assert set(manifest["files"]) == {"model.onnx", "golden.npz"}
    for name, entry in manifest["files"].items():
        path = mlp_bundle.path / name
        assert entry == {"sha256": sha256_file(path), "size": path.stat().st_size}
    assert len(manifest["created"]["source_sha256"]) == 64
    inputs, outputs = mlp_bundle.golden()
    assert inputs["x"].shape == (1, 8) and outputs["y"].shape == (1, 4)


def test_golden_input_is_deterministic(make_bundle):
    first = make_bundle(mlp_onnx([8, 16, 4]))
    second = make_bundle(mlp_onnx([8, 16, 4]))
    assert (first.path / "golden.npz").read_bytes() == (second.path / "golden.npz").read_bytes()


def test_a_pinned_source_date_epoch_makes_the_same_bundle_twice(tmp_path, monkeypatch):
    """The manifest's created_at was always now: the same model built twice gave two
    manifests, two archives and two signatures. SOURCE_DATE_EPOCH pins it."""
    source = tmp_path / "m.onnx"
    source.write_bytes(mlp_onnx([4, 8, 3]))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    built = [create_bundle(source, tmp_path / f"b{i}", name="m", version="1")
             .pack(tmp_path / f"b{i}.tar.gz").read_bytes() for i in (1, 2)]
    assert built[0] == built[1]
    manifest = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert manifest["created"]["created_at"] == "2023-11-14T22:13:20+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH must be whole seconds"):
        create_bundle(source, tmp_path / "b3", name="m", version="1")
    assert not (tmp_path / "b3").exists()


def test_fixed_batch_model_is_not_batchable(make_bundle):
    bundle = make_bundle(identity_onnx("float32", [1, 3]))
    assert bundle.signature.inputs[0].batch_axis is None
    assert not bundle.signature.batchable


def test_round_trip_through_tar_gz(mlp_bundle, tmp_path):
    packed = mlp_bundle.pack(tmp_path / "mlp.tar.gz")
    again = mlp_bundle.pack(tmp_path / "again.tar.gz")
    assert packed.read_bytes() == again.read_bytes(), "packing is deterministic"
    with Bundle.open(packed) as opened:
        assert opened.manifest == mlp_bundle.manifest
        Model.load(opened).check_golden()
        extracted = opened.path
    assert not extracted.exists(), "the temporary extraction is cleaned up"


def test_round_trip_through_zip(mlp_bundle, tmp_path):
    packed = mlp_bundle.pack(tmp_path / "mlp.zip")
    assert zipfile.is_zipfile(packed)
    assert packed.read_bytes() == mlp_bundle.pack(tmp_path / "again.zip").read_bytes()
    with Bundle.open(packed) as opened:
        assert opened.manifest == mlp_bundle.manifest
        Model.load(opened).check_golden()
    assert BundleSource(packed).version == "1"


@pytest.mark.parametrize("command", [
    ["tar", "-C", "{folder}", "-czf", "{archive}.tar.gz", "."],  # a ./ root member first
    ["tar", "-C", "{folder}", "-cf", "{archive}.tar", "."],
    ["zip", "-qrX", "{archive}.zip", "."],  # run in the folder; folder entries too
])
def test_archives_that_tar_and_zip_write_open(mlp_bundle, tmp_path, command):
    stem = tmp_path / "made"
    argv = [part.format(folder=mlp_bundle.path, archive=stem) for part in command]
    subprocess.run(argv, check=True, cwd=mlp_bundle.path)
    (made,) = tmp_path.glob("made.*")
    with Bundle.open(made) as opened:
        Model.load(opened).check_golden()
    assert BundleSource(made).version == "1"


def test_tampered_model_file_fails_its_hash(mlp_bundle):
    model = mlp_bundle.path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        Bundle.open(mlp_bundle.path)


def test_truncated_file_fails_its_size(mlp_bundle):
    golden = mlp_bundle.path / "golden.npz"
    golden.write_bytes(golden.read_bytes()[:-10])
    with pytest.raises(BundleError, match="golden.npz is .* bytes, manifest says"):
        Bundle.open(mlp_bundle.path)


def test_missing_file_and_unlisted_file_are_refused(mlp_bundle):
    (mlp_bundle.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="files not in the manifest: extra.bin"):
        Bundle.open(mlp_bundle.path)
    (mlp_bundle.path / "extra.bin").unlink()
    (mlp_bundle.path / "golden.npz").unlink()
    with pytest.raises(BundleError, match="golden.npz is missing"):
        Bundle.open(mlp_bundle.path)


def test_symlinked_model_file_is_refused(mlp_bundle, tmp_path):
    model = mlp_bundle.path / "model.onnx"
    outside = tmp_path / "outside.onnx"
    model.rename(outside)
    model.symlink_to(outside)
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.open(mlp_bundle.path)


def test_a_folder_reached_through_a_link_is_refused(mlp_bundle, tmp_path):
    """Only the last part of a listed name was checked for a link: `sub -> elsewhere` passed
    `bundle verify`, read files from outside the bundle, and `bundle pack` left it out, so
    the archive failed its own check; an unlisted `root -> /` passed too."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"weights")
    (mlp_bundle.path / "sub").symlink_to(outside, target_is_directory=True)
    files = {**mlp_bundle.manifest.files,
             "sub/data.bin": FileEntry(sha256_file(outside / "data.bin"), 7)}
    write_manifest(mlp_bundle.path, dataclasses.replace(mlp_bundle.manifest, files=files))
    with pytest.raises(BundleError, match="sub/data.bin lies under sub, a link"):
        Bundle.open(mlp_bundle.path)
    with pytest.raises(BundleError, match="only regular files can be packed"):
        archive.pack(mlp_bundle.path, tmp_path / "b.tar.gz")
    (mlp_bundle.path / "sub").unlink()
    (mlp_bundle.path / "sub").mkdir()
    (mlp_bundle.path / "sub" / "data.bin").write_bytes(b"weights")
    Bundle.open(mlp_bundle.path)  # the same file in a folder of its own is fine
    (mlp_bundle.path / "root").symlink_to("/", target_is_directory=True)
    with pytest.raises(BundleError, match="files not in the manifest: root"):
        Bundle.open(mlp_bundle.path)


class _RunsCode:
    """Pickles to a call of os.mkdir: what a hostile golden.npz would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _with_golden(bundle: Bundle, **arrays) -> Bundle:
    """The bundle with another golden.npz, its manifest entry rewritten to match (a bundle
    made so, unsigned, opens and verifies), opened again."""
    np.savez(bundle.path / "golden.npz", **arrays)
    path = bundle.path / "golden.npz"
    files = {**bundle.manifest.files, "golden.npz": FileEntry(sha256_file(path),
                                                              path.stat().st_size)}
    write_manifest(bundle.path, dataclasses.replace(bundle.manifest, files=files))
    return Bundle.open(bundle.path)


def test_golden_sample_never_runs_code(make_bundle, tmp_path):
    """String tensors' golden arrays are pickles: only text may come out of them, even from a
    bundle nobody signed (`bundle verify` and `serve` run its golden sample)."""
    bundle = make_bundle(identity_onnx("string", ["b"]), name="text")
    Model.load(bundle.path).check_golden()  # the build's own text arrays load as before
    marker = tmp_path / "code-ran"
    hostile = np.empty(1, dtype=object)
    hostile[0] = _RunsCode(marker)
    with pytest.raises(BundleError, match="input_0 is not a readable array .*not allowed"):
        _with_golden(bundle, input_0=hostile, output_0=hostile).golden()
    assert not marker.exists()
    with pytest.raises(BundleError, match="input_0 holds objects other than text"):
        _with_golden(bundle, input_0=np.array([1, 2], dtype=object),
                     output_0=np.array(["a"], dtype=object)).golden()
    with pytest.raises(BundleError, match="no output_0 array"):
        _with_golden(bundle, input_0=np.array(["a"], dtype=object)).golden()


def _golden_bytes(bundle: Bundle, members: dict[str, bytes]) -> Bundle:
    """`bundle` with golden.npz made of these raw members, listed again."""
    path = bundle.path / "golden.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as npz:
        for name, data in members.items():
            npz.writestr(name, data)
    files = {**bundle.manifest.files, "golden.npz": FileEntry(sha256_file(path),
                                                              path.stat().st_size)}
    write_manifest(bundle.path, dataclasses.replace(bundle.manifest, files=files))
    return Bundle.open(bundle.path)


def _npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """`array` as .npy bytes; `shape` is what its header declares instead, if given."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": array.dtype.str, "fortran_order": False,
                                               "shape": array.shape if shape is None else shape})
    return out.getvalue() + array.tobytes()


def test_a_golden_sample_that_would_unpack_past_its_limit_is_refused_before_it_is_read(
        mlp_bundle, monkeypatch):
    """numpy allocates what an array's header declares before it reads a byte: a 1 kB member
    declaring 2**45 int64 ended `bundle verify` in an untyped MemoryError (256 TiB), and a
    member of zeros compressed 1000 to 1 would be unpacked whole."""
    import edgerun.runtime.bundle as bundle_module

    output = _npy(np.zeros((1, 4), np.float32))
    liar = _golden_bytes(mlp_bundle, {"input_0.npy": _npy(np.zeros(1, np.int64), (2 ** 45,)),
                                      "output_0.npy": output})
    with pytest.raises(BundleError, match=r"input_0 declares shape \(35184372088832,\) of "
                                          r"int64 \(281,474,976,710,656 bytes\), more than it "
                                          r"holds"):
        liar.golden()
    monkeypatch.setattr(bundle_module, "GOLDEN_ARRAY_LIMIT", 1 << 20)
    bomb = _golden_bytes(mlp_bundle, {"input_0.npy": _npy(np.zeros((1, 1 << 18), np.float64)),
                                      "output_0.npy": output})
    assert bomb.path.joinpath("golden.npz").stat().st_size < 10_000
    with pytest.raises(BundleError, match=r"input_0 unpacks to 2,097,280 bytes from [0-9,]+, "
                                          r"over the golden sample's limit of 1,048,576 for a "
                                          r"compressed array"):
        bomb.golden()
    # stored, as bundle create writes it, a large sample costs its own size: it loads
    stored = mlp_bundle.path / "golden.npz"
    np.savez(stored, input_0=np.zeros((1, 1 << 18)), output_0=np.zeros((1, 4), np.float32))
    files = {**mlp_bundle.manifest.files, "golden.npz": FileEntry(sha256_file(stored),
                                                                  stored.stat().st_size)}
    write_manifest(mlp_bundle.path, dataclasses.replace(mlp_bundle.manifest, files=files))
    assert Bundle.open(mlp_bundle.path).golden()[0]["x"].shape == (1, 1 << 18)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must hold a JSON object"),
    (b'{"format": 1, "name": "m"}', "manifest is malformed: KeyError"),
    (b'{"format": 99}', "format 99 is not supported"),
    (b'{"format": true}', "format True is not supported"),
    (b'{"format": 1.0}', "format 1.0 is not supported"),
    # json parses recursively: a few kB of brackets was a RecursionError, no BundleError
    (b"[" * 100_000, "manifest.json: JSON nested too deep to be a manifest"),
    (b'{"created": ' * 100_000, "manifest.json: JSON nested too deep to be a manifest"),
])
def test_malformed_manifest(mlp_bundle, content, message):
    (mlp_bundle.path / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        Bundle.open(mlp_bundle.path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "nope")


@pytest.mark.parametrize("name, version, message", [
    ("../evil", "1", "bundle name"), ("ok", "v1", "bundle version"), ("ok", "1.2", "semver"),
    ("ok\n", "1", "bundle name"), ("ok", "1\n", "bundle version"),
])
def test_names_and_versions_are_checked(tmp_path, name, version, message):
    source = tmp_path / "m.onnx"
    source.write_bytes(mlp_onnx([2, 2]))
    with pytest.raises(BundleError, match=message):
        create_bundle(source, tmp_path / "out", name=name, version=version)


def test_an_input_of_unknown_rank_is_refused_naming_it(tmp_path, make_bundle):
    # ONNX Runtime reports no dims for it, which became a scalar spec refusing every request
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the checker wants a shape; exporters and ONNX Runtime do not
    source = tmp_path / "m.onnx"
    source.write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="m.onnx: input 'x' has no shape in the graph"):
        create_bundle(source, tmp_path / "out", name="m", version="1")
    scalar = make_bundle(identity_onnx("float32", []))  # a true scalar is still a scalar
    assert scalar.signature.inputs[0].shape == ()


def test_create_refuses_a_non_empty_output(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(mlp_onnx([2, 2]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        create_bundle(source, tmp_path / "out", name="m", version="1")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_create_with_a_user_golden_input(make_bundle):
    bundle = make_bundle(mlp_onnx([8, 16, 4]), golden_inputs={"x": [[1.0] * 8] * 3})
    inputs, outputs = bundle.golden()
    np.testing.assert_array_equal(inputs["x"], np.ones((3, 8), np.float32))
    assert outputs["y"].shape == (3, 4)


def test_create_refuses_a_model_onnxruntime_cannot_load(tmp_path):
    source = tmp_path / "broken.onnx"
    source.write_bytes(b"not a protobuf")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load it"):
        create_bundle(source, tmp_path / "out", name="m", version="1")
    assert not (tmp_path / "out").exists()


def external_data_model(folder: Path, location: str) -> Path:
    """`folder/big.onnx` (mlp_onnx([8, 16, 4])) keeping its weights in the file named
    `location` (ONNX external data, as models over 2 GB must), written beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "big.onnx"
    onnx.save_model(onnx.load_from_string(mlp_onnx([8, 16, 4])), source,
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.bin", size_threshold=0)
    if location != "big.bin":  # named as written: onnx itself refuses to write "../"
        proto = onnx.load(source, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        source.write_bytes(proto.SerializeToString())
        moved = (folder / location).resolve()
        moved.parent.mkdir(parents=True, exist_ok=True)
        (folder / "big.bin").rename(moved)
    return source


def test_create_carries_the_models_external_data_files(tmp_path, make_bundle):
    """The data file stayed behind: the golden run, from the new folder, failed naming it
    there (`External data path does not exist: .../out/big.bin`)."""
    source = external_data_model(tmp_path / "src", "weights/big.bin")
    bundle = create_bundle(source, tmp_path / "out", name="m", version="1")
    assert set(bundle.manifest.files) == {"model.onnx", "weights/big.bin", "golden.npz"}
    assert (bundle.path / "weights" / "big.bin").read_bytes() == \
        (tmp_path / "src" / "weights" / "big.bin").read_bytes()
    model = Model.load(Bundle.open(bundle.path))
    inline = Model.load(make_bundle(mlp_onnx([8, 16, 4])))
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(model.predict({"x": x})["y"], inline.predict({"x": x})["y"],
                               rtol=1e-6)
    model.check_golden()
    model.close()
    inline.close()


@pytest.mark.parametrize("location, message", [
    ("big.bin", r"big.onnx: its tensor data file .*src/big.bin does not exist"),
    ("../outside.bin", "big.onnx: tensor data in '../outside.bin': not a file beside the model"),
    ("model.onnx", "big.onnx: tensor data in 'model.onnx': a file the bundle makes itself"),
])
def test_create_refuses_external_data_it_cannot_carry_naming_it(tmp_path, location, message):
    source = external_data_model(tmp_path / "src", location)
    if location == "big.bin":
        (tmp_path / "src" / "big.bin").unlink()
    with pytest.raises(BundleError, match=message):
        create_bundle(source, tmp_path / "out", name="m", version="1")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- hostile archives
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _folder(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, message", [
    ([_file("../x")], "escapes the bundle folder"),
    ([_file("a/../../x")], "escapes the bundle folder"),
    ([_file("/etc/passwd")], "absolute path"),
    ([_link("model.onnx", "/etc/passwd", tarfile.SYMTYPE)], "is a link"),
    ([_file("a"), _link("b", "a", tarfile.LNKTYPE)], "is a link"),
    ([_link("dev", "", tarfile.CHRTYPE)], "not a regular file"),
    ([_file("a"), _file("./a")], "appears twice"),
    ([_file("a"), _file("a/b")], "'a/b' is inside 'a', which is a file"),
    ([_file("a/b"), _file("a")], "'a' is a file where other members need a folder"),
    ([_file("")], "has no name"),
    # a name too long for the file system: refused for a file, an OSError for a folder
    ([_folder("a" * 300)], "'a{300}' cannot be written \\(File name too long\\)"),
    ([_folder("/".join(["b" * 200] * 30))], "cannot be written"),
])
def test_hostile_members_are_rejected(tmp_path, members, message):
    hostile = _tar(tmp_path / "hostile.tar.gz", members)
    with pytest.raises(BundleError, match=message):
        archive.unpack(hostile, tmp_path / "out")
    assert not (tmp_path / "x").exists()
    with pytest.raises(BundleError, match=message):
        Bundle.open(hostile)


def _zip_entry(name: str, mode: int, data: bytes = b"x") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info, data


@pytest.mark.parametrize("entries, message", [
    ([_zip_entry("../x", stat.S_IFREG | 0o644)], "escapes the bundle folder"),
    ([_zip_entry("/x", stat.S_IFREG | 0o644)], "absolute path"),
    ([_zip_entry("model.onnx", stat.S_IFLNK | 0o777, b"/etc/passwd")], "is a link"),
    ([_zip_entry("fifo", stat.S_IFIFO | 0o644)], "not a regular file"),
    ([_zip_entry("a", 0o644), _zip_entry("a", 0o644)], "appears twice"),
])
def test_hostile_zip_entries_are_rejected(tmp_path, entries, message):
    hostile = tmp_path / "hostile.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(hostile, "w") as zip_file:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        for info, data in entries:
            zip_file.writestr(info, data)
    with pytest.raises(BundleError, match=message):
        Bundle.open(hostile)
    assert not (tmp_path / "x").exists()


def test_a_zip_name_that_is_not_utf8_is_a_bundle_error(tmp_path):
    """The UTF-8 flag on a name that is not UTF-8: a corrupt archive, named as one."""
    hostile = tmp_path / "hostile.zip"
    with zipfile.ZipFile(hostile, "w") as zip_file:
        zip_file.writestr("a\u00e9c", b"x")  # non-ASCII: zipfile sets the UTF-8 flag
    hostile.write_bytes(hostile.read_bytes().replace("a\u00e9c".encode(), b"a\xff\xfec"))
    with pytest.raises(BundleError, match="not a readable tar or zip archive"):
        Bundle.open(hostile)


def test_oversize_member_and_too_many_members(tmp_path):
    big = _tar(tmp_path / "big.tar.gz", [_file("model.onnx", b"0" * 2048)])
    with pytest.raises(BundleError, match="over the 1024-byte cap"):
        archive.unpack(big, tmp_path / "out1", max_member_bytes=1024)
    many = _tar(tmp_path / "many.tar.gz", [_file(f"f{i}") for i in range(5)])
    with pytest.raises(BundleError, match="more than 4 members"):
        archive.unpack(many, tmp_path / "out2", max_members=4)
    with pytest.raises(BundleError, match="total over"):
        archive.unpack(big, tmp_path / "out3", max_total_bytes=1000)


def test_corrupt_archive(tmp_path, mlp_bundle):
    packed = mlp_bundle.pack(tmp_path / "mlp.tar.gz").read_bytes()
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(BundleError, match="corrupt archive|not a readable"):
        Bundle.open(corrupt)


def test_tampered_archive_fails_its_hash(tmp_path, mlp_bundle):
    files = {p.name: p.read_bytes() for p in mlp_bundle.path.iterdir()}
    files["model.onnx"] = files["model.onnx"][:-1] + bytes([files["model.onnx"][-1] ^ 1])
    tampered = _tar(tmp_path / "t.tar.gz", [_file(n, d) for n, d in files.items()])
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        Bundle.open(tampered)


def _gzip_tar(path: Path, blocks: list[bytes]) -> Path:
    """A .tar.gz written block by block, for headers tarfile itself would not write."""
    import gzip

    with gzip.open(path, "wb") as gz:
        for block in blocks:
            gz.write(block)
        gz.write(b"\0" * 1024)
    return path


def _sized_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A GNU tar header of `size`, negative or huge ones too (base-256, which tarfile reads)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[124:136] = (b"\x80" if size >= 0 else b"\xff") + (size % 256**11).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_a_negative_member_size_cannot_extract_past_the_total_cap(tmp_path):
    """A negative size took bytes off the running total and sent tarfile back into data it
    had passed: one compressed copy of a member's bytes was written again and again as new
    members, each counted once and uncounted by the next negative one (unbounded disk)."""
    block = 512
    hostile = _gzip_tar(tmp_path / "reread.tar.gz", [
        _sized_header("a", 2 * block), _sized_header("x", 3 * block), b"A" * block,
        _sized_header("n", -3 * block), b"N" * block])  # n: back to x's header in a's data
    with pytest.raises(BundleError, match="'n' declares a negative size"):
        archive.unpack(hostile, tmp_path / "out", max_total_bytes=1100)
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*"))
    assert written <= 1100
    with pytest.raises(BundleError, match="'n' declares a negative size"):
        archive.read_members(hostile, ["manifest.json"])
    with pytest.raises(BundleError, match="'n' declares a negative size"):
        Bundle.open(hostile)


def test_a_huge_member_that_reading_a_manifest_skips_is_a_bundle_error(tmp_path):
    """Reading a manifest skipped members that are no file, whatever their size: tarfile then
    sought past any offset, a bare ValueError (a repository scan, an OTA signature check)."""
    hostile = _gzip_tar(tmp_path / "skipped.tar.gz", [_sized_header("z", 1 << 70, b"Z")])
    with pytest.raises(BundleError, match="members total over"):
        archive.read_members(hostile, ["manifest.json"])
    with pytest.raises(BundleError, match="members total over"):
        BundleSource(hostile)


def test_an_oversize_extended_header_is_refused_before_it_is_read(tmp_path):
    """A GNU long name or a pax header is read whole into memory before any member check: 64
    MiB of them gzip to 64 kB, and nothing capped them (512 MiB of memory to refuse this)."""
    import tracemalloc

    size = 64 << 20
    after = tarfile.TarInfo("x")
    after.size = 1
    blocks = []
    for kind, fmt in ((tarfile.GNUTYPE_LONGNAME, tarfile.GNU_FORMAT),
                      (tarfile.XHDTYPE, tarfile.PAX_FORMAT)):
        header = tarfile.TarInfo("././@LongLink")
        header.type, header.size = kind, size
        blocks.append([header.tobuf(format=fmt), *[b"a" * (1 << 20)] * (size >> 20),
                       after.tobuf(), b"x".ljust(512, b"\0")])
    for n, members in enumerate(blocks):
        hostile = _gzip_tar(tmp_path / f"long{n}.tar.gz", members)
        assert hostile.stat().st_size < 1 << 20
        for read in (lambda: archive.unpack(hostile, tmp_path / f"out{n}"),
                     lambda: archive.read_member(hostile, "manifest.json")):
            tracemalloc.start()
            try:
                with pytest.raises(BundleError, match="over the 1048576-byte cap for a name"):
                    read()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 8 << 20, f"{peak} bytes held to refuse a {hostile.stat().st_size}" \
                "-byte archive"


def test_sparse_members_are_refused_before_their_map_is_read(tmp_path):
    """A GNU sparse 1.0 map is a list of numbers tarfile reads whole, however long it says it
    is (32 kB of gzip held 136 MiB of them); a malformed one raised a bare ValueError."""
    for n, data in enumerate([b"%d\n" % (8 << 20) + b"1\n" * (8 << 20), b"abc\n"]):
        info = tarfile.TarInfo("model.onnx")
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "model.onnx", "GNU.sparse.realsize": "10"}
        data += b"\0" * (-len(data) % 512)
        info.size = len(data)
        hostile = _gzip_tar(tmp_path / f"sparse{n}.tar.gz",
                            [info.tobuf(format=tarfile.PAX_FORMAT), data])
        with pytest.raises(BundleError, match="'model.onnx' is a sparse file"):
            archive.unpack(hostile, tmp_path / f"out{n}")
    old_style = tarfile.TarInfo("model.onnx")
    old_style.type = tarfile.GNUTYPE_SPARSE
    hostile = _gzip_tar(tmp_path / "gnu-sparse.tar.gz", [old_style.tobuf(tarfile.GNU_FORMAT)])
    with pytest.raises(BundleError, match="'model.onnx' is a sparse file"):
        Bundle.open(hostile)


def test_reading_the_manifest_stops_at_the_member_cap(tmp_path):
    """`BundleSource` reads an archive's manifest without extracting it; tarfile keeps every
    header it passes, so 200,000 empty members (1.2 MB of gzip) held 90 MiB."""
    members = [_file(f"f{i}", b"") for i in range(5)] + [_file("manifest.json", b"{}")]
    many = _tar(tmp_path / "many.tar.gz", members)
    with pytest.raises(BundleError, match="more than 4 members"):
        archive.read_member(many, "manifest.json", max_members=4)
    assert archive.read_member(many, "manifest.json", max_members=6) == b"{}"
    default = _tar(tmp_path / "default.tar.gz",
                   [_file(f"f{i}", b"") for i in range(archive.MAX_MEMBERS)]
                   + [_file("manifest.json", b"{}")])
    with pytest.raises(BundleError, match=f"more than {archive.MAX_MEMBERS} members"):
        BundleSource(default)


@pytest.mark.parametrize("field, value, message", [
    # a string max_batch_size opened fine, then every request (the golden check first) was a
    # TypeError; -1 refused every request as too large, 2.5 and true were caps nobody meant
    (["max_batch_size"], "4", "max_batch_size must be an integer >= 1 or null, got '4'"),
    (["max_batch_size"], -1, "max_batch_size must be an integer >= 1"),
    (["max_batch_size"], True, "max_batch_size must be an integer >= 1"),
    # a numeric tensor name: every request failed in ONNX Runtime, a 500
    (["inputs", 0, "name"], 5, r"inputs\[0\].name must be a non-empty string, got 5"),
    (["inputs", 0, "shape"], "-8", r"inputs\[0\].shape must be a list of integers"),
    (["inputs", 0, "shape"], [-1, 8.5], r"inputs\[0\].shape must be a list of integers"),
    (["inputs", 0, "batch_axis"], "0", r"inputs\[0\].batch_axis must be null or an axis"),
    (["outputs"], {}, "outputs must be a list"),
    (["backend"], ["onnxruntime"], "backend must be a string"),
    (["device", "accelerator"], 5, "device must be an object of strings"),
    (["created", "optimizations"], 5, "created.optimizations must be a list, got 5"),
    (["files", "golden.npz", "size"], "1", r"files\['golden.npz'\] must be a sha256"),
])
def test_a_manifest_field_of_the_wrong_type_is_refused_naming_it(mlp_bundle, field, value,
                                                                   message):
    """Every manifest field is checked where it is read, naming the file and the field,
    rather than passing and failing later (a TypeError at load, a 500 on each request)."""
    path = mlp_bundle.path / "manifest.json"
    manifest = json.loads(path.read_text())
    *parents, last = field
    holder = manifest
    for key in parents:
        holder = holder[key]
    holder[last] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"manifest.json: manifest field {message}"):
        Model.load(mlp_bundle.path).check_golden()


def test_a_manifest_naming_one_input_twice_is_refused(mlp_bundle):
    path = mlp_bundle.path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["inputs"].append(dict(manifest["inputs"][0]))
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="inputs names a tensor twice"):
        Bundle.open(mlp_bundle.path)


# ------------------------------------------------- extracting only what a manifest lists
def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


@pytest.mark.parametrize("members, message, absent", [
    ([_file("a.bin", b"abcd"), _file("extra", b"z" * 1000), _file("sub/b.bin", b"xy")],
     "'extra' is not in the signed manifest", ["extra", "sub"]),
    ([_file("a.bin", b"abcd" * 1000), _file("sub/b.bin", b"xy")],
     "'a.bin' is 4000 bytes, the signed manifest lists 4", ["a.bin", "sub"]),
    ([_file("a.bin", b"abce"), _file("sub/b.bin", b"xy")],
     "'a.bin' does not match its sha256 in the signed manifest", ["sub"]),
    ([_file("a.bin", b"abcd")], "lists files the archive lacks: sub/b.bin", ["sub"]),
    ([_dir("other"), _file("a.bin", b"abcd"), _file("sub/b.bin", b"xy")],
     "'other' is a folder the signed manifest has no file in", ["other", "a.bin"]),
])
def test_unpack_extracts_only_what_the_signed_manifest_lists(tmp_path, members, message,
                                                             absent):
    """With `expected` (a signed manifest's files), a member it does not list, or whose header
    gives another size, is refused before any of it is written; one with other bytes is
    written no further than its listed size; nothing after a refusal is extracted."""
    expected = {"a.bin": (4, _sha(b"abcd")), "sub/b.bin": (2, _sha(b"xy"))}
    good = _tar(tmp_path / "good.tar.gz", [_dir("sub"), _file("./a.bin", b"abcd"),
                                           _file("sub/b.bin", b"xy")])
    out = archive.unpack(good, tmp_path / "good", expected=expected)
    assert (out / "a.bin").read_bytes() == b"abcd" and (out / "sub/b.bin").read_bytes() == b"xy"
    hostile = _tar(tmp_path / "hostile.tar.gz", members)
    with pytest.raises(BundleError, match=message):
        archive.unpack(hostile, tmp_path / "out", expected=expected)
    for name in absent:
        assert not (tmp_path / "out" / name).exists(), name
    written = tmp_path / "out" / "a.bin"
    assert not written.exists() or written.stat().st_size <= 4


def _overlapping_zip(path: Path, size: int) -> Path:
    """A stored entry "a" whose data is the whole of entry "b" (a local header and `size`
    deflated zeros): the two entries share bytes, the kernel of an overlapping zip bomb."""
    import struct
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packer.compress(b"\0" * size) + packer.flush()
    crc_b = zlib.crc32(b"\0" * size)

    def local(name: bytes, method: int, crc: int, packed: int, full: int) -> bytes:
        return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc, packed,
                           full, len(name), 0) + name

    def central(name: bytes, method: int, crc: int, packed: int, full: int,
                offset: int) -> bytes:
        return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc,
                           packed, full, len(name), 0, 0, 0, 0, 0o100644 << 16, offset) + name

    entry_b = local(b"b", 8, crc_b, len(deflated), size) + deflated
    header_a = local(b"a", 0, zlib.crc32(entry_b), len(entry_b), len(entry_b))
    directory = (central(b"a", 0, zlib.crc32(entry_b), len(entry_b), len(entry_b), 0)
                 + central(b"b", 8, crc_b, len(deflated), size, len(header_a)))
    start = len(header_a) + len(entry_b)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, len(directory), start, 0)
    path.write_bytes(header_a + entry_b + directory + end)
    return path


def test_zip_entries_that_share_bytes_are_refused(tmp_path):
    """Python 3.11 reads a zip whose entries overlap (CPython refuses them from 3.12): each
    entry of an overlapping zip bomb decompresses the same few kB into gigabytes."""
    hostile = _overlapping_zip(tmp_path / "overlap.zip", 1 << 20)
    with zipfile.ZipFile(hostile) as zip_file:  # it is a zip this Python reads whole
        assert [len(zip_file.read(name)) for name in ("a", "b")][1] == 1 << 20
    for read in (lambda: archive.unpack(hostile, tmp_path / "out"),
                 lambda: archive.read_member(hostile, "b"),
                 lambda: Bundle.open(hostile)):
        with pytest.raises(BundleError, match="zip entry 'a' overlaps the next entry"):
            read()
    assert not (tmp_path / "out" / "b").exists()


def test_a_zip_whose_directory_offset_is_too_large_is_a_bundle_error(tmp_path, packed):
    """Found by the archive property below: a zip's end record naming its central directory
    past where it is makes zipfile place every entry before byte 0; seeking there escaped as
    OSError [Errno 22] (a 500 for a pushed bundle), where any other corruption is BundleError."""
    import struct

    from edgerun.runtime import signing

    data = bytearray(packed["archives"][".zip"].read_bytes())
    end = data.rfind(b"PK\x05\x06")  # the end record; its offset of the directory at +16
    data[end + 19] ^= 0xED  # the flip hypothesis found: that offset's top byte
    assert struct.unpack_from("<I", data, end + 16)[0] > len(data)
    changed = tmp_path / "b.zip"
    changed.write_bytes(bytes(data))
    for read in (lambda: archive.unpack(changed, tmp_path / "out"),
                 lambda: archive.read_member(changed, "manifest.json"),
                 lambda: signing.verify_archive(changed, packed["trusted"]),
                 lambda: Bundle.open(changed).close()):
        with pytest.raises(BundleError, match=r"corrupt archive \(entry '\S+' starts before"):
            read()
    assert not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------ property-based rounds
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """One signed bundle as .tar.gz, .zip and plain .tar, its files' bytes and its key."""
    from edgerun.runtime import signing

    folder = tmp_path_factory.mktemp("packed")
    (folder / "m.onnx").write_bytes(mlp_onnx([4, 4]))
    bundle = create_bundle(folder / "m.onnx", folder / "b", name="m", version="1")
    private, public = signing.generate_keys(folder / "keys")
    signing.sign_folder(bundle.path, private)
    archives = {suffix: archive.pack(bundle.path, folder / f"b{suffix}")
                for suffix in (".tar.gz", ".zip")}
    with tarfile.open(folder / "b.tar", "w") as tar:  # uncompressed: flips hit headers
        for path in sorted(bundle.path.iterdir()):
            tar.add(path, path.name)
    archives[".tar"] = folder / "b.tar"
    files = {path.name: path.read_bytes() for path in bundle.path.iterdir()}
    return {"archives": archives, "files": files,
            "trusted": [signing.load_public_key(public)]}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".tar.gz", ".zip", ".tar"]),
       flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), max_size=3),
       cut=st.none() | st.integers(0, 1 << 30), signed=st.booleans())
# the signed manifest's bytes at 4096 + 276 (the .tar's manifest.json starts at 4096) are
# indentation: a space flipped to a newline, the canonical manifest, and so its signature, holds
@example(suffix=".tar", flips=[(4096 + 276, 42)], cut=None, signed=True)
def test_a_changed_archive_opens_as_built_or_is_a_bundle_error(tmp_path, packed, suffix, flips,
                                                               cut, signed):
    """Bytes flipped or cut anywhere in an archive: BundleError (one line), or a bundle whose
    every file is the one built (a flip in a timestamp, say); unsigned, the manifest itself
    is not hashed; signed, the signature covers the canonical manifest, so manifest.json and
    signature.sig hold the JSON built, their whitespace aside (a re-indented manifest keeps
    its signature, as signing.py says). Nothing is written beside the archive."""
    from edgerun.runtime import signing

    data = bytearray(packed["archives"][suffix].read_bytes())
    for position, mask in flips:
        data[position % len(data)] ^= mask
    if cut is not None:
        data = data[:cut % len(data)]
    work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    changed = work / f"b{suffix}"
    changed.write_bytes(bytes(data))
    try:
        expected = signing.verify_archive(changed, packed["trusted"]).files if signed else None
        with Bundle.open(changed, expected=expected) as opened:
            for name, content in packed["files"].items():
                if name not in ("manifest.json", "signature.sig"):
                    assert (opened.path / name).read_bytes() == content, name
                elif signed:
                    assert json.loads((opened.path / name).read_bytes()) == json.loads(content)
    except BundleError as exc:
        assert "\n" not in str(exc), str(exc)
    assert [p.name for p in work.iterdir()] == [changed.name]


@pytest.mark.parametrize("signed", [False, True])
def test_a_gzip_whose_crc_fails_is_a_bundle_error(tmp_path, packed, signed):
    """gzip checks its CRC at the end of the stream, where tarfile looks for another member:
    its BadGzipFile, an OSError, escaped as itself, no BundleError."""
    from edgerun.runtime import signing

    import gzip
    import io

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, content in sorted(packed["files"].items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        end = tar.offset  # no end-of-archive blocks: looking past the last member reads
    data = bytearray(gzip.compress(tar_bytes.getvalue()[:end]))  # the trailer, CRC and all
    data[-8] ^= 0xFF  # the trailer's CRC32 of the uncompressed tar
    changed = tmp_path / "b.tar.gz"
    changed.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt archive.*CRC check failed"):
        expected = signing.verify_archive(changed, packed["trusted"]).files if signed else None
        Bundle.open(changed, expected=expected).close()


_JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
                | st.text(max_size=12)
                | st.sampled_from(["float32", "model.onnx", "golden.npz", "../x", "/etc/passwd",
                                   "a\x00b", "", "0" * 64, "\ud800"])
                | st.sampled_from([10 ** 400]))
_JSON = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(["name", "shape", "dtype", "batch_axis", "sha256",
                                           "size", "optimizations"]), inner, max_size=3),
    max_leaves=10)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built")
    (folder / "m.onnx").write_bytes(mlp_onnx([4, 4]))
    return create_bundle(folder / "m.onnx", folder / "b", name="m", version="1")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_manifest_with_any_field_changed_opens_or_is_a_bundle_error(tmp_path, built, data):
    """Each field of manifest.json set to any JSON value (wrong types, NaN, huge numbers,
    names with NUL or `..`), removed, or joined by others: BundleError in one line, or a
    bundle whose files all still match their hashes."""
    manifest = json.loads((built.path / "manifest.json").read_bytes())
    paths = [path for path in _paths(manifest) if path]
    for path, remove, value in data.draw(st.lists(st.tuples(
            st.sampled_from(paths), st.booleans(), _JSON), min_size=1, max_size=3)):
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if remove:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # a path an earlier change removed
    manifest.update(data.draw(st.dictionaries(st.text(max_size=5), _JSON, max_size=2)))
    folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    shutil.copytree(built.path, folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    try:
        with Bundle.open(folder) as opened:
            opened.golden()
            for name, entry in opened.manifest.files.items():
                assert sha256_file(folder / name) == entry.sha256
    except BundleError as exc:
        assert "\n" not in str(exc), str(exc)
