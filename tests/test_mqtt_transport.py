"""The daemon's side of paho: the buffered broker socket on real loopback TCP connections, and
its PUBLISH decoding and properties checked against paho's own."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from edgerun.adapters.mqtt import transport
from edgerun.adapters.mqtt.transport import (READ_SIZE, BufferedSocket, PublishProperties,
                                             Unusual, decode_publish)


@pytest.fixture()
def pair():
    """A connected, non-blocking BufferedSocket and the plain socket at the other end."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    client.setblocking(False)
    buffered = BufferedSocket(client)
    yield buffered, peer
    buffered.close()
    peer.close()


def wait_readable(sock: BufferedSocket) -> None:
    import select
    select.select([sock], [], [], 5)


def test_small_reads_come_from_one_read_of_the_kernel(pair):
    buffered, peer = pair
    with pytest.raises(BlockingIOError):  # nothing there: paho's cue to wait
        buffered.recv(1)
    peer.sendall(b"\x30\x05hello\x40\x02\x00\x01")  # two packets in one segment
    wait_readable(buffered)
    assert buffered.recv(1) == b"\x30"
    assert buffered.pending() == 10  # the rest waits in the buffer, invisible to select()
    assert buffered.recv(1) == b"\x05"
    assert buffered.recv(5) == b"hello"
    assert buffered.recv(1) == b"\x40"
    assert buffered.recv(100) == b"\x02\x00\x01"  # never more than the buffer holds
    assert buffered.pending() == 0
    with pytest.raises(BlockingIOError):
        buffered.recv(1)


def test_a_large_read_bypasses_the_buffer(pair):
    buffered, peer = pair
    data = bytes(range(256)) * (4 * READ_SIZE // 256)
    sender = threading.Thread(target=peer.sendall, args=(data,))
    sender.start()
    received = bytearray()
    while len(received) < len(data):
        wait_readable(buffered)
        try:
            received += buffered.recv(len(data) - len(received))
        except BlockingIOError:
            continue
    sender.join()
    assert received == data


def test_sends_wait_for_one_flush(pair):
    buffered, peer = pair
    assert buffered.send(b"\x40\x02\x00\x01") == 4  # taken, not written yet
    assert buffered.send(bytearray(b"\x30\x03abc")) == 5
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(100)
    assert buffered.flush() is True
    peer.settimeout(5)
    got = b""
    while len(got) < 9:
        got += peer.recv(100)
    assert got == b"\x40\x02\x00\x01\x30\x03abc"


def test_a_full_socket_keeps_the_rest_for_the_next_flush(pair):
    buffered, peer = pair
    buffered.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    data = bytes(range(251)) * 160_000  # 40 MB: far more than the kernel holds unread
    buffered.send(data)
    assert buffered.flush() is False  # the kernel took part of it
    received = bytearray()
    peer.settimeout(5)
    while len(received) < len(data):
        received += peer.recv(1 << 20)
        buffered.flush()
    assert received == data
    assert buffered.flush() is True


def test_a_broken_connection_reaches_paho_on_its_next_call(pair):
    buffered, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # with linger 0: a reset
    buffered.send(b"x" * 100_000)
    for _ in range(100):  # the reset may take a moment to arrive
        if not buffered.flush() or buffered.failed:
            break
        buffered.send(b"x" * 100_000)
    assert buffered.failed
    with pytest.raises(OSError):
        buffered.recv(1)  # where paho reads it as a lost connection


def test_close_writes_what_is_still_buffered(pair):
    buffered, peer = pair
    buffered.send(b"\xe0\x00")  # a DISCONNECT paho wrote and then closed the socket on
    buffered.close()
    peer.settimeout(5)
    assert peer.recv(10) == b"\xe0\x00"
    assert peer.recv(10) == b""


# ------------------------------------------------------------ PUBLISH decoding
def paho_properties(**values) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def publish_packet(topic: bytes, mid: int | None, properties: Properties, payload: bytes
                   ) -> bytes:
    """The variable part of a PUBLISH as a broker sends it, packed by paho's own code."""
    packed = Properties.pack(properties)
    return (len(topic).to_bytes(2, "big") + topic
            + (b"" if mid is None else mid.to_bytes(2, "big")) + packed + payload)


def as_read_by_paho(properties: Properties) -> dict:
    found = Properties(PacketTypes.PUBLISH)
    found.unpack(Properties.pack(properties))
    return found.json()


CASES = [
    {},
    {"ResponseTopic": "replies/1", "CorrelationData": b"\x00\xffk"},
    {"ContentType": "application/octet-stream", "ResponseTopic": "r/ü/€", "CorrelationData": b"",
     "UserProperty": [("inference-header-content-length", "12"), ("a", "b"), ("a", "c")]},
    {"PayloadFormatIndicator": 1, "MessageExpiryInterval": 3600, "SubscriptionIdentifier": 7,
     "ContentType": "application/json"},
    {"SubscriptionIdentifier": 268435455, "UserProperty": ("k", "v" * 300)},
]


@pytest.mark.parametrize("values", CASES)
@pytest.mark.parametrize("qos, mid", [(0, None), (1, 1), (1, 65535)])
def test_publish_decoded_as_paho_decodes_it(values, qos, mid):
    sent = paho_properties(**values)
    packet = bytearray(publish_packet(b"edgerun/d/infer/m", mid, sent, b'{"inputs": []}'))
    got_mid, topic, properties, payload = decode_publish(packet, qos)
    assert (got_mid, topic, payload) == (mid or 0, b"edgerun/d/infer/m", b'{"inputs": []}')
    assert isinstance(properties, Properties)
    assert properties.json() == as_read_by_paho(sent)
    for name in values:  # read by attribute, in paho's types
        assert getattr(properties, name) == getattr(paho_properties(**values), name)


@pytest.mark.parametrize("packet", [
    publish_packet(b"t", 1, paho_properties(TopicAlias=3), b"x"),  # left to paho
    publish_packet(b"t", 1, paho_properties(ContentType="a\x00b"), b"x"),  # MQTT forbids U+0000
    publish_packet(b"t", 1, paho_properties(ContentType="\ufeffa"), b"x"),
    b"\x00\x01t\x00\x01\x06\x03\x00\x01a\x03\x00\x01b",  # Content Type twice
    b"\x00\x01t\x00\x01\x05\x08\x00\x09abc",  # a string past the properties
    b"\x00\x01t\x00\x01\xff\xff\xff\xff\x7f",  # a length of five bytes
    b"\x00\x01t\x00\x01\x09\x08\x00",  # properties past the packet
    b"\x00\x01t\x00\x01\x03\x03\xff\xfe",  # a string not UTF-8 (and cut short)
])
def test_packets_the_fast_path_leaves_to_paho(packet):
    with pytest.raises((Unusual, IndexError, UnicodeDecodeError)):
        decode_publish(bytearray(packet), 1)


@pytest.mark.parametrize("property_bytes", [b"\x01\x02", b"\x0b\x00"],
                         ids=["payload format indicator 2", "subscription identifier 0"])
def test_property_values_paho_refuses_are_left_to_paho(property_bytes):
    # paho raises MQTTException for them (a protocol error); the fast path took them as read
    packet = b"\x00\x01t\x00\x07" + bytes([len(property_bytes)]) + property_bytes + b"{}"
    with pytest.raises(Unusual):
        decode_publish(bytearray(packet), 1)


def paho_decode(packet: bytes, qos: int) -> tuple[int, bytes, Properties, bytes]:
    """A PUBLISH's variable part as paho's own `_handle_publish` reads it."""
    size = int.from_bytes(packet[:2], "big")
    if size > len(packet) - 2:
        raise IndexError("topic past the packet")
    topic, rest = packet[2:2 + size], packet[2 + size:]
    mid = 0
    if qos:
        if len(rest) < 2:
            raise IndexError("packet id past the packet")
        mid, rest = int.from_bytes(rest[:2], "big"), rest[2:]
    properties = Properties(PacketTypes.PUBLISH)
    used = properties.unpack(rest)[1]
    return mid, topic, properties, rest[used:]


# property identifiers PUBLISH carries, one it may (Topic Alias), and ones it may not
ANY_PROPERTIES = st.lists(st.tuples(st.sampled_from([1, 2, 3, 8, 9, 11, 35, 38, 0, 17, 255]),
                                    st.binary(max_size=10)), max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4), ANY_PROPERTIES, st.binary(max_size=8), st.sampled_from([0, 1]),
       st.one_of(st.none(), st.binary(max_size=40)))
def test_any_publish_the_fast_path_decodes_paho_decodes_alike(topic, properties, payload, qos,
                                                              raw):
    """Arbitrary and mutated PUBLISH packets: the fast path either leaves a packet to paho
    (Unusual, or the errors `Client._handle_publish` catches) or reads what paho reads."""
    if raw is None:
        packed = b"".join(bytes([ident]) + value for ident, value in properties)
        raw = (len(topic).to_bytes(2, "big") + topic + (b"\x00\x07" if qos else b"")
               + VariableByteIntegers.encode(len(packed)) + packed + payload)
    try:
        mid, got_topic, got, rest = decode_publish(bytearray(raw), qos)
    except (Unusual, IndexError, UnicodeDecodeError):
        return
    paho_mid, paho_topic, paho, paho_rest = paho_decode(raw, qos)
    assert (mid, got_topic, rest) == (paho_mid, paho_topic, paho_rest)
    assert got.json() == paho.json()


@pytest.mark.parametrize("values", CASES[1:])
def test_publish_properties_pack_as_paho_reads_them(values):
    ours = PublishProperties(values)
    found = Properties(PacketTypes.PUBLISH)
    found.unpack(ours.pack())
    assert found.json() == as_read_by_paho(paho_properties(**values))
    assert str(ours) == str(found) or ours.json() == found.json()


def test_publish_properties_set_through_paho_api_are_packed_by_paho():
    ours = PublishProperties({"ContentType": "application/json"})
    ours.TopicAlias = 5  # paho's checks and paho's packing
    ours.UserProperty = ("a", "b")
    found = Properties(PacketTypes.PUBLISH)
    found.unpack(ours.pack())
    assert (found.ContentType, found.TopicAlias, found.UserProperty) == \
        ("application/json", 5, [("a", "b")])
    with pytest.raises(ValueError, match="TopicAlias"):
        PublishProperties({"TopicAlias": 5})


def test_the_fast_paths_run_on_the_installed_paho():
    """The benchmarked path is the tested one: a paho whose internals moved fails here."""
    assert transport.FAST_PATHS


# ------------------------------------------------- the broker's Receive Maximum
def test_answers_queued_while_the_broker_was_away_stay_within_its_receive_maximum(tmp_path):
    """paho resets every unacknowledged QoS > 0 message to "send now" on a reconnect and sends
    them all after the CONNACK, past the broker's Receive Maximum: Mosquitto refused the
    excess QoS 2 ones ("quota exceeded") and paho dropped them without a word, so answers and
    reports published while the broker was away were lost."""
    import orjson

    from edgerun.adapters.mqtt import Daemon, load_config
    from edgerun.examples import mlp_onnx
    from tests.mqtt import Broker, connect, wait_online
    from tests.serving import add_version

    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 3]))
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + "max_inflight_messages 5\n")
    broker.start()
    config = load_config(None, repository=repo, broker=broker.url, device_id="rm",
                         data_dir=tmp_path / "state", poll_interval=0, telemetry_interval=0,
                         qos=2, reconnect_min_s=0.1, reconnect_max_s=0.5)
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    watcher = None
    try:
        wait_online(broker, "rm")
        got: set[int] = set()
        all_in = threading.Event()

        def on_message(client, userdata, message) -> None:
            got.add(orjson.loads(message.payload)["n"])
            if len(got) == 50:
                all_in.set()

        watcher = connect(broker, client_id="rm-watcher", clean=False)
        watcher.on_message = on_message
        subscribed = threading.Event()
        watcher.on_subscribe = lambda *args: subscribed.set()
        watcher.subscribe("out/#", 2)
        assert subscribed.wait(10)
        broker.stop()  # its sessions persist: the watcher's subscription comes back with it
        for n in range(50):  # an extension publishing while the broker is away
            daemon.publish(f"out/{n}", {"n": n}, qos=2)
        broker.start()
        assert all_in.wait(60), f"{50 - len(got)} of 50 messages lost: {sorted(got)}"
    finally:
        if watcher is not None:
            watcher.disconnect()
            watcher.loop_stop()
        daemon.stop()
        runner.join(30)
        broker.stop()
