"""The daemon's buffered broker socket, on real loopback TCP connections."""

from __future__ import annotations

import socket
import threading

import pytest

from edgerun.adapters.mqtt.transport import READ_SIZE, BufferedSocket


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
