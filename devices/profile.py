"""Typed loading of the TOML device profiles shipped in `devices/profiles/` (or a user's file)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

PROFILE_DIR = Path(__file__).with_name("profiles")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PRECISIONS = ("fp32", "fp16", "int8")
ARCHES = ("any", "x86_64", "aarch64")
TVM_KINDS = ("llvm", "cuda")
_SM_RE = re.compile(r"^sm_[0-9]{2,3}[a-z]?$")


#: Each field's annotation -> the type its value must have.
_FIELD_KINDS: dict[str, type] = {"str": str, "int": int, "bool": bool, "tuple[str, ...]": tuple,
                                 "dict[str, Any]": dict}
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false",
               tuple: "a list of strings", dict: "a table"}
#: The most each integer field may be. Thread counts and instances: far above the logical CPUs
#: of any host (the largest two-socket servers have under 1024), where more is never faster;
#: ONNX Runtime's intra_op_num_threads is a C int (past 2**31 - 1 a TypeError naming nothing),
#: and a pool of 2**31 - 1 threads was a std::bad_alloc at load. Memory: 1 PiB, in MiB.
_MAXIMA = {"intra_op_threads": 1024, "inter_op_threads": 1024, "instances": 1024,
           "memory_mb": 1 << 30}


class ProfileError(ValueError):
    """A field that cannot work; `reason` says why without the profile's name, for
    `load_profile` to name the file instead."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(f"device profile {name!r}: {reason}")
        self.reason = reason


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_text(key: str) -> str:
    """A TOML key as an error names it: as written where TOML takes it bare, else escaped
    (repr): a quoted key's newline split the error over two lines, half of it lost to a log
    reader."""
    return key if _BARE_KEY.fullmatch(key) else repr(key)


def is_integer(value: Any) -> bool:
    """An int from JSON or TOML, not a bool (True is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DeviceProfile:
    """How to run on one kind of device: execution providers in order of preference, threads."""

    name: str
    description: str = ""
    arch: str = "any"
    #: ONNX Runtime providers, best first; those not present in the installed build are skipped
    #: and CPUExecutionProvider is always the last resort.
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: 0: the CPUs the process may use (a container's CPU limit, its affinity), else the
    #: backend's default (one thread per physical core).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    #: ONNX Runtime's default: idle threads spin briefly before sleeping, so the parallel
    #: sections of a forward pass hand over faster when nothing else needs the cores (about
    #: 13 % more micro-batched throughput in benchmarks/core.py). Every shipped profile turns
    #: it off: in edgerun the model shares the cores with a transport (the server's event loop,
    #: the daemon's network thread) that spinning threads starve, and on a battery or a
    #: passively cooled board the spinning after every batch is heat and power for nothing.
    allow_spinning: bool = True
    #: Model instances per model the serving adapters start (each with its own session).
    instances: int = 1
    #: What the optimizer compiles for: GNU host triple ("aarch64-linux-gnu"), the TVM target in
    #: apache-tvm 0.27's dict form (CUDA targets carry their "arch" and an llvm "host"), and the
    #: C++ compiler that links a TVM library for the device ("" = the host's own).
    host_triple: str = ""
    tvm_target: dict[str, Any] = field(default_factory=dict)
    cross_compiler: str = ""
    #: The precision the optimizer picks when none is asked for: int8 on ARM CPUs, fp16 on GPUs.
    precision: str = "fp32"
    #: Memory a model may take on the device, in MiB (0: no budget).
    memory_mb: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if self.graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise ProfileError(self.name, "graph_optimization_level must be one of "
                                          f"{', '.join(OPTIMIZATION_LEVELS)}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0 or self.instances < 1:
            raise ProfileError(self.name, "thread counts must be >= 0 and instances >= 1")
        for name, most in _MAXIMA.items():
            if getattr(self, name) > most:
                raise ProfileError(self.name, f"{name} must be at most {most}, got "
                                              f"{getattr(self, name)!r:.40}")
        if self.precision not in PRECISIONS:
            raise ProfileError(self.name, f"precision must be one of {', '.join(PRECISIONS)}")
        if self.arch not in ARCHES:
            raise ProfileError(self.name, f"arch must be one of {', '.join(ARCHES)}")
        if self.memory_mb < 0:
            raise ProfileError(self.name, "memory_mb must be >= 0")
        self._check_tvm_target()
        object.__setattr__(self, "execution_providers", tuple(self.execution_providers))

    def _check_types(self) -> None:
        """TOML gives what the user wrote: "4" for 4, or one provider name for a list of them
        (which `tuple` would split into letters)."""
        for item in fields(self):
            value, kind = getattr(self, item.name), _FIELD_KINDS[str(item.type)]
            if kind is tuple:
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            elif kind is int:
                ok = is_integer(value)
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise ProfileError(self.name, f"{item.name} must be {_KIND_NAMES[kind]}, got "
                                              f"{value!r:.40}")

    def _check_tvm_target(self) -> None:
        target = self.tvm_target
        if not target:
            return
        if target.get("kind") not in TVM_KINDS:
            raise ProfileError(self.name, f"tvm_target.kind must be one of {', '.join(TVM_KINDS)}")
        if target["kind"] == "cuda":
            if not _SM_RE.match(str(target.get("arch", ""))):
                raise ProfileError(self.name, "tvm_target.arch must name the GPU architecture, "
                                              "e.g. 'sm_87'")
            if not isinstance(target.get("host"), dict) or target["host"].get("kind") != "llvm":
                raise ProfileError(self.name, "tvm_target.host must be an llvm target for the "
                                              "CPU beside the GPU")
        llvm = target["host"] if target["kind"] == "cuda" else target
        triple = str(llvm.get("mtriple", ""))
        if self.host_triple and triple != self.host_triple:
            raise ProfileError(self.name, f"tvm_target: mtriple {triple!r:.80} differs from "
                                          f"host_triple {self.host_triple!r:.80}")
        if self.arch != "any" and triple and not triple.startswith(self.arch):
            raise ProfileError(self.name, f"tvm_target: mtriple {triple!r:.80} is not for arch "
                                          f"{self.arch!r}")

    @property
    def accelerator(self) -> str:
        """What the TVM artifact's kernels run on: "cpu" or "cuda:sm_87"."""
        if self.tvm_target.get("kind") == "cuda":
            return f"cuda:{self.tvm_target['arch']}"
        return "cpu"

    def replace(self, **changes: Any) -> DeviceProfile:
        """A copy with some fields overridden (None values are ignored)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update({key: value for key, value in changes.items() if value is not None})
        return DeviceProfile(**data)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgerun."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path | DeviceProfile | None = None) -> DeviceProfile:
    """A shipped profile by name, a TOML file by path, or the default `cpu` profile."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    if name_or_path is None:
        name_or_path = "cpu"
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"unknown device profile {str(name_or_path)!r} (no such profile file); "
                         f"shipped profiles: {', '.join(list_profiles())}")
    with path.open("rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:  # "Invalid value (at line 2)": of which file?
            raise ValueError(f"device profile {path}: {exc}") from None
        except UnicodeDecodeError as exc:  # tomllib decodes the whole file first
            raise ValueError(f"device profile {path}: not UTF-8 text, as TOML must be "
                             f"({exc.reason} at byte {exc.start})") from None
        except RecursionError:  # tomllib parses arrays and tables recursively
            raise ValueError(f"device profile {path}: arrays or tables nested too "
                             "deep") from None
    known = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"device profile {path}: unknown keys "
                         f"{', '.join(map(key_text, unknown))}")
    data.setdefault("name", path.stem)
    try:
        return DeviceProfile(**data)
    except ProfileError as exc:  # the profile's name alone: which file is it in?
        raise ValueError(f"device profile {path}: {exc.reason}") from None
