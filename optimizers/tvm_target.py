"""A device profile's TVM target, and whether an artifact for it can run on this host."""

from __future__ import annotations

import os
import platform
from typing import Any

from edgerun.devices import DeviceProfile

#: `platform.machine()` spellings of the two CPU architectures edgerun compiles for.
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    """This host's CPU architecture as the profiles spell it ("x86_64", "aarch64")."""
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def target_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The profile's target in apache-tvm 0.27's dict form; an empty one means this host's CPU."""
    if profile.tvm_target:
        return _plain(profile.tvm_target)
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu()).attrs
    return {"kind": "llvm", "mtriple": f"{host_arch()}-linux-gnu",
            "mcpu": str(detected.get("mcpu", "generic")), "num-cores": os.cpu_count() or 1}


def target_for(profile: DeviceProfile) -> Any:
    """The `tvm.target.Target` to compile for."""
    import tvm

    return tvm.target.Target(target_dict(profile))


def is_cuda(target: dict[str, Any]) -> bool:
    return target.get("kind") == "cuda"


def cpu_arch(target: dict[str, Any]) -> str:
    """The CPU architecture the host code of a target runs on."""
    llvm = target.get("host", {}) if is_cuda(target) else target
    triple = str(llvm.get("mtriple", f"{host_arch()}-linux-gnu"))
    return _MACHINES.get(triple.split("-")[0], triple.split("-")[0])


def runs_here(target: dict[str, Any]) -> bool:
    """True when an artifact for this target can run on this host with this TVM."""
    if cpu_arch(target) != host_arch():
        return False
    if is_cuda(target):
        import tvm

        return bool(tvm.cuda(0).exist)
    return True


#: x86 instruction-set extensions that compiled code may use and an older CPU lacks (an
#: illegal instruction there), as LLVM names them; every `avx*` and `amx*` one counts too,
#: but those Linux never lists in /proc/cpuinfo (KVM-only there), which no host could show.
_X86_ISA = {"sse4.1", "sse4.2", "ssse3", "fma", "f16c", "bmi", "bmi2"}
_NOT_IN_CPUINFO = {"avxvnniint8", "avxvnniint16", "avxneconvert", "amx-complex"}


def cpu_features(target: dict[str, Any]) -> list[str]:
    """The x86 instruction-set extensions an artifact for this CPU target may use (its `mcpu`,
    as LLVM knows it, and `mattr`), for the manifest: the backend refuses the artifact on a
    host without them. [] for other targets."""
    if is_cuda(target) or cpu_arch(target) != "x86_64":
        return []
    import tvm
    from tvm.target import codegen

    features = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target))}
    return sorted(f for f in features if "avx10" not in f and f not in _NOT_IN_CPUINFO and
                  (f in _X86_ISA or f.startswith(("avx", "amx"))))


def describe(target: dict[str, Any]) -> str:
    """A short name for messages: "aarch64 cpu (cortex-a76)" or "cuda sm_87 on aarch64"."""
    if is_cuda(target):
        return f"cuda {target.get('arch', '?')} on {cpu_arch(target)}"
    return f"{cpu_arch(target)} cpu ({target.get('mcpu', 'generic')})"


def _plain(value: Any) -> Any:
    """TOML tables and arrays as plain dicts and lists (tvm's Target wants JSON-like data)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
