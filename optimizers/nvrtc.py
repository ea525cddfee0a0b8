"""CUDA 12's NVRTC through ctypes: device code for the GPUs that CUDA 13's nvcc dropped.

CUDA 13 no longer targets sm_50..sm_72 (Jetson Nano is sm_53, Xavier NX sm_72), and PyPI has
no CUDA 12 nvcc: nvidia-cuda-nvcc-cu12 ships only ptxas and libnvvm. It does have CUDA 12's
NVRTC (nvidia-cuda-nvrtc-cu12), which compiles CUDA C to PTX or to a cubin without a GPU or a
driver, and the headers TVM's kernels include (cuda_fp16.h from nvidia-cuda-runtime-cu12,
cuda/std/* from nvidia-cuda-cccl-cu12). `.ci/run` installs the three into DEFAULT_ROOT.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgerun.optimizers import cuda_paths

#: Where `.ci/run` installs the CUDA 12 wheels (`pip install --target`).
DEFAULT_ROOT = Path("/opt/edgerun-cuda12")
WHEELS = "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12"
#: Headers TVM's generated CUDA source includes when compiled by NVRTC, and their wheels.
REQUIRED_HEADERS = {"cuda_fp16.h": "nvidia-cuda-runtime-cu12",
                    "cuda/std/cstdint": "nvidia-cuda-cccl-cu12"}


class NvrtcError(RuntimeError):
    """NVRTC failed to compile; the message carries its log."""


@dataclass(frozen=True)
class Nvrtc:
    """One libnvrtc and the include folders found beside it."""

    library: str
    include_dirs: tuple[str, ...]

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        _lib(self.library).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return f"{major.value}.{minor.value}"

    def archs(self) -> frozenset[str]:
        """The sm_XX codes this NVRTC compiles for."""
        return _archs(self.library)

    def missing_headers(self) -> list[str]:
        """Required headers found in none of the include folders, with the wheel that has them."""
        return [f"{header} ({wheel})" for header, wheel in REQUIRED_HEADERS.items()
                if not any((Path(d) / header).is_file() for d in self.include_dirs)]

    def compile(self, source: str, arch: str) -> bytes:
        """CUDA C source -> a cubin for "sm_XX", or PTX (NUL-terminated) for "compute_XX"."""
        lib = _lib(self.library)
        program = ctypes.c_void_p()
        _check(lib, lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu",
                                           0, None, None), "nvrtcCreateProgram")
        try:
            options = [f"--gpu-architecture={arch}", "-std=c++17", "-w",
                       *(f"--include-path={d}" for d in self.include_dirs)]
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            if lib.nvrtcCompileProgram(program, len(options), argv) != 0:
                raise NvrtcError(f"NVRTC {self.version()} failed for {arch}: "
                                 f"{_log(lib, program)[-2000:]}")
            kind = "CUBIN" if arch.startswith("sm_") else "PTX"
            size = ctypes.c_size_t()
            _check(lib, getattr(lib, f"nvrtcGet{kind}Size")(program, ctypes.byref(size)), kind)
            buffer = ctypes.create_string_buffer(size.value)
            _check(lib, getattr(lib, f"nvrtcGet{kind}")(program, buffer), kind)
            return buffer.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))


def candidates() -> list[Nvrtc]:
    """$EDGERUN_NVRTC (a libnvrtc.so), DEFAULT_ROOT's, then any in this environment's
    `nvidia` wheels; each with its include folders."""
    paths = cuda_paths.distinct(
        [os.environ.get("EDGERUN_NVRTC"),
         str(DEFAULT_ROOT / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"),
         *cuda_paths.in_nvidia_wheels("*/lib/libnvrtc.so.[0-9]*")],
        lambda path: Path(path).is_file())
    return [Nvrtc(path, _include_dirs(Path(path))) for path in paths]


def _include_dirs(library: Path) -> tuple[str, ...]:
    """The wheels' layout (nvidia/<package>/include beside nvidia/cuda_nvrtc/lib) or a
    toolkit's (lib64/../include and its cccl folder)."""
    wheels, toolkit = library.parents[2], library.parents[1]
    dirs = [wheels / "cuda_runtime" / "include", wheels / "cuda_cccl" / "include",
            toolkit / "include", toolkit / "include" / "cccl"]
    return tuple(str(d) for d in dirs if d.is_dir())


@lru_cache(maxsize=None)
def _lib(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                       ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p]
    lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    for name in ("nvrtcGetPTXSize", "nvrtcGetCUBINSize", "nvrtcGetProgramLogSize"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    for name in ("nvrtcGetPTX", "nvrtcGetCUBIN", "nvrtcGetProgramLog"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


@lru_cache(maxsize=None)
def _archs(path: str) -> frozenset[str]:
    lib = _lib(path)
    count = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    codes = (ctypes.c_int * count.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(codes), "nvrtcGetSupportedArchs")
    return frozenset(f"sm_{code}" for code in codes)


def _log(lib: ctypes.CDLL, program: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    buffer = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, buffer)
    return buffer.value.decode(errors="replace").strip()


def _check(lib: ctypes.CDLL, result: int, call: str) -> None:
    if result != 0:
        raise NvrtcError(f"{call}: {lib.nvrtcGetErrorString(result).decode()}")
