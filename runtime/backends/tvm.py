"""TVM: a library compiled by `edgerun.optimizers.tvm`, run with the Relax VM.

The library is native code for one CPU (and one GPU arch): loading it anywhere else would
crash or fail deep inside TVM, so the target the manifest records is checked against this host
first and refused with both named.

Threads: TVM runs a library's parallel loops on a pool that belongs to the thread calling the
model, shared by every TVM model that thread runs, and sized when the thread first uses it; on
its own it takes half the host's logical CPUs on x86 (all of them elsewhere), blind to a
container's quota. A model sizes the pool of each thread that runs it to the profile's
`intra_op_threads`, else to the CPUs the container leaves (`cpu_limit`), else leaves TVM's
default (or TVM_NUM_THREADS / OMP_NUM_THREADS, when set) alone. Two models with different counts
run from one thread share its pool: the later one's count can lower it, never raise it. TVM's
binding of threads to cores is off (TVM_BIND_THREADS=0) unless the environment turns it on.
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
from edgerun.runtime.backends.cpus import cpu_limit
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature

if TYPE_CHECKING:
    from edgerun.runtime.bundle import Bundle, Manifest

#: `runtime.config_threadpool`'s mode that TVM's pool starts in (kBig; it picks the cores TVM
#: would bind to, and binding is off, see `_load_bytes`).
_BIG_CORES = 1
#: Per calling thread: the pool size this module last gave TVM there.
_POOL = threading.local()

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


def threads_for(device: DeviceProfile) -> int:
    """The pool size for a profile: its `intra_op_threads`, else the CPUs a container leaves;
    0 (TVM's own choice) when neither says, or when the operator set TVM's variables."""
    if device.intra_op_threads:
        return device.intra_op_threads
    if os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return 0
    return cpu_limit() or 0


def use_threads(count: int) -> None:
    """Size the calling thread's TVM pool to `count` (0: leave it). TVM sizes a pool by the
    length of the CPU list it is given (in kBig mode the ids only count) and caps it at the size
    it had when first made, so it is called before the thread's first run."""
    if not count or getattr(_POOL, "threads", None) == count:
        return
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(
        _BIG_CORES, count, [str(i) for i in range(count)])
    _POOL.threads = count


def use_threads_on(session: Any, count: int) -> None:
    """`use_threads` on a device through a TVM RPC session (a new process per session): its
    serving thread's pool, sized before it runs anything. RPC carries no arrays, so the CPU
    list is made on the device."""
    if not count:
        return
    cpus = session.get_function("ffi.Array")(*[str(i) for i in range(count)])
    session.get_function("runtime.config_threadpool")(_BIG_CORES, count, cpus)


def _cuda_available() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


class TvmBackend(Backend):
    name = "tvm"

    def __init__(self, library: Any, device: Any, signature: Signature, target: str,
                 threads: int = 0) -> None:
        self._library = library
        self._device = device
        self._threads = threads  # the pool size of each thread running it (0: TVM's default)
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
                         read_manifest(model_path.parent), device)

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: DeviceProfile) -> TvmBackend:
        """The library from its verified bytes, with the manifest the bundle was opened with
        (its signature and target): neither is read from the folder again."""
        name = bundle.manifest.model_file
        return cls._load(bundle.read_file(name), name, bundle.manifest, device)

    @classmethod
    def _load(cls, library: bytes, name: str, manifest: Manifest,
              device: DeviceProfile) -> TvmBackend:
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
        cuda = accelerator.startswith("cuda")
        return cls._load_bytes(library, name, manifest.signature, target, cuda=cuda,
                               threads=0 if cuda else threads_for(device))

    @classmethod
    def load_library(cls, path: Path, signature: Signature, target: Any, *,
                     cuda: bool = False, threads: int = 0) -> TvmBackend:
        """Load a library already known to suit this host (the optimizer checks its own), run
        on `threads` (`threads_for` a profile; 0: TVM's default)."""
        return cls._load_bytes(path.read_bytes(), path.name, signature, target, cuda=cuda,
                               threads=threads)

    @classmethod
    def _load_bytes(cls, library: bytes, name: str, signature: Signature, target: Any, *,
                    cuda: bool = False, threads: int = 0) -> TvmBackend:
        """Load a library from its bytes. TVM's loader (the dynamic loader) takes only a path:
        the bytes are written to a file of a fresh private folder (0700; the file 0600), which
        nobody else can replace, loaded, and removed once mapped. A path of its own also
        matters because the dynamic loader hands back the library it already holds for a path,
        so a new version installed where an old one was (an OTA slot, a rebuilt bundle) would
        run the old code."""
        import tvm
        from tvm import relax  # noqa: F401  (registers the Relax VM loader)

        # TVM binds a calling thread to the first cores, and its pool's workers one to a core,
        # the same cores for every thread's pool: a version's instances, two models, the
        # loading thread (and the threads it starts later, ONNX Runtime's among them) would all
        # be stacked there. The kernel places them, as it does ONNX Runtime's; =1 binds again.
        os.environ.setdefault("TVM_BIND_THREADS", "0")
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
        return cls(module, tvm.cuda(0) if cuda else tvm.cpu(0), signature, str(target), threads)

    def _vm(self) -> Any:
        """One VM per thread: a Relax VM keeps per-call state, the library is shared."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            from tvm import relax

            vm = self._local.vm = relax.VirtualMachine(self._library, self._device)
        return vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        use_threads(self._threads)
        vm = self._vm()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), self._device)
                for name in self._input_names]
        result = vm["main"](*args)
        results = [result] if hasattr(result, "numpy") else list(result)
        return {name: value.numpy() for name, value in zip(self._output_names, results)}

    def describe(self) -> dict[str, Any]:
        import tvm

        return {"backend": self.name, "tvm": tvm.__version__, "target": self._target,
                "providers": [f"tvm:{self._device}"],
                "threads": self._threads}  # 0: TVM's own default
