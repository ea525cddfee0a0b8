"""ONNX Runtime: sessions built from a device profile, accelerators first when present."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgerun.devices import DeviceProfile
from edgerun.runtime.backends.base import Backend
from edgerun.runtime.backends.cpus import cpu_limit
from edgerun.runtime.errors import BundleError, InvalidInput
from edgerun.runtime.signature import Signature, TensorSpec

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


def _specs(args: list[Any], model: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise BundleError(f"{model.name}: tensor {arg.name!r} has type {arg.type}, which "
                              "edgerun does not serve (tensors of numbers, bools or strings only)")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        batch_axis = 0 if shape and shape[0] == -1 else None
        specs.append(TensorSpec(arg.name, _ORT_TYPES[arg.type], shape, batch_axis))
    return tuple(specs)


def _unranked_inputs(model_path: Path) -> list[str]:
    """Graph inputs whose type carries no shape at all (not even a rank)."""
    import onnx  # only when a bundle is made: parsing the graph costs a full read

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [value.name for value in graph.input if value.name not in weights
            and value.type.HasField("tensor_type")
            and not value.type.tensor_type.HasField("shape")]


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


def providers_for(device: DeviceProfile) -> list[str | tuple[str, dict[str, Any]]]:
    """The profile's providers that this ONNX Runtime build has, CPU always last."""
    available = set(ort.get_available_providers())
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in device.execution_providers:
        if name == CPU or name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            cache = Path(os.environ.get("EDGERUN_CACHE", Path.home() / ".cache" / "edgerun"))
            chosen.append((name, {"trt_engine_cache_enable": True,
                                  "trt_engine_cache_path": str(cache / "tensorrt")}))
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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self._output_names = [o.name for o in session.get_outputs()]
        self._text_inputs = [i.name for i in session.get_inputs() if i.type == "tensor(string)"]

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
        return Signature(_specs(session.get_inputs(), model_path),
                         _specs(session.get_outputs(), model_path))

    @classmethod
    def load(cls, model_path: Path, device: DeviceProfile) -> OnnxRuntimeBackend:
        options = session_options(device)
        providers = providers_for(device)
        try:
            return cls(ort.InferenceSession(str(model_path), options, providers=providers))
        except Exception as exc:
            if providers == [CPU]:
                raise BundleError(f"{model_path.name}: ONNX Runtime cannot load it: {exc}") from exc
            log.warning("%s: providers %s failed (%s); falling back to the CPU",
                        model_path.name, providers[:-1], exc)
        try:
            return cls(ort.InferenceSession(str(model_path), options, providers=[CPU]))
        except Exception as exc:
            raise BundleError(f"{model_path.name}: ONNX Runtime cannot load it on the CPU "
                              f"either: {exc}") from exc

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, inputs)))

    def conform(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """String tensors as text: ONNX Runtime turns a bytes element into its repr
        ("b'...'"), so UTF-8 bytes are decoded and any other bytes refused."""
        for name in self._text_inputs:
            array = inputs[name]
            if any(type(value) is bytes for value in array.flat):
                inputs = {**inputs, name: _as_text(name, array)}
        return inputs

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": ort.__version__,
                "providers": self.session.get_providers()}
