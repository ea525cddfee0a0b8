"""ONNX Runtime: sessions built from a device profile, accelerators first when present."""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edgerun.devices import DeviceProfile
from edgerun.runtime.backends.base import Backend, shared_file
from edgerun.runtime.backends.cpus import cpu_limit
from edgerun.runtime.cache import cache_dir
from edgerun.runtime.errors import BundleError, InvalidInput
from edgerun.runtime.signature import Signature, TensorSpec

if TYPE_CHECKING:
    from edgerun.runtime.bundle import Bundle

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "bool", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(int8)": "int8",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
    "tensor(string)": "string",
}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CPU = "CPUExecutionProvider"


def _specs(args: list[Any], model: Path,
           inner: frozenset[str] = frozenset()) -> tuple[TensorSpec, ...]:
    """Specs of ONNX Runtime's inputs or outputs; a dynamic dim 0 is the batch axis unless its
    name is one of `inner`, names a dim past axis 0 somewhere in the model uses."""
    specs = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise BundleError(f"{model.name}: tensor {arg.name!r} has type {arg.type}, which "
                              "edgerun does not serve (tensors of numbers, bools or strings only)")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        batch_axis = 0 if shape and shape[0] == -1 and arg.shape[0] not in inner else None
        specs.append(TensorSpec(arg.name, _ORT_TYPES[arg.type], shape, batch_axis))
    return tuple(specs)


def _inner_dims(args: list[Any]) -> frozenset[str]:
    """Dim names the model uses past axis 0 ([n, n] of a Gram matrix, a [seq, seq] map): a dim 0
    of such a name is no batch axis, since concatenating requests on it changes those dims too,
    and every caller's answer (n1 + n2 columns, some of them another caller's)."""
    return frozenset(dim for arg in args for dim in arg.shape[1:] if isinstance(dim, str) and dim)


def _alike_dims(args: list[Any]) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """Input dims the model names alike, as (name, ((input, axis), ...)) for each symbolic name
    on two dims or more: ONNX means them to be one size at run time (an input and its mask of
    one `sequence`), and ONNX Runtime does not check it."""
    places: dict[str, list[tuple[str, int]]] = {}
    for arg in args:
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, str) and dim:
                places.setdefault(dim, []).append((arg.name, axis))
    return tuple((dim, tuple(where)) for dim, where in places.items() if len(where) > 1)


def _unranked_inputs(model_path: Path) -> list[str]:
    """Graph inputs whose type carries no shape at all (not even a rank)."""
    import onnx  # only when a bundle is made: parsing the graph costs a full read

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [value.name for value in graph.input if value.name not in weights
            and value.type.HasField("tensor_type")
            and not value.type.tensor_type.HasField("shape")]


# The ONNX messages (onnx.proto's field numbers) that can hold a tensor, read straight from
# the wire: the onnx package is not needed to load a model, and the device binary leaves it out.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
#: message -> {field number: (message it holds, whether that starts a subgraph)}
_HOLDS = {
    _MODEL: {7: (_GRAPH, False), 20: (_TRAINING, True), 25: (_FUNCTION, True)},
    _GRAPH: {1: (_NODE, False), 5: (_TENSOR, False), 15: (_SPARSE, False)},
    _NODE: {5: (_ATTRIBUTE, False)},
    _ATTRIBUTE: {5: (_TENSOR, False), 6: (_GRAPH, True), 10: (_TENSOR, False),
                 11: (_GRAPH, True), 22: (_SPARSE, False), 23: (_SPARSE, False)},
    _SPARSE: {1: (_TENSOR, False), 2: (_TENSOR, False)},
    _FUNCTION: {7: (_NODE, False), 11: (_ATTRIBUTE, True)},  # 11: attributes' defaults
    _TRAINING: {1: (_GRAPH, False), 2: (_GRAPH, False)},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


class _Malformed(Exception):
    pass


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise _Malformed("a truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview | None]]:
    """A protobuf message's fields: (number, a varint's value, a length-delimited field's
    bytes, or None for a fixed-width one)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        value: int | memoryview | None = None
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1 or wire == 5:
            at += 8 if wire == 1 else 4
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        else:
            raise _Malformed(f"wire type {wire}")
        if at > len(data):
            raise _Malformed("a field runs past its message")
        yield number, value


def _text(data: memoryview) -> str:
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        raise _Malformed("a string that is not UTF-8") from None


def external_data_files(model: bytes, name: str) -> dict[str, bool]:
    """The files an ONNX model's tensors keep their data in (`location` of external data), as
    the model names them (almost always none), each with whether a tensor inside a subgraph
    (an If, Loop or Scan body, a function) keeps its data there."""
    if b"location" not in model:  # every external tensor names its file under this key
        return {}
    locations: dict[str, bool] = {}
    pending = [(_MODEL, memoryview(model), False)]
    try:
        while pending:
            kind, data, nested = pending.pop()
            if kind == _TENSOR:
                _tensor_location(data, nested, locations, name)
                continue
            holds = _HOLDS[kind]
            for number, value in _fields(data):
                if number in holds and isinstance(value, memoryview):
                    child, starts_subgraph = holds[number]
                    pending.append((child, value, nested or starts_subgraph))
    except _Malformed as exc:
        raise BundleError(f"{name}: not a readable ONNX model ({exc})") from None
    return locations


def _tensor_location(data: memoryview, nested: bool, locations: dict[str, bool],
                     name: str) -> None:
    tensor, flagged, listed, location = "?", False, False, ""
    for number, value in _fields(data):
        if number == _TENSOR_NAME and isinstance(value, memoryview):
            tensor = _text(value)
        elif number == _TENSOR_DATA_LOCATION and isinstance(value, int):
            flagged = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
            listed = True
            entry = {key: _text(text) for key, text in _fields(value)
                     if key in (1, 2) and isinstance(text, memoryview)}
            if entry.get(1) == "location":
                location = entry.get(2, "")
    if not (flagged or listed):
        return
    if not location:
        raise BundleError(f"{name}: tensor {tensor!r} keeps its data externally but names no "
                          "file")
    locations[location] = locations.get(location, False) or nested


def _check_beside(where: str, location: str) -> None:
    """Refuse an external data location that is not a file in the model's folder."""
    # "*/_ORT_MEM_ADDR_/*" and its kind are ONNX Runtime's own tags for memory addresses
    if (location.startswith("*/") or "\\" in location or posixpath.isabs(location)
            or ".." in location.split("/")):
        raise BundleError(f"{where}: not a file beside the model in the bundle; refused")


def _listed_file(bundle: Bundle, model_file: str, location: str) -> str:
    """The bundle file an external data location names: beside the model, listed in the
    manifest (and so hashed, and signed with it)."""
    where = f"{model_file}: tensor data in {location!r}"
    _check_beside(where, location)
    listed = posixpath.normpath(posixpath.join(posixpath.dirname(model_file), location))
    if listed == model_file or listed not in bundle.manifest.files:
        raise BundleError(f"{where}: the bundle's manifest does not list {listed!r}; an "
                          "external data file must be a file of the bundle")
    return listed


def _write_private(path: Path, data: bytes) -> None:
    """`data` as a new file (0600) of a private folder; one already there (a location named
    two ways, `w` and `./w`) holds the same verified file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    text = np.empty(array.shape, dtype=object)
    for index, value in enumerate(array.flat):
        if type(value) is bytes:
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r}: element {index} is not UTF-8 text; ONNX "
                                   "Runtime string tensors hold text only", name) from None
        text.flat[index] = value
    return text


def providers_for(device: DeviceProfile,
                  model_sha256: str = "") -> list[str | tuple[str, dict[str, Any]]]:
    """The profile's providers that this ONNX Runtime build has, CPU always last.

    TensorRT's engine cache is kept per model (`model_sha256`): ONNX Runtime names a cached
    engine by the model's graph (names, not weights), so a new version of the same graph
    would be served the old version's engine, with its old weights."""
    available = set(ort.get_available_providers())
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in device.execution_providers:
        if name == CPU or name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            cache = cache_dir()
            chosen.append((name, {"trt_engine_cache_enable": True,
                                  "trt_engine_cache_path": str(
                                      cache / "tensorrt" / model_sha256[:32])}))
        else:
            chosen.append(name)
    chosen.append(CPU)
    return chosen


def session_options(device: DeviceProfile) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # 0 is ONNX Runtime's default, the host's physical cores, blind to a container's limit
    options.intra_op_num_threads = device.intra_op_threads or cpu_limit() or 0
    options.inter_op_num_threads = device.inter_op_threads
    options.graph_optimization_level = _LEVELS[device.graph_optimization_level]
    options.log_severity_level = 3
    if not device.allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _check_manifest_signature(bundle: Bundle, session: ort.InferenceSession, name: str) -> None:
    """Requests are checked against the manifest's signature, and the golden check compares
    the outputs it lists: a manifest that disagrees with the model (edited by hand, or listing
    no outputs, so the golden check compared nothing) is refused, naming the tensor. Outputs
    are compared by name and dtype alone: `inspect` reads them unoptimized, and an output
    whose rank shape inference leaves unknown (reported as rank 0) gets one once constants
    are folded."""
    for kind, declared, actual in (
            ("input", bundle.signature.inputs, _specs(session.get_inputs(), Path(name))),
            ("output", bundle.signature.outputs, _specs(session.get_outputs(), Path(name)))):
        model = {spec.name: spec for spec in actual}
        listed = {spec.name: spec for spec in declared}
        for tensor in sorted(set(model) ^ set(listed)):
            where = "the model has it, the manifest does not list it" if tensor in model \
                else "the manifest lists it, the model has no such tensor"
            raise BundleError(f"{name}: {kind} {tensor!r}: {where}")
        for tensor, spec in listed.items():
            ranks = (len(spec.shape), len(model[tensor].shape)) if kind == "input" else (0, 0)
            if spec.dtype != model[tensor].dtype or ranks[0] != ranks[1]:
                raise BundleError(
                    f"{name}: {kind} {tensor!r} is {spec.dtype} of rank {len(spec.shape)} in "
                    f"the manifest, {model[tensor].dtype} of rank {len(model[tensor].shape)} "
                    "in the model")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self._output_names = [o.name for o in session.get_outputs()]
        self._text_inputs = [i.name for i in session.get_inputs() if i.type == "tensor(string)"]
        self._alike_dims = _alike_dims(session.get_inputs())

    @classmethod
    def inspect(cls, model_path: Path) -> Signature:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = _LEVELS["disable"]
        try:
            session = ort.InferenceSession(str(model_path), options, providers=[CPU])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{model_path.name}: ONNX Runtime cannot load it: {exc}") from exc
        unranked = _unranked_inputs(model_path)
        if unranked:  # ONNX Runtime reports [] for these, which would read as a scalar
            raise BundleError(
                f"{model_path.name}: input {', '.join(map(repr, unranked))} has no shape in "
                "the graph (its rank is unknown), so requests cannot be checked against it; "
                "export the model with input shapes (dynamic dims are fine)")
        inner = _inner_dims([*session.get_inputs(), *session.get_outputs()])
        return Signature(_specs(session.get_inputs(), model_path, inner),
                         _specs(session.get_outputs(), model_path, inner))

    @classmethod
    def data_files(cls, model_path: Path) -> list[str]:
        """The external data files the model names, each refused unless beside it: a bundle
        carries them, and loads them from nowhere else."""
        if model_path.suffix.lower() == ".ort":  # the ORT format keeps no external data
            return []
        locations = external_data_files(model_path.read_bytes(), model_path.name)
        for location in locations:
            _check_beside(f"{model_path.name}: tensor data in {location!r}", location)
        return list(locations)

    @classmethod
    def load(cls, model_path: Path, device: DeviceProfile) -> OnnxRuntimeBackend:
        return cls._create(str(model_path), model_path.name, session_options(device),
                           providers_for(device))

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: DeviceProfile) -> OnnxRuntimeBackend:
        """A session made from the model's verified bytes. External data files the model
        names must be files of the bundle: they are read verified too and handed over in
        memory, and ONNX Runtime is pointed at an empty private folder for any other file, so
        it reads nothing else from disk (from bytes it would look in the working directory).
        A subgraph's external data ONNX Runtime reads from that folder only, never from
        memory: those files are written there, a private copy of the verified bytes."""
        name = bundle.manifest.model_file
        held = shared_file(bundle, name)
        model = held.data
        # from a path ONNX Runtime takes a `.ort` file for its own format and any other for
        # ONNX; from bytes it must be told (it would sniff them). The ORT format keeps no
        # external data files.
        ort_format = name.lower().endswith(".ort")
        locations = {} if ort_format else external_data_files(model, name)
        external = {location: bundle.read_file(_listed_file(bundle, name, location))
                    for location in locations}
        options = session_options(device)
        options.add_session_config_entry("session.load_model_format",
                                         "ORT" if ort_format else "ONNX")
        if external:
            if not hasattr(options, "add_external_initializers_from_files_in_memory"):
                raise BundleError(f"{name}: keeps tensor data in {', '.join(external)}; this "
                                  f"ONNX Runtime ({ort.__version__}) cannot take external data "
                                  "from memory, and it is never read from disk after the "
                                  "bundle was verified")
            names = list(external)
            options.add_external_initializers_from_files_in_memory(
                names, [external[n] for n in names], [len(external[n]) for n in names])
        with tempfile.TemporaryDirectory(prefix="edgerun-ort-") as nowhere:  # mode 0700
            for location, in_subgraph in locations.items():
                if in_subgraph:
                    _write_private(Path(nowhere, location), external[location])
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", nowhere)
            backend = cls._create(model, name, options, providers_for(
                device, bundle.manifest.files[name].sha256))
        del model
        _check_manifest_signature(bundle, backend.session, name)
        session = backend.session
        if external or session.get_providers() == [CPU]:
            # ONNX Runtime's wrapper keeps the model bytes for as long as the session lives, to
            # make it again on the CPU if a provider fails mid-run: a CPU session has nowhere
            # to fall back to, nor does one with external data given in memory (the table
            # only lives through its creation). Let them go: its own copy is what runs.
            session.disable_fallback()
            if getattr(session, "_model_bytes", None) is not None:
                session._model_bytes = None
        else:  # it keeps them: one copy for every instance of the version
            backend._held = held
        return backend

    @classmethod
    def _create(cls, model: str | bytes, name: str, options: ort.SessionOptions,
                providers: list[str | tuple[str, dict[str, Any]]]) -> OnnxRuntimeBackend:
        try:
            return cls(ort.InferenceSession(model, options, providers=providers))
        except Exception as exc:
            if providers == [CPU]:
                raise BundleError(f"{name}: ONNX Runtime cannot load it: {exc}") from exc
            log.warning("%s: providers %s failed (%s); falling back to the CPU",
                        name, providers[:-1], exc)
        try:
            return cls(ort.InferenceSession(model, options, providers=[CPU]))
        except Exception as exc:
            raise BundleError(f"{name}: ONNX Runtime cannot load it on the CPU "
                              f"either: {exc}") from exc

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, inputs)))

    def conform(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Dims the model names alike refused unless they agree: ONNX Runtime broadcasts a
        mask of one where it expected the whole sequence (an answer to a request nobody sent),
        or fails inside an op, naming no input. String tensors as text: ONNX Runtime turns a
        bytes element into its repr ("b'...'"), so UTF-8 bytes are decoded and any other bytes
        refused."""
        for dim, ((first, axis), *others) in self._alike_dims:
            size = inputs[first].shape[axis]
            for name, other in others:
                if inputs[name].shape[other] != size:
                    raise InvalidInput(
                        f"input {name!r}: dim {other} ({dim!r}) is {inputs[name].shape[other]}, "
                        f"but input {first!r} dim {axis} ({dim!r}) is {size}; the model names "
                        f"both {dim!r}, so they must be equal", name)
        for name in self._text_inputs:
            array = inputs[name]
            if any(type(value) is bytes for value in array.flat):
                inputs = {**inputs, name: _as_text(name, array)}
        return inputs

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort.__version__,
                "providers": self.session.get_providers()}
