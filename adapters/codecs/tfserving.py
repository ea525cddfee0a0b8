"""TF Serving REST predict: the row (`instances`) and column (`inputs`) formats.

    {"instances": [[...], [...]]}              one input: a value per row
    {"instances": [{"a": ..., "b": ...}, ...]}  named inputs per row
    {"inputs": [[...], [...]]}                 one input: the whole batch
    {"inputs": {"a": [...], "b": [...]}}       named inputs, whole batches
    {"inputs": {"b64": "..."}}                 one input: a scalar binary string
Binary strings travel as {"b64": "..."}. Answers mirror the request: `predictions` (rows) or
`outputs` (columns), a bare value for a single output, else keyed by output name.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson

from edgerun.adapters.codecs.oip import finite, loads, non_finite_list
from edgerun.runtime.errors import InvalidInput
from edgerun.runtime.signature import Signature


def decode_predict(body: bytes, signature: Signature) -> tuple[dict[str, Any], bool]:
    """The request's inputs by name, and whether it used the row format."""
    try:
        request = loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InvalidInput("the request must be a JSON object")
    _check_signature_name(request.get("signature_name", ""))
    names = [spec.name for spec in signature.inputs]
    if "instances" in request and "inputs" in request:
        raise InvalidInput("give either \"instances\" (rows) or \"inputs\" (columns), not both")
    if "instances" in request:
        rows = request["instances"]
        if not isinstance(rows, list) or not rows:
            raise InvalidInput("\"instances\" must be a non-empty list of rows")
        if all(isinstance(row, dict) for row in rows) and not (
                "b64" not in names and all(row.keys() == {"b64"} for row in rows)):
            inputs = {}
            for name in {key for row in rows for key in row}:
                if any(name not in row for row in rows):
                    raise InvalidInput(f"input {name!r} is missing from some instances", name)
                inputs[name] = [row[name] for row in rows]
        else:
            inputs = {_only_input(names): rows}
        return _checked(_unwrap_b64(inputs), signature, body), True
    if "inputs" in request:
        columns = request["inputs"]
        # TF Serving reads a {"b64": "..."} object as the one input's value (a scalar string),
        # not as inputs by name; an input named "b64" keeps it a name, as in the row format
        named = isinstance(columns, dict) and not (
            "b64" not in names and columns.keys() == {"b64"} and isinstance(columns["b64"], str))
        inputs = columns if named else {_only_input(names): columns}
        return _checked(_unwrap_b64(inputs), signature, body), False
    raise InvalidInput("the request needs \"instances\" (rows) or \"inputs\" (columns)")


#: The one signature a model here has, as TF Serving names a SavedModel's default.
DEFAULT_SIGNATURE = "serving_default"


def _check_signature_name(name: Any) -> None:
    """Refuse another signature, as TF Serving does: answering it from the default one would
    read as that signature's answer."""
    if name not in ("", DEFAULT_SIGNATURE):
        raise InvalidInput(f"signature_name {name!r:.80} is not served: a model here has one "
                           f"signature, {DEFAULT_SIGNATURE!r}")


def _only_input(names: list[str]) -> str:
    if len(names) != 1:
        raise InvalidInput(f"the model takes inputs {', '.join(map(repr, names))}: name them")
    return names[0]


#: The most dimensions a tensor can have (numpy's limit): deeper nesting is refused before
#: it is walked, or a request of 1,000 nested lists (orjson reads up to 1,024) ran out of stack.
MAX_DIMS = 64


def _unwrap_b64(inputs: dict[str, Any]) -> dict[str, Any]:
    return {name: _b64(value, name) for name, value in inputs.items()}


_CONTAINERS = frozenset({list, dict})


def _checked(inputs: dict[str, Any], signature: Signature, body: bytes) -> dict[str, Any]:
    """`inputs`, refusing JSON `true` or `false` in a numeric input: TF Serving takes only
    numbers there (json_tensor.cc), and numpy would read them as 1 and 0. Only a body holding
    either token is walked, and each row of values by its set of types, at C speed."""
    if b"true" not in body and b"false" not in body:
        return inputs
    dtypes = {spec.name: spec.dtype for spec in signature.inputs}
    for name, value in inputs.items():
        if dtypes.get(name, "bool") in ("bool", "string"):  # unknown names: validate's to name
            continue
        stack = [[value]]
        while stack:
            row = stack.pop()
            types = set(map(type, row))
            if bool in types:
                raise InvalidInput(f"input {name!r}: {dtypes[name]} values must be numbers, "
                                   "not true or false (only bool inputs take them)", name)
            if list in types:
                stack.extend(v for v in row if type(v) is list)
    return inputs


def _b64(value: Any, name: str, depth: int = 1) -> Any:
    if isinstance(value, list):
        # a row of scalars: nothing to unwrap. Strings may mix plain and {"b64": ...} values
        # in any order, so a row of strings is scanned whole (at C speed), not by its first
        kind = type(value[0]) if value else list
        if kind is not list and kind is not dict and (
                kind is not str or _CONTAINERS.isdisjoint(map(type, value))):
            return value
        if depth > MAX_DIMS:
            raise InvalidInput(f"input {name!r}: lists nested deeper than a tensor's "
                               f"{MAX_DIMS} dimensions", name)
        return [_b64(v, name, depth + 1) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise InvalidInput(f"input {name!r}: objects inside values must be {{\"b64\": ...}}",
                               name)
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError):
            raise InvalidInput(f"input {name!r}: invalid base64", name) from None
    return value


def encode_predict(outputs: dict[str, np.ndarray], rows: bool) -> bytes:
    if rows:
        if len(outputs) == 1:
            (array,) = outputs.values()
            return orjson.dumps({"predictions": _jsonable(array)},
                                option=orjson.OPT_SERIALIZE_NUMPY)
        count = _rows(outputs)
        columns = {name: _jsonable(array) for name, array in outputs.items()}
        return orjson.dumps({"predictions": [{name: column[i] for name, column in
                                              columns.items()} for i in range(count)]})
    if len(outputs) == 1:
        (array,) = outputs.values()
        return orjson.dumps({"outputs": _jsonable(array)}, option=orjson.OPT_SERIALIZE_NUMPY)
    return orjson.dumps({"outputs": {name: _jsonable(a) for name, a in outputs.items()}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def _rows(outputs: dict[str, np.ndarray]) -> int:
    """The rows every output shares: the row format has nothing else to answer with."""
    counts = {name: array.shape[0] if array.ndim else None for name, array in outputs.items()}
    if None in counts.values() or len(set(counts.values())) > 1:
        shapes = ", ".join(f"{name!r} {outputs[name].shape}" for name in counts)
        raise InvalidInput(f"the outputs ({shapes}) do not share their first dimension, so they "
                           "cannot be answered row by row; ask with \"inputs\" (columns)")
    return next(iter(counts.values()))


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind in "OSU":
        return np.vectorize(_text, otypes=[object])(array).tolist() if array.size else []
    return array.tolist() if finite(array) else non_finite_list(array)


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    return value


def status(versions: list[str]) -> bytes:
    """GET /v1/models/{name}: the TF Serving model status document."""
    return orjson.dumps({"model_version_status": [
        {"version": version, "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}} for version in versions]})
