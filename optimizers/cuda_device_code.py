"""CUDA device code compiled here with nvcc, so a Jetson or a cloud GPU needs no NVRTC or nvcc.

apache-tvm's wheel is built without the CUDA runtime: its CUDA codegen keeps the kernels as CUDA
C source (module format "cuda"), which a CUDA-enabled TVM compiles at load time through its
`tvm_callback_cuda_compile` hook. Here that source is compiled ahead of time into a fatbin with
SASS for the profile's arch plus PTX for newer GPUs, and the serialized module is rewritten to
format "fatbin" (`cuModuleLoadData` takes it as is). A CUDA-enabled TVM calls the same nvcc
through the callback, registered while compiling.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_CUBIN = 1, 2


class DeviceCodeError(RuntimeError):
    """nvcc is missing, or cannot compile for the asked architecture."""


def find_nvcc() -> str:
    """$EDGERUN_NVCC, nvcc on PATH, /usr/local/cuda, or the nvidia-cuda-nvcc wheel's."""
    candidates = [os.environ.get("EDGERUN_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += [str(p) for p in sorted(Path(root).glob("*/bin/nvcc"))]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise DeviceCodeError("nvcc not found: CUDA artifacts carry device code compiled here. "
                          "Install the CUDA toolkit (or `pip install nvidia-cuda-nvcc`) or set "
                          "EDGERUN_NVCC")


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


def compile_fatbin(source: str, arch: str, nvcc: str | None = None) -> bytes:
    """CUDA C source -> fatbin with SASS for `arch` (sm_87) and its PTX for newer GPUs."""
    nvcc = nvcc or find_nvcc()
    if arch not in supported_archs(nvcc):
        raise DeviceCodeError(
            f"nvcc {nvcc_version(nvcc)} ({nvcc}) cannot compile for {arch}; it supports "
            f"{', '.join(sorted(supported_archs(nvcc)))}. Set EDGERUN_NVCC to a CUDA toolkit "
            f"that still targets {arch} (CUDA 12.x for sm_53 and sm_72)")
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="edgerun-nvcc-") as scratch:
        src, out = Path(scratch) / "kernels.cu", Path(scratch) / "kernels.fatbin"
        src.write_text(source)
        result = subprocess.run(
            [nvcc, "--fatbin", "-O3", "-std=c++17", "-w",
             "-gencode", f"arch={compute},code={arch}",
             "-gencode", f"arch={compute},code={compute}", "-o", str(out), str(src)],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise DeviceCodeError(f"nvcc failed for {arch}: {result.stderr.strip()[-2000:]}")
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
