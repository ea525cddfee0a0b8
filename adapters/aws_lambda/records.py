"""SQS and Kinesis records as data-plane calls.

A record's body is an OIP v2 JSON inference request (base64 in Kinesis, as Kinesis delivers
every payload). The model it asks for is, first match wins: the SQS message attribute `model`
(and `version`), the body's own `model_name` (and `model_version`) field, which the OIP decoder
otherwise ignores, or the function's default model. SQS string message attributes are the
call's attributes, so `x-request-timeout-ms`, `x-request-id` and sticky-routing keys work as
they do in HTTP headers.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from edgerun.adapters.dataplane import Call
from edgerun.adapters.dataplane.call import INFER
from edgerun.runtime.errors import InvalidInput


@dataclass
class Record:
    """One record of a batch: the id Lambda knows it by, and its call (or why it has none)."""

    item_id: str
    call: Call | None
    error: InvalidInput | None = None


def sqs_record(record: dict[str, Any], default_model: str, timeout: float | None) -> Record:
    attributes = {name.lower(): value.get("stringValue")
                  for name, value in (record.get("messageAttributes") or {}).items()
                  if isinstance(value, dict) and str(value.get("dataType", "")).startswith(
                      ("String", "Number"))}
    item_id = record["messageId"]
    if not _is_text(item_id):
        return _misnamed(item_id, "SQS", "messageId")
    try:
        body = str(record.get("body", "")).encode()
    except UnicodeEncodeError as exc:  # a lone surrogate (the event's JSON allows "\ud800")
        return Record(item_id, None, InvalidInput(f"SQS record {item_id}: body is not valid "
                                                  f"Unicode ({exc})"))
    return Record(item_id, _call(body, attributes, default_model, "sqs", timeout))


def kinesis_record(record: dict[str, Any], default_model: str, timeout: float | None) -> Record:
    item_id = record["kinesis"]["sequenceNumber"]
    if not _is_text(item_id):
        return _misnamed(item_id, "Kinesis", "sequenceNumber")
    try:
        body = base64.b64decode(record["kinesis"]["data"], validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        return Record(item_id, None, InvalidInput(f"Kinesis record {item_id}: data is not "
                                                  f"base64 ({exc})"))
    return Record(item_id, _call(body, {}, default_model, "kinesis", timeout))


def _is_text(item_id: Any) -> bool:
    """Whether an id is a string that encodes (the event's JSON allows a lone surrogate)."""
    if not isinstance(item_id, str):
        return False
    try:
        item_id.encode()
    except UnicodeEncodeError:
        return False
    return True


def _misnamed(item_id: Any, source: str, field: str) -> Record:
    """A record whose id is not a string (a hand-written event's `"messageId": 17`) or not
    valid Unicode (`"m\\ud800"`) fails alone, reported by its id as text: taken as it was, it
    ran, and a results destination failed on the id as an internal error (a FIFO queue's or a
    stream's batch stopped there at every delivery), and the id went into
    `batchItemFailures`, where Lambda wants a string. One with no id at all fails the batch
    (KeyError, as a missing id)."""
    if not item_id:
        raise KeyError(field)
    what = "not valid Unicode (it holds a lone surrogate)" if isinstance(item_id, str) \
        else f"{type(item_id).__name__}, not a string"
    return Record(str(item_id), None, InvalidInput(f"{source} record {item_id!r}: {field} is "
                                                   f"{what}"))


def _call(body: bytes, attributes: dict[str, str | None], default_model: str, transport: str,
          timeout: float | None) -> Call:
    model, version = attributes.get("model"), attributes.get("version")
    if model is None and b'"model_name"' in body:
        named = _named_model(body)
        model, version = named.get("model_name"), version or named.get("model_version")
    return Call(INFER, str(model or default_model), None if version is None else str(version),
                body, attributes.get, transport, timeout)


def _named_model(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}  # the data plane's decoder reports it, counted in its metrics
    return parsed if isinstance(parsed, dict) else {}
