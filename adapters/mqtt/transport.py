"""paho under the daemon, with the per-message costs that do not need to be there taken out.

Measured on the daemon's loop thread (benchmarks/mqtt.py, 64 requests in flight), paho spent
more per request than the data plane did, in two places:

- System calls. paho reads a packet with three or more `recv` calls (the command byte, each
  byte of the remaining length, then the rest) and writes every packet with a `send` of its
  own; a request is two packets in (the PUBLISH, then the broker's PUBACK of the answer) and two
  out (our PUBACK, the answer), and each `send` wakes the broker for one packet.
  `BufferedSocket` is the socket paho sees (paho's own `SocketLike` protocol): `recv` is served
  from one large read of what the kernel holds, and `send` appends to a buffer the daemon writes
  with one `send` once a turn of its event loop has queued everything (`flush`). Whoever drives
  it must call `flush` after `loop_write`, and `loop_read` again while `pending()` says bytes are
  buffered (the selector cannot see them).
- Properties. paho's `Properties` builds two lookup tables per instance and checks every
  attribute against all 27 property names; decoding a request PUBLISH cost 30 us, its PUBACK
  11 us, and packing an answer's two properties 23 us. `PublishProperties` shares the tables
  and reads and writes the PUBLISH properties directly, and `Client` decodes MQTT v5 PUBLISH
  (QoS 0 and 1) and plain PUBACK packets itself; anything else (MQTT 3.1.1, QoS 2, a property
  it does not know, a malformed packet, a paho it was not written for) takes paho's own path.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

READ_SIZE = 65536
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BufferedSocket:
    """A connected, non-blocking socket (TCP or TLS) with a read buffer and a write buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in = b""
        self._at = 0
        self._out = bytearray()
        self._error: OSError | None = None

    # -------------------------------------------------------------- what paho calls
    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from the buffer, else from one large read of the socket."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._at >= len(self._in):
            if size >= READ_SIZE:
                return self.sock.recv(size)
            data = self.sock.recv(READ_SIZE)  # raises when nothing is there, as paho expects
            if len(data) <= size:
                return data
            self._in, self._at = data, 0
        start = self._at
        self._at = end = min(start + size, len(self._in))
        return self._in[start:end]

    def send(self, data: bytes | bytearray) -> int:
        """Taken: it goes out with the next `flush`."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._out += data
        return len(data)

    def pending(self) -> int:
        """Bytes read from the kernel (or decrypted by TLS) that paho has not taken yet."""
        buffered = len(self._in) - self._at
        if isinstance(self.sock, ssl.SSLSocket):
            buffered += self.sock.pending()
        return buffered

    def close(self) -> None:
        """Closes the socket, after a last try at what is still buffered (a DISCONNECT)."""
        if self._out:
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(self._out)
            except (OSError, ValueError):
                pass
            self._out.clear()
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeercert, ...
        return getattr(self.sock, name)

    # ------------------------------------------------------------ what the daemon calls
    @property
    def failed(self) -> bool:
        """A write failed; paho's next `recv` or `send` raises the error."""
        return self._error is not None

    def flush(self) -> bool:
        """Write what paho sent; True when all of it is out, False when the socket is full.

        A broken connection is raised by paho's next `recv` or `send` on this object, so paho
        sees it where it always does and reconnects.
        """
        out = self._out
        while out:
            try:
                written = self.sock.send(out)
            except _WOULD_BLOCK:
                return False
            except OSError as exc:
                self._error = exc
                out.clear()
                return True
            del out[:written]
        return True


# ------------------------------------------------------------------- properties
_TEMPLATE = Properties(PacketTypes.PUBLISH)
# identifier -> (attribute, kind); kinds: b byte, i four-byte integer, v variable byte integer,
# s UTF-8 string, d binary data, p UTF-8 string pair. Those paho allows several times: v, p.
_PUBLISH_PROPERTIES = {1: ("PayloadFormatIndicator", "b"), 2: ("MessageExpiryInterval", "i"),
                       3: ("ContentType", "s"), 8: ("ResponseTopic", "s"),
                       9: ("CorrelationData", "d"), 11: ("SubscriptionIdentifier", "v"),
                       38: ("UserProperty", "p")}
_IDENTIFIERS = {name: (ident, kind) for ident, (name, kind) in _PUBLISH_PROPERTIES.items()}


class Unusual(Exception):
    """A packet the fast path leaves to paho (which decodes it, or calls it malformed)."""


class PublishProperties(Properties):
    """PUBLISH properties that share paho's lookup tables instead of building them per message.

    Still a paho `Properties`: read by attribute, printable, and anything set on it through the
    usual attribute API is checked and packed by paho's own code.
    """

    types, names, properties = _TEMPLATE.types, _TEMPLATE.names, _TEMPLATE.properties

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        put = object.__setattr__
        put(self, "packetType", PacketTypes.PUBLISH)
        for name, value in (values or {}).items():
            if name not in _IDENTIFIERS:
                raise ValueError(f"{name!r} is not a PUBLISH property PublishProperties packs")
            if _IDENTIFIERS[name][1] in "vp" and not isinstance(value, list):
                value = [value]  # those paho allows several times are kept as lists
            put(self, name, value)

    def pack(self) -> bytes:
        buffer = bytearray()
        for name, value in vars(self).items():
            if name == "packetType":
                continue
            if name not in _IDENTIFIERS:  # set through paho's API: paho packs it all
                return super().pack()
            ident, kind = _IDENTIFIERS[name]
            for item in value if kind in "vp" else (value,):
                buffer.append(ident)
                if kind == "s":
                    _put16(buffer, item.encode())
                elif kind == "d":
                    _put16(buffer, item)
                elif kind == "p":
                    _put16(buffer, item[0].encode())
                    _put16(buffer, item[1].encode())
                elif kind == "b":
                    buffer.append(item)
                elif kind == "i":
                    buffer += item.to_bytes(4, "big")
                else:
                    buffer += VariableByteIntegers.encode(item)
        return VariableByteIntegers.encode(len(buffer)) + bytes(buffer)


def _put16(buffer: bytearray, data: bytes) -> None:
    """A string or binary property value: two-byte big-endian length, then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT property value holds at most 65535 bytes, not {len(data)}")
    buffer += len(data).to_bytes(2, "big")
    buffer += data


def decode_publish(packet: bytes | bytearray, qos: int
                   ) -> tuple[int, bytes, PublishProperties, bytes]:
    """(packet id, topic, properties, payload) of an MQTT v5 PUBLISH's variable part."""
    size = len(packet)
    if size < 3:
        raise Unusual("too short")
    at = 2 + (packet[0] << 8 | packet[1])
    topic = bytes(packet[2:at])
    mid = 0
    if qos:
        mid = packet[at] << 8 | packet[at + 1]
        at += 2
    length, at = _varint(packet, at)
    end = at + length
    if end > size:
        raise Unusual("properties run past the packet")
    values: dict[str, Any] = {}
    while at < end:
        known = _PUBLISH_PROPERTIES.get(packet[at])
        if known is None:  # a Topic Alias, or not a PUBLISH property at all
            raise Unusual(f"property {packet[at]}")
        name, kind = known
        at += 1
        if kind in "sdp":
            start = at + 2
            at = start + (packet[at] << 8 | packet[at + 1])
            value: Any = bytes(packet[start:at])
            if kind == "p":
                start = at + 2
                at = start + (packet[at] << 8 | packet[at + 1])
                value = (_text(value), _text(bytes(packet[start:at])))
            elif kind == "s":
                value = _text(value)
        elif kind == "b":
            value = packet[at]
            at += 1
        elif kind == "i":
            value = int.from_bytes(packet[at:at + 4], "big")
            at += 4
        else:
            value, at = _varint(packet, at)
        if (kind == "b" and value > 1) or (kind == "v" and not value):
            # a Payload Format Indicator past 1 or a Subscription Identifier of 0: paho
            # refuses them (a protocol error), so they are left to it
            raise Unusual(f"{name} {value}")
        if kind in "vp":
            values.setdefault(name, []).append(value)
        elif name in values:
            raise Unusual(f"{name} twice")
        else:
            values[name] = value
    if at != end:
        raise Unusual("a property runs past the properties")
    return mid, topic, PublishProperties(values), bytes(packet[end:])


def _text(data: bytes) -> str:
    """A UTF-8 string as MQTT allows it (no U+0000, no U+FEFF; Python refuses surrogates)."""
    text = data.decode()
    if "\x00" in text or "\ufeff" in text:
        raise Unusual("a string MQTT forbids")
    return text


def _varint(packet: bytes | bytearray, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if shift > 21:
            raise Unusual("variable byte integer too long")
        byte = packet[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


# ----------------------------------------------------------------------- client
_PAHO_INTERNALS = ("_create_socket", "_handle_publish", "_handle_pubackcomp",
                   "_handle_on_message", "_send_puback", "_do_on_publish")
#: The decoding fast paths run on the paho they were written and tested against (2.x), whose
#: internals they rely on; on any other, paho decodes everything as usual.
FAST_PATHS = paho.mqtt.__version__.split(".")[0] == "2" and \
    all(hasattr(mqtt.Client, name) for name in _PAHO_INTERNALS)
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class Client(mqtt.Client):
    """paho's client on a `BufferedSocket`, decoding the packets of the request path itself."""

    #: Called with the topic and reason of each PUBLISH the broker acknowledged with a failure
    #: (MQTT v5: an ACL that does not let this client write the topic, a quota), in a PUBACK
    #: (QoS 1) or a PUBREC (QoS 2): paho drops those without a word.
    on_refused: Callable[[str, ReasonCode], None] | None = None

    def honour_receive_maximum(self, properties: Any) -> None:
        """From a v5 CONNACK (in `on_connect`, before paho sends what it queued): keep at most
        the broker's Receive Maximum of QoS 1 and 2 PUBLISHes unacknowledged (65,535 when it
        names none), as MQTT 5 (3.3.4) requires. paho ignores it; Mosquitto refuses the excess
        QoS 2 answers ("quota exceeded") and paho drops them without a word. paho's setter
        refuses a connected client, so the limit is set where paho keeps it.

        On a reconnect paho marks every unacknowledged message "send now" without counting
        them, and sends them all after this callback: what is over the limit is put back in
        its queue (after the rest, since paho stops sending at the first queued one), for
        paho to send as acknowledgements free room."""
        limit = self._max_inflight_messages = int(getattr(properties, "ReceiveMaximum", 65535))
        with self._out_message_mutex:
            messages = list(self._out_messages.values())
            room = limit - sum(1 for m in messages if m.qos and m.state != mqtt.mqtt_ms_publish
                               and m.state != mqtt.mqtt_ms_queued)
            for message in messages:
                if message.qos and message.state == mqtt.mqtt_ms_publish:
                    if room > 0:
                        room -= 1
                        continue
                    message.state = mqtt.mqtt_ms_queued
                if message.state == mqtt.mqtt_ms_queued:
                    self._out_messages.move_to_end(message.mid)

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        return BufferedSocket(sock) if isinstance(sock, socket.socket) else sock

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if not FAST_PATHS or self._protocol != mqtt.MQTTv5 or qos == 2:
            return super()._handle_publish()
        try:
            mid, topic, properties, payload = decode_publish(self._in_packet["packet"], qos)
        except (Unusual, IndexError, UnicodeDecodeError):
            return super()._handle_publish()
        message = mqtt.MQTTMessage(mid, topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = properties
        message.payload = payload
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _do_on_publish(self, mid: int, reason_code: ReasonCode, properties: Properties
                       ) -> mqtt.MQTTErrorCode:
        # called with _out_message_mutex held, the message still queued
        if reason_code.is_failure and self.on_refused is not None:
            message = self._out_messages.get(mid)
            if message is not None:
                self.on_refused(message.topic, reason_code)
        return super()._do_on_publish(mid, reason_code, properties)

    def _handle_pubrec(self) -> mqtt.MQTTErrorCode:
        """A v5 PUBREC with a failure reason ends the QoS 2 flow (MQTT 5, 4.3.3): the message
        is done, and refused. paho ignores the reason and sends PUBREL, whose PUBCOMP the
        broker gives as a success, so an answer refused at QoS 2 went unlogged, uncounted."""
        packet = self._in_packet["packet"]
        if self._protocol != mqtt.MQTTv5 or len(packet) < 3 or packet[2] < 0x80:
            return super()._handle_pubrec()
        try:
            reason = ReasonCode(PacketTypes.PUBREC, identifier=packet[2])
            properties = Properties(PacketTypes.PUBREC)
            if len(packet) > 3:
                properties.unpack(packet[3:])
        except Exception:  # a reason PUBREC cannot carry, malformed properties: paho's to say
            return super()._handle_pubrec()
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, properties)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Any) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        if not FAST_PATHS or cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        # two bytes: the packet id alone, so success and no properties (MQTT v5 3.4.2.1)
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_OK, _NO_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
