"""CUDA device code compiled here, so a Jetson or a cloud GPU needs no NVRTC or nvcc.

apache-tvm's wheel is built without the CUDA runtime: its CUDA codegen keeps the kernels as CUDA
C source (module format "cuda"), which a CUDA-enabled TVM compiles at load time through its
`tvm_callback_cuda_compile` hook. Here that source is compiled ahead of time into a fatbin with
SASS for the profile's arch plus PTX for newer GPUs, and the serialized module is rewritten to
format "fatbin" (`cuModuleLoadData` takes it as is). A CUDA-enabled TVM calls the same compiler
through the callback, registered while compiling. The compiler is the first nvcc that targets
the arch; for the archs CUDA 13 dropped (sm_50..sm_72), CUDA 12's NVRTC (see nvrtc.py), its
cubin and PTX packed by the nvcc toolkit's fatbinary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgerun.optimizers import cuda_paths, nvrtc

FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_CUBIN = 1, 2


class DeviceCodeError(RuntimeError):
    """nvcc is missing, or cannot compile for the asked architecture."""


#: Where `.ci/run` installs NVIDIA's CUDA 13 nvcc wheels on a machine without a CUDA toolkit.
NVCC_WHEEL = "/opt/edgerun-nvcc/nvidia/cu13/bin/nvcc"
#: What fatbinary records for the PTX's JIT: nvcc's defaults, which NVRTC's match.
CICC_CMDLINE = "-ftz=0 -prec_div=1 -prec_sqrt=1 -fmad=1 "


def nvcc_candidates() -> list[str]:
    """$EDGERUN_NVCC, nvcc on PATH, /usr/local/cuda, the CUDA 13 wheels `.ci/run` installs, and
    any nvcc wheel in this environment, in that order (executables only, no duplicates)."""
    return cuda_paths.distinct(
        [os.environ.get("EDGERUN_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
         NVCC_WHEEL, *cuda_paths.in_nvidia_wheels("*/bin/nvcc")],
        lambda path: os.access(path, os.X_OK))


@lru_cache(maxsize=None)
def supported_archs(nvcc: str) -> frozenset[str]:
    """The sm_XX codes this nvcc compiles for (CUDA 13 dropped everything below sm_75)."""
    listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True,
                            check=True).stdout.split()
    return frozenset(code for code in listed if code.startswith("sm_"))


def nvcc_version(nvcc: str) -> str:
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return next((line.split("release")[-1].split(",")[0].strip() for line in text.splitlines()
                 if "release" in line), "unknown")


def compiler_for(arch: str) -> str | nvrtc.Nvrtc:
    """An nvcc that targets `arch`, else a CUDA NVRTC that does (with its headers and a
    fatbinary to pack its output); a clear error naming what was found otherwise."""
    for candidate in nvcc_candidates():
        if arch in supported_archs(candidate):
            return candidate
    for rtc in nvrtc.candidates():
        if arch in rtc.archs() and not rtc.missing_headers() and find_fatbinary():
            return rtc
    raise DeviceCodeError(_nothing_compiles(arch))


def describe_compiler(compiler: str | nvrtc.Nvrtc) -> str:
    """What `compiler_for` chose, for the compile report."""
    if isinstance(compiler, nvrtc.Nvrtc):
        return f"NVRTC {compiler.version()} ({compiler.library}) and {find_fatbinary()}"
    return f"nvcc {nvcc_version(compiler)} ({compiler})"


def find_fatbinary() -> str | None:
    """fatbinary beside one of the nvcc candidates, or on PATH."""
    for nvcc in nvcc_candidates():
        beside = Path(nvcc).with_name("fatbinary")
        if os.access(beside, os.X_OK):
            return str(beside)
    return shutil.which("fatbinary")


def _nothing_compiles(arch: str) -> str:
    found = [f"nvcc {nvcc_version(c)} ({c}): {_span(supported_archs(c))}"
             for c in nvcc_candidates()]
    for rtc in nvrtc.candidates():
        missing = rtc.missing_headers()
        found.append(f"NVRTC {rtc.version()} ({rtc.library}): {_span(rtc.archs())}"
                     + (f", missing {', '.join(missing)}" if missing else ""))
    if found and not find_fatbinary():
        found.append("no fatbinary (it comes with nvcc)")
    return (f"no CUDA compiler here targets {arch}: "
            f"{'; '.join(found) or 'neither nvcc nor NVRTC found'}. CUDA artifacts carry "
            "device code compiled here: install the CUDA toolkit or NVIDIA's nvcc wheels "
            "(`pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt "
            "nvidia-cuda-cccl nvidia-nvvm`), and for sm_50..sm_72, which CUDA 13 dropped, "
            f"CUDA 12's NVRTC (`pip install --target {nvrtc.DEFAULT_ROOT} {nvrtc.WHEELS}`, as "
            ".ci/run does); or set EDGERUN_NVCC / EDGERUN_NVRTC")


def _span(archs: frozenset[str]) -> str:
    ordered = sorted(archs, key=lambda a: int("".join(filter(str.isdigit, a)) or 0))
    return f"{ordered[0]}..{ordered[-1]}" if ordered else "no archs"


def compile_fatbin(source: str, arch: str,
                   compiler: str | nvrtc.Nvrtc | None = None) -> bytes:
    """CUDA C source -> fatbin with SASS for `arch` (sm_87) and its PTX for newer GPUs, by
    `compiler` (an nvcc path or an NVRTC) or else `compiler_for(arch)`."""
    compiler = compiler or compiler_for(arch)
    if isinstance(compiler, nvrtc.Nvrtc):
        return _fatbin_with_nvrtc(source, arch, compiler)
    if arch not in supported_archs(compiler):
        raise DeviceCodeError(
            f"nvcc {nvcc_version(compiler)} ({compiler}) cannot compile for {arch}; it "
            f"supports {', '.join(sorted(supported_archs(compiler)))}")
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="edgerun-nvcc-") as scratch:
        src, out = Path(scratch) / "kernels.cu", Path(scratch) / "kernels.fatbin"
        src.write_text(source)
        result = subprocess.run(
            [compiler, "--fatbin", "-O3", "-std=c++17", "-w",
             "-gencode", f"arch={compute},code={arch}",
             "-gencode", f"arch={compute},code={compute}", "-o", str(out), str(src)],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise DeviceCodeError(f"nvcc failed for {arch}: {result.stderr.strip()[-2000:]}")
        return out.read_bytes()


def _fatbin_with_nvrtc(source: str, arch: str, rtc: nvrtc.Nvrtc) -> bytes:
    """NVRTC's cubin for `arch` and PTX for its compute_XX, packed by fatbinary as nvcc
    packs its own."""
    fatbinary = find_fatbinary()
    if fatbinary is None:
        raise DeviceCodeError(_nothing_compiles(arch))
    compute, sm = arch.replace("sm_", "compute_"), arch.removeprefix("sm_")
    try:
        cubin, ptx = rtc.compile(source, arch), rtc.compile(source, compute)
    except nvrtc.NvrtcError as exc:
        raise DeviceCodeError(str(exc)) from exc
    with tempfile.TemporaryDirectory(prefix="edgerun-nvrtc-") as scratch:
        folder = Path(scratch)
        (folder / "kernels.cubin").write_bytes(cubin)
        (folder / "kernels.ptx").write_bytes(ptx.rstrip(b"\0"))
        out = folder / "kernels.fatbin"
        result = subprocess.run(
            [fatbinary, f"--create={out}", "-64", f"--cicc-cmdline={CICC_CMDLINE}",
             f"--image3=kind=elf,sm={sm},file={folder / 'kernels.cubin'}",
             f"--image3=kind=ptx,sm={sm},file={folder / 'kernels.ptx'}"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise DeviceCodeError(f"fatbinary failed for {arch}: "
                                  f"{result.stderr.strip()[-2000:]}")
        return out.read_bytes()


def fatbin_entries(data: bytes) -> list[tuple[str, str]]:
    """(kind, arch) of every image in the fatbins within `data`: ("cubin", "sm_87"),
    ("ptx", "compute_87")."""
    entries, start = [], 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (start := data.find(magic, start)) >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        pos, end = start + header_size, start + header_size + fat_size
        while pos < end and pos + 32 <= len(data):
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, pos)
            (sm,) = struct.unpack_from("<I", data, pos + 28)
            if kind in (FATBIN_PTX, FATBIN_CUBIN):
                entries.append(("ptx", f"compute_{sm}") if kind == FATBIN_PTX else ("cubin", f"sm_{sm}"))
            if entry_header == 0:
                break
            pos += entry_header + size
        start = max(end, start + 4)
    return entries


@contextlib.contextmanager
def nvcc_callback(arch: str) -> Iterator[None]:
    """Register nvcc as TVM's `tvm_callback_cuda_compile` for the duration (CUDA-enabled TVM)."""
    import tvm_ffi

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_source(code: str, *_: Any) -> bytes:
        return compile_fatbin(code, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def cuda_sources(module: Any) -> list[str]:
    """The CUDA C source of every CUDA module (format "cuda") imported by a built executable."""
    found, stack, seen = [], [module], set()
    while stack:
        mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if mod.kind == "cuda":
            source = mod.inspect_source("cuda")
            compiled = any(mod.inspect_source(fmt) for fmt in ("cubin", "fatbin", "ptx"))
            if source and not compiled:  # a CUDA-enabled TVM already compiled it (callback)
                found.append(source)
        stack.extend(mod.imports)
    return found


def pack_imports_with(fatbins: dict[str, bytes]) -> Callable[..., str]:
    """An `export_library(fpack_imports=...)` hook: TVM's packed imports, with every CUDA
    source module (keyed by its source) replaced by its fatbin."""

    def pack(mod: Any, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        import tvm

        blob = bytes(tvm.runtime._ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes())
        rewritten = _rewrite_blob(blob, fatbins)
        symbol = prefix + str(tvm.runtime._ffi_api.ModuleImportsBlobName())
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(_blob_to_c(rewritten, symbol))
        return path

    return pack


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self) -> bytes:
        n = self.u64()
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def u64s(self) -> list[int]:
        n = self.u64()
        values = list(struct.unpack_from(f"<{n}Q", self.data, self.pos))
        self.pos += 8 * n
        return values


def _bytes(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _u64s(values: list[int]) -> bytes:
    return struct.pack(f"<Q{len(values)}Q", len(values), *values)


def _rewrite_blob(blob: bytes, fatbins: dict[str, bytes]) -> bytes:
    """TVM's serialized import tree ([u64 size][row_ptr][children]{[key][payload]}) with CUDA
    payloads [fmt][fmap][code] turned from ("cuda", source) into ("fatbin", fatbin)."""
    reader = _Reader(blob[8:])
    row_ptr, children = reader.u64s(), reader.u64s()
    out = [_u64s(row_ptr), _u64s(children)]
    replaced = 0
    for _ in range(len(row_ptr) - 1):
        key = reader.raw()
        out.append(_bytes(key))
        if key == b"_lib":
            continue
        if key == b"_import_tree":
            out += [_u64s(reader.u64s()), _u64s(reader.u64s())]
            continue
        payload = reader.raw()
        if key == b"cuda":
            payload, done = _rewrite_cuda_payload(payload, fatbins)
            replaced += done
        out.append(_bytes(payload))
    if replaced != len(fatbins):
        raise DeviceCodeError(f"expected {len(fatbins)} CUDA source modules in the library, "
                              f"rewrote {replaced}")
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _rewrite_cuda_payload(payload: bytes, fatbins: dict[str, bytes]) -> tuple[bytes, int]:
    reader = _Reader(payload)
    fmt = reader.raw()
    rest = payload[reader.pos:]
    if fmt != b"cuda":
        return payload, 0
    for source, fatbin in fatbins.items():
        code = _bytes(source.encode())
        if rest.endswith(code):
            fmap = rest[:len(rest) - len(code)]
            return _bytes(b"fatbin") + fmap + _bytes(fatbin), 1
    raise DeviceCodeError("a CUDA module's source does not match any compiled kernel source")


def _blob_to_c(blob: bytes, symbol: str) -> str:
    rows = (",".join(f"0x{b:02x}" for b in blob[i:i + 20]) for i in range(0, len(blob), 20))
    return ('#ifdef __cplusplus\nextern "C" {\n#endif\n'
            f"extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
            "#ifdef __cplusplus\n}\n#endif\n")
