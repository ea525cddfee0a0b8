"""TVM: a library compiled by `edgerun.optimizers.tvm`, run with the Relax VM.

The library is native code for one CPU (and one GPU arch): loading it anywhere else would
crash or fail deep inside TVM, so the target the manifest records is checked against this host
first and refused with both named.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerun.devices import DeviceProfile
from edgerun.runtime.backends.base import Backend
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature

if TYPE_CHECKING:
    from edgerun.runtime.bundle import Bundle, Manifest

#: ELF e_machine values of the CPUs edgerun compiles for.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_HOST_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _HOST_MACHINES.get(machine, machine)


def library_arch(library: Path | bytes, name: str | None = None) -> str:
    """The CPU a shared library (a file, or its bytes) was built for, from its ELF header."""
    if isinstance(library, bytes):
        header, name = library[:20], name or "model"
    else:
        with library.open("rb") as handle:
            header, name = handle.read(20), name or library.name
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise BundleError(f"{name}: not an ELF shared library; a TVM bundle's model file is "
                          "the library `edgerun optimize --compile tvm` exports")
    machine = int.from_bytes(header[18:20], "little")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def host_cpu_flags() -> set[str] | None:
    """This host's CPU flags (/proc/cpuinfo), as `normalized_flag` spells them; None if
    unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return {normalized_flag(flag) for flag in value.split()}
    except OSError:
        pass
    return None


def normalized_flag(name: str) -> str:
    """LLVM's and /proc/cpuinfo's spellings of one feature alike: "sse4.2" and "sse4_2",
    "avx512vnni" and "avx512_vnni", "amx-tile" and "amx_tile"; LLVM's "bmi" is "bmi1"."""
    plain = name.lower().replace("_", "").replace("-", "").replace(".", "")
    return "bmi1" if plain == "bmi" else plain


def missing_cpu_features(recorded: str) -> list[str]:
    """The features of the manifest's `cpu_features` (comma-separated, LLVM's names) this
    host's CPU lacks; [] when it has them all or its flags cannot be read."""
    host = host_cpu_flags()
    if host is None:
        return []
    return [f for f in recorded.split(",") if f and normalized_flag(f) not in host]


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

        return cls._load(model_path.read_bytes(), model_path.name,
                         read_manifest(model_path.parent))

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: DeviceProfile) -> TvmBackend:
        """The library from its verified bytes, with the manifest the bundle was opened with
        (its signature and target): neither is read from the folder again."""
        name = bundle.manifest.model_file
        return cls._load(bundle.read_file(name), name, bundle.manifest)

    @classmethod
    def _load(cls, library: bytes, name: str, manifest: Manifest) -> TvmBackend:
        recorded = manifest.device
        target = recorded.get("tvm_target", recorded.get("target", "?"))
        built_for = library_arch(library, name)
        if built_for != host_arch():
            raise BundleError(
                f"{name} was compiled for {built_for} (profile "
                f"{recorded.get('profile', '?')}, target {target}); this host is {host_arch()}")
        missing = missing_cpu_features(recorded.get("cpu_features", ""))
        if missing:
            raise BundleError(
                f"{name} was compiled for {target} (profile {recorded.get('profile', '?')}) and "
                f"uses CPU features this host lacks: {', '.join(missing)}; it would stop on an "
                "illegal instruction. Compile it for this CPU (a profile with its mcpu, or "
                "`cpu` on a host like it)")
        accelerator = recorded.get("accelerator", "cpu")
        if accelerator.startswith("cuda") and not _cuda_available():
            raise BundleError(
                f"{name} was compiled for {accelerator} (profile "
                f"{recorded.get('profile', '?')}, target {target}); this host has no CUDA "
                "device that TVM can use (no GPU, or a TVM built without CUDA)")
        return cls._load_bytes(library, name, manifest.signature, target,
                               cuda=accelerator.startswith("cuda"))

    @classmethod
    def load_library(cls, path: Path, signature: Signature, target: Any, *,
                     cuda: bool = False) -> TvmBackend:
        """Load a library already known to suit this host (the optimizer checks its own)."""
        return cls._load_bytes(path.read_bytes(), path.name, signature, target, cuda=cuda)

    @classmethod
    def _load_bytes(cls, library: bytes, name: str, signature: Signature, target: Any, *,
                    cuda: bool = False) -> TvmBackend:
        """Load a library from its bytes. TVM's loader (the dynamic loader) takes only a path:
        the bytes are written to a file of a fresh private folder (0700; the file 0600), which
        nobody else can replace, loaded, and removed once mapped. A path of its own also
        matters because the dynamic loader hands back the library it already holds for a path,
        so a new version installed where an old one was (an OTA slot, a rebuilt bundle) would
        run the old code."""
        import tvm
        from tvm import relax  # noqa: F401  (registers the Relax VM loader)

        scratch = tempfile.mkdtemp(prefix="edgerun-tvm-")  # mode 0700
        try:
            fd, private = tempfile.mkstemp(suffix=".so", dir=scratch)  # mode 0600
            with os.fdopen(fd, "wb") as handle:
                handle.write(library)
            try:
                module = tvm.runtime.load_module(private)
            except Exception as exc:  # tvm raises its own error types
                raise BundleError(f"{name}: TVM cannot load it: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return cls(module, tvm.cuda(0) if cuda else tvm.cpu(0), signature, str(target))

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
