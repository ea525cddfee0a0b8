"""`edgerun package lambda`: real manylinux wheels from PyPI (cached in ~/.cache/edgerun), the
package's size against Lambda's limit, and the package for this machine run by a Python 3.12."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import zipfile
from pathlib import Path

import pytest

from edgerun.adapters.aws_lambda.packaging import FUNCTION_DIR, find_python312, package_lambda
from edgerun.examples import mlp_onnx
from edgerun.runtime import create_bundle
from edgerun.runtime.errors import BundleError
from tests.cli import edgerun, edgerun_command

FIXTURES = Path(__file__).with_name("fixtures") / "lambda"
#: The package built for this machine is run here; the other architecture's is inspected.
HOST = "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
OTHER = "x86_64" if HOST == "arm64" else "arm64"
MACHINE = {"arm64": "aarch64", "x86_64": "x86_64"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("package")
    (work / "mlp.onnx").write_bytes(mlp_onnx([8, 16, 4], seed=2))
    create_bundle(work / "mlp.onnx", work / "bundle", name="mlp", version="4")
    return work / "bundle"


@pytest.fixture(scope="module")
def host_zip(bundle, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp(HOST)
    done = edgerun("package", "lambda", str(bundle), "--arch", HOST, "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert "of Lambda's 250 MB limit" in done.stdout
    return output / "function.zip"


def test_the_zip_holds_the_function_its_runtime_and_the_model_and_nothing_else(host_zip):
    names = set(zipfile.ZipFile(host_zip).namelist())
    assert {"app.py", "model/manifest.json", "model/model.onnx",
            "edgerun/adapters/aws_lambda/handler.py", "edgerun/adapters/http/asgi.py",
            "edgerun/runtime/backends/onnxruntime.py", "mangum/adapter.py",
            "edgerun/devices/profiles/cpu.toml"} <= names
    assert any(n.startswith("onnxruntime/capi/") and n.endswith(f"{MACHINE[HOST]}-linux-gnu.so")
               for n in names)
    tops = {n.split("/")[0] for n in names}
    # no web framework, no tools, no build-only dependencies, no CLI, no tests
    assert not tops & {"fastapi", "starlette", "pydantic", "uvicorn", "flatbuffers", "google",
                       "packaging", "sympy", "rich", "onnx", "bin"}
    assert not {"edgerun/adapters/http/app.py", "edgerun/cli/__init__.py",
                "edgerun/adapters/aws_lambda/packaging.py"} & names
    assert not [n for n in names if "/tests/" in n or n.endswith((".pyi", ".h"))]
    assert not [n for n in names if n.startswith("onnxruntime/tools/")]
    assert not [n for n in names if "cpython-311" in n]


def test_the_package_ships_python_312_byte_code_or_says_it_cannot(host_zip):
    names = set(zipfile.ZipFile(host_zip).namelist())
    sources = [n for n in names if n.endswith(".py")]
    compiled = [n for n in names if n.endswith(".cpython-312.pyc")]
    if find_python312() is None:
        assert not compiled
        return
    missing = [s for s in sources if "/".join(
        [*s.split("/")[:-1], "__pycache__", s.split("/")[-1][:-3] + ".cpython-312.pyc"])
        not in names]
    assert not missing, missing[:5]


def test_the_unzipped_package_serves_on_python_312(host_zip, tmp_path):
    python = find_python312()
    assert python is not None, "no Python 3.12 here: install one (pyenv, uv) to run the package"
    task = tmp_path / "task"
    zipfile.ZipFile(host_zip).extractall(task)
    for path in task.rglob("*"):  # /var/task is read-only: nothing may be compiled or written
        path.chmod(0o555 if path.is_dir() else 0o444)
    event = json.loads((FIXTURES / "apigw_v2.json").read_text())
    event["body"] = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                            "data": [0.5] * 8}]})
    script = (f"import json, app; print(json.dumps(app.handler(json.loads({json.dumps(json.dumps(event))}), None)))")
    env = {"PATH": os.environ["PATH"], "EDGERUN_MODEL": "model", "LAMBDA_TASK_ROOT": str(task),
           "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048", "PYTHONPATH": str(task)}
    done = subprocess.run([python, "-S", "-v", "-c", script], cwd=task, env=env,
                          capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert answer["statusCode"] == 200
        assert json.loads(answer["body"])["model_version"] == "4"
        loaded = [line for line in done.stderr.splitlines()
                  if line.startswith("# code object from") and str(task) in line]
        assert loaded and all(".cpython-312.pyc" in line for line in loaded)
    finally:
        for path in task.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_the_other_architecture_gets_its_own_binaries(bundle, tmp_path):
    report = package_lambda(bundle, OTHER, tmp_path / OTHER, unzipped=True)
    assert report.zipped_bytes is None and report.unzipped_bytes < 250 * 2**20
    binaries = [p.name for p in (tmp_path / OTHER / "onnxruntime" / "capi").glob("*.so")]
    assert binaries and all(MACHINE[HOST] not in name for name in binaries)
    assert any(MACHINE[OTHER] in name for name in binaries)


def test_a_package_over_the_limit_is_a_clear_error(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"unzips to \d+\.\d MB, over Lambda's 10 MB limit.*"
                                          r"largest parts: onnxruntime"):
        package_lambda(bundle, HOST, tmp_path / "small", limit=10 * 2**20)
    assert not (tmp_path / "small").exists()


def other_python(folder: Path) -> str:
    """An interpreter that is not Python 3.12: this one, unless it is 3.12; then, as no other
    is sure to be installed, a script that answers as 3.13 does."""
    import sys
    if sys.version_info[:2] != (3, 12):
        return sys.executable
    script = folder / "python3.13"
    script.write_text("#!/bin/sh\necho 3.13\n")
    script.chmod(0o755)
    return str(script)


def test_python_that_is_not_312_is_refused_before_building(bundle, tmp_path):
    """Byte code of another version is ignored by the python3.12 runtime: the package was
    built, reported as compiled, and compiled nothing Lambda would use (or failed with pages
    of SyntaxErrors from 3.12-only sources)."""
    python = other_python(tmp_path)
    with pytest.raises(BundleError, match=r"is Python 3\.\d+: byte code for Lambda's "
                                          r"python3\.12 runtime needs a Python 3\.12"):
        package_lambda(bundle, HOST, tmp_path / "other", python312=python)
    assert not (tmp_path / "other").exists()
    done = edgerun("package", "lambda", str(bundle), "--arch", HOST, "-o", str(tmp_path / "x"),
                   "--python", str(tmp_path / "no-such-python"))
    assert done.returncode == 2 and "no-such-python does not run" in done.stderr
    assert "Traceback" not in done.stderr


def test_unzipped_into_a_folder_with_an_earlier_package_is_refused(bundle, tmp_path):
    """Copied over an earlier package, another architecture's binaries stayed beside the new
    ones: 179 MB on disk, reported as 103 MB, and in no size check."""
    output = tmp_path / "build"
    (output / "onnxruntime" / "capi").mkdir(parents=True)
    stale = output / "onnxruntime" / "capi" / "onnxruntime_pybind11_state.cpython-312-x.so"
    stale.write_bytes(b"an earlier build's binary")
    with pytest.raises(BundleError, match="is not empty: an unzipped package must be all"):
        package_lambda(bundle, HOST, output, unzipped=True)
    assert stale.read_bytes() == b"an earlier build's binary"
    assert sorted(p.name for p in output.rglob("*")) == ["capi", "onnxruntime", stale.name]


def test_the_sam_makefile_starts_from_an_empty_artifacts_folder(bundle, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "stale.txt").write_text("from an earlier sam build")
    venv_bin = str(Path(edgerun_command()[0]).parent)
    done = subprocess.run(["make", "-s", "build-InferenceFunction", f"ARTIFACTS_DIR={artifacts}",
                           f"EDGERUN_BUNDLE={bundle}", f"EDGERUN_ARCH={HOST}"],
                          cwd=FUNCTION_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (artifacts / "stale.txt").exists()
    assert (artifacts / "app.py").is_file() and (artifacts / "model" / "manifest.json").is_file()
