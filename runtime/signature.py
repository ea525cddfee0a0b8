"""A model's io signature, and the one place where request tensors are checked against it.

Checks run on whole arrays (dtype, rank, fixed dims), never element by element, so the cost of
validation does not grow with the tensor. Casts are allowed only where no value changes: a
lossless numpy cast, integers that fit the target, or floats narrowed to a float type that holds
them (JSON numbers are doubles, so float64 -> float32 rounding is the one accepted change).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgerun.runtime.errors import InvalidInput

#: Manifest dtype names, the numpy names, plus "string" for text tensors.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
}
DTYPES["string"] = np.dtype(object)


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype, shape with -1 for dynamic dims, and its batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int | None = None
    np_dtype: np.dtype = field(init=False, repr=False, compare=False)
    _fixed_dims: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInput(f"tensor {self.name!r}: unknown dtype {self.dtype!r}", self.name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "np_dtype", DTYPES[self.dtype])
        fixed = tuple((axis, size) for axis, size in enumerate(self.shape) if size >= 0)
        object.__setattr__(self, "_fixed_dims", fixed)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "batch_axis": self.batch_axis}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]),
                   batch_axis=data.get("batch_axis"))

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"

    def conform(self, value: Any) -> np.ndarray:
        """Return `value` as an array of this spec's dtype, or raise InvalidInput naming it."""
        if self.dtype == "string":
            array = string_array(value, self.name)
        elif type(value) is np.ndarray and value.dtype == self.np_dtype:
            array = value
        else:
            array = as_array(value, self.name)
            if self.dtype == "uint64":  # JSON integers from TF Serving, MQTT, a Lambda event
                array = exact_uint64(value, array, self.name)
            array = cast_array(array, self.dtype, self.name)
        if array.ndim != len(self.shape):
            raise InvalidInput(
                f"input {self.name!r}: expected rank {len(self.shape)} "
                f"{list(self.shape)}, got shape {list(array.shape)}", self.name)
        shape = array.shape
        for axis, size in self._fixed_dims:
            if shape[axis] != size:
                raise InvalidInput(
                    f"input {self.name!r}: dim {axis} must be {size} (expected "
                    f"{list(self.shape)}), got shape {list(shape)}", self.name)
        return array


def as_array(value: Any, name: str) -> np.ndarray:
    """`value` (nested lists, scalars, an array) as an array; ragged nesting is refused."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nesting, mixed objects
        raise InvalidInput(f"input {name!r}: not a rectangular array ({exc})", name) from None


def exact_uint64(data: Any, array: np.ndarray, name: str) -> np.ndarray:
    """`array` (`as_array(data)`) as uint64 read exactly from `data`'s Python integers: those
    above 2**63 make numpy fall back to float64 (or object) and lose digits. Anything else,
    floats among them say, is left to `cast_array` to judge."""
    if array.dtype.kind not in "fO" or isinstance(data, np.ndarray):
        return array
    exact = np.array(data, dtype=object)
    values = list(exact.reshape(-1))  # not .flat: numpy's iterators stop at 32 dimensions
    if not all(type(v) is int for v in values):
        return array
    if values and (min(values) < 0 or max(values) >= 2 ** 64):
        raise InvalidInput(f"input {name!r}: values out of uint64 range [0, {2 ** 64 - 1}]",
                           name)
    return exact.astype(np.uint64)


def cast_array(array: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """`array` as manifest dtype `dtype` if no value changes, else InvalidInput naming `name`."""
    source, target = array.dtype, DTYPES[dtype]
    if target.kind == "O":
        return string_array(array, name)
    if source == target:
        return array
    if array.size == 0:  # no value to change: `[]` parses as float64 whatever it is for
        return array.astype(target)
    if source == _FLOAT64 and target == _FLOAT32 and \
            np.maximum.reduce(np.abs(array), axis=None) <= _FLOAT32_MAX:
        return array.astype(target)  # every JSON FP32 request: finite, in range, the short way
    if source.kind not in "biuf":
        raise _dtype_error(name, dtype, source, array)
    if source.kind in "iu" and target.kind == "f":  # numpy calls int64 -> float64 safe; it is not
        exact = 2 ** (np.finfo(target).nmant + 1)
        if array.size == 0 or max(-int(array.min()), int(array.max())) <= exact:
            return array.astype(target)
        raise InvalidInput(
            f"input {name!r}: integer values beyond +/-{exact} cannot be {dtype} "
            f"exactly", name)
    if np.can_cast(source, target, "safe"):
        return array.astype(target)
    if source.kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        if array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max):
            return array.astype(target)
        raise InvalidInput(
            f"input {name!r}: values out of {dtype} range [{info.min}, {info.max}]",
            name)
    if source.kind == "f" and target.kind == "f":
        with np.errstate(over="ignore"):
            narrowed = array.astype(target)
        if _overflows(array, narrowed):
            raise InvalidInput(f"input {name!r}: values overflow {dtype}", name)
        return narrowed
    raise _dtype_error(name, dtype, source)


def string_array(value: Any, name: str) -> np.ndarray:
    """`value` as an object array of str or bytes elements, each kept as given (numpy's own
    text dtypes would drop trailing NULs); any other element is refused, naming it."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return value.astype(object)
        if value.dtype.kind != "O":
            raise _dtype_error(name, "string", value.dtype)
        array = value
    else:
        try:
            array = np.array(value, dtype=object)
        except ValueError as exc:  # ragged below the first level
            raise InvalidInput(f"input {name!r}: not a rectangular array ({exc})",
                               name) from None
    elements = array.reshape(-1)  # not .flat: numpy's iterators stop at 32 dimensions
    if set(map(type, elements)) <= _TEXT_TYPES:  # C-speed: 8x the loop below
        return array
    for index, element in enumerate(elements):
        if not isinstance(element, (str, bytes)):
            if isinstance(element, (list, tuple)):
                raise InvalidInput(f"input {name!r}: not a rectangular array", name)
            raise InvalidInput(f"input {name!r}: expected string, got "
                               f"{type(element).__name__} at element {index}", name)
    return array


_TEXT_TYPES = frozenset({str, bytes})


_FLOAT64, _FLOAT32 = np.dtype(np.float64), np.dtype(np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _overflows(wide: np.ndarray, narrowed: np.ndarray) -> bool:
    """Whether narrowing made an infinity out of a finite value."""
    made = np.isinf(narrowed)
    return bool(made.any() and not np.isinf(wide[made]).all())


def _dtype_error(name: str, dtype: str, source: np.dtype,
                 array: np.ndarray | None = None) -> InvalidInput:
    if source.kind == "O" and array is not None and array.size and all(
            type(value) is int for value in array.reshape(-1)):  # numpy keeps these as objects
        fits = f"are out of {dtype} range" if DTYPES[dtype].kind in "iu" \
            else f"cannot be {dtype} exactly"
        return InvalidInput(f"input {name!r}: integer values beyond 64 bits {fits}", name)
    text = source.kind in "US" or (source.kind == "O" and array is not None and all(
        isinstance(value, (str, bytes)) for value in array.reshape(-1)))  # not .flat: 32 dims
    got = "string" if text else \
        "null, mixed or nested values" if source.kind == "O" else source.name
    return InvalidInput(f"input {name!r}: expected {dtype}, got {got} (no lossless cast)", name)


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a model, and whether requests can be stacked on axis 0."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None = None
    _by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _batchable: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "_batchable", bool(self.inputs) and all(
            spec.batch_axis == 0 for spec in (*self.inputs, *self.outputs)))

    @property
    def batchable(self) -> bool:
        """True when there are inputs and every input and output has its batch on axis 0."""
        return self._batchable

    def unbatched(self) -> Signature:
        """The same tensors with no batch axis: for a model whose dim 0 only looks like a
        batch (`ids [seq]` -> `[seq, vocab]`), whose callers' rows must never be stacked
        (Triton's `max_batch_size: 0`)."""
        def plain(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
            return tuple(dataclasses.replace(spec, batch_axis=None) for spec in specs)

        return Signature(plain(self.inputs), plain(self.outputs))

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check names, dtypes, ranks, fixed dims and batch agreement; return the arrays."""
        by_name = self._by_name
        if type(inputs) is not dict and not isinstance(inputs, Mapping):  # ABC checks are slow
            raise InvalidInput(
                f"inputs must be a mapping of tensor name to array, got {type(inputs).__name__}")
        if inputs.keys() != by_name.keys():
            raise self._name_error(inputs)
        arrays = {name: by_name[name].conform(value) for name, value in inputs.items()}
        if self._batchable and (len(arrays) > 1 or self.max_batch_size):
            self.batch_size(arrays)
        return arrays

    def _name_error(self, inputs: Mapping[str, Any]) -> InvalidInput:
        unknown = sorted(str(name) for name in inputs if name not in self._by_name)
        missing = sorted(name for name in self._by_name if name not in inputs)
        parts = []
        if unknown:
            parts.append(f"unknown input {', '.join(map(repr, unknown))}")
        if missing:
            parts.append(f"missing input {', '.join(map(repr, missing))}")
        expected = ", ".join(f"{s.name!r} ({s.describe()})" for s in self.inputs)
        return InvalidInput(f"{'; '.join(parts)}; the model takes {expected}",
                            (unknown or missing)[0])

    def batch_size(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Rows in a validated request; all inputs must agree and stay within max_batch_size."""
        rows = -1
        first = ""
        for name, array in arrays.items():
            if rows < 0:
                rows, first = array.shape[0], name
            elif array.shape[0] != rows:
                raise InvalidInput(
                    f"inputs disagree on batch size: {first!r} has {rows} rows, {name!r} has "
                    f"{array.shape[0]}", name)
        if self.max_batch_size and rows > self.max_batch_size:
            raise InvalidInput(
                f"input {first!r}: batch of {rows} exceeds the model's max_batch_size "
                f"{self.max_batch_size}", first)
        return max(rows, 0)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs],
                "max_batch_size": self.max_batch_size}
