"""MQTT messages to data-plane calls and replies back: topics, properties, payload forms.

Request topics: `edgerun/<device-id or group>/infer/<model>[/<version>]`.
Payload forms, chosen by the MQTT v5 Content Type of the request:
- absent or `application/json`: an OIP v2 JSON request; the reply is an OIP v2 response.
- `application/octet-stream` with the user property `inference-header-content-length`: the OIP
  binary tensor extension (JSON header, then raw tensor bytes), as over HTTP; binary outputs come
  back the same way, with that user property on the reply.
- `application/x-npz`: a numpy `.npz` of the inputs by name; the reply is an `.npz` of every
  output.
Where the answer goes: the request's Response Topic (with its Correlation Data, if any). MQTT
3.1.1 has no properties: such clients send OIP JSON with a top-level `"reply_to"` topic and use
the OIP `"id"` (echoed in the answer) to match answers; both are read by the data plane's decode
of the body (`Call.kept`), so a body is parsed once. Errors are JSON
`{"error": "...", "kind": "...", "id": ...}` with the user property `edgerun-error: <kind>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from paho.mqtt.properties import Properties, VariableByteIntegers

from edgerun.adapters.codecs import npz, oip
from edgerun.adapters.dataplane.call import BINARY, JSON, Call
from edgerun.adapters.mqtt.transport import PublishProperties
from edgerun.runtime.errors import EdgerunError, InvalidInput, Overloaded

TRANSPORT = "mqtt"
NPZ = npz.CONTENT_TYPE
ERROR_PROPERTY = "edgerun-error"
REPLY_TO = "reply_to"
#: What a kept member holds until the data plane's decode has read the request.
_UNREAD = object()


@dataclass(slots=True)
class Request:
    """What one message asks: the model, where to answer, and the payload in its form."""

    model: str
    version: str | None
    body: bytes
    content_type: str
    user: dict[str, str]
    response_topic: str | None
    correlation: bytes | None
    request_id: str | None = None
    #: Whether the JSON body's "id" (and, with no Response Topic, its "reply_to") was read.
    read: bool = False

    @property
    def attributes(self):  # noqa: ANN201 - an Attributes callable
        return self.user.get


def infer_topics(scope: str) -> str:
    """The filter for inference requests to a device or a group."""
    return f"edgerun/{scope}/infer/#"


def parse(topic: str, payload: bytes, properties: Properties | None) -> Request:
    """The request a message carries. A JSON body without a Response Topic (MQTT 3.1.1) names
    its reply topic itself: read where the data plane decodes it (`take`), not here."""
    parts = topic.split("/")
    model = parts[3] if len(parts) >= 4 else ""
    version = parts[4] if len(parts) == 5 else None
    user: dict[str, str] = {}
    response_topic = correlation = None
    content_type = ""
    if properties is not None:
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        content_type = getattr(properties, "ContentType", "") or ""
        for key, value in getattr(properties, "UserProperty", ()):
            user[key.lower()] = value
    return Request(model, version, payload, content_type.split(";")[0].strip().lower(), user,
                   response_topic, correlation)


def _json_header(body: bytes) -> Any:
    """The JSON request body read for its reply topic and id (NaN and the infinities allowed,
    as the codec reads them); None when it is not JSON."""
    try:
        return oip.loads(body)
    except orjson.JSONDecodeError:
        return None


def take(request: Request, call: Call) -> None:
    """What the data plane's decode read of the request for its answer: its "id" and, with
    no Response Topic, its "reply_to" (a big body was parsed once, on the worker thread)."""
    kept = call.kept
    if kept is None or kept["id"] is _UNREAD:
        return
    request.request_id = oip.id_text(kept["id"])
    if REPLY_TO in kept:
        request.response_topic = _topic(kept[REPLY_TO])
    request.read = True


def _read(request: Request) -> None:
    """The JSON body read for its "id" and reply topic, once, where the data plane did not
    read it (a call refused before its decode: no such model, a full inbox)."""
    if request.read or request.content_type not in ("", JSON):
        return
    request.read = True
    header = _json_header(request.body)
    if isinstance(header, dict):
        request.request_id = oip.id_text(header.get("id"))
        if request.response_topic is None:
            request.response_topic = _topic(header.get(REPLY_TO))


def _topic(reply_to: Any) -> str | None:
    return reply_to if isinstance(reply_to, str) and reply_to else None


def request_id(request: Request) -> str | None:
    """The request's "id" for an error reply: as the data plane's decode read it, else read
    now, off the path every answered request takes."""
    _read(request)
    return request.request_id


def reply_topic(request: Request) -> str | None:
    """Where the answer goes: the Response Topic, else the JSON body's "reply_to"."""
    if request.response_topic is None:
        _read(request)
    return request.response_topic


#: Topics a device publishes or reads on its own account (`edgerun/<id>/<kind>...`).
CONTROL_TOPICS = frozenset({"infer", "ota", "status", "telemetry"})


def reply_topic_problem(topic: str) -> str | None:
    """Why an answer must not go to `topic`, or None. The broker ends the connection of a
    client that publishes to a topic with U+0000, a control character, a surrogate or a
    non-character (MQTT 5 1.5.4; Mosquitto checks them all), and paho raises, inside its read
    loop, for wildcards and topics over 65535 bytes; a QoS 1 answer that ended the connection
    is sent again on every reconnect, so one bad reply_to would keep the daemon offline.
    paho sends an empty topic under MQTT v5 (it could stand for a Topic Alias), and Mosquitto
    ends the connection for it (a protocol error)."""
    if not topic:
        return "is empty"
    if "+" in topic or "#" in topic:
        return "has wildcards"
    levels = topic.split("/")
    if len(levels) >= 3 and levels[0] == "edgerun" and levels[2] in CONTROL_TOPICS:
        # the broker's ACL lets a device write its own status and OTA reports: a requester
        # must not get an answer published there, as if the device had said it
        return f"is an edgerun {levels[2]} topic, not a reply topic"
    for char in topic:
        code = ord(char)
        if code <= 0x1F or 0x7F <= code <= 0x9F:
            return f"holds the control character U+{code:04X}"
        if 0xD800 <= code <= 0xDFFF or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"holds U+{code:04X}, which MQTT forbids"
    if len(topic.encode()) > 0xFFFF:
        return "is longer than 65535 bytes"
    return None


def publish_size(topic: str, payload: bytes, qos: int, properties: Properties | None) -> int:
    """The bytes of the MQTT v5 PUBLISH packet carrying `payload`, as a broker's Maximum
    Packet Size counts them: fixed header, topic, packet id, properties, payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    remaining += len(properties.pack()) if properties is not None else 1
    return 1 + len(VariableByteIntegers.encode(remaining)) + remaining


def check_topic(request: Request, topic: str) -> None:
    if not request.model or len(topic.split("/")) > 5:
        raise InvalidInput(f"topic {topic!r} is not edgerun/<device-or-group>/infer/<model>"
                           "[/<version>]")


def call_for(request: Request) -> Call:
    """The data-plane call; an OIP body's decode keeps its "id" (and "reply_to") for `take`."""
    kept: dict[str, Any] | None = None
    if request.content_type in ("", JSON, BINARY):
        kept = {"id": _UNREAD}
        if request.response_topic is None and request.content_type != BINARY:
            kept[REPLY_TO] = _UNREAD
    return Call("infer", request.model, request.version, request.body, request.attributes,
                transport=TRANSPORT, kept=kept)


def npz_request(request: Request) -> oip.InferRequest:
    """The request an `.npz` payload holds: the data plane's decoder, run once the hooks let
    the call through, so a refused call costs no decode."""
    return oip.InferRequest(id=None, inputs=npz.decode(request.body), outputs=None,
                            binary_outputs=False, timeout_us=None)


def reply_properties(request: Request, content_type: str,
                     user: list[tuple[str, str]] | None = None) -> Properties:
    values: dict[str, Any] = {"ContentType": content_type}
    if request.correlation is not None:
        values["CorrelationData"] = request.correlation
    if user:
        values["UserProperty"] = list(user)
    return PublishProperties(values)


def error_payload(error: EdgerunError, request_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": str(error), "kind": error.kind}
    if request_id is not None:
        body["id"] = request_id
    if isinstance(error, Overloaded):
        body["retry_after_s"] = error.retry_after_s
    return orjson.dumps(body)
