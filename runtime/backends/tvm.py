"""TVM: a library compiled by `edgerun.optimizers.tvm`, run with the Relax VM.

The library is native code for one CPU (and one GPU arch): loading it anywhere else would
crash or fail deep inside TVM, so the target the manifest records is checked against this host
first and refused with both named.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.devices import DeviceProfile
from edgerun.runtime.backends.base import Backend
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature

#: ELF e_machine values of the CPUs edgerun compiles for.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_HOST_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _HOST_MACHINES.get(machine, machine)


def library_arch(path: Path) -> str:
    """The CPU a shared library was built for, from its ELF header."""
    with path.open("rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise BundleError(f"{path.name}: not an ELF shared library; a TVM bundle's model file is "
                          "the library `edgerun optimize --compile tvm` exports")
    machine = int.from_bytes(header[18:20], "little")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def _cuda_available() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


class TvmBackend(Backend):
    name = "tvm"

    def __init__(self, library: Any, device: Any, signature: Signature, target: str) -> None:
        self._library = library
        self._device = device
        self._input_names = [spec.name for spec in signature.inputs]
        self._output_names = [spec.name for spec in signature.outputs]
        self._target = target
        self._local = threading.local()

    @classmethod
    def inspect(cls, model_path: Path) -> Signature:
        raise BundleError(f"{model_path.name}: a TVM library does not describe its tensors; "
                          "make TVM bundles with `edgerun optimize MODEL.onnx --compile tvm`")

    @classmethod
    def load(cls, model_path: Path, device: DeviceProfile) -> TvmBackend:
        from edgerun.runtime.bundle import read_manifest

        manifest = read_manifest(model_path.parent)
        recorded = manifest.device
        target = recorded.get("tvm_target", recorded.get("target", "?"))
        built_for = library_arch(model_path)
        if built_for != host_arch():
            raise BundleError(
                f"{model_path.name} was compiled for {built_for} (profile "
                f"{recorded.get('profile', '?')}, target {target}); this host is {host_arch()}")
        accelerator = recorded.get("accelerator", "cpu")
        if accelerator.startswith("cuda") and not _cuda_available():
            raise BundleError(
                f"{model_path.name} was compiled for {accelerator} (profile "
                f"{recorded.get('profile', '?')}, target {target}); this host has no CUDA "
                "device that TVM can use (no GPU, or a TVM built without CUDA)")
        return cls.load_library(model_path, manifest.signature, target,
                                cuda=accelerator.startswith("cuda"))

    @classmethod
    def load_library(cls, path: Path, signature: Signature, target: Any, *,
                     cuda: bool = False) -> TvmBackend:
        """Load a library already known to suit this host (the optimizer checks its own)."""
        import tvm
        from tvm import relax  # noqa: F401  (registers the Relax VM loader)

        # Loaded from a copy at a path of its own: the dynamic loader hands back the library
        # it already holds for a path, so a new version installed where an old one was (an
        # OTA slot, a rebuilt bundle) would run the old code. Once mapped, the copy can go.
        with tempfile.TemporaryDirectory(prefix="edgerun-tvm-") as scratch:
            private = Path(scratch) / path.name
            shutil.copyfile(path, private)
            try:
                library = tvm.runtime.load_module(str(private))
            except Exception as exc:  # tvm raises its own error types
                raise BundleError(f"{path.name}: TVM cannot load it: {exc}") from exc
        return cls(library, tvm.cuda(0) if cuda else tvm.cpu(0), signature, str(target))

    def _vm(self) -> Any:
        """One VM per thread: a Relax VM keeps per-call state, the library is shared."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            from tvm import relax

            vm = self._local.vm = relax.VirtualMachine(self._library, self._device)
        return vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        vm = self._vm()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), self._device)
                for name in self._input_names]
        result = vm["main"](*args)
        results = [result] if hasattr(result, "numpy") else list(result)
        return {name: value.numpy() for name, value in zip(self._output_names, results)}

    def describe(self) -> dict[str, Any]:
        import tvm

        return {"backend": self.name, "tvm": tvm.__version__, "target": self._target,
                "providers": [f"tvm:{self._device}"]}
