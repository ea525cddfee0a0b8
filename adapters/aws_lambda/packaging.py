"""`edgerun package lambda`: the deployment package of the SAM function, for one architecture.

The package holds the function module (functions/inference/app.py), the parts of edgerun a
function imports (the core, the codecs, the data plane, the lean HTTP app, this adapter and the
one backend the bundle uses), its dependencies as manylinux wheels for Python 3.12 on the chosen
architecture, and the verified bundle as `model/` (EDGERUN_MODEL's default). Tests, docs, type
stubs, C headers, tools a server never imports and distributions it never loads are left out.

`/var/task` is read-only, so Python cannot cache byte code there and would compile every module
at every cold start: the package ships `.pyc` files compiled by a Python 3.12 interpreter
(byte code is specific to the minor version), with `unchecked-hash` invalidation so they are
used without looking at source timestamps. Without a Python 3.12 on this machine the package
ships sources only, and the report says so.

Wheels are downloaded once into `~/.cache/edgerun/wheels/<platform>/` (or `$EDGERUN_CACHE`) and
installed from there; a cached wheel that is not a whole zip (a download cut off) is fetched
again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgerun.adapters.aws_lambda.architecture import ARCHITECTURE_FILE, MACHINES
from edgerun.adapters.function_sources import (BACKEND_REQUIREMENTS, REQUIREMENTS, copy_model,
                                               copy_sources)
from edgerun.runtime.bundle import Bundle
from edgerun.runtime.cache import cache_dir
from edgerun.runtime.errors import BundleError

PYTHON = "3.12"
#: The python3.12 runtime is Amazon Linux 2023 (glibc 2.34): manylinux2014 wheels and every
#: newer manylinux up to glibc 2.34 run there (onnxruntime ships manylinux_2_27/2_28 only).
GLIBC_MINORS = range(17, 35)
#: Lambda's limit for a function's code and layers, unzipped.
UNZIPPED_LIMIT = 250 * 1024 * 1024
#: Larger zips cannot be uploaded directly; `sam deploy` goes through S3.
DIRECT_UPLOAD_LIMIT = 50 * 1024 * 1024
FUNCTION_DIR = Path(__file__).resolve().parents[2] / "functions" / "inference"
#: Where Lambda unpacks the package (LAMBDA_TASK_ROOT).
TASK_ROOT = "/var/task"
#: What the function imports; the rest of each wheel's requirements (flatbuffers, protobuf,
#: packaging for onnxruntime) are build and tool dependencies.
LAMBDA_REQUIREMENTS = (*REQUIREMENTS, "mangum>=0.17")
#: Backends no zip package can serve, and why: a pip install --no-deps of apache-tvm lacks
#: the apache-tvm-ffi and ml_dtypes it imports, and with them it is over the limit alone.
CONTAINER_ONLY = {"tvm": (
    "a tvm bundle cannot be served from a Lambda zip package: apache-tvm needs apache-tvm-ffi "
    "and ml_dtypes, and unpacks to about 305 MB, over Lambda's 250 MB limit for a function's "
    "code and layers. Use the container image (up to 10 GB): docker build -f "
    "functions/inference/Dockerfile --build-arg EXTRAS=lambda,tvm --build-arg BUNDLE=... .")}
#: Left out of every dependency: tests, docs, stubs, headers, sources of compiled code.
DROPPED_DIRS = {"tests", "test", "testing", "include", "__pycache__", "docs", "benchmarks"}
DROPPED_SUFFIXES = {".pyi", ".pyx", ".pxd", ".h", ".hpp", ".c", ".cpp", ".md", ".rst"}
#: Parts of onnxruntime that only offline tools import.
DROPPED_PATHS = {"onnxruntime/tools", "onnxruntime/transformers", "onnxruntime/quantization",
                 "onnxruntime/datasets", "onnxruntime/backend", "numpy/f2py", "numpy/typing"}


@dataclass
class PackageReport:
    path: Path
    architecture: str
    unzipped_bytes: int
    zipped_bytes: int | None
    files: int
    bytecode: str  # "python 3.12.x (unchecked-hash)" or why there is none
    largest: list[tuple[str, int]] = field(default_factory=list)

    @property
    def fraction_of_limit(self) -> float:
        return self.unzipped_bytes / UNZIPPED_LIMIT


def package_lambda(bundle: Path, architecture: str, output: Path, *, unzipped: bool = False,
                   python312: str | None = None, cache: Path | None = None,
                   limit: int = UNZIPPED_LIMIT) -> PackageReport:
    """Build the package into `output` (as `function.zip`, or as a tree with `unzipped`)."""
    if architecture not in MACHINES:
        raise BundleError(f"architecture {architecture!r}: Lambda runs arm64 or x86_64")
    if not (FUNCTION_DIR / "app.py").is_file():
        raise BundleError(f"{FUNCTION_DIR / 'app.py'} is missing: package from a checkout of "
                          "edgerun (pip install -e .)")
    if python312 is not None:
        _check_python312(python312)  # before wheels are downloaded and the tree is built
    if unzipped and output.is_dir() and any(output.iterdir()):
        # copied over an earlier package, its files would stay (another architecture's
        # binaries, another bundle's model files), deployed but in no size check
        raise BundleError(f"{output} is not empty: an unzipped package must be all that the "
                          "folder holds (remove it, or name a new one)")
    with Bundle.open(bundle) as opened:  # verified before anything is built around it
        backend = opened.manifest.backend
        if backend in CONTAINER_ONLY:  # before any wheel is downloaded
            raise BundleError(CONTAINER_ONLY[backend])
        with tempfile.TemporaryDirectory(prefix="edgerun-lambda-") as scratch:
            tree = Path(scratch) / "package"
            copy_model(opened.path, tree / "model")
            shutil.copy2(FUNCTION_DIR / "app.py", tree / "app.py")
            # app.py checks it first at init: sam build does not tell the Makefile the
            # template's Architecture, and arm64 wheels on x86_64 fail in numpy's import
            (tree / ARCHITECTURE_FILE).write_text(architecture + "\n")
            copy_sources(tree, "edgerun.adapters.aws_lambda", backend)
            _install(tree, architecture, backend, cache or _default_cache())
            _prune(tree)
            _check_size(_sizes(tree), architecture, limit)  # before spending time compiling
            bytecode = _compile(tree, python312)
            sizes = _sizes(tree)
            unzipped_bytes, largest = _check_size(sizes, architecture, limit)
            output.mkdir(parents=True, exist_ok=True)
            if unzipped:
                shutil.copytree(tree, output, dirs_exist_ok=True)
                return PackageReport(output, architecture, unzipped_bytes, None, len(sizes),
                                     bytecode, largest)
            target = output / "function.zip"
            _zip(tree, target)
            return PackageReport(target, architecture, unzipped_bytes, target.stat().st_size,
                                 len(sizes), bytecode, largest)


def find_python312() -> str | None:
    """A Python 3.12 interpreter: on PATH, in pyenv, or managed by uv."""
    home = Path.home()
    candidates = [shutil.which("python3.12") or ""]
    candidates += sorted(str(p) for p in home.glob(".pyenv/versions/3.12*/bin/python3.12"))
    candidates += sorted(str(p) for p in home.glob(
        ".local/share/uv/python/cpython-3.12*/bin/python3.12"))
    for candidate in filter(None, candidates):
        if _version_of(candidate) == PYTHON:
            return candidate
    return None


def _version_of(python: str) -> str | None:
    """`python`'s major.minor version, or None when it does not run."""
    try:
        done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _check_python312(python: str) -> None:
    """A named interpreter must be 3.12: byte code of any other version is ignored by the
    python3.12 runtime, so the package would ship dead weight and compile at every cold start."""
    version = _version_of(python)
    if version != PYTHON:
        found = f"is Python {version}" if version else "does not run"
        raise BundleError(f"{python} {found}: byte code for Lambda's python{PYTHON} runtime "
                          f"needs a Python {PYTHON} (--python)")


def _default_cache() -> Path:
    return cache_dir() / "wheels"


def _install(tree: Path, architecture: str, backend: str, cache: Path) -> None:
    """Install from the wheel cache; download into it first what it lacks."""
    machine = MACHINES[architecture]
    wheels = cache / f"linux-{machine}-cp312"
    wheels.mkdir(parents=True, exist_ok=True)
    platform = ["--platform", f"manylinux2014_{machine}"]
    for minor in GLIBC_MINORS:
        platform += ["--platform", f"manylinux_2_{minor}_{machine}"]
    platform += ["--implementation", "cp", "--python-version", PYTHON, "--only-binary=:all:",
                 "--no-deps"]
    requirements = [*LAMBDA_REQUIREMENTS, *BACKEND_REQUIREMENTS.get(backend, ())]
    # Requires-Python is checked against 3.12 when downloading; installing must not check it
    # against the interpreter that runs pip
    install = ["install", "--target", str(tree), "--no-index", "--find-links", str(wheels),
               "--no-compile", "--ignore-requires-python", *platform, *requirements]
    try:
        _pip(*install)  # offline, from the wheels an earlier build downloaded
    except BundleError:
        _drop_broken(wheels)
        _pip("download", "--dest", str(wheels), *platform, *requirements)
        _pip(*install)


def _drop_broken(wheels: Path) -> None:
    """Remove the cached wheels that are not whole zips, so the download fetches them again.

    pip download copies a wheel into the cache under its final name: one cut off there (pip
    killed, a full disk) stayed. With PyPI, pip checks the file against the index's sha256 and
    fetches it again; from an index without hashes (a --find-links wheelhouse, a plain mirror)
    it reused the broken file, and every later build failed ("pip download failed: Wheel ...
    is invalid") until someone deleted it by hand."""
    for wheel in wheels.glob("*.whl"):
        try:
            with zipfile.ZipFile(wheel):  # reads the central directory, the end of the file
                pass
        except zipfile.BadZipFile:
            wheel.unlink(missing_ok=True)


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"pip {args[0]} failed:\n{done.stderr.strip()[-2000:]}")


def _prune(tree: Path) -> None:
    for relative in DROPPED_PATHS:
        shutil.rmtree(tree / relative, ignore_errors=True)
    for path in sorted(tree.rglob("*"), reverse=True):
        if not path.exists() or path.is_relative_to(tree / "model"):
            continue
        if path.is_dir() and path.name in DROPPED_DIRS:
            shutil.rmtree(path)
        elif path.is_file() and path.suffix in DROPPED_SUFFIXES:
            path.unlink()
    shutil.rmtree(tree / "bin", ignore_errors=True)  # console scripts pip writes


def _compile(tree: Path, python312: str | None) -> str:
    python = python312 or find_python312()
    if python is None:
        return "none: no Python 3.12 found (pass --python); the package ships sources only"
    # -d: code objects name their source where Lambda has it, not the build's random scratch
    # folder, which made every build's .pyc files, and so the zip, differ
    done = subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "-d", TASK_ROOT,
                           "--invalidation-mode", "unchecked-hash", str(tree)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"compiling byte code with {python} failed:\n"
                          f"{(done.stdout + done.stderr).strip()[-2000:]}")
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True).stdout.strip()
    return f"python {version} (unchecked-hash .pyc)"


def _files(tree: Path) -> Iterator[Path]:
    return (p for p in sorted(tree.rglob("*")) if p.is_file())


def _sizes(tree: Path) -> dict[str, int]:
    return {p.relative_to(tree).as_posix(): p.stat().st_size for p in _files(tree)}


def _check_size(sizes: dict[str, int], architecture: str,
                limit: int) -> tuple[int, list[tuple[str, int]]]:
    """The unzipped size and the largest parts; BundleError naming them when over `limit`."""
    total = sum(sizes.values())
    largest = _largest(sizes)
    if total > limit:
        raise BundleError(
            f"the {architecture} package unzips to {total / 2**20:.1f} MB, over Lambda's "
            f"{limit / 2**20:.0f} MB limit for a function's code and layers; largest parts: "
            + ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in largest[:5])
            + ". Ship the model from S3 (EDGERUN_MODEL=s3://...) or use the container image "
              "(functions/inference/Dockerfile, up to 10 GB)")
    return total, largest


def _largest(sizes: dict[str, int]) -> list[tuple[str, int]]:
    """Sizes by top-level entry (a distribution, edgerun, the model), largest first."""
    totals: dict[str, int] = {}
    for name, size in sizes.items():
        top = name.split("/")[0]
        if top.endswith(".dist-info") or top.endswith(".libs"):
            top = re.split(r"[-.]", top)[0]
        totals[top] = totals.get(top, 0) + size
    return sorted(totals.items(), key=lambda item: -item[1])


def _zip(tree: Path, target: Path) -> None:
    """A reproducible zip: sorted names, fixed timestamps, modes kept (0644 or 0755).

    Written beside `target` and renamed onto it when whole: a build cut off while zipping (a
    full disk, Ctrl-C) leaves the earlier package, not a truncated one for the deploy to upload.
    """
    partial = target.with_name(target.name + ".partial")
    try:
        # level 1: a few percent larger than the default level, three times faster to build
        with zipfile.ZipFile(partial, "w") as archive:
            for path in _files(tree):
                info = zipfile.ZipInfo(path.relative_to(tree).as_posix(), (1980, 1, 1, 0, 0, 0))
                info.external_attr = (0o100755 if os.access(path, os.X_OK) else 0o100644) << 16
                archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED, 1)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
