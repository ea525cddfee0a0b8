"""The daemon: a paho-mqtt client in front of a repository and its data plane.

Threads: one asyncio loop (the thread `run` is called from) drives paho's socket (paho's
external-loop interface: no network thread of its own) and serves each request through
`DataPlane.handle_async`, which never blocks it; the forward passes run on the MicroBatcher's
thread, so requests that arrive together wait in the same batcher and run as one batch.
Receiving, answering and publishing on one thread spares two thread hand-offs per request
(measured in benchmarks/mqtt.py). paho reads and writes through a `transport.BufferedSocket`:
one `recv` takes what the kernel holds, and everything a turn of the loop queues (PUBACKs,
answers) goes out in one `send` on the next turn; `transport.Client` decodes the request path's
packets without paho's costly `Properties`. Extension callbacks run on a thread of their own,
in order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import partial
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgerun import __version__
from edgerun.adapters.codecs import npz, oip
from edgerun.adapters.dataplane import Call, DataPlane, InferResult, Reply
from edgerun.adapters.dataplane.call import BINARY, JSON
from edgerun.adapters.mqtt import messages, systemd_notify, transport
from edgerun.adapters.mqtt.config import Broker, DaemonConfig
from edgerun.adapters.mqtt.extensions import Extension, specs
from edgerun.adapters.mqtt.messages import Request
from edgerun.adapters.mqtt.telemetry import Telemetry
from edgerun.adapters.urls import redact
from edgerun.runtime.errors import (EdgerunError, InferenceError, InvalidInput, Overloaded,
                                    PayloadTooLarge)
from edgerun.runtime.metrics import REGISTRY, Registry
from edgerun.runtime.repository import READY, Repository

log = logging.getLogger(__name__)
#: How long a stopping daemon waits for the broker to take its "offline" status.
OFFLINE_WAIT_S = 5.0
#: What a stop needs beyond its bounded waits: the DISCONNECT, closing the models, exiting.
STOP_MARGIN_S = 15.0

UNSUPPORTED_PROTOCOL = 132  # MQTT v5 CONNACK reason: the broker speaks an older protocol
DEDUPE_WINDOW_S = 30.0
DEDUPE_SIZE = 8192
READS_PER_TURN = 16  # loop_read calls on buffered bytes before other work gets a turn
MessageCallback = Callable[[mqtt.MQTTMessage], None]
Fields = Callable[[], dict[str, Any]]
#: The request whose answer the data plane is making in this task, for `Daemon._answer_size`.
_answering: ContextVar[Request | None] = ContextVar("edgerun_mqtt_answering", default=None)


class Daemon:
    """Serves inference requests arriving over MQTT; extensions add topics and report fields."""

    def __init__(self, config: DaemonConfig, *, repository: Repository | None = None,
                 registry: Registry = REGISTRY) -> None:
        self.config = config
        self.device_id = config.device_id
        self.group = config.group
        self.data_dir = config.state_dir
        self.repository = repository if repository is not None else Repository(
            config.repository, config.device, registry=registry)
        self.plane = DataPlane(self.repository)
        self.plane.limit_answers(self._answer_size, lambda size, limit, call: _too_large_text(
            call.model, size, limit))
        self.status_topic = f"edgerun/{self.device_id}/status"
        self._broker_shown = redact(config.broker)  # logs never show a password in the URL
        self.telemetry_topic = f"edgerun/{self.device_id}/telemetry"
        self.v5 = config.protocol != "3.1.1"
        self._telemetry = Telemetry(self.repository.registry)
        self._rejected = self.repository.registry.family(
            "edgerun_mqtt_rejected_total", "MQTT requests answered or dropped before the data "
            "plane, and subscriptions the broker refused, by reason", "counter", ("reason",))
        self._status_fields: list[Fields] = []
        self._telemetry_fields: list[Fields] = []
        self._extensions: list[Extension] = []
        self._subscriptions: dict[str, tuple[int, MessageCallback | None]] = {}
        #: SUBSCRIBEs the broker has not answered yet: packet id -> their topic filters.
        self._subscribing: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._draining = False
        self._closing = False
        self._retrying = False
        self._attempts = 0
        self._socket_open = False
        #: The broker's Maximum Packet Size (MQTT v5 CONNACK); a bigger packet ends the session.
        self._max_packet: int | None = None
        self._writing: set[Any] = set()  # sockets with a write the kernel did not take yet
        self._loop_thread: int | None = None
        self._recent: OrderedDict[tuple, float] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._connected = threading.Event()
        self._started = time.time()
        self._extension_pool = ThreadPoolExecutor(1, thread_name_prefix="edgerun-extension")
        for scope, prefix in ((self.device_id, ""),
                              (self.group, f"$share/{self.group}/") if self.group else (None, "")):
            if scope:
                self._subscriptions[prefix + messages.infer_topics(scope)] = (config.qos, None)
        self.client = self._make_client()

    # ------------------------------------------------------------ extension point
    def subscribe(self, topic_filter: str, callback: MessageCallback,
                  qos: int | None = None) -> None:
        """Call `callback(message)` (on the extension thread) for messages on the filter."""
        qos = self.config.qos if qos is None else qos
        self._subscriptions[topic_filter] = (qos, callback)
        self._add_callback(self.client, topic_filter, callback)
        if self._connected.is_set():
            self._subscribe(self.client, [(topic_filter, qos)])

    def publish(self, topic: str, payload: bytes | str | dict | list, qos: int = 1,
                retain: bool = False, properties: Properties | None = None
                ) -> mqtt.MQTTMessageInfo:
        """Publish now or, at QoS > 0, as soon as the connection is back."""
        if isinstance(payload, (dict, list)):
            payload = orjson.dumps(payload)
        return self.client.publish(topic, payload, qos, retain,
                                   properties if self.v5 else None)

    def add_status_fields(self, fields: Fields) -> None:
        """Merge `fields()` into every status payload (online, and the offline Last Will)."""
        self._status_fields.append(fields)

    def add_telemetry_fields(self, fields: Fields) -> None:
        self._telemetry_fields.append(fields)

    def add_extension(self, extension: Extension) -> None:
        self._extensions.append(extension)

    def publish_status(self) -> None:
        """Publish the retained status again (say, after an extension's state changed)."""
        self.publish(self.status_topic, self.status("online"), retain=True)

    def status(self, state: str) -> bytes:
        payload: dict[str, Any] = {
            "state": state, "device_id": self.device_id, "group": self.group or None,
            "edgerun": __version__, "protocol": "5" if self.v5 else "3.1.1",
            "models": self._models(), "since": round(self._started, 3), "ts": round(time.time(), 3)}
        for fields in self._status_fields:
            payload.update(fields())
        return orjson.dumps(payload)

    def telemetry(self) -> bytes:
        with self._lock:
            inbox = self._pending
        rejected = {labels[0]: int(child.value)  # type: ignore[union-attr]
                    for labels, child in self._rejected.children()}
        traffic = self._telemetry.traffic()
        # a full inbox answers before the data plane counts anything: those are requests,
        # and failures, the fleet's health gate must see as it sees the batcher's own
        refused = rejected.get("overloaded", 0)
        if refused:
            traffic["requests"] += refused
            traffic["errors"] += refused
            traffic["outcomes"]["overloaded"] = traffic["outcomes"].get("overloaded", 0) + refused
        payload: dict[str, Any] = {
            "device_id": self.device_id, "ts": round(time.time(), 3), "models": self._models(),
            "since": round(self._started, 3),  # counters start here: a restart resets them
            **traffic, "inbox_depth": inbox, "rejected": rejected, **self._telemetry.machine()}
        for fields in self._telemetry_fields:
            payload.update(fields())
        return orjson.dumps(payload)

    def _models(self) -> dict[str, list[str]]:
        models: dict[str, list[str]] = {}
        for state in self.repository.index():
            if state.state == READY:
                models.setdefault(state.name, []).append(state.version)
        return models

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (when called from the main thread) or `stop()`."""
        asyncio.run(self._main())

    def stop(self) -> None:
        """Ask a running daemon to drain and exit; safe from any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop, self._idle = asyncio.Event(), asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # started, as Type=simple counted it, once the config held: READY=1 waits neither for
        # the models (a TensorRT engine build takes minutes, and boot would wait for it, or
        # forever for a load that hangs) nor for the broker (out of reach at boot, say)
        systemd_notify.ready()
        if not await self._load():
            return  # stopped while loading: not connected yet, so nothing to drain or announce
        gc.freeze()  # the loaded models' objects leave the collector's scans: shorter pauses
        if self.config.poll_interval:
            self.repository.start_polling(self.config.poll_interval)
        for extension in self._extensions:
            extension.start()
        self._connect()
        tasks = [asyncio.create_task(self._report_telemetry()),
                 asyncio.create_task(self._keepalive())]
        systemd_notify.status(systemd_notify.SERVING)
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()
            for task in tasks:
                task.cancel()

    async def _load(self) -> bool:
        """Load the repository on its own thread; False if a stop came first.

        A load can take minutes (a TensorRT engine build, many instances): a SIGTERM then
        stops the daemon at once, leaving the load unfinished, instead of waiting for it past
        systemd's stop timeout and its SIGKILL. The loading thread stays alive then: whoever
        owns the process ends it without waiting for it (`exit_if_still_loading`).
        """
        assert self._stop is not None
        loading = self.repository.start_loading()
        while loading.is_alive():  # polled: a thread joining it would hold up the stop
            try:
                await asyncio.wait_for(self._stop.wait(), 0.1)
            except asyncio.TimeoutError:
                continue
            log.warning("stopped while models were still loading; their load is abandoned")
            return False
        return True

    async def _shutdown(self) -> None:
        assert self._idle is not None
        # a drain_timeout longer than the unit's TimeoutStopSec allows is waited out, not killed
        systemd_notify.stopping(stop_budget(self.config))
        with self._lock:
            self._draining = True  # from now on, QoS 1 requests stay unacknowledged for next time
            idle = self._pending == 0
        # the requests taken run now, whatever their batching delay: answered before the
        # disconnect, not published into a closed session (they were acknowledged: the
        # broker would never send them again)
        self.repository.flush()
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
        drained = idle or await self._drained(deadline)
        offline = self.publish(self.status_topic, self.status("offline"), retain=True)
        if self._connected.is_set():
            try:
                await asyncio.get_running_loop().run_in_executor(None, offline.wait_for_publish,
                                                                 OFFLINE_WAIT_S)
            except (RuntimeError, ValueError) as exc:
                log.warning("the offline status was not delivered: %s", exc)
        if drained:  # QoS 0 and 2 requests the broker handed over meanwhile
            drained = await self._drained(deadline)
        self._closing = True
        if self.client.disconnect() == mqtt.MQTT_ERR_SUCCESS:
            for _ in range(50):  # the DISCONNECT goes out on the loop, then the socket closes
                if not self._socket_open:
                    break
                await asyncio.sleep(0.02)
        for extension in self._extensions:
            extension.stop()
        self._extension_pool.shutdown(wait=True)
        # past the drain timeout, what is still queued is not run: its answer could only go
        # into the closed session, and running it held the stop past systemd's timeout
        closed = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.repository.close(wait_for_loads=False, drain=drained))
        if not closed:  # a hot swap loads (minutes for a TensorRT engine): not waited for
            log.warning("stopped while a model was loading; its load is abandoned")

    async def _drained(self, deadline: float) -> bool:
        """Wait until every request taken is answered; False (and a warning) at `deadline`."""
        assert self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._pending == 0:
                    return True
                self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.warning("%d requests still in flight after %.0f s; exiting anyway",
                            self._pending, self.config.drain_timeout)
                return False

    async def _report_telemetry(self) -> None:
        interval = self.config.telemetry_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self._connected.is_set():
                self.publish(self.telemetry_topic, self.telemetry(), qos=0)

    # ----------------------------------------------------------------- connection
    def _make_client(self) -> mqtt.Client:
        config = self.config
        client = transport.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgerun-{self.device_id}",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False, manual_ack=True)
        client.max_inflight_messages = 0  # 3.1.1: not capped at paho's default 20; v5: the broker's
        if Broker.parse(config.broker).tls:
            client.tls_set(ca_certs=_str(config.ca_file), certfile=_str(config.cert_file),
                           keyfile=_str(config.key_file))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_refused = self._on_refused
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        for topic_filter, (_, callback) in self._subscriptions.items():
            if callback is not None:
                self._add_callback(client, topic_filter, callback)
        return client

    def _connect(self) -> None:
        """One connection attempt on the loop; failures retry with backoff and jitter."""
        if self._closing:
            return
        try:
            # password_file is read at each attempt: a rotated password takes effect, and a
            # file missing for a moment is retried, not the end of reconnecting
            broker = self.config.broker_address
        except (OSError, ValueError) as exc:  # gone, unreadable, not UTF-8
            log.warning("cannot read the broker password (%s); retrying", exc)
            self._retry()
            return
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        # the Last Will carries the models and extension fields as of this connection
        self.client.will_set(self.status_topic, self.status("offline"), qos=1, retain=True)
        try:
            if self.v5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.config.session_expiry
                self.client.connect(broker.host, broker.port, self.config.keepalive,
                                    clean_start=False, properties=properties)
            else:
                self.client.connect(broker.host, broker.port, self.config.keepalive)
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake
            log.warning("cannot reach %s (%s)", self._broker_shown, exc)
            self._retry()

    def _retry(self) -> None:
        """Exponential backoff from reconnect_min_s to reconnect_max_s, each delay jittered
        (x0.5-1.5) so a fleet that lost one broker does not come back in one wave."""
        if self._closing or self._retrying:
            return
        delay = backoff(self._attempts, self.config.reconnect_min_s,
                        self.config.reconnect_max_s)
        self._attempts += 1
        self._retrying = True
        assert self._loop is not None
        self._loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retrying = False
        self._connect()

    # paho's external-loop interface: the loop reads and writes its socket (a BufferedSocket)
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        assert self._loop is not None
        self._loop.add_reader(sock, self._read, client, sock)
        self._socket_open = True

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if client is self.client:
            self._socket_open = False
        self._writing.discard(sock)

    def _read(self, client: mqtt.Client, sock: Any) -> None:
        """Take what the socket holds; bytes already buffered are invisible to the selector,
        so read on while there are some (a bounded number of times per turn of the loop)."""
        pending = getattr(sock, "pending", None)
        for _ in range(READS_PER_TURN):
            client.loop_read()
            if client.socket() is not sock or pending is None or not pending():
                return
        assert self._loop is not None
        self._loop.call_soon(self._read, client, sock)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho queued a packet (and announces no more until `loop_write`): write on the next
        turn of the loop, with whatever else this turn queues (PUBACKs, answers), in one
        system call."""
        self._on_loop(self._write, client, sock)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any,
                                    sock: Any) -> None:
        pass  # `_write` watches the socket itself while a write is unfinished

    def _write(self, client: mqtt.Client, sock: Any) -> None:
        if client.socket() is not sock:
            return
        client.loop_write()
        flush = getattr(sock, "flush", None)
        done = flush() if flush is not None else not client.want_write()
        assert self._loop is not None
        if not done and sock not in self._writing:
            self._writing.add(sock)
            self._loop.add_writer(sock, self._write, client, sock)
        elif done and sock in self._writing:
            self._writing.discard(sock)
            self._loop.remove_writer(sock)
        if getattr(sock, "failed", False):
            client.loop_read()  # paho meets the error there, and reconnects
        elif done and client.want_write():
            # another thread queued a packet while paho still counted itself registered for
            # writing, so no callback announced it
            self._loop.call_soon(self._write, client, sock)

    def _on_loop(self, function: Callable[..., Any], *args: Any) -> None:
        """Run on the loop's next turn, handed over from another thread (extensions publish)."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(function, *args)
        else:
            self._loop.call_soon_threadsafe(function, *args)

    async def _keepalive(self) -> None:
        """Pings, and notices a broker that went silent (paho's loop_misc, once a second)."""
        while True:
            await asyncio.sleep(1)
            self.client.loop_misc()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            if reason.value == UNSUPPORTED_PROTOCOL and self.config.protocol == "auto" and self.v5:
                log.warning("the broker refuses MQTT v5; falling back to 3.1.1")
                assert self._loop is not None
                self._loop.call_soon(self._fall_back)
            else:
                log.error("broker refused the connection: %s", reason)
                client.disconnect()
                self._retry()
            return
        self._attempts = 0
        self._max_packet = getattr(properties, "MaximumPacketSize", None) if self.v5 else None
        if self.v5:
            client.honour_receive_maximum(properties)
        log.info("connected to %s (session present: %s)", self._broker_shown,
                 flags.session_present)
        self._subscribing.clear()  # those of an earlier connection get no SUBACK now
        self._subscribe(client, [(topic, qos) for topic, (qos, _) in self._subscriptions.items()])
        client.publish(self.status_topic, self.status("online"), 1, True)
        self._connected.set()

    def _subscribe(self, client: mqtt.Client, filters: list[tuple[str, int]]) -> None:
        """SUBSCRIBE, remembering its filters for `_on_subscribe` to name."""
        result, mid = client.subscribe(filters)
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subscribing[mid] = [topic for topic, _ in filters]

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        """The broker's SUBACK: a filter it refused (an ACL, a quota, shared subscriptions it
        does not offer) leaves the device online but deaf to it, so say so here."""
        filters = self._subscribing.pop(mid, [])
        for index, reason in enumerate(reasons):
            if getattr(reason, "is_failure", False):
                topic_filter = filters[index] if index < len(filters) else f"(SUBSCRIBE {mid})"
                log.error("the broker refused the subscription to %r (%s): no message sent "
                          "there reaches this device", topic_filter[:200], reason)
                self._rejected.labels("subscription_refused").inc()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if self._closing or client is not self.client:
            return
        log.warning("disconnected from %s (%s); reconnecting", self._broker_shown, reason)
        self._retry()

    def _on_refused(self, topic: str, reason: Any) -> None:
        """The broker refused a message we published (an answer to a Response Topic its ACL
        does not let this device write, say): the requester gets nothing, so say so here."""
        log.warning("the broker refused the message to %r (%s); it is dropped", topic[:200],
                    reason)
        self._rejected.labels("refused_by_broker").inc()

    def _fall_back(self) -> None:
        old, self.v5 = self.client, False
        old.disconnect()
        self.client = self._make_client()
        self._connect()

    def _add_callback(self, client: mqtt.Client, topic_filter: str,
                      callback: MessageCallback) -> None:
        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            client.ack(message.mid, message.qos)
            self._extension_pool.submit(_guarded, callback, message)

        client.message_callback_add(_matching(topic_filter), on_message)

    # ---------------------------------------------------------------- the inbox
    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        """On the loop: acknowledge and start serving it, or refuse at once."""
        if message.retain:
            # from the broker's retained store, sent again at every (re)subscribe: answered
            # when it came live (retain 0) or queued in our session, never again
            client.ack(message.mid, message.qos)
            self._rejected.labels("retained").inc()
            log.warning("ignored a retained request on %s: a request is answered once, when it "
                        "arrives, not each time the daemon subscribes", message.topic[:200])
            return
        key = _request_key(message)
        if self._duplicate(message, key):
            client.ack(message.mid, message.qos)
            return
        with self._lock:
            if self._draining and message.qos == 1:
                return  # unacknowledged: the broker hands it to our next session
            # QoS 0 has no next time, and QoS 2 none either: paho sent PUBREC when the
            # PUBLISH came, so the broker only repeats its PUBREL, never the request; both
            # are served, and answered before the disconnect
            full = self._pending >= self.config.max_inbox
            if not full:
                self._pending += 1
                self._remember(key)  # only what is served: a refused request may come again
        client.ack(message.mid, message.qos)
        if full:
            self._rejected.labels("overloaded").inc()
            request = messages.parse(message.topic, message.payload, message.properties)
            self._send(request, *self._error(request, Overloaded(
                f"the daemon's inbox is full ({self.config.max_inbox} requests in flight); "
                "retry later", retry_after_s=0.1)))
        else:
            asyncio.ensure_future(self._serve(message))

    def _duplicate(self, message: mqtt.MQTTMessage, key: tuple) -> bool:
        """A QoS 1 request taken already: answered once, so dropped.

        Brokers do not pass the DUP flag on: a requester that resends after a broker restart
        reaches us as a new message. So a request repeating the topic, Response Topic,
        Correlation Data and payload of one taken in the last DEDUPE_WINDOW_S seconds counts
        as a redelivery; without Correlation Data (mosquitto_rr) only the DUP flag does. A
        request refused (inbox full, draining) is not taken: its retry is served.
        """
        correlation = key[2]
        with self._lock:
            seen = self._recent.get(key)
        if seen is not None and (message.dup or (correlation is not None and
                                                 time.monotonic() - seen < DEDUPE_WINDOW_S)):
            self._rejected.labels("duplicate").inc()
            return True
        return False

    def _remember(self, key: tuple) -> None:
        """Under the lock: a request taken now, for `_duplicate` to recognise."""
        self._recent[key] = time.monotonic()
        self._recent.move_to_end(key)
        while len(self._recent) > DEDUPE_SIZE:
            self._recent.popitem(last=False)

    async def _serve(self, message: mqtt.MQTTMessage) -> None:
        try:
            request = messages.parse(message.topic, message.payload, message.properties)
            payload, properties = await self._answer(request, message.topic)
            self._send(request, payload, properties)
        except Exception:
            log.exception("request on %s failed", message.topic)
        finally:
            with self._lock:
                self._pending -= 1
                idle = self._draining and self._pending == 0
            if idle:
                assert self._idle is not None
                self._idle.set()

    async def _answer(self, request: Request, topic: str) -> tuple[bytes, Properties]:
        call = messages.call_for(request)
        try:
            try:
                messages.check_topic(request, topic)
                if request.content_type not in ("", JSON, BINARY, messages.NPZ):
                    raise InvalidInput(f"content type {request.content_type!r} is not one of "
                                       f"{JSON}, {BINARY} (OIP binary extension), "
                                       f"{messages.NPZ}")
            except InvalidInput as exc:  # through the hooks and counted, as any bad request
                return self._error(request, self.plane.refuse(call, exc).error or exc)
            if request.content_type == messages.NPZ:
                # decoded by the data plane once its hooks let the call through and it is
                # routed, as HTTP bodies and gRPC messages are: a refused call costs no decode;
                # a big payload is decoded, and its answer encoded, off the loop, as theirs are
                # (an answer .npz cannot carry is the call's error, counted as such)
                body = await self.plane.infer_async(call, partial(
                    self.plane.convert, len(request.body), messages.npz_request, request),
                    partial(self._npz_answer, request, call))
                return body, messages.reply_properties(request, messages.NPZ)
            answering = _answering.set(request)  # for `_answer_size`, inside the call
            try:
                reply = await self.plane.handle_async(call)
            finally:
                _answering.reset(answering)
            if reply.error is not None or request.response_topic is None:
                messages.take(request, call)  # the id and reply topic its decode read, if so
            if reply.error is not None:
                return self._error(request, reply.error)
            return reply.body, _reply_properties(request, reply)
        except EdgerunError as exc:
            return self._error(request, exc)
        except Exception as exc:
            log.exception("request on %s failed unexpectedly", topic)
            return self._error(request, InferenceError(f"internal error: {exc}"))

    @staticmethod
    def _error(request: Request, error: EdgerunError) -> tuple[bytes, Properties]:
        return (messages.error_payload(error, messages.request_id(request)),
                messages.reply_properties(request, JSON, [(messages.ERROR_PROPERTY, error.kind)]))

    async def _npz_answer(self, request: Request, call: Call, result: InferResult) -> bytes:
        size = sum(output.nbytes for output in result.outputs.values())
        body = await self.plane.convert(size, npz.encode, result.outputs)
        # inside the call, as `_answer_size` for the other payloads: counted as what is sent
        properties = messages.reply_properties(request, messages.NPZ)
        packet = self._packet_size(request, body, properties)
        if packet is not None and self._max_packet and packet > self._max_packet:
            raise PayloadTooLarge(_too_large_text(call.model, packet, self._max_packet))
        return body

    def _answer_size(self, call: Call, reply: Reply) -> tuple[int, int] | None:
        """An answer's PUBLISH against the broker's Maximum Packet Size, for the data plane to
        answer a larger one with payload_too_large and count it so: replaced only as it was
        sent, it was counted `ok`, and a version whose answers outgrew the broker passed the
        fleet's health gate with no errors. None for a call this daemon is not answering."""
        request = _answering.get()
        if request is None or not self._max_packet:
            return None
        messages.take(request, call)  # a JSON body's "reply_to", which its decode read
        packet = self._packet_size(request, reply.body, _reply_properties(request, reply))
        return None if packet is None else (packet, self._max_packet)

    def _packet_size(self, request: Request, payload: bytes,
                     properties: Properties) -> int | None:
        """The bytes of the answer's PUBLISH; None where it goes nowhere (no reply topic, or
        one `_send` drops) or the broker set no limit."""
        topic = request.response_topic
        if not self._max_packet or topic is None or messages.reply_topic_problem(topic):
            return None
        return messages.publish_size(topic, payload, self.config.qos, properties)

    def _send(self, request: Request, payload: bytes, properties: Properties) -> None:
        if request.response_topic is None and messages.reply_topic(request) is None:
            self._rejected.labels("no_reply_topic").inc()
            log.warning("a request to model %r names no Response Topic nor %r; its answer is "
                        "dropped", request.model, messages.REPLY_TO)
            return
        problem = messages.reply_topic_problem(request.response_topic)
        if problem is not None:
            # the broker would end our connection, or paho raise inside its read loop
            self._rejected.labels("bad_reply_topic").inc()
            log.warning("a request to model %r names the reply topic %r, which %s; its answer "
                        "is dropped", request.model, request.response_topic[:200], problem)
            return
        properties = properties if self.v5 else None
        if self._max_packet and self._too_large(request, payload, properties):
            error = PayloadTooLarge(  # an error reply: the data plane replaces answers
                _too_large_text(request.model, len(payload), self._max_packet))
            payload, properties = self._error(request, error)
            if self._too_large(request, payload, properties):
                self._rejected.labels("too_large").inc()
                log.warning("%s; even the error reply is, so it is dropped", error)
                return
        self.client.publish(request.response_topic, payload, self.config.qos, False,
                            properties)

    def _too_large(self, request: Request, payload: bytes, properties: Properties | None
                   ) -> bool:
        """Whether the broker would end the connection for this answer (and it would be sent
        again on every reconnect, keeping the daemon offline)."""
        assert self._max_packet and request.response_topic is not None
        return messages.publish_size(request.response_topic, payload, self.config.qos,
                                     properties) > self._max_packet


def _reply_properties(request: Request, reply: Reply) -> Properties:
    """An answer's MQTT v5 properties: the request's, and the OIP binary header's length."""
    user = [(k.lower(), v) for k, v in reply.headers.items() if k.lower() == oip.HEADER_LENGTH]
    return messages.reply_properties(request, reply.content_type, user)


def _too_large_text(model: str, size: int, limit: int) -> str:
    """The payload_too_large message of an answer the broker would refuse (and end the
    connection for)."""
    return (f"the answer to model {model!r} ({size} bytes) is larger than the broker's "
            f"maximum packet size ({limit} bytes); send fewer rows per request")


def stop_budget(config: DaemonConfig) -> float:
    """Seconds a clean stop takes at worst: the drain, the "offline" status, the extensions'
    stops (a running OTA job reaching a safe point), and a margin; systemd is told at SIGTERM,
    so its TimeoutStopSec does not cut a long drain_timeout short."""
    return (config.drain_timeout + OFFLINE_WAIT_S + sum(spec.stop_wait_s for spec in specs())
            + STOP_MARGIN_S)


def backoff(attempt: int, shortest: float, longest: float) -> float:
    """Seconds before reconnect attempt `attempt` (from 0): doubling, capped, jittered. The
    exponent is capped too: 2.0 ** 1024 overflows, and a day-long outage gets there."""
    return min(shortest * 2.0 ** min(attempt, 32), longest) * random.uniform(0.5, 1.5)


def _request_key(message: mqtt.MQTTMessage) -> tuple:
    """What makes two messages the same request: topic, Response Topic, Correlation Data and
    payload."""
    properties = message.properties
    return (message.topic, getattr(properties, "ResponseTopic", None),
            getattr(properties, "CorrelationData", None), hash(message.payload))


def _no_delay(sock: Any) -> None:
    """Nagle's algorithm against the broker's delayed ACKs costs ~40-80 ms per round trip."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets, unix)
        pass


def _matching(topic_filter: str) -> str:
    """The filter messages are matched against: a shared subscription's without `$share/g/`."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _guarded(callback: MessageCallback, message: mqtt.MQTTMessage) -> None:
    try:
        callback(message)
    except Exception:
        log.exception("extension callback for %s failed", message.topic)


def _str(path: Any) -> str | None:
    return None if path is None else str(path)
