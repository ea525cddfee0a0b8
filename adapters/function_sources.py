"""edgerun's own modules a serverless function imports, copied as sources into its package.

A function needs the core, the codecs, the data plane, the lean HTTP app, its own adapter and
the one backend its bundle uses; not the CLI, the optimizers, the FastAPI app or the other
backends. Lambda and Cloud Functions packages are both made of this.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from edgerun.runtime.errors import BundleError

#: What a serving function imports besides its backend, whatever the cloud.
REQUIREMENTS = ("numpy>=1.24", "orjson>=3.9", "pysimdjson>=6.0", "typing-extensions>=4")
BACKEND_REQUIREMENTS = {"onnxruntime": ("onnxruntime>=1.17",), "tflite": ("ai-edge-litert>=1.0",),
                        "tvm": ("apache-tvm>=0.27",)}
_PACKAGES = ("edgerun", "edgerun.runtime", "edgerun.runtime.backends", "edgerun.adapters",
             "edgerun.adapters.codecs", "edgerun.adapters.dataplane", "edgerun.adapters.http",
             "edgerun.devices", "edgerun.devices.profiles")
_SKIPPED = {"edgerun": {"__main__.py", "examples.py"},
            "edgerun.adapters": {"function_sources.py"},
            "edgerun.adapters.http": {"app.py", "server.py"}}


def copy_sources(tree: Path, adapter: str, backend: str) -> None:
    """edgerun's serving modules, `adapter`'s (without its packaging) and `backend`'s, into
    `tree` laid out as an importable `edgerun/` package."""
    from edgerun.runtime.backends import _BACKENDS
    unused = {module.rsplit(".", 1)[1] + ".py" for name, (module, _) in _BACKENDS.items()
              if name != backend}
    skipped = {**_SKIPPED, adapter: {"packaging.py"}, "edgerun.runtime.backends": unused}
    for package in (*_PACKAGES, adapter):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BundleError(f"{package} is not installed; package from an edgerun install")
        source = Path(list(spec.submodule_search_locations)[0])
        target = tree.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.suffix in (".py", ".toml") and \
                    path.name not in skipped.get(package, ()):
                shutil.copy2(path, target / path.name)


def copy_model(bundle: Path, target: Path) -> None:
    """The opened bundle's folder into `target`, every folder 0755 and file 0644: a bundle
    opened from an archive is extracted into a 0700 temporary folder, whose mode copytree
    keeps, and a package tool that zips folder modes would ship a `model/` that the function's
    non-root user cannot enter."""
    shutil.copytree(bundle, target)
    target.chmod(0o755)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
