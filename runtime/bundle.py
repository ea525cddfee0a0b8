"""The bundle: the unit that is optimized, signed, shipped and served.

A folder with `manifest.json` (signature, hashes of every file), the model file and
`golden.npz` (an input and the output the build produced, to smoke-test a device after an
update). Opening a bundle verifies every hash; an archive (`.tar.gz`, `.zip`) is extracted
safely first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerun import __version__
from edgerun.devices import DeviceProfile, load_profile
from edgerun.devices.profile import is_integer
from edgerun.runtime import archive, npy_headers
from edgerun.runtime.backends import backend_class, backend_for_file
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signature import Signature, TensorSpec

MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
SIGNATURE_FILE = "signature.sig"
FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)([-+][0-9A-Za-z.-]+)?)?$")
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name: str) -> str:
    # fullmatch: `$` also matches before a trailing newline, which names must not carry
    if not NAME_RE.fullmatch(name):
        raise BundleError(f"bundle name {name!r} must be letters, digits, '.', '_' or '-' "
                          "(starting with a letter or digit)")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise BundleError(f"bundle version {version!r} must be an integer or semver (1.2.3)")
    return version


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key for versions: integers and semver (build metadata ignored, a pre-release
    before its release, numeric identifiers compared as numbers: rc.9 before rc.10)."""
    core, _, pre = version.split("+")[0].partition("-")
    parts = [int(p) for p in core.split(".")] + [0, 0]
    identifiers = tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                        for p in pre.split(".")) if pre else ()
    return parts[0], parts[1], parts[2], 0 if pre else 1, identifiers


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The self-description of a bundle: its signature, files with their hashes, provenance."""

    name: str
    version: str
    backend: str
    model_file: str
    signature: Signature
    files: dict[str, FileEntry]
    device: dict[str, str] = field(default_factory=lambda: {"profile": "cpu", "target": "any"})
    created: dict[str, Any] = field(default_factory=dict)
    reference_stats: dict[str, Any] | None = None
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format, "name": self.name, "version": self.version,
            "backend": self.backend, "model_file": self.model_file, "device": self.device,
            **self.signature.to_json(),
            "files": {name: {"sha256": e.sha256, "size": e.size}
                      for name, e in sorted(self.files.items())},
            "created": self.created,
        }
        if self.reference_stats is not None:
            data["reference_stats"] = self.reference_stats
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            if type(data.get("format")) is not int or data["format"] != FORMAT:  # not true, 1.0
                raise BundleError(f"manifest format {data.get('format')!r} is not supported "
                                  f"(this edgerun reads format {FORMAT})")
            max_batch_size = data.get("max_batch_size")
            if max_batch_size is not None and not (is_integer(max_batch_size)
                                                   and max_batch_size >= 1):
                raise BundleError(f"manifest field max_batch_size must be an integer >= 1 or "
                                  f"null, got {max_batch_size!r}")
            signature = Signature(_tensors(data, "inputs"), _tensors(data, "outputs"),
                                  max_batch_size)
            for key in ("backend", "model_file"):
                if not isinstance(data[key], str):
                    raise BundleError(f"manifest field {key} must be a string, got "
                                      f"{data[key]!r}")
            device, created = data.get("device", {}), data.get("created", {})
            if not isinstance(device, dict) or not all(
                    isinstance(v, str) for v in device.values()):
                raise BundleError(f"manifest field device must be an object of strings, got "
                                  f"{device!r}")
            if not isinstance(created, dict):
                raise BundleError(f"manifest field created must be an object, got {created!r}")
            if not isinstance(created.get("optimizations", []), list):
                raise BundleError(f"manifest field created.optimizations must be a list, got "
                                  f"{created['optimizations']!r}")
            return cls(
                name=check_name(data["name"]), version=check_version(str(data["version"])),
                backend=data["backend"], model_file=data["model_file"], signature=signature,
                files=_files(data["files"]), device=dict(device), created=dict(created),
                reference_stats=data.get("reference_stats"))
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def _tensors(data: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    """`inputs` or `outputs`, each field of the right type: a wrong one (a string
    max_batch_size, a numeric name) passed here and failed every request later."""
    specs = data[key]
    if not isinstance(specs, list):
        raise BundleError(f"manifest field {key} must be a list, got {specs!r}")
    tensors = []
    for i, spec in enumerate(specs):
        where = f"manifest field {key}[{i}]"
        if not isinstance(spec, dict):
            raise BundleError(f"{where} must be an object, got {spec!r}")
        name, shape, axis = spec.get("name"), spec.get("shape"), spec.get("batch_axis")
        if not isinstance(name, str) or not name:
            raise BundleError(f"{where}.name must be a non-empty string, got {name!r}")
        if not isinstance(shape, list) or not all(is_integer(d) and d >= -1 for d in shape):
            raise BundleError(f"{where}.shape must be a list of integers (-1: dynamic), got "
                              f"{shape!r}")
        if axis is not None and not (is_integer(axis) and 0 <= axis < len(shape)):
            raise BundleError(f"{where}.batch_axis must be null or an axis of its shape, got "
                              f"{axis!r}")
        if not isinstance(spec.get("dtype"), str):
            raise BundleError(f"{where}.dtype must be a string, got {spec.get('dtype')!r}")
        tensors.append(TensorSpec.from_json(spec))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest field {key} names a tensor twice: {names}")
    return tuple(tensors)


def _files(files: Any) -> dict[str, FileEntry]:
    """`files`: each a sha256 (64 hex digits) and a size in bytes."""
    if not isinstance(files, dict):
        raise BundleError(f"manifest field files must be an object, got {files!r}")
    entries = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
                and is_integer(size) and size >= 0):
            raise BundleError(f"manifest field files[{name!r}] must be a sha256 (64 hex "
                              f"digits) and a size >= 0, got {entry!r}")
        entries[name] = FileEntry(digest, size)
    return entries


class Bundle:
    """An opened, verified bundle folder (extracted to a temporary folder if it was a tar).

    A folder may change after it was verified (anyone who can write a repository folder can
    swap a file), so what runs never reads a file by its path: `read_file` reads a file once
    and checks those bytes against the manifest the bundle was opened with, and backends are
    handed those bytes (`Model.load`); `golden` reads `golden.npz` the same way, and
    `signing.verify_folder(bundle, ...)` checks the signature over `manifest_bytes`, the bytes
    `manifest` was parsed from.
    """

    def __init__(self, path: Path, manifest: Manifest,
                 cleanup: tempfile.TemporaryDirectory[str] | None = None,
                 manifest_bytes: bytes | None = None) -> None:
        self.path = path
        self.manifest = manifest
        #: The bytes `manifest` was parsed from (None: made here without reading one).
        self.manifest_bytes = manifest_bytes
        self._cleanup = cleanup

    @classmethod
    def open(cls, source: str | Path, *, verify: bool = True,
             expected: Mapping[str, archive.Listed] | None = None) -> Bundle:
        """Open a bundle folder or archive; with `verify`, every file's hash is checked.

        `expected` (an archive's signed files, from `signing.verify_archive`) extracts only
        those, each checked as it is written: an archive changed since its signature was
        checked is refused while it unpacks, not after."""
        source = Path(source)
        cleanup = None
        if source.is_file():
            cleanup = tempfile.TemporaryDirectory(prefix="edgerun-bundle-")
            try:
                archive.unpack(source, Path(cleanup.name), expected=expected)
            except BaseException:
                cleanup.cleanup()
                raise
            folder = Path(cleanup.name)
        elif source.is_dir():
            folder = source
        else:
            raise BundleError(f"{source}: no such bundle folder or archive")
        try:
            raw = _read_manifest_bytes(folder)
            manifest = parse_manifest(raw, folder / MANIFEST)
            if verify:
                verify_files(folder, manifest)
        except BundleError as exc:
            if cleanup is None:
                raise
            cleanup.cleanup()  # named by the archive, not the extraction folder just removed
            raise BundleError(str(exc).replace(cleanup.name, str(source))) from exc
        except BaseException:
            if cleanup is not None:
                cleanup.cleanup()
            raise
        return cls(folder, manifest, cleanup, raw)

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def signature(self) -> Signature:
        return self.manifest.signature

    def read_file(self, name: str) -> bytes:
        """A file the manifest lists, read once; BundleError unless those very bytes have the
        size and sha256 the manifest gives (a file swapped or changed since the bundle was
        verified is refused, never served). Hand these bytes on rather than the path."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BundleError(f"{self.path}: manifest does not list {name}")
        return _read_listed(self.path, name, entry)

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The golden input and the output the build produced, by tensor name (read from
        the bytes checked against the manifest)."""
        sig = self.signature
        data, where = self.read_file(GOLDEN), self.path / GOLDEN
        inputs = {s.name: _golden_array(data, where, f"input_{i}")
                  for i, s in enumerate(sig.inputs)}
        outputs = {s.name: _golden_array(data, where, f"output_{i}")
                   for i, s in enumerate(sig.outputs)}
        return inputs, outputs

    def pack(self, archive_path: Path) -> Path:
        return archive.pack(self.path, Path(archive_path))

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cleanup()
            self._cleanup = None

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_name(folder: Path, name: str) -> Path:
    if ".." in Path(name).parts or Path(name).is_absolute():
        raise BundleError(f"{folder}: manifest lists an unsafe path {name!r}")
    return folder / name


def _read_listed(folder: Path, name: str, entry: FileEntry) -> bytes:
    """`folder/name` read once (never through a final symlink, never a FIFO or device) and
    held to `entry`: the bytes returned are the bytes whose size and sha256 were checked."""
    path = _safe_name(folder, name)
    changed = (f"{folder}: {name} changed after the bundle was verified (it no longer matches "
               "its sha256 in the manifest); refused")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BundleError(f"{folder}: {name} cannot be read ({exc.strerror}); it is missing, "
                          "a link or not a regular file") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise BundleError(f"{folder}: {name} is not a regular file")
        data = handle.read(entry.size + 1)  # one more: a file that grew is seen to
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleError(changed)
    return data


#: What numpy's pickle of an object array names (numpy 2 and 1): nothing that runs code.
_ARRAY_GLOBALS = frozenset({("numpy._core.multiarray", "_reconstruct"),
                            ("numpy.core.multiarray", "_reconstruct"),
                            ("numpy", "ndarray"), ("numpy", "dtype")})


class _TextArrayUnpickler(pickle.Unpickler):
    """Unpickles an object array of str and bytes, and nothing else: `golden.npz` of a bundle
    with string tensors holds such arrays, and a bundle's file must never run code when it is
    checked (an unsigned bundle is opened by `bundle verify` and `serve` too)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an array")
        return super().find_class(module, name)


#: The most one compressed array of `golden.npz` may unpack to: `bundle create` stores its
#: arrays uncompressed (a large one costs its own size on disk, hashed like the rest), so a
#: member that unpacks past this from much less is a zip bomb.
GOLDEN_ARRAY_LIMIT = 256 << 20
GOLDEN_COMPRESSION_LIMIT = 4


def _check_golden_member(raw: bytes, path: Path, key: str) -> None:
    """Refuse an array of `golden.npz` that would unpack past GOLDEN_ARRAY_LIMIT from a
    member compressed more than GOLDEN_COMPRESSION_LIMIT to 1, or whose header declares more
    data than the member holds (numpy allocates the declared shape before it reads a byte:
    2**45 int64 from a 1 kB file)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as npz:
        try:
            info = npz.getinfo(f"{key}.npy")
        except KeyError:
            return  # np.load names the missing array
        if info.file_size > GOLDEN_ARRAY_LIMIT and \
                info.file_size > GOLDEN_COMPRESSION_LIMIT * info.compress_size:
            raise BundleError(f"{path}: {key} unpacks to {info.file_size:,} bytes from "
                              f"{info.compress_size:,}, over the golden sample's limit of "
                              f"{GOLDEN_ARRAY_LIMIT:,} for a compressed array")
        with npz.open(info) as member:
            shape, dtype = _npy_header(member)
            declared = math.prod(shape) * dtype.itemsize
            if not dtype.hasobject and declared > info.file_size - member.tell():
                raise BundleError(f"{path}: {key} declares shape {shape} of {dtype} "
                                  f"({declared:,} bytes), more than it holds")


def _npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype]:
    """An .npy member's shape and dtype, read from its header alone (left at its data)."""
    major, _ = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(member)
    return shape, dtype


def _golden_array(raw: bytes, path: Path, key: str) -> np.ndarray:
    """One array of `golden.npz` (its bytes `raw`; `path` names it in errors), read without
    ever unpickling anything but text."""
    with npy_headers.LOCK:  # headers are parsed by `ast`, one thread at a time on 3.11
        return _read_golden_array(raw, path, key)


def _read_golden_array(raw: bytes, path: Path, key: str) -> np.ndarray:
    try:
        _check_golden_member(raw, path, key)
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            if key not in data.files:
                raise BundleError(f"{path}: no {key} array (the golden sample does not match "
                                  "the manifest's inputs and outputs)")
            try:
                return data[key]
            except ValueError as exc:  # an object array: text, read below, or refused
                if "allow_pickle" not in str(exc):
                    raise
        with zipfile.ZipFile(io.BytesIO(raw)) as npz, npz.open(f"{key}.npy") as member:
            shape, _ = _npy_header(member)
            array = _TextArrayUnpickler(member).load()
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
            AttributeError, TypeError, KeyError, IndexError, MemoryError) as exc:
        raise BundleError(f"{path}: {key} is not a readable array ({exc})") from exc
    if not isinstance(array, np.ndarray) or array.shape != shape or not all(
            isinstance(element, (str, bytes)) for element in array.flat):
        raise BundleError(f"{path}: {key} holds objects other than text")
    return array


def _read_manifest_bytes(folder: Path) -> bytes:
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}; not a bundle")
    return path.read_bytes()


def read_manifest(folder: Path) -> Manifest:
    return parse_manifest(_read_manifest_bytes(folder), folder / MANIFEST)


def parse_manifest(raw: bytes, where: str | Path) -> Manifest:
    """A manifest from its bytes; `where` names it in errors (a file, or an archive's)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    except RecursionError:  # json parses recursively: a few kB of "[" was a traceback
        raise BundleError(f"{where}: JSON nested too deep to be a manifest") from None
    if not isinstance(data, dict):
        raise BundleError(f"{where}: must hold a JSON object")
    try:
        return Manifest.from_json(data)
    except BundleError as exc:  # named: a repository or a fleet holds many manifests
        raise BundleError(f"{where}: {exc}") from exc


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every listed file present with its size and sha256; nothing unlisted but a signature."""
    for required in (manifest.model_file, GOLDEN):
        if required not in manifest.files:
            raise BundleError(f"{folder}: manifest does not list {required}")
    for name, entry in manifest.files.items():
        path = _safe_name(folder, name)
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{folder}: {name} is missing or not a regular file")
        linked = next((parent for parent in path.relative_to(folder).parents
                       if parent.parts and (folder / parent).is_symlink()), None)
        if linked is not None:  # what is read through it is not the folder's, nor packed
            raise BundleError(f"{folder}: {name} lies under {linked.as_posix()}, a link: a "
                              "bundle holds regular files and folders only")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{folder}: {name} is {size} bytes, manifest says {entry.size} "
                              "(tampered or truncated)")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{folder}: {name} does not match its sha256 in the manifest "
                              "(tampered or corrupt)")
    listed = set(manifest.files) | {MANIFEST, SIGNATURE_FILE}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if (p.is_symlink() or not p.is_dir())
                   and p.relative_to(folder).as_posix() not in listed)
    if extra:
        raise BundleError(f"{folder}: files not in the manifest: {', '.join(extra)}")


def golden_input(signature: Signature, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input: dynamic dims of 1, normal floats, zero integers, empty strings."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in signature.inputs:
        shape = tuple(d if d >= 0 else 1 for d in spec.shape)
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.np_dtype)
        elif spec.dtype == "string":
            inputs[spec.name] = np.full(shape, "", dtype=object)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=spec.np_dtype)
    return inputs


def created_at() -> str:
    """A manifest's creation time: SOURCE_DATE_EPOCH when set (reproducible-builds.org), so a
    build pipeline that pins it gets the same manifest, and so the same signature, from the
    same inputs; else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if not (epoch.isascii() and epoch.isdigit()):
        raise ValueError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}")
    try:
        moment = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
    except (OverflowError, ValueError, OSError) as exc:  # milliseconds, say: "year 56902 is
        # out of range" named no setting, and past time_t an OverflowError was a traceback
        raise ValueError(f"SOURCE_DATE_EPOCH {epoch} is past any date a manifest can hold "
                         f"({exc}): it must be whole seconds since 1970") from None
    return moment.isoformat(timespec="seconds")


def create_bundle(model_file: str | Path, out_dir: str | Path, *, name: str, version: str,
                  max_batch_size: int | None = None,
                  golden_inputs: Mapping[str, Any] | None = None,
                  device: str | DeviceProfile | None = None,
                  optimizations: tuple[str, ...] = (), source_file: str | None = None,
                  source_sha256: str | None = None) -> Bundle:
    """Inspect a model file, copy it (with the external data files it names, from beside it)
    with a golden sample and a manifest into `out_dir`.

    `source_file`/`source_sha256` name the model that `model_file` was derived from (the
    optimizer bundles a transformed copy); by default the model file itself is recorded.
    """
    model_file, out_dir = Path(model_file), Path(out_dir)
    check_name(name)
    check_version(str(version))
    if not model_file.is_file():
        raise BundleError(f"{model_file}: no such model file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"{out_dir}: output folder exists and is not empty")
    if max_batch_size is not None and max_batch_size < 0:
        raise BundleError("max_batch_size must be >= 1 (omit it for no limit), or 0 for a "
                          "model with no batch axis")
    profile = load_profile(device)
    backend_name = backend_for_file(model_file)
    backend = backend_class(backend_name)
    model_name = f"model{model_file.suffix.lower()}"
    data_files = _data_files(backend.data_files(model_file), model_file, model_name)
    inspected = backend.inspect(model_file)
    signature = inspected.unbatched() if max_batch_size == 0 else Signature(
        inspected.inputs, inspected.outputs, max_batch_size if inspected.batchable else None)
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(model_file, out_dir / model_name)
        for location in data_files:  # where the model names them, beside its copy
            (out_dir / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_file.parent / location, out_dir / location)
        sample = signature.validate(golden_inputs) if golden_inputs is not None \
            else golden_input(signature)
        runner = backend.load(out_dir / model_name, profile)
        try:
            outputs = runner.run(sample)
        except Exception as exc:
            raise BundleError(f"{model_file.name}: the golden input failed to run ({exc}); "
                              "pass a valid sample with --golden-input") from exc
        finally:
            runner.close()
        np.savez(out_dir / GOLDEN,
                 **{f"input_{i}": sample[s.name] for i, s in enumerate(signature.inputs)},
                 **{f"output_{i}": outputs[s.name] for i, s in enumerate(signature.outputs)})
        files = {p.relative_to(out_dir).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
                 for p in sorted(out_dir.rglob("*")) if p.is_file()}
        manifest = Manifest(
            name=name, version=str(version), backend=backend_name, model_file=model_name,
            signature=signature, files=files,
            device={"profile": profile.name, "target": profile.arch},
            created={"tool": "edgerun", "tool_version": __version__,
                     "created_at": created_at(),
                     "source_file": source_file or model_file.name,
                     "source_sha256": source_sha256 or sha256_file(model_file),
                     "optimizations": list(optimizations)})
        raw = write_manifest(out_dir, manifest)
    except BaseException:
        if created_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return Bundle(out_dir, manifest, manifest_bytes=raw)


def _data_files(locations: list[str], model_file: Path, model_name: str) -> list[str]:
    """The files beside `model_file` that it reads (ONNX external data), checked before
    anything is made: each must exist there, and be no file the bundle makes itself."""
    for location in locations:
        where = f"{model_file.name}: tensor data in {location!r}"
        if os.path.normpath(location) in (model_name, GOLDEN, MANIFEST, SIGNATURE_FILE):
            raise BundleError(f"{where}: a file the bundle makes itself; save the data under "
                              "another name")
        if not (model_file.parent / location).is_file():
            raise BundleError(f"{model_file.name}: its tensor data file "
                              f"{model_file.parent / location} does not exist; ONNX external "
                              "data must lie beside the model, where the model names it")
    return locations


def write_manifest(folder: Path, manifest: Manifest) -> bytes:
    """Write manifest.json atomically, so a reader never sees half of it; returns its bytes."""
    raw = (json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n").encode()
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_bytes(raw)
    temporary.replace(folder / MANIFEST)
    return raw
