"""TensorFlow Lite: LiteRT's interpreter (ai-edge-litert), or tflite-runtime where a device has it.

Callers pass and get float for int8/uint8 tensors: the tensor's scale and zero point quantize
inputs and dequantize outputs. A model whose batch dim is fixed at 1 is served batched when the
interpreter can resize it and a resized run gives the same rows as single runs (checked once,
when the bundle is created). Interpreters are not thread-safe: each call borrows one from a
small pool (the profile's `instances` of them at most), so concurrent callers never share one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerun.devices import DeviceProfile
from edgerun.runtime.backends.base import Backend, shared_file
from edgerun.runtime.backends.cpus import cpu_limit
from edgerun.runtime.errors import BundleError, InvalidInput
from edgerun.runtime.signature import DTYPES, Signature, TensorSpec

if TYPE_CHECKING:
    from edgerun.runtime.bundle import Bundle

_QUANTIZED = ("int8", "uint8", "int16")


def interpreter_class() -> tuple[type, str]:
    """LiteRT's Interpreter, else tflite-runtime's (built for NumPy 1.x), with its version."""
    try:
        from ai_edge_litert import interpreter as litert
        import ai_edge_litert
        return litert.Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '')}"
    except ImportError:
        pass
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, f"tflite-runtime {getattr(tflite_runtime, '__version__', '')}"
    except Exception as exc:  # tflite-runtime 2.14 fails to import beside NumPy 2
        raise BundleError("the TFLite backend needs ai-edge-litert (pip install "
                          f"'edgerun[tflite]') or a working tflite-runtime ({exc})") from exc


def _new_interpreter(model: Path | bytes, name: str, threads: int | None) -> Any:
    """An interpreter of a model file, or of model bytes (which it uses in place, not copied:
    every interpreter of one backend shares one buffer)."""
    interpreter_type, _ = interpreter_class()
    source = {"model_content": model} if isinstance(model, bytes) \
        else {"model_path": str(model)}
    try:
        interpreter = interpreter_type(**source, num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{name}: the TFLite interpreter cannot load it: {exc}") from exc
    return interpreter


def _threads(device: DeviceProfile) -> int:
    return device.intra_op_threads or cpu_limit() or os.cpu_count() or 1


class _Tensor:
    """One io tensor: where it lives in the interpreter and how floats map onto it."""

    __slots__ = ("name", "index", "dtype", "quantized", "_scale", "_zero_point", "_lo", "_hi")

    def __init__(self, name: str, index: int, dtype: np.dtype, scale: float,
                 zero_point: int) -> None:
        self.name, self.index, self.dtype = name, index, dtype
        self.quantized = scale != 0.0 and dtype.name in _QUANTIZED
        self._scale, self._zero_point = np.float32(scale), np.float32(zero_point)
        if self.quantized:
            info = np.iinfo(dtype)
            self._lo, self._hi = info.min, info.max

    def to_tensor(self, array: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return array
        q = np.round(array.astype(np.float32) / self._scale) + self._zero_point
        return np.clip(q, self._lo, self._hi).astype(self.dtype)

    def from_tensor(self, array: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return array
        return (array.astype(np.float32) - self._zero_point) * self._scale


def _tensors(details: list[dict[str, Any]], model: str) -> tuple[_Tensor, ...]:
    tensors = []
    for d in details:
        dtype = np.dtype(d["dtype"])
        params = d.get("quantization_parameters") or {}
        if len(params.get("scales", ())) > 1:
            raise BundleError(f"{model}: tensor {d['name']!r} is quantized per channel; "
                              "edgerun serves per-tensor quantized inputs and outputs only")
        scale, zero_point = d.get("quantization", (0.0, 0))
        tensor = _Tensor(d["name"], int(d["index"]), dtype, float(scale), int(zero_point))
        if not tensor.quantized and dtype.name not in DTYPES:
            raise BundleError(f"{model}: tensor {d['name']!r} has type {dtype.name}, which "
                              "edgerun does not serve")
        tensors.append(tensor)
    return tuple(tensors)


def _spec(tensor: _Tensor, shape: list[int], batched: bool) -> TensorSpec:
    dtype = "float32" if tensor.quantized else tensor.dtype.name
    if batched:
        shape = [-1, *shape[1:]]
    return TensorSpec(tensor.name, dtype, tuple(int(d) for d in shape), 0 if batched else None)


def _sample(tensor: _Tensor, shape: list[int], rng: np.random.Generator,
            row: int = 0) -> np.ndarray:
    """A trial row; integer and bool rows hold their row number (0, 1: valid ids and flags),
    so two rows differ and a graph that mixes them cannot pass for one that batches."""
    shape = [d if d > 0 else 1 for d in shape]
    if tensor.quantized or tensor.dtype.kind == "f":
        return rng.standard_normal(shape).astype(np.float32 if tensor.quantized else tensor.dtype)
    return np.full(shape, row, tensor.dtype)


def _shape_signatures(interpreter: Any) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The declared shapes (-1: dynamic) of the inputs and of the outputs, by tensor index."""
    return ({d["index"]: list(d["shape_signature"]) for d in interpreter.get_input_details()},
            {d["index"]: list(d["shape_signature"]) for d in interpreter.get_output_details()})


class _Slot:
    """One interpreter and the input shapes it is allocated for (reading them back from the
    interpreter costs more than a small model's forward pass)."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.shapes = {d["index"]: tuple(int(n) for n in d["shape"])
                       for d in interpreter.get_input_details()}


class TFLiteBackend(Backend):
    name = "tflite"

    def __init__(self, model: Path | bytes, threads: int | None, pool_size: int,
                 name: str | None = None, batched: bool | None = None) -> None:
        # a bundle's model as the verified bytes (`from_bundle`), kept: interpreters made
        # later for the pool read them, never the file, which may have changed since
        self._model = model
        self._name = name or (model.name if isinstance(model, Path) else "model")
        self._threads = threads
        first = _Slot(_new_interpreter(model, self._name, threads))
        self._inputs = _tensors(first.interpreter.get_input_details(), self._name)
        self._outputs = _tensors(first.interpreter.get_output_details(), self._name)
        self._quantized_inputs = tuple(t.name for t in self._inputs if t.quantized)
        # as the model declares them: a trial below resizes the interpreter it runs on
        self._declared = _shape_signatures(first.interpreter)
        # whether axis 0 of every tensor is the batch (a bundle's signature says, unless a
        # config's max_batch_size 0 `unbatch`es it; else the trial): only then has a request
        # of no rows answers of no rows (`_empty`)
        self._batched = self._batchable(first, *self._declared) if batched is None else batched
        self._idle = [first]
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max(1, pool_size))  # interpreters at most

    @classmethod
    def inspect(cls, model_path: Path) -> Signature:
        backend = cls(model_path, 1, 1)
        (ins, outs), batched = backend._declared, backend._batched
        return Signature(tuple(_spec(t, ins[t.index], batched) for t in backend._inputs),
                         tuple(_spec(t, outs[t.index], batched) for t in backend._outputs))

    def _batchable(self, slot: _Slot, ins: dict[int, list[int]],
                   outs: dict[int, list[int]]) -> bool:
        """Whether every tensor leads with a batch dim that can grow: declared dynamic, or fixed
        at 1 and a batch of 2 resized gives the rows that two single runs give."""
        shapes = [*ins.values(), *outs.values()]
        if not ins or any(not s or s[0] not in (-1, 1) for s in shapes):
            return False
        if all(s[0] == -1 for s in shapes):
            return True
        rng = np.random.default_rng(0)
        rows = [{t.name: _sample(t, [1, *ins[t.index][1:]], rng, row) for t in self._inputs}
                for row in range(2)]
        try:
            single = [self._invoke(slot, feed) for feed in rows]
            both = self._invoke(slot, {name: np.concatenate([r[name] for r in rows])
                                       for name in rows[0]})
        except (ValueError, RuntimeError):
            return False
        return all(both[name].shape[0] == 2 and np.allclose(
            both[name], np.concatenate([s[name] for s in single]), rtol=1e-4, atol=1e-5)
            for name in both)

    @classmethod
    def load(cls, model_path: Path, device: DeviceProfile) -> TFLiteBackend:
        return cls(model_path, _threads(device), device.instances)

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: DeviceProfile) -> TFLiteBackend:
        name = bundle.manifest.model_file
        held = shared_file(bundle, name)  # LiteRT runs the bytes in place: one copy for all
        backend = cls(held.data, _threads(device), device.instances, name,
                      bundle.signature.batchable)
        backend._held = held
        return backend

    def _invoke(self, slot: _Slot, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = slot.interpreter
        resized: list[str] = []
        for tensor in self._inputs:
            shape = inputs[tensor.name].shape
            if slot.shapes[tensor.index] != shape:
                interpreter.resize_tensor_input(tensor.index, list(shape), strict=False)
                slot.shapes[tensor.index] = shape
                resized.append(tensor.name)
        if resized:
            try:
                interpreter.allocate_tensors()
            except RuntimeError as exc:  # a kernel's (or XNNPACK's) Prepare refused the shapes
                shapes = ", ".join(f"{t.name!r} {list(inputs[t.name].shape)}"
                                   for t in self._inputs)
                raise InvalidInput(f"input shapes {shapes}: the model cannot run them "
                                   f"({str(exc).strip()})", resized[0]) from None
        for tensor in self._inputs:
            interpreter.set_tensor(tensor.index,
                                   np.ascontiguousarray(tensor.to_tensor(inputs[tensor.name])))
        interpreter.invoke()
        return {t.name: t.from_tensor(interpreter.get_tensor(t.index)) for t in self._outputs}

    def _empty(self, slot: _Slot, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of no rows: LiteRT's kernels (XNNPACK's among them) fail to resize to it, so
        one row of zeros runs for the output shapes and no row of it is returned. For a
        batched model only: where axis 0 is no batch (a sequence), an input of no elements
        has an answer of its own, which that row would change."""
        one = {name: np.zeros((1, *a.shape[1:]) if a.ndim else (), a.dtype)
               for name, a in inputs.items()}
        return {name: out[:0] if out.ndim else out
                for name, out in self._invoke(slot, one).items()}

    def conform(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """NaN in a quantized input refused: it has no integer value (the cast makes up one,
        and the answer looks plausible but is for some other input)."""
        for name in self._quantized_inputs:
            array = inputs[name]
            if array.size and np.isnan(array.min()):  # min() is NaN if any element is
                raise InvalidInput(f"input {name!r}: NaN cannot be quantized (the model "
                                   "takes integers scaled from these floats)", name)
        return inputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._slots.acquire()
        try:
            with self._lock:
                slot = self._idle.pop() if self._idle else None
            if slot is None:
                slot = _Slot(_new_interpreter(self._model, self._name, self._threads))
            # an interpreter that failed is dropped, not pooled: it is left sized for shapes it
            # could not allocate, and its error reporter keeps every message it ever gave (each
            # failure's text would carry all the ones before it)
            if self._batched and any(a.ndim and not a.shape[0] for a in inputs.values()):
                outputs = self._empty(slot, inputs)
            else:
                outputs = self._invoke(slot, inputs)
            with self._lock:
                self._idle.append(slot)
            return outputs
        finally:
            self._slots.release()

    def unbatch(self) -> None:
        """An input of no rows runs as it is (`_empty` answered a batch of none: a sequence
        model's empty prefix emptied the whole answer)."""
        self._batched = False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "interpreter": interpreter_class()[1],
                "threads": self._threads}
