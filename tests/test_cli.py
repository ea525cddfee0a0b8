"""The `edgerun` command: bundle create/inspect/verify/pack/unpack, predict, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgerun.examples import mlp_onnx
from tests.cli import edgerun, edgerun_command
from tests.helpers import two_input_onnx
from tests.serving import free_port


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_onnx([8, 16, 4]))
    return path


def test_version():
    result = edgerun("--version")
    assert result.returncode == 0 and result.stdout.startswith("edgerun ")


def test_bundle_create_inspect_verify(tmp_path, mlp_file):
    made = edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "3",
                   "-o", str(tmp_path / "b"), "--max-batch-size", "32")
    assert made.returncode == 0, made.stderr
    assert "created bundle mlp version 3" in made.stdout
    shown = edgerun("bundle", "inspect", str(tmp_path / "b"), "--json")
    manifest = json.loads(shown.stdout)
    assert manifest["version"] == "3" and manifest["max_batch_size"] == 32
    assert manifest["inputs"][0]["shape"] == [-1, 8]
    checked = edgerun("bundle", "verify", str(tmp_path / "b"))
    assert checked.returncode == 0 and "ok mlp version 3" in checked.stdout


def run_into_a_closed_pipe(*args: str) -> tuple[int, str]:
    """The command's status and stderr, its stdout a pipe nobody reads any more (the reader
    of `edgerun ... | head -c 10` once it has its ten bytes)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([*edgerun_command(), *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300,
                              env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path, mlp_file):
    """`edgerun bundle inspect --json B | head -c 10` ended in "error: [Errno 32] Broken
    pipe" (status 2), or in Python's "Exception ignored ... BrokenPipeError" (status 120),
    as did `edgerun serve --help | head`; output written by rich ended quietly with status 1.
    Every command now ends as rich's do."""
    made = edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(tmp_path / "b"))
    assert made.returncode == 0, made.stderr
    for args in (("bundle", "inspect", "--json", str(tmp_path / "b")),
                 ("devices", "list", "--json"), ("bundle", "inspect", str(tmp_path / "b")),
                 ("serve", "--help"), ("--version",)):
        assert run_into_a_closed_pipe(*args) == (1, ""), args


def test_bundle_create_max_batch_size_0_writes_a_bundle_with_no_batch_axis(tmp_path):
    from tests.helpers import centered_onnx

    model = tmp_path / "centered.onnx"
    model.write_bytes(centered_onnx())
    made = edgerun("bundle", "create", str(model), "--name", "seq", "--version", "1",
                   "-o", str(tmp_path / "b"), "--max-batch-size", "0")
    assert made.returncode == 0, made.stderr
    manifest = json.loads(edgerun("bundle", "inspect", str(tmp_path / "b"), "--json").stdout)
    assert [spec["batch_axis"] for spec in manifest["inputs"] + manifest["outputs"]] == [None] * 2
    shown = edgerun("bundle", "inspect", str(tmp_path / "b"))
    assert "max_batch_size 0 (no batch axis)" in shown.stdout, shown.stdout
    refused = edgerun("bundle", "create", str(model), "--name", "seq", "--version", "1",
                      "-o", str(tmp_path / "c"), "--max-batch-size", "-1")
    assert refused.returncode != 0 and "or 0 for a model with no batch axis" in refused.stderr


def test_inspect_says_max_batch_size_0_for_a_model_whose_output_has_no_batch_axis(tmp_path):
    # x [n, 4] -> total []: its input's dim 0 is dynamic, its output has none, so servers
    # never stack its requests and their metadata says max_batch_size 0; inspect, looking at
    # the inputs alone, said "unlimited"
    from edgerun.adapters.dataplane import DataPlane
    from edgerun.runtime.metrics import Registry
    from edgerun.runtime.repository import Repository
    from tests.helpers import total_onnx
    from tests.serving import add_version

    add_version(tmp_path / "repo", "total", "1", total_onnx())
    shown = edgerun("bundle", "inspect", str(tmp_path / "repo" / "total" / "1"))
    assert shown.returncode == 0, shown.stderr
    assert "max_batch_size 0 (no batch axis)" in shown.stdout, shown.stdout
    repository = Repository(tmp_path / "repo", registry=Registry())
    repository.load_all()
    assert DataPlane(repository).model_metadata("total")["parameters"] == {"max_batch_size": 0}
    repository.close()


def test_inspect_shows_a_bundles_names_as_they_are(tmp_path):
    """A bundle's names are its maker's text: rich took them for markup, so `logits[batch]`
    showed as `logits`, and `[/x]` ended `bundle inspect` in a MarkupError."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x[0]"], ["[/x]"])], "g",
                              [helper.make_tensor_value_info("x[0]", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("[/x]", TensorProto.FLOAT, ["n", 2])])
    model = tmp_path / "odd.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # onnx's newest IR is past what Python 3.10's last ONNX Runtime reads
    model.write_bytes(proto.SerializeToString())
    made = edgerun("bundle", "create", str(model), "--name", "odd", "--version", "1",
                   "-o", str(tmp_path / "b"))
    assert made.returncode == 0, made.stderr
    shown = edgerun("bundle", "inspect", str(tmp_path / "b"))
    assert shown.returncode == 0, shown.stderr
    assert "x[0]" in shown.stdout and "[/x]" in shown.stdout, shown.stdout


def test_verify_reports_tampering_with_a_clear_error(tmp_path, mlp_file):
    edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
            "-o", str(tmp_path / "b"))
    model = tmp_path / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    result = edgerun("bundle", "verify", str(tmp_path / "b"))
    assert result.returncode == 2
    assert "bundle_error" in result.stderr and "model.onnx does not match its sha256" in \
        result.stderr


def test_errors_keep_their_bracketed_text(tmp_path):
    """rich read `[...]` in an error as markup and dropped it: the hint `pip install
    'edgerun[tflite]'` lost its extra, a path its folder."""
    missing = tmp_path / "[nope]"
    result = edgerun("bundle", "verify", str(missing))
    assert result.returncode == 2 and f"{missing}: no such bundle" in result.stderr, \
        result.stderr
    result = edgerun("devices", "show", "[gpu]")
    assert result.returncode == 2 and "'[gpu]'" in result.stderr, result.stderr


def test_errors_are_not_wrapped_to_the_terminal(tmp_path):
    """Without a terminal rich wrapped an error at 80 columns: a path broken over two lines,
    a message no log search found (CI read `is not \nempty`)."""
    missing = tmp_path / ("a-folder-name-long-enough-to-wrap-" * 3) / "bundle"
    for command in (("bundle", "verify", str(missing)), ("devices", "show", "x" * 90)):
        result = edgerun(*command, env={"COLUMNS": "40"})
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_file_that_is_no_archive_is_refused_in_one_line_saying_why(tmp_path, mlp_file):
    """tarfile's error for a file no compression reads lists each one it tried, a line each
    ("- method gz: ReadError('not a gzip file')" ...): the model file given where its bundle
    goes, the commonest slip, gave five lines of that."""
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b" + b"x" * 40)  # gzip's magic, no gzip
    cases = {mlp_file: "not zip, gzip, bzip2 or xz; read as a plain tar: invalid header",
             tmp_path / "empty.tar.gz": "not zip, gzip, bzip2 or xz; read as a plain tar: empty "
                                        "file",
             tmp_path / "bad.tar.gz": "read as a gzip-compressed tar: not a gzip file"}
    for path, reason in cases.items():
        for command in (("bundle", "verify", str(path)),
                        ("bundle", "unpack", str(path), "-o", str(tmp_path / "out"))):
            result = edgerun(*command)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip() == (f"error (bundle_error): {path}: not a readable tar "
                                             f"or zip archive ({reason})"), result.stderr


def test_create_archive_pack_and_unpack(tmp_path, mlp_file):
    archive = tmp_path / "mlp-1.tar.gz"
    assert edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(archive)).returncode == 0
    unpacked = edgerun("bundle", "unpack", str(archive), "-o", str(tmp_path / "u"))
    assert unpacked.returncode == 0 and "(verified)" in unpacked.stdout
    repacked = edgerun("bundle", "pack", str(tmp_path / "u"), "-o", str(tmp_path / "r.tar.gz"))
    assert repacked.returncode == 0
    assert (tmp_path / "r.tar.gz").read_bytes() == archive.read_bytes()


def file_size_limited(limit: int) -> Callable[[], None]:
    """A child whose files cannot grow past `limit` bytes: its write past that fails (EFBIG,
    as ENOSPC would on a full disk) midway."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["create", "pack", "sign"])
def test_an_archive_write_that_fails_midway_leaves_the_old_archive_whole(tmp_path, command):
    """`bundle create/pack -o x.tar.gz` wrote the archive in place: a write that failed or
    was interrupted midway left a truncated archive under its name, in place of the good one
    there; `bundle sign` left its half-written `.tmp-x.tar.gz` beside it for good. The limit
    lies above every file but the archive (model ~410 KB, golden ~390 KB, archive ~745 KB)."""
    from edgerun.runtime import Bundle
    from tests.cli import edgerun_command
    from tests.staging_peer import held_elsewhere

    model, golden = tmp_path / "m.onnx", tmp_path / "golden.npy"
    model.write_bytes(mlp_onnx([16, 4096, 8]))
    np.save(golden, np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32))
    made = ["bundle", "create", str(model), "--name", "m", "--version", "1",
            "--golden-input", str(golden)]
    assert edgerun(*made, "-o", str(tmp_path / "b")).returncode == 0
    assert edgerun("keys", "generate", "-o", str(tmp_path / "keys")).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.tar.gz"
    assert edgerun("bundle", "pack", str(tmp_path / "b"), "-o", str(target)).returncode == 0
    good = target.read_bytes()
    args = {"create": [*made, "-o", str(target)],
            "pack": ["bundle", "pack", str(tmp_path / "b"), "-o", str(target)],
            "sign": ["bundle", "sign", str(target), "--key", str(tmp_path / "keys" / "fleet.key")]
            }[command]
    failed = subprocess.run([*edgerun_command(), *args], capture_output=True, text=True,
                            timeout=300, preexec_fn=file_size_limited(600_000))
    assert failed.returncode == 2 and "File too large" in failed.stderr, failed.stderr
    assert target.read_bytes() == good
    assert [p.name for p in out.iterdir()] == ["m.tar.gz"]
    with held_elsewhere(out) as killed:  # a run killed midway: its staging folder stays
        (killed / "m.tar.gz").write_bytes(good[:1000])
    done = edgerun(*args)  # replacing the archive there is allowed, as tar -cf does
    assert done.returncode == 0, done.stderr
    assert [p.name for p in out.iterdir()] == ["m.tar.gz"]  # the killed run's swept
    with Bundle.open(target) as bundle:
        assert bundle.manifest.name == "m"


def test_unpack_that_runs_out_of_space_says_so_not_that_the_bundle_is_truncated(tmp_path):
    """A member's write that ran out of room wrote what fitted and said how much; unchecked,
    the member was cut short in silence and the bundle then blamed as "tampered or truncated"
    (naming a staging folder already removed), on a disk that was only full. The limit cuts
    the model file (~410 KB, written in one chunk) short, as a nearly full disk does (ENOSPC
    on a real one: the same short write)."""
    archive = tmp_path / "m.tar.gz"
    (tmp_path / "m.onnx").write_bytes(mlp_onnx([16, 4096, 8]))
    assert edgerun("bundle", "create", str(tmp_path / "m.onnx"), "--name", "m", "--version",
                   "1", "-o", str(archive)).returncode == 0
    failed = subprocess.run([*edgerun_command(), "bundle", "unpack", str(archive), "-o",
                             str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300, preexec_fn=file_size_limited(300_000))
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.strip() == ("error (bundle_error): archive member 'model.onnx' "
                                     "cannot be written (File too large)"), failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.tar.gz"]


def test_create_into_an_empty_folder_that_fails_leaves_it_empty(tmp_path, mlp_file):
    """The model was copied into -o before the golden input was checked: the failure left it
    there, and the rerun was refused ("output folder exists and is not empty")."""
    out = tmp_path / "out"
    out.mkdir()
    np.save(tmp_path / "narrow.npy", np.zeros((2, 3), np.float32))
    made = ["bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1"]
    failed = edgerun(*made, "--golden-input", str(tmp_path / "narrow.npy"), "-o", str(out))
    assert failed.returncode == 2 and "dim 1 must be 8" in failed.stderr, failed.stderr
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["mlp.onnx", "narrow.npy", "out"]
    done = edgerun(*made, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert edgerun("bundle", "verify", str(out)).returncode == 0


@pytest.mark.parametrize("epoch", ["1733500000000", "99999999999999999999"])
def test_a_source_date_epoch_past_any_date_is_named_in_one_line(tmp_path, mlp_file, epoch):
    """Milliseconds for seconds (`date +%s%3N`) ended bundle create in "year 56903 is out of
    range", naming no setting, and a larger number in an OverflowError traceback."""
    result = edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                     "-o", str(tmp_path / "b"), env={"SOURCE_DATE_EPOCH": epoch})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, \
        result.stderr
    assert result.stderr.startswith(f"error: SOURCE_DATE_EPOCH {epoch} is past any date"), \
        result.stderr
    assert not (tmp_path / "b").exists()


def test_create_into_a_place_that_cannot_be_written_says_where_and_why(tmp_path, mlp_file):
    (tmp_path / "notes.txt").write_text("")
    output = tmp_path / "notes.txt" / "m.tar.gz"
    result = edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                     "-o", str(output))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error (bundle_error): {output}: the output cannot be "
                                     f"written there: {tmp_path / 'notes.txt'} is not a "
                                     "folder"), result.stderr


def test_unpack_leaves_nothing_behind_when_the_bundle_does_not_verify(tmp_path, mlp_file):
    """It extracted into -o, then verified: a tampered archive left its files there, where
    `serve` or a copy step could pick them up."""
    import tarfile

    folder = tmp_path / "b"
    assert edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(folder)).returncode == 0
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with tarfile.open(tmp_path / "tampered.tar.gz", "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    result = edgerun("bundle", "unpack", str(tmp_path / "tampered.tar.gz"), "-o",
                     str(tmp_path / "u"))
    assert result.returncode == 2 and "does not match its sha256" in result.stderr
    assert not (tmp_path / "u").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging


def test_unpack_sweeps_what_a_killed_unpack_left(tmp_path, mlp_file):
    """unpack staged in a `.NAME.*` temporary folder: one a kill (SIGKILL, the OOM killer)
    left beside -o, as large as the bundle, stayed for good. Its staging is now the project's
    (`staging.replacing`), which the next run sweeps."""
    from tests.staging_peer import held_elsewhere

    archive = tmp_path / "mlp-1.tar.gz"
    assert edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(archive)).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    with held_elsewhere(out) as killed:
        (killed / "u").mkdir()
        (killed / "u" / "model.onnx").write_bytes(b"half")
    assert len(list(out.iterdir())) == 1
    result = edgerun("bundle", "unpack", str(archive), "-o", str(out / "u"))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["u"]
    assert (out / "u" / "manifest.json").is_file()


def test_predict_from_json_npy_and_npz(tmp_path):
    source = tmp_path / "two.onnx"
    source.write_bytes(two_input_onnx())
    edgerun("bundle", "create", str(source), "--name", "two", "--version", "1",
            "-o", str(tmp_path / "b"))
    (tmp_path / "in.json").write_text(json.dumps({"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}))
    np.savez(tmp_path / "in.npz", a=np.ones((2, 4), np.float32), b=np.ones((2, 4), np.int32))
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "in.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["out"] == {
        "dtype": "float32", "shape": [1, 4], "data": [[2.0, 3.0, 4.0, 5.0]]}
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "in.npz"))
    assert json.loads(result.stdout)["outputs"]["out"]["data"] == [[2.0] * 4] * 2
    np.savez(tmp_path / "nan.npz", a=np.array([[np.nan, 1, 2, 3]], np.float32),
             b=np.ones((1, 4), np.int32))
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "nan.npz"))
    strict = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(name))
    assert strict["outputs"]["out"]["data"] == [[None, 2.0, 3.0, 4.0]], "NaN is not JSON"
    np.save(tmp_path / "in.npy", np.ones((1, 4), np.float32))
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "in.npy"))
    assert result.returncode == 2 and "name them in .npz or JSON" in result.stderr


def test_predict_single_input_npy_and_bad_input(tmp_path, mlp_file):
    edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
            "-o", str(tmp_path / "b"))
    np.save(tmp_path / "x.npy", np.zeros((3, 8), np.float32))
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "x.npy"))
    assert json.loads(result.stdout)["outputs"]["y"]["shape"] == [3, 4]
    (tmp_path / "bad.json").write_text(json.dumps({"x": [[1, 2, 3]]}))
    result = edgerun("predict", str(tmp_path / "b"), "--input", str(tmp_path / "bad.json"))
    assert result.returncode == 2
    assert "invalid_input" in result.stderr and "input 'x': dim 1 must be 8" in result.stderr


def test_demo_serves_through_the_batcher(tmp_path):
    result = edgerun("demo", "--workdir", str(tmp_path), "--requests", "600",
                     "--concurrency", "16")
    assert result.returncode == 0, result.stderr
    assert "same labels as unbatched predict │ True" in result.stdout
    assert "forward passes" in result.stdout
    assert (tmp_path / "digits-1.tar.gz").is_file() and (tmp_path / "sample.json").is_file()


def test_a_path_of_the_wrong_kind_is_not_said_to_be_missing(tmp_path, mlp_file):
    """A folder given for a file (or a file for a folder) was "does not exist": the user
    looked at a path that plainly did, and stopped trusting the error."""
    bundle = tmp_path / "b"
    assert edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(bundle)).returncode == 0
    expected = {
        ("predict", str(bundle), "--input", str(tmp_path)): f"error (invalid_input): {tmp_path}: "
                                                           "not a file",
        ("serve", "--repository", str(mlp_file)): f"error (bundle_error): {mlp_file}: a model "
                                                  "repository must be a folder, not a file",
        ("serve", "--repository", str(tmp_path), "--api-keys", str(tmp_path)):
            f"error (invalid_input): tokens file {tmp_path} is not a file",
    }
    for args, message in expected.items():
        result = edgerun(*args, timeout=60)
        assert result.returncode == 2 and result.stderr.strip() == message, result.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--port", "99999", "argument --port: 99999 is not a TCP port (0-65535)"),
    ("--port", "-5", "argument --port: -5 is not a TCP port"),
    ("--grpc-port", "70000", "argument --grpc-port: 70000 is not a TCP port"),
    ("--poll-interval", "-1", "argument --poll-interval: -1 must be a finite number above zero"),
    ("--max-body-bytes", "0", "argument --max-body-bytes: 0 must be a finite number above zero"),
])
def test_serve_refuses_out_of_range_numbers_before_serving(tmp_path, option, value, message):
    """Once taken, 99999 bound port 34463 and -1 polled the folder without pause."""
    result = edgerun("serve", "--model-dir", str(tmp_path / "model"), option, value, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_serve_model_name_without_model_dir_is_a_usage_error(tmp_path):
    result = edgerun("serve", "--repository", str(tmp_path), "--model-name", "x", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --model-name goes with --model-dir"


def test_serve_refuses_one_port_for_http_and_grpc_naming_both_flags(tmp_path):
    """It said "HTTP could not listen on 127.0.0.1:P: ... address already in use", sending
    the user to look for another process on a port that nothing else held."""
    port = str(free_port())
    result = edgerun("serve", "--repository", str(tmp_path), "--port", port,
                     "--grpc-port", port, timeout=60)
    assert (result.returncode, result.stderr) == (
        2, f"error: --grpc-port {port} is --port too: HTTP and gRPC need a port each\n")


@pytest.mark.parametrize("flags, error", [
    # an unset variable in a manifest's args served the model under the bundle's own name, or
    # the file's stem, which no client of that name could call
    (("--model-name", ""), "error (bundle_error): bundle name '' must be letters, digits, '.', "
                           "'_' or '-' (starting with a letter or digit)\n"),
    # the one model is fixed at start-up: the flag was taken and served on, and a new bundle
    # put in its place was never loaded nor said to be ignored
    (("--poll-interval", "1"), "error: --poll-interval goes with --repository: --model-dir "
                               "serves one model, fixed at start-up\n")])
def test_serve_refuses_a_flag_model_dir_cannot_honour(tmp_path, mlp_file, flags, error):
    bundle = tmp_path / "b"
    assert edgerun("bundle", "create", str(mlp_file), "--name", "mlp", "--version", "1",
                   "-o", str(bundle)).returncode == 0
    for model in (bundle, mlp_file):
        result = edgerun("serve", "--model-dir", str(model), *flags, "--port", "0", timeout=60)
        assert (result.returncode, result.stderr) == (2, error)


def test_fleet_serve_data_that_is_a_file_is_named(tmp_path):
    """It said "[Errno 17] File exists: 'FILE'", of a path the user meant as a folder."""
    (tmp_path / "notes").write_text("mine")
    pub = tmp_path / "fleet.pub"
    assert edgerun("keys", "generate", "-o", str(tmp_path)).returncode == 0
    for data in (tmp_path / "notes", tmp_path / "notes" / "fleet"):
        result = edgerun("fleet", "serve", "--data", str(data), "--broker",
                         "mqtt://127.0.0.1:1", "--trust", str(pub), "--port", "0", timeout=60)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1] == (
            f"error (fleet_error): --data {data}: a file is there (or on the way), not a "
            "folder for bundles and fleet.db"), result.stderr
    assert (tmp_path / "notes").read_text() == "mine"


def test_fleet_serve_names_an_address_it_cannot_listen_on(tmp_path):
    """uvicorn logged "ERROR:    [Errno -2] Name or service not known" (no host named) and
    the command exited with status 3; it is one error line naming the address, status 2, as
    `edgerun serve` says it."""
    import socket

    assert edgerun("keys", "generate", "-o", str(tmp_path)).returncode == 0
    (tmp_path / "tokens").touch()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        used = holder.getsockname()[1]
        for host in ("127.0.0.1", "nosuch.invalid"):
            result = edgerun("fleet", "serve", "--data", str(tmp_path / "d"), "--broker",
                             "mqtt://127.0.0.1:1", "--trust", str(tmp_path / "fleet.pub"),
                             "--tokens", str(tmp_path / "tokens"), "--host", host,
                             "--port", str(used), timeout=60)
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith(f"error: HTTP could not listen on {host}:{used}: ")
            assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("option", ["--requests", "--concurrency"])
def test_demo_needs_requests_and_callers(tmp_path, option):
    """With no callers it printed a table of made-up figures (millions of requests/s)."""
    result = edgerun("demo", "--workdir", str(tmp_path), option, "0", timeout=120)
    assert result.returncode == 2
    assert f"argument {option}: 0 must be a finite number above zero" in result.stderr
    assert "requests/s" not in result.stdout and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [
    ("fleet", "serve", "--data", "DATA", "--broker", "mqtt://127.0.0.1:1", "--port", "99999"),
    ("fleet", "serve", "--data", "DATA", "--broker", "mqtt://127.0.0.1:1", "--lease-ttl", "inf"),
    ("fleet", "deploy", "m:2", "--server", "http://127.0.0.1:1", "--job-timeout", "-1"),
])
def test_fleet_commands_refuse_out_of_range_numbers(tmp_path, command):
    result = edgerun(*(str(tmp_path / "data") if part == "DATA" else part for part in command),
                     timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {command[-2]}: {command[-1]} " in result.stderr


@pytest.mark.parametrize("module, extra, command", [
    ("cryptography", "ota", ["keys", "generate", "-o", "keys"]),
    ("paho", "mqtt", ["daemon", "--repository", "models", "--broker", "mqtt://127.0.0.1:1",
                      "--device-id", "d"]),
    ("tvm", "tvm", ["optimize", "mlp.onnx", "--device", "x86-64", "--compile", "tvm",
                    "-o", "out"]),
    ("skl2onnx", "demo", ["demo", "--requests", "1"]),
    ("uvicorn", "server", ["serve", "--repository", "models"]),  # exit 1 before, as the next
    ("uvicorn", "fleet", ["fleet", "serve", "--data", "data", "--broker", "mqtt://127.0.0.1:1",
                          "--trust", "fleet.pub"]),
])
def test_a_missing_extra_is_named_not_a_traceback(tmp_path, mlp_file, module, extra, command):
    """Each optional module is imported when a command first needs it: without its extra,
    `keys generate`, `daemon`, `optimize --compile tvm` and `demo` ended in a traceback."""
    (tmp_path / "models").mkdir()
    mlp_file.rename(tmp_path / "mlp.onnx")
    hide = (f"import sys; sys.modules[{module!r}] = None; from edgerun.cli import main; "
            f"sys.exit(main({command!r}))")
    result = subprocess.run([sys.executable, "-c", hide], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install 'edgerun[{extra}]'" in result.stderr, result.stderr


def test_every_extra_the_cli_names_exists():
    from edgerun.cli import EXTRAS

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(EXTRAS.values()) <= set(pyproject["project"]["optional-dependencies"])
