"""`edgerun package lambda`: real manylinux wheels from PyPI (cached in ~/.cache/edgerun), the
package's size against Lambda's limit, and the package for this machine run by a Python 3.12."""

from __future__ import annotations

import json
import os
import platform
import shutil
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
    assert (task / "edgerun-architecture.txt").read_text() == f"{HOST}\n"  # checked at init
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


def test_a_package_for_the_other_architecture_fails_init_naming_both(bundle, tmp_path):
    """sam build does not tell the Makefile the template's Architecture (aws-sam-cli#3349): an
    x86_64 function given arm64 wheels failed init in numpy's import, "No module named
    'numpy._core._multiarray_umath'" and a page of advice about a bad install, never naming
    the architecture."""
    python = find_python312()
    assert python is not None, "no Python 3.12 here: install one (pyenv, uv) to run the package"
    task = tmp_path / "task"
    done = edgerun("package", "lambda", str(bundle), "--arch", OTHER, "--unzipped",
                   "-o", str(task))
    assert done.returncode == 0, done.stderr
    assert (task / "edgerun-architecture.txt").read_text() == f"{OTHER}\n"
    env = {"PATH": os.environ["PATH"], "EDGERUN_MODEL": "model", "LAMBDA_TASK_ROOT": str(task),
           "PYTHONPATH": str(task)}
    init = subprocess.run([python, "-S", "-c", "import app"], cwd=task, env=env,
                          capture_output=True, text=True, timeout=120)
    assert init.returncode != 0
    assert init.stderr.strip().splitlines()[-1] == (
        f"edgerun.adapters.aws_lambda.architecture.ArchitectureMismatch: this package was built "
        f"for {OTHER} but the function runs on {HOST} ({MACHINE[HOST]}): rebuild it for {HOST} "
        f"(EDGERUN_ARCH={HOST} sam build ..., or edgerun package lambda BUNDLE --arch {HOST} "
        f"-o DIR) or deploy it with Architecture={OTHER}")
    assert "numpy" not in init.stderr


def test_two_builds_of_the_same_bundle_are_byte_identical(bundle, host_zip, tmp_path):
    """The .pyc files named their sources in the build's random scratch folder
    (/tmp/edgerun-lambda-XXXX/package/...): every build of the same bundle was another zip, a
    new CodeSha256 at every deploy, and no pipeline could check a package against its inputs."""
    done = edgerun("package", "lambda", str(bundle), "--arch", HOST, "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "function.zip").read_bytes() == host_zip.read_bytes()
    archive = zipfile.ZipFile(host_zip)
    compiled = [n for n in archive.namelist() if n.endswith(".pyc")]
    assert not [n for n in compiled if b"edgerun-lambda-" in archive.read(n)]


def test_a_build_that_fails_while_zipping_leaves_the_earlier_zip_whole(bundle, host_zip,
                                                                       tmp_path):
    """function.zip was written in place: a build cut off while zipping (disk full, Ctrl-C, a
    cancelled CI job) left a truncated function.zip where the earlier package was, for the
    deploy to upload. Here the file-size limit (RLIMIT_FSIZE) is the full disk: every file of
    the package fits under it, the zip does not."""
    import resource
    import shutil
    largest = max(i.file_size for i in zipfile.ZipFile(host_zip).infolist())
    limit = largest + 2**20
    assert limit < host_zip.stat().st_size
    output = tmp_path / "dist"
    output.mkdir()
    shutil.copyfile(host_zip, output / "function.zip")  # the earlier build

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([*edgerun_command(), "package", "lambda", str(bundle), "--arch", HOST,
                           "-o", str(output)], capture_output=True, text=True, timeout=600,
                          preexec_fn=cap)
    assert done.returncode == 2 and "File too large" in done.stderr, done.stderr
    assert (output / "function.zip").read_bytes() == host_zip.read_bytes()
    assert sorted(p.name for p in output.iterdir()) == ["function.zip"]


@pytest.mark.parametrize("index", ["pypi", "wheelhouse"])
def test_a_wheel_cut_off_in_the_cache_is_fetched_again(bundle, host_zip, tmp_path, index):
    """pip download copies a wheel into the cache under its final name, so one cut off there
    (pip killed, a full disk) stayed. PyPI gives each file's sha256 and pip fetched it again;
    from an index without hashes (here a --find-links wheelhouse, --no-index) pip reused it,
    and every later build failed: "pip download failed: Wheel 'mangum' ... is invalid"."""
    from edgerun.runtime.cache import cache_dir
    cached = cache_dir() / "wheels" / f"linux-{MACHINE[HOST]}-cp312"  # filled by host_zip
    wheels = tmp_path / "cache" / "wheels" / cached.name
    shutil.copytree(cached, wheels)
    env = {"EDGERUN_CACHE": str(tmp_path / "cache")}
    if index == "wheelhouse":
        shutil.copytree(cached, tmp_path / "wheelhouse")
        env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheelhouse")}
    [wheel] = wheels.glob("mangum-*.whl")
    whole = wheel.read_bytes()
    wheel.write_bytes(whole[:len(whole) // 2])
    done = edgerun("package", "lambda", str(bundle), "--arch", HOST, "--unzipped",
                   "-o", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / "mangum" / "adapter.py").is_file()
    assert wheel.read_bytes() == whole


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


def tvm_bundle(bundle: Path, folder: Path) -> Path:
    """The test bundle, its manifest naming the tvm backend (its files' hashes still hold)."""
    import shutil
    copy = folder / "tvm-bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "backend": "tvm"}))
    return copy


def test_a_tvm_bundle_is_refused_pointing_at_the_container_image(bundle, tmp_path, monkeypatch):
    """apache-tvm was installed --no-deps (without the apache-tvm-ffi and ml_dtypes it
    imports) and is over Lambda's 250 MB alone: a package that could never serve."""
    from edgerun.adapters.aws_lambda import packaging

    def fetched(*args, **kwargs):
        raise AssertionError("wheels were installed for a package that cannot work")

    monkeypatch.setattr(packaging, "_install", fetched)
    with pytest.raises(BundleError, match=r"tvm bundle cannot be served from a Lambda zip.*"
                                          r"container image.*--build-arg EXTRAS=lambda,tvm"):
        package_lambda(tvm_bundle(bundle, tmp_path), HOST, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_model_folder_of_a_package_from_an_archive_is_0755(bundle, tmp_path, monkeypatch):
    """A .tar.gz bundle is opened in a 0700 temporary folder and copytree kept that mode:
    `model/` was 0700, which a tool zipping folder modes ships for Lambda's non-root user,
    who cannot enter it."""
    from edgerun.adapters.aws_lambda import packaging
    from edgerun.runtime import Bundle
    with Bundle.open(bundle) as opened:
        archive = opened.pack(tmp_path / "mlp-4.tar.gz")
    monkeypatch.setattr(packaging, "_install", lambda *args: None)  # the model is what counts
    package_lambda(archive, HOST, tmp_path / "out", unzipped=True, python312=None)
    model = tmp_path / "out" / "model"
    assert model.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in model.rglob("*") if p.is_file()} == {0o644}


DOCKERFILE = FUNCTION_DIR / "Dockerfile"


def test_the_container_image_installs_the_extras_it_is_built_with():
    """The image installed `/src[lambda]` only: a TFLite or TVM bundle, the ones the zip
    packager sends to the image, could not load in it."""
    import re
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency there
        import tomli as tomllib
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG EXTRAS=lambda$", text, re.M)
    assert 'pip install --no-cache-dir "/src[${EXTRAS}]"' in text
    extras = tomllib.loads((FUNCTION_DIR.parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    for documented in re.findall(r"EXTRAS=([\w,]+)", text):
        assert set(documented.split(",")) <= set(extras), documented


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_the_container_images_bundle_step_takes_a_folder_or_an_archive(bundle, tmp_path, kind):
    """A bundle folder as BUNDLE was copied to /tmp/bundle.tar.gz as a folder, and `bundle
    unpack` failed on it. The image's RUN step, with its paths moved under tmp_path."""
    import re
    import shutil
    import sys
    from edgerun.runtime import Bundle
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    assert re.search(r"^COPY \$\{BUNDLE\} /tmp/bundle$", text, re.M)
    (step,) = re.findall(r"^RUN (.*edgerun bundle unpack.*)$", text, re.M)
    if kind == "folder":  # what COPY does with a folder: its contents, as /tmp/bundle
        shutil.copytree(bundle, tmp_path / "bundle")
    else:
        with Bundle.open(bundle) as opened:
            opened.pack(tmp_path / "bundle")
    step = step.replace("/tmp/", f"{tmp_path}/").replace("/var/task", f"{tmp_path}/task")
    step = step.replace("edgerun bundle", f"{Path(sys.executable).with_name('edgerun')} bundle")
    step = step.replace("python -m", f"{sys.executable} -m")
    done = subprocess.run(["sh", "-c", step], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with Bundle.open(tmp_path / "task" / "model") as served:
        assert served.manifest.name == "mlp"
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.tar.gz").exists()
