"""`edgerun daemon` against a real Mosquitto started by the tests, with real paho clients."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import queue
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgerun.adapters.codecs import npz, oip, prometheus
from edgerun.adapters.dataplane import Call, Hook
from edgerun.adapters.mqtt.config import Broker as BrokerURL
from edgerun.adapters.mqtt.config import load_config
from edgerun.adapters.mqtt.daemon import backoff
from edgerun.adapters.mqtt.telemetry import quantile, temperature
from edgerun.adapters.urls import redact
from edgerun.examples import mlp_onnx
from edgerun.runtime.errors import Unauthenticated
from tests.cli import edgerun
from tests.mqtt import (INFER_JSON, Broker, Requester, connect, daemon_command, read_retained,
                        running_broker, running_daemon, user_properties, wait_online)
from tests.serving import add_version, free_port

MLP = mlp_onnx([4, 8, 3])


def expected(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("mqtt") / "repo"
    add_version(repo, "mlp", "1", MLP)
    add_version(repo, "mlp", "2", MLP)
    (repo / "mlp" / "config.toml").write_text("version_policy = { all = true }\n")
    return repo


@pytest.fixture(scope="module")
def broker(repo):
    with running_broker(repo.parent / "broker") as broker:
        yield broker


@pytest.fixture(scope="module")
def daemon(repo, broker):
    with running_daemon(repo, broker, "dev1", "--group", "fleet",
                        "--telemetry-interval", "0.5") as daemon:
        yield daemon


@pytest.fixture()
def requester(broker, daemon):
    requester = Requester(broker)
    yield requester
    requester.close()


def outputs(payload: bytes) -> np.ndarray:
    body = orjson.loads(payload)
    assert "error" not in body, body
    out = body["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


# ------------------------------------------------------------------- round trips
def test_json_round_trip_over_v5_keeps_correlation_data(requester):
    payload, properties = requester.ask("edgerun/dev1/infer/mlp", INFER_JSON,
                                        correlation=b"\x00\xffcorr")
    assert properties.CorrelationData == b"\x00\xffcorr"
    assert properties.ContentType == "application/json"
    np.testing.assert_allclose(outputs(payload), expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)
    body = orjson.loads(payload)
    assert body["model_name"] == "mlp" and body["model_version"] == "2"


def test_explicit_version_in_topic(requester):
    payload, _ = requester.ask("edgerun/dev1/infer/mlp/1", INFER_JSON)
    assert orjson.loads(payload)["model_version"] == "1"


def test_oip_binary_both_ways(requester):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    payload, properties = requester.ask(
        "edgerun/dev1/infer/mlp", header + x.tobytes(), content_type="application/octet-stream",
        user=[(oip.HEADER_LENGTH, str(len(header)))])
    assert properties.ContentType == "application/octet-stream"
    split = int(user_properties(properties)[oip.HEADER_LENGTH])
    head = orjson.loads(payload[:split])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    y = np.frombuffer(payload[split:], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, expected(x), rtol=1e-5)


def test_requests_with_more_properties_than_the_usual_two(requester):
    """Expiry, payload format and several user properties: decoded, and the answer correct."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = requester.reply_topic
    properties.CorrelationData = b"many-properties"
    properties.MessageExpiryInterval = 600
    properties.PayloadFormatIndicator = 1
    properties.ContentType = "application/json; charset=utf-8"
    properties.UserProperty = [("x-request-timeout-ms", "5000"), ("trace", "é€"),
                               ("trace", "2")]
    requester.client.publish("edgerun/dev1/infer/mlp/1", INFER_JSON, 1, properties=properties)
    requester.wait([b"many-properties"])
    (payload, answer), = requester.answers[b"many-properties"]
    assert answer.ContentType == "application/json"
    np.testing.assert_allclose(outputs(payload), expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)


def test_npz_both_ways(requester):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, x=x)
    payload, properties = requester.ask("edgerun/dev1/infer/mlp", buffer.getvalue(),
                                        content_type=npz.CONTENT_TYPE)
    assert properties.ContentType == npz.CONTENT_TYPE
    np.testing.assert_allclose(npz.decode(payload)["y"], expected(x), rtol=1e-5)


def test_mqtt_311_client_gets_answer_on_reply_to(broker, daemon):
    """Also for a body holding NaN (as Python's json writes it): the reply topic was read from
    it with a parser that refuses NaN, so the request ran and its answer was dropped."""
    client = connect(broker, protocol=mqtt.MQTTv311)
    got: queue.Queue[bytes] = queue.Queue()
    client.on_message = lambda c, u, m: got.put(m.payload)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe("replies/v311", 1)
    assert subscribed.wait(10)
    request = orjson.loads(INFER_JSON)
    request.update(id="req-311", reply_to="replies/v311")
    client.publish("edgerun/dev1/infer/mlp", orjson.dumps(request), 1)
    answer = got.get(timeout=20)
    request["id"] = "req-nan"
    request["inputs"][0]["data"] = [float("nan"), 2, 3, 4]
    client.publish("edgerun/dev1/infer/mlp", json.dumps(request), 1)
    with_nan = json.loads(got.get(timeout=20))
    client.disconnect()
    client.loop_stop()
    assert orjson.loads(answer)["id"] == "req-311"
    np.testing.assert_allclose(outputs(answer), expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)
    assert with_nan["id"] == "req-nan" and "error" not in with_nan, with_nan


def test_a_reply_topic_with_wildcards_is_dropped_and_the_daemon_serves_on(broker, daemon,
                                                                           requester):
    """paho refuses to publish to it, from inside its callback: once a wedged read loop. A
    control character or U+0000 makes Mosquitto drop the connection, and the QoS 1 answer,
    sent again on every reconnect, once kept the daemon offline for good."""
    client = connect(broker, protocol=mqtt.MQTTv311)
    for reply_to in ("bad/#", "bad/+/x", "bad\x00nul", "bad\x01ctl", "bad\x85c1",
                     "bad\uffffnon", "b" * 70_000, "edgerun/dev1/status",
                     "edgerun/dev1/ota/report", "edgerun/dev1/telemetry",
                     "edgerun/dev1/infer/mlp"):
        request = {**orjson.loads(INFER_JSON), "reply_to": reply_to}
        client.publish("edgerun/dev1/infer/mlp", orjson.dumps(request), 1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    for _ in range(3):
        answer, _ = requester.ask("edgerun/dev1/infer/mlp", INFER_JSON, timeout=20)
        assert outputs(answer).shape == (1, 3)
    assert daemon.process.poll() is None
    log = daemon.output()
    assert "Exception in callback" not in log and "'bad/#', which has wildcards" in log
    assert "control character U+0000" in log and "longer than 65535 bytes" in log
    # a device's own topics, which its ACL lets it write: no answer passes for its status
    assert "'edgerun/dev1/status', which is an edgerun status topic" in log
    assert "is an edgerun ota topic" in log and "is an edgerun infer topic" in log
    assert "disconnected from" not in log


def test_an_empty_response_topic_gets_no_answer_and_the_daemon_stays_connected(daemon,
                                                                              requester):
    """paho publishes to an empty topic under MQTT v5 (a Topic Alias could stand for it), and
    Mosquitto ends the connection for it: the QoS 1 answer, sent again on every reconnect,
    kept the daemon offline until it was restarted."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = ""
    properties.CorrelationData = b"empty-response-topic"
    requester.client.publish("edgerun/dev1/infer/mlp", INFER_JSON, 1,
                             properties=properties).wait_for_publish(10)
    for _ in range(3):
        answer, _ = requester.ask("edgerun/dev1/infer/mlp", INFER_JSON, timeout=20)
        assert outputs(answer).shape == (1, 3)
    log = daemon.output()
    assert "names the reply topic '', which is empty" in log
    assert "disconnected from" not in log


def test_mosquitto_rr_gets_its_answer(broker, daemon):
    result = subprocess.run(
        ["mosquitto_rr", "-p", str(broker.port), "-t", "edgerun/dev1/infer/mlp",
         "-e", "replies/rr", "-m", INFER_JSON.decode(), "-W", "20"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(outputs(result.stdout.encode()),
                               expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)


def test_group_shared_subscription(requester):
    payload, _ = requester.ask("edgerun/fleet/infer/mlp", INFER_JSON)
    np.testing.assert_allclose(outputs(payload), expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)


def test_500_concurrent_requests_all_answered_with_their_correlation(requester):
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(500, 4)).astype(np.float32)
    keys = []
    for i, x in enumerate(xs):
        body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                         "data": x.tolist()}]})
        keys.append(requester.send("edgerun/dev1/infer/mlp", body, correlation=f"k{i}".encode()))
    requester.wait(keys, timeout=60)
    want = expected(xs)
    for i, key in enumerate(keys):
        (payload, properties), = requester.answers[key]
        assert properties.CorrelationData == key
        np.testing.assert_allclose(outputs(payload)[0], want[i], rtol=1e-4)


def test_messages_larger_than_the_socket_buffers_both_ways(requester):
    """A request and an answer of megabytes: read in many pieces, written in many flushes."""
    xs = np.random.default_rng(2).normal(size=(300_000, 4)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(xs.shape),
                                     "data": xs.ravel().tolist()}]})
    assert len(body) > 8_000_000
    payload, _ = requester.ask("edgerun/dev1/infer/mlp", body, timeout=120)
    assert len(payload) > 4_000_000

    np.testing.assert_allclose(outputs(payload), expected(xs), rtol=1e-4, atol=1e-6)
    # and the connection serves small requests as before
    payload, _ = requester.ask("edgerun/dev1/infer/mlp", INFER_JSON)
    np.testing.assert_allclose(outputs(payload), expected(np.array([[1, 2, 3, 4]])), rtol=1e-5)


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize("topic, payload, options, kind, culprit", [
    ("edgerun/dev1/infer/mlp", b"{not json", {}, "invalid_input", "JSON"),
    ("edgerun/dev1/infer/nope", INFER_JSON, {}, "model_not_found", "nope"),
    ("edgerun/dev1/infer/mlp/9", INFER_JSON, {}, "model_not_found", "'9'"),
    ("edgerun/dev1/infer/mlp", orjson.dumps({"id": "bad-5", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}]}), {},
     "invalid_input", "x"),
    ("edgerun/dev1/infer/mlp", b"PK\x03\x04garbage", {"content_type": "application/x-npz"},
     "invalid_input", "npz"),
    ("edgerun/dev1/infer/mlp", b"\x00\x01", {"content_type": "image/png"},
     "invalid_input", "image/png"),
])
def test_bad_requests_get_error_replies_and_the_daemon_lives_on(requester, daemon, topic,
                                                                 payload, options, kind,
                                                                 culprit):
    answer, properties = requester.ask(topic, payload, correlation=b"bad-1", **options)
    body = orjson.loads(answer)
    assert body["kind"] == kind and culprit in body["error"], body
    if payload.startswith(b"{\"") and b'"id"' in payload:  # v5 error replies echo it too
        assert body["id"] == orjson.loads(payload)["id"]
    assert properties.CorrelationData == b"bad-1"
    assert user_properties(properties)["edgerun-error"] == kind
    good, _ = requester.ask("edgerun/dev1/infer/mlp", INFER_JSON)
    assert outputs(good).shape == (1, 3)
    assert daemon.process.poll() is None


def test_a_request_id_that_is_no_string_is_echoed_as_its_json_as_over_http(broker, daemon,
                                                                           requester):
    """OIP's id is a string; one that is not was echoed as Python's repr ("{'a': 1}"), in
    answers and error replies alike, over MQTT as over HTTP (test_server holds HTTP's side)."""
    for given, echoed in (({"a": 1}, '{"a":1}'), (5, "5"), (True, "true")):
        good = orjson.dumps({**orjson.loads(INFER_JSON), "id": given})
        answer, _ = requester.ask("edgerun/dev1/infer/mlp", good)
        assert orjson.loads(answer)["id"] == echoed
        bad = orjson.dumps({"id": given, "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}]})
        answer, _ = requester.ask("edgerun/dev1/infer/mlp", bad)
        assert orjson.loads(answer)["id"] == echoed
        unknown, _ = requester.ask("edgerun/dev1/infer/nope", good)  # refused unread
        assert orjson.loads(unknown)["kind"] == "model_not_found"
        assert orjson.loads(unknown)["id"] == echoed
    client = connect(broker, protocol=mqtt.MQTTv311)
    got: queue.Queue[bytes] = queue.Queue()
    client.on_message = lambda c, u, m: got.put(m.payload)
    client.subscribe("replies/v311-ids", 1)
    time.sleep(0.3)
    try:
        for topic in ("edgerun/dev1/infer/mlp", "edgerun/dev1/infer/nope"):
            request = {**orjson.loads(INFER_JSON), "id": {"a": 1}, "reply_to": "replies/v311-ids"}
            client.publish(topic, orjson.dumps(request), 1)
            assert orjson.loads(got.get(timeout=20))["id"] == '{"a":1}'
    finally:
        client.disconnect()
        client.loop_stop()


def test_every_bad_request_answered_is_counted_in_telemetry(broker, daemon, requester):
    """A topic that names no model (or too many levels) and a content type the daemon does
    not read were answered `invalid_input` before the data plane saw them: the telemetry, the
    fleet's health gate's only view of a device, counted none of them, while a body that is
    not JSON, the same mistake a step later, was counted."""
    client = connect(broker)
    seen: queue.Queue = queue.Queue()
    client.on_message = lambda c, u, m: seen.put(orjson.loads(m.payload))
    client.subscribe("edgerun/dev1/telemetry", 0)
    try:
        before = seen.get(timeout=10)["outcomes"].get("invalid_input", 0)
        for topic, options in [("edgerun/dev1/infer/mlp/1/extra", {}), ("edgerun/dev1/infer", {}),
                               ("edgerun/dev1/infer/mlp", {"content_type": "image/png"}),
                               ("edgerun/dev1/infer/mlp", {"content_type": "text/plain"})]:
            answer, _ = requester.ask(topic, INFER_JSON, **options)
            assert orjson.loads(answer)["kind"] == "invalid_input"
        counted, deadline = before, time.monotonic() + 20
        while counted < before + 4 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                counted = seen.get(timeout=1)["outcomes"].get("invalid_input", 0)
        assert counted == before + 4
    finally:
        client.disconnect()
        client.loop_stop()


# ------------------------------------------------------------- status, telemetry
def test_status_and_telemetry(broker, daemon, requester):
    status = read_retained(broker, "edgerun/dev1/status")
    assert status["state"] == "online" and status["models"] == {"mlp": ["1", "2"]}
    requester.ask("edgerun/dev1/infer/mlp", INFER_JSON)
    client = connect(broker)
    got: list[dict] = []
    done = threading.Event()
    client.on_message = lambda c, u, m: (got.append(orjson.loads(m.payload)), done.set())
    client.subscribe("edgerun/dev1/telemetry", 0)
    assert done.wait(10)
    client.disconnect()
    client.loop_stop()
    telemetry = got[0]
    assert telemetry["models"] == {"mlp": ["1", "2"]}
    assert telemetry["requests"] >= 1 and telemetry["outcomes"]["ok"] >= 1
    assert telemetry["rss_mb"] > 10 and telemetry["mem_total_mb"] > 0
    assert {"p50", "p99"} <= telemetry["latency_ms"].keys()
    assert "cpu_percent" in telemetry and "temperature_c" in telemetry
    assert telemetry["since"] == status["since"]  # the fleet gate tells a restart by it


def test_reconnect_backoff_never_overflows():
    delays = [backoff(attempt, 0.5, 30) for attempt in (0, 1, 6, 1024, 10**6)]
    assert 0.25 <= delays[0] <= 0.75 and 0.5 <= delays[1] <= 1.5
    assert all(15 <= d <= 45 for d in delays[2:])  # capped, after a day of outage as well


def test_telemetry_helpers(tmp_path):
    buckets = [(0.001, 50), (0.01, 99), (0.1, 100), (float("inf"), 100)]
    assert quantile(buckets, 0.5) == pytest.approx(0.001)
    assert 0.01 < quantile(buckets, 0.995) <= 0.1
    assert quantile([], 0.5) is None
    (tmp_path / "thermal_zone0").mkdir()
    (tmp_path / "thermal_zone0" / "temp").write_text("48250\n")
    (tmp_path / "thermal_zone1").mkdir()
    (tmp_path / "thermal_zone1" / "temp").write_text("51000\n")
    assert temperature(tmp_path) == 51.0
    assert temperature(tmp_path / "none") is None


@pytest.mark.parametrize("setting", [{"poll_interval": -1}, {"telemetry_interval": "30"},
                                     {"drain_timeout": float("inf")}, {"reconnect_min_s": 0},
                                     {"keepalive": 70_000}, {"reconnect_max_s": 0.1}])
def test_settings_in_seconds_are_checked(tmp_path, setting):
    """-1 polled the repository without pause (a core at 100 %); a string from device.toml
    failed later, inside the daemon."""
    with pytest.raises(ValueError, match=next(iter(setting))):
        load_config(None, repository=tmp_path, broker="mqtt://h", device_id="pi-1", **setting)


def test_the_daemon_refuses_a_negative_poll_interval(tmp_path):
    result = edgerun("daemon", "--repository", str(tmp_path), "--broker", "mqtt://127.0.0.1:1",
                     "--device-id", "pi-1", "--poll-interval", "-1", timeout=60)
    assert result.returncode == 2 and "poll_interval must be" in result.stderr, result.stderr


@pytest.mark.parametrize("url, problem", [
    ("mqtt://u:secret@h:99999", "port 99999 is not between 1 and 65535"),
    ("mqtt://h:0", "port 0 is not between 1 and 65535"),  # was taken for 1883
    ("mqtt://h:abc", "port 'abc' is not a number"),
    ("mqtt://[::1:1883", "Invalid IPv6 URL"),
])
def test_a_malformed_broker_url_is_refused_naming_it(tmp_path, url, problem):
    """urllib's bare "Port out of range 0-65535" was all the daemon said: neither the setting
    nor the URL (one of a device.toml's many values) was named."""
    result = edgerun("daemon", "--repository", str(tmp_path), "--broker", url,
                     "--device-id", "pi-1", timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"broker URL {redact(url)!r}: {problem}" in result.stderr, result.stderr
    assert "secret" not in result.stderr


def test_a_group_named_as_the_device_is_refused(tmp_path):
    """The device's own subscription and the group's shared one then both matched every
    request to the device: each was answered twice (once only when it carried Correlation
    Data, the second copy taken for a redelivery)."""
    with pytest.raises(ValueError, match="group 'pi-1' must differ from the device id"):
        load_config(None, repository=tmp_path, broker="mqtt://h", device_id="pi-1",
                    group="pi-1")


@pytest.mark.parametrize("setting, message", [
    (f"telemetry_interval = 1{'0' * 400}", "telemetry_interval must be a number of seconds"),
    (f"group = {'[' * 3000}{']' * 3000}", "arrays or tables nested too deep"),
    ("data_dir = '~no-such-user-here/state'", "data_dir '~no-such-user-here/state': there is "
                                              "no user 'no-such-user-here'"),
    ("[ota]\ntrust = '~no-such-user-here/fleet.pub'", "[ota] trust "),
])
def test_the_daemon_refuses_a_device_toml_it_cannot_read_in_one_line(tmp_path, setting,
                                                                      message):
    """An integer past any float (OverflowError), arrays nested past what tomllib parses
    (RecursionError) and ~user of no user (RuntimeError) were tracebacks."""
    config = tmp_path / "device.toml"
    config.write_text(f"repository = '{tmp_path}'\nbroker = 'mqtt://127.0.0.1:1'\n"
                      f"device_id = 'pi-1'\n{setting}\n")
    result = edgerun("daemon", "--config", str(config), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("setting, message", [
    ("telemetry_interval = -1", "{config}: telemetry_interval must be a number of seconds of "
                                "at least 0, got -1"),
    (f"telemetry_interval = '{'9' * 5000}'", "{config}: telemetry_interval must be a number of "
                                             "seconds of at least 0, got '999"),
    (f"qos = {10 ** 18}", "{config}: qos must be 0, 1 or 2"),
    (f"group = 'g/{'x' * 5000}'", "{config}: group 'g/xxx"),
    ("broker = 'mqtt://h:0'", "{config}: broker URL 'mqtt://h:0': port 0 is not between"),
    ("device = 'mine.toml'", "device profile {folder}/mine.toml: intra_op_threads must be at "
                             "most 1024, got 100000000000000000000"),
])
def test_a_device_toml_setting_that_cannot_work_is_said_naming_the_file(tmp_path, setting,
                                                                        message):
    """"telemetry_interval must be ..." named the setting but not the file it came from (one
    of several a device may be given), and a value thousands of characters long was printed
    whole."""
    (tmp_path / "mine.toml").write_text(f"intra_op_threads = {10 ** 20}\n")
    config = tmp_path / "device.toml"
    config.write_text(f"repository = '{tmp_path}'\ndevice_id = 'pi-1'\n{setting}\n"
                      + ("" if setting.startswith("broker") else
                         "broker = 'mqtt://127.0.0.1:1'\n"))
    result = edgerun("daemon", "--config", str(config), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    expected = message.format(config=config, folder=tmp_path)
    assert result.stderr.startswith(f"edgerun daemon: {expected}"), result.stderr
    assert len(result.stderr) < 200 + len(str(config)), result.stderr


def test_a_flag_that_cannot_work_is_not_said_to_be_in_the_file(tmp_path):
    """The file names only the settings that came from it: a flag overrides the file's."""
    config = tmp_path / "device.toml"
    config.write_text(f"repository = '{tmp_path}'\nbroker = 'mqtt://127.0.0.1:1'\n"
                      "device_id = 'pi-1'\ntelemetry_interval = 5\n")
    result = edgerun("daemon", "--config", str(config), "--telemetry-interval", "-1",
                     timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("edgerun daemon: telemetry_interval must be"), result.stderr


def test_config_file_with_flags_on_top(tmp_path):
    config = tmp_path / "device.toml"
    config.write_text('repository = "/var/lib/edgerun/models"\nbroker = "mqtts://u:p@host"\n'
                      'device_id = "pi-1"\nqos = 0\n[ota]\ntrust = "key.pub"\n')
    loaded = load_config(config, device_id="pi-2", qos=None)
    assert loaded.device_id == "pi-2" and loaded.qos == 0
    assert loaded.repository == Path("/var/lib/edgerun/models")
    assert loaded.extensions == {"ota": {"trust": "key.pub"}}
    broker = loaded.broker_address
    assert (broker.host, broker.port, broker.tls, broker.username) == ("host", 8883, True, "u")
    assert BrokerURL.parse("mqtt://h:1884").port == 1884
    with pytest.raises(ValueError, match="device id"):
        load_config(config, device_id="a/b")
    with pytest.raises(ValueError, match="unknown setting"):
        bad = tmp_path / "bad.toml"
        bad.write_text('brokr = "x"\n')
        load_config(bad)
    not_toml = tmp_path / "typo.toml"  # the parser's message alone named no file
    not_toml.write_text('broker = "mqtt://h"\nqos =\n')
    with pytest.raises(ValueError) as refused:
        load_config(not_toml)
    assert str(refused.value).startswith(f"{not_toml}: Invalid value (at line 2")


# ------------------------------------------------------- backpressure, failures
@pytest.mark.parametrize("device", [None, "cpu", "x86-64"])
def test_onnx_runtime_threads_never_spin_in_the_daemon(repo, device):
    """Spinning after each small forward pass took the cores the network loop needs: no
    shipped profile spins."""
    from edgerun.adapters.mqtt.daemon import Daemon
    config = load_config(None, repository=repo, broker="mqtt://127.0.0.1:1", device_id="spin",
                         device=device)
    daemon = Daemon(config)
    try:
        daemon.repository.load_all()
        session = daemon.repository.get("mlp").model.backend.session
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert daemon.repository.device.name == (device or "cpu")
    finally:
        daemon.repository.close()


def test_full_inbox_answers_overloaded(tmp_path, repo):
    """... and the telemetry counts those answers among the errors: they never reached the
    data plane, so a new version too slow for its traffic passed the fleet's health gate."""
    with running_broker(tmp_path / "b") as broker, \
            running_daemon(repo, broker, "tiny", "--max-inbox", "1",
                           "--telemetry-interval", "0.3"):
        requester = Requester(broker)
        body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [64, 4],
                                         "data": [0.5] * 256}]})
        keys = [requester.send("edgerun/tiny/infer/mlp", body) for _ in range(300)]
        requester.wait(keys, timeout=60)
        kinds = [orjson.loads(requester.answers[k][0][0]).get("kind", "ok") for k in keys]
        # a refused request retried as it was (same Correlation Data and payload) is served,
        # not dropped as a duplicate of the one refused
        retried = [k for k, kind in zip(keys, kinds) if kind == "overloaded"][:5]
        for key in retried:
            requester.send("edgerun/tiny/infer/mlp", body, correlation=key)
            deadline = time.monotonic() + 30
            while len(requester.answers[key]) < 2:
                assert time.monotonic() < deadline, f"retry {key} unanswered"
                time.sleep(0.02)
            assert "kind" not in orjson.loads(requester.answers[key][1][0])
        requester.close()
        telemetry = wait_for_telemetry(broker, "tiny", lambda t: t["requests"] >= 305)
    assert set(kinds) <= {"ok", "overloaded"}
    assert "overloaded" in kinds and "ok" in kinds
    assert telemetry["requests"] == 305  # 300, then 5 retried
    assert telemetry["errors"] == telemetry["outcomes"]["overloaded"] == kinds.count("overloaded")


def wait_for_telemetry(broker, device_id: str, ready, timeout: float = 30) -> dict:
    """The first telemetry message of `device_id` that `ready` accepts."""
    client = connect(broker)
    got: queue.Queue = queue.Queue()
    client.on_message = lambda c, u, m: got.put(orjson.loads(m.payload))
    client.subscribe(f"edgerun/{device_id}/telemetry", 0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            telemetry = got.get(timeout=max(0.0, deadline - time.monotonic()))
            if ready(telemetry):
                return telemetry
    finally:
        client.disconnect()
        client.loop_stop()


def test_an_answer_over_the_brokers_maximum_packet_size_is_an_error_reply(tmp_path, repo):
    """A broker ends the connection of a client that sends a packet over the Maximum Packet
    Size of its CONNACK; the answer, sent again on every reconnect, once kept the daemon
    offline for good. The requester gets a payload_too_large reply naming both sizes, and the
    telemetry counts it so (it counted `ok`, an answer never sent: a version whose answers
    outgrew the broker passed the fleet's health gate with 0 % errors)."""
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + "max_packet_size 4000\n")
    broker.start()
    try:
        with running_daemon(repo, broker, "small", "--telemetry-interval", "0.3") as daemon:
            requester = Requester(broker)
            rows = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                             "shape": [300, 4], "data": [1] * 1200}]})
            answer, properties = requester.ask("edgerun/small/infer/mlp", rows,
                                               correlation=b"big", timeout=20)
            body = orjson.loads(answer)
            assert body["kind"] == "payload_too_large", body
            assert "maximum packet size (4000 bytes)" in body["error"] and "mlp" in body["error"]
            assert properties.CorrelationData == b"big"
            assert user_properties(properties)["edgerun-error"] == "payload_too_large"
            # under the limit: answered as usual, on the same connection
            fewer = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                              "shape": [20, 4], "data": [1] * 80}]})
            answer, _ = requester.ask("edgerun/small/infer/mlp", fewer, timeout=20)
            assert outputs(answer).shape == (20, 3)
            # an .npz answer over the limit too (a compressed request under it), by version
            packed = io.BytesIO()
            np.savez_compressed(packed, x=np.ones((400, 4), np.float32))
            answer, properties = requester.ask("edgerun/small/infer/mlp/1", packed.getvalue(),
                                               content_type=npz.CONTENT_TYPE, timeout=20)
            assert orjson.loads(answer)["kind"] == "payload_too_large", answer[:200]
            assert user_properties(properties)["edgerun-error"] == "payload_too_large"
            requester.close()
            telemetry = wait_for_telemetry(broker, "small", lambda t: t["requests"] >= 3)
            assert telemetry["requests"] == 3 and telemetry["errors"] == 2, telemetry
            assert telemetry["outcomes"] == {"ok": 1, "payload_too_large": 2}, telemetry
            assert "disconnected from" not in daemon.output()
    finally:
        broker.stop()


@pytest.mark.parametrize("qos", [1, 2])
def test_an_answer_the_broker_refuses_is_logged_and_counted(tmp_path, repo, qos):
    """A broker whose ACL does not let the device write a request's Response Topic (the fleet's
    ACL allows edgerun/<device>/replies/... alone) acknowledges the answer with "Not
    authorized" (PUBACK at QoS 1, PUBREC at QoS 2), and paho dropped it without a word: the
    requester waited for an answer that the device's log and telemetry never said was lost.
    At QoS 2 paho ignored the PUBREC's reason and sent PUBREL, which Mosquitto completes with
    a successful PUBCOMP: the refused answer was neither logged nor counted."""
    broker = Broker(tmp_path / "b")
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edgerun/#\ntopic read replies/#\n"
                   "topic write replies/allowed/#\n")
    broker.config.write_text(broker.config.read_text() + f"acl_file {acl}\n")
    broker.start()
    try:
        with running_daemon(repo, broker, "acl", "--telemetry-interval", "0.3",
                            "--qos", str(qos)) as daemon:
            requester = Requester(broker)  # its Response Topic: replies/<hex>, not writable
            requester.send("edgerun/acl/infer/mlp", INFER_JSON, correlation=b"denied")
            telemetry = wait_for_telemetry(
                broker, "acl", lambda t: t["rejected"].get("refused_by_broker", 0) >= 1)
            assert telemetry["rejected"]["refused_by_broker"] == 1
            assert f"refused the message to {requester.reply_topic!r} (Not authorized)" in \
                daemon.output()
            # and a writable reply topic is answered on the same connection
            requester.client.subscribe("replies/allowed/#", 1)
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = "replies/allowed/1"
            properties.CorrelationData = b"allowed"
            requester.client.publish("edgerun/acl/infer/mlp", INFER_JSON, 1,
                                     properties=properties)
            requester.wait([b"allowed"], timeout=20)
            assert outputs(requester.answers[b"allowed"][0][0]).shape == (1, 3)
            assert b"denied" not in requester.answers
            requester.close()
    finally:
        broker.stop()


def dynamic_security(path: Path, username: str, password: str, denied: list[str]) -> None:
    """Mosquitto's dynamic security plugin file: `username` may not subscribe to `denied`;
    everything else, and every other client, is allowed."""
    import base64
    import hashlib
    import os

    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    path.write_bytes(orjson.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": True, "unsubscribe": True},
        "clients": [{"username": username, "password": base64.b64encode(digest).decode(),
                     "salt": base64.b64encode(salt).decode(), "iterations": 101,
                     "roles": [{"rolename": "deaf"}]}],
        "roles": [{"rolename": "deaf", "acls": [
            {"acltype": "subscribePattern", "topic": topic, "allow": False}
            for topic in denied]}],
        "groups": []}))


#: Mosquitto's dynamic security plugin, which Debian's mosquitto package ships (any arch).
PLUGIN = next(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"),
              Path("/usr/lib/mosquitto_dynamic_security.so"))


@pytest.mark.parametrize("protocol, reason", [("5", "Not authorized"),
                                              ("3.1.1", "Unspecified error")])
def test_a_subscription_the_broker_refuses_is_logged_and_counted(tmp_path, repo, protocol,
                                                                  reason):
    """A broker that refuses the daemon's SUBSCRIBE (an ACL, a quota, no shared
    subscriptions) answers its SUBACK with a failure code: the daemon said nothing, and stayed
    "online" while no request could reach it. (Mosquitto's acl_file grants every SUBSCRIBE and
    filters deliveries; its dynamic security plugin refuses one: 0x87 Not authorized to an
    MQTT v5 client, 0x80 to a 3.1.1 one.)"""
    assert PLUGIN.exists(), f"{PLUGIN}: Mosquitto's dynamic security plugin is missing"
    broker = Broker(tmp_path / "b")
    dynsec = tmp_path / "dynsec.json"
    dynamic_security(dynsec, "deaf", "secret", ["edgerun/deaf/infer/#", "$share/#"])
    broker.config.write_text(broker.config.read_text() + f"plugin {PLUGIN}\n"
                             f"plugin_opt_config_file {dynsec}\n")
    broker.start()
    (tmp_path / "password").write_text("secret\n")
    try:
        with running_daemon(repo, broker, "deaf", "--group", "herd", "--username", "deaf",
                            "--password-file", str(tmp_path / "password"),
                            "--protocol", protocol, "--telemetry-interval", "0.3") as daemon:
            telemetry = wait_for_telemetry(
                broker, "deaf", lambda t: t["rejected"].get("subscription_refused", 0) >= 2)
            assert telemetry["rejected"]["subscription_refused"] == 2
            log = daemon.output()
            assert f"refused the subscription to 'edgerun/deaf/infer/#' ({reason})" in log
            assert f"refused the subscription to '$share/herd/edgerun/herd/infer/#' " \
                f"({reason})" in log
    finally:
        broker.stop()


def test_qos_2_answers_stay_within_the_brokers_receive_maximum(tmp_path, repo):
    """A broker takes at most its CONNACK's Receive Maximum of unacknowledged QoS 1 and 2
    PUBLISHes from a client; paho ignores it, Mosquitto refused the excess QoS 2 answers
    ("quota exceeded") and paho dropped them without a word: a third of them were lost."""
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + "max_inflight_messages 5\n")
    broker.start()
    try:
        with running_daemon(repo, broker, "strict", "--qos", "2"):
            requester = Requester(broker)
            # QoS 1 requests: the requester's own paho would exceed the quota at QoS 2
            keys = [requester.send("edgerun/strict/infer/mlp", INFER_JSON) for _ in range(300)]
            requester.wait(keys, timeout=60)
            assert all(outputs(requester.answers[k][0][0]).shape == (1, 3) for k in keys)
            requester.close()
    finally:
        broker.stop()


def test_requests_sent_while_the_daemon_is_down_are_answered_when_it_returns(tmp_path, repo):
    with running_broker(tmp_path / "b") as broker:
        requester = Requester(broker)
        with running_daemon(repo, broker, "away") as daemon:
            requester.ask("edgerun/away/infer/mlp", INFER_JSON)
            # SIGTERM with requests in flight: those taken are answered before it exits, the
            # rest wait in the session for the next start
            draining = [requester.send("edgerun/away/infer/mlp", INFER_JSON) for _ in range(200)]
            assert daemon.terminate() == 0
        status = read_retained(broker, "edgerun/away/status")
        assert status["state"] == "offline"
        keys = [requester.send("edgerun/away/infer/mlp", INFER_JSON) for _ in range(20)]
        time.sleep(0.5)
        assert not any(k in requester.answers for k in keys)
        with running_daemon(repo, broker, "away"):
            requester.wait(keys + draining, timeout=60)
            time.sleep(0.5)  # room for duplicates to show up
        requester.close()
    assert all(len(requester.answers[k]) == 1 for k in keys + draining)


def test_a_retained_request_is_answered_once_not_at_every_start(tmp_path, repo):
    """The broker sends retained messages again at every (re)subscribe: a request published
    with retain was answered again at each start of the daemon."""
    with running_broker(tmp_path / "b") as broker:
        with running_daemon(repo, broker, "kept"):
            pass  # the daemon's session exists from here on
        requester = Requester(broker)
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = requester.reply_topic
        properties.CorrelationData = b"retained"
        requester.client.publish("edgerun/kept/infer/mlp", INFER_JSON, 1, retain=True,
                                 properties=properties).wait_for_publish(10)
        logs = []
        for _ in range(3):
            with running_daemon(repo, broker, "kept") as daemon:
                requester.wait([b"retained"], timeout=30)  # queued in its session: answered
                time.sleep(1.0)  # room for an answer to the retained copy
            logs.append(daemon.output())
        requester.close()
    assert len(requester.answers[b"retained"]) == 1
    assert outputs(requester.answers[b"retained"][0][0]).shape == (1, 3)
    assert all("ignored a retained request" in log for log in logs)


def test_kill_9_publishes_offline_by_last_will(tmp_path, repo):
    with running_broker(tmp_path / "b") as broker:
        with running_daemon(repo, broker, "doomed", "--keepalive", "5") as daemon:
            daemon.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = read_retained(broker, "edgerun/doomed/status")
            if status["state"] == "offline":
                break
            time.sleep(0.2)
        assert status["state"] == "offline" and status["device_id"] == "doomed"
        assert status["models"] == {"mlp": ["1", "2"]}  # the will is set at connect time


def test_broker_restart_mid_stream_answers_each_acknowledged_request_once(tmp_path, repo):
    with running_broker(tmp_path / "b") as broker, \
            running_daemon(repo, broker, "flaky", "--reconnect-min-s", "0.2"):
        requester = Requester(broker, client_id="flaky-client", clean=False)
        sent: list[bytes] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                sent.append(requester.send("edgerun/flaky/infer/mlp", INFER_JSON))
                time.sleep(0.005)

        sender = threading.Thread(target=stream)
        sender.start()
        time.sleep(1.0)
        broker.stop()
        time.sleep(0.5)
        broker.start()
        time.sleep(1.0)
        stop.set()
        sender.join()
        acknowledged = set(requester.acknowledged)
        assert len(acknowledged) > 50
        requester.wait(sorted(acknowledged), timeout=60)
        time.sleep(1.0)  # room for duplicates to show up
        requester.close()
    duplicates = {k: len(requester.answers[k]) for k in acknowledged
                  if len(requester.answers[k]) != 1}
    assert not duplicates
    # QoS 1 from broker to requester is at least once: a broker that restarts before it read
    # our PUBACK delivers the same answer again, flagged DUP; never a second answer
    for key, copies in requester.redelivered.items():
        assert all(copy == requester.answers[key][0][0] for copy in copies)
    assert all("error" not in orjson.loads(requester.answers[k][0][0]) for k in acknowledged)


def test_a_rotated_password_file_is_read_at_the_next_connect(tmp_path, repo):
    """The password was read once, at start-up: after a rotation (new password file, broker
    restarted) the daemon presented the old one at every reconnect, refused for good until
    restarted by hand; and a file missing at a reconnect attempt ended the reconnecting."""
    passwd, secret = tmp_path / "passwd", tmp_path / "broker.password"

    def set_password(password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev", password],
                       check=True, capture_output=True)
        passwd.chmod(0o644)  # for a broker run as its own user
        secret.write_text(password + "\n")
        secret.chmod(0o600)

    set_password("first")
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + f"password_file {passwd}\n")
    broker.start()
    try:
        with running_daemon(repo, broker, "rotated", "--username", "dev", "--password-file",
                            str(secret), "--reconnect-min-s", "0.1", "--reconnect-max-s",
                            "0.5") as daemon:
            broker.stop()
            secret.unlink()  # mid-rotation
            deadline = time.monotonic() + 30
            while "cannot read the broker password" not in daemon.output():
                assert time.monotonic() < deadline, daemon.output()
                time.sleep(0.1)
            set_password("second")
            broker.start()
            wait_online(broker, "rotated", daemon, timeout=30)
            requester = Requester(broker)
            answer, _ = requester.ask("edgerun/rotated/infer/mlp", INFER_JSON, timeout=20)
            requester.close()
            assert outputs(answer).shape == (1, 3)
    finally:
        broker.stop()


@pytest.mark.parametrize("in_file, flag", [("password = \"stale\"", "--password-file"),
                                            ("password_file = \"stale.password\"",
                                             "--password")])
def test_a_password_flag_overrides_the_config_files_other_form(tmp_path, repo, in_file, flag):
    """Flags override device.toml, but a flag's password with the file's password_file (or
    the other way round) ended start-up in "give password or password_file, not both": the
    file had to be edited to try a new password."""
    passwd, secret = tmp_path / "passwd", tmp_path / "broker.password"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev", "right"], check=True,
                   capture_output=True)
    passwd.chmod(0o644)  # for a broker run as its own user
    for path, text in ((secret, "right\n"), (tmp_path / "stale.password", "stale\n")):
        path.write_text(text)
        path.chmod(0o600)
    config = tmp_path / "device.toml"
    config.write_text(f'username = "dev"\n{in_file}\n')
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + f"password_file {passwd}\n")
    broker.start()
    try:
        with running_daemon(repo, broker, "overridden", "--config", str(config), flag,
                            str(secret) if flag == "--password-file" else "right"):
            requester = Requester(broker)
            answer, _ = requester.ask("edgerun/overridden/infer/mlp", INFER_JSON, timeout=20)
            requester.close()
            assert outputs(answer).shape == (1, 3)
    finally:
        broker.stop()


def test_a_password_in_the_broker_url_is_never_logged(tmp_path, repo):
    """`--broker mqtt://user:password@host` (as --help offers) put the password in every
    "connected to", "disconnected from" and "cannot reach" line of the daemon's log."""
    passwd, secret = tmp_path / "passwd", "s3cret-in-url"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev", secret], check=True,
                   capture_output=True)
    passwd.chmod(0o644)  # for a broker run as its own user
    broker = Broker(tmp_path / "b")
    broker.config.write_text(broker.config.read_text() + f"password_file {passwd}\n")
    broker.start()
    url = f"mqtt://dev:{secret}@127.0.0.1:{broker.port}"
    command = [*daemon_command(repo, broker, "hidden", "--log-level", "info",
                               "--reconnect-min-s", "0.1", "--reconnect-max-s", "0.2")]
    command[command.index(broker.url)] = url
    try:
        with running_daemon(repo, broker, "hidden", command=command) as daemon:
            broker.stop()
            deadline = time.monotonic() + 30
            while "cannot reach" not in daemon.output():
                assert time.monotonic() < deadline, daemon.output()
                time.sleep(0.1)
            assert daemon.terminate() == 0
    finally:
        broker.stop()
    log = daemon.output()
    assert f"connected to mqtt://dev:***@127.0.0.1:{broker.port}" in log, log
    assert "disconnected from" in log and "cannot reach" in log, log
    assert secret not in log, log
    bad = edgerun("daemon", "--repository", str(repo), "--device-id", "x", "--broker",
                  f"http://dev:{secret}@127.0.0.1:1")
    assert bad.returncode != 0 and "dev:***@" in bad.stderr, bad.stderr
    assert secret not in bad.stdout + bad.stderr


def test_tls_with_a_test_ca(tmp_path, repo):
    tls = make_certificates(tmp_path / "pki")
    with running_broker(tmp_path / "b", tls=tls) as broker, \
            running_daemon(repo, broker, "secure", "--ca-file", tls["ca"], "--cert-file",
                           tls["client_cert"], "--key-file", tls["client_key"]) as daemon:
        result = subprocess.run(
            ["mosquitto_rr", "-p", str(broker.port), "-h", "localhost", "--cafile", tls["ca"],
             "--cert", tls["client_cert"], "--key", tls["client_key"],
             "-t", "edgerun/secure/infer/mlp", "-e", "replies/tls", "-m", INFER_JSON.decode(),
             "-W", "20"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr + daemon.output()
        assert outputs(result.stdout.encode()).shape == (1, 3)
        # many answers in few TLS records, and one answer of megabytes in many
        requester = Requester(broker)
        try:
            xs = np.random.default_rng(3).normal(size=(200, 4)).astype(np.float32)
            keys = [requester.send("edgerun/secure/infer/mlp", orjson.dumps({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.tolist()}]}))
                for x in xs]
            big = np.random.default_rng(4).normal(size=(100_000, 4)).astype(np.float32)
            keys.append(requester.send("edgerun/secure/infer/mlp", orjson.dumps({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(big.shape),
                 "data": big.ravel().tolist()}]})))
            requester.wait(keys, timeout=120)
            want = expected(xs)
            for i, key in enumerate(keys[:-1]):
                np.testing.assert_allclose(outputs(requester.answers[key][0][0])[0], want[i],
                                           rtol=1e-4)
            np.testing.assert_allclose(outputs(requester.answers[keys[-1]][0][0]),
                                       expected(big), rtol=1e-4, atol=1e-6)
        finally:
            requester.close()


def make_certificates(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)

    def issue(subject: str, key, issuer=None, issuer_key=None, *, ca=False, san=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer.subject if issuer else name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    def write(name: str, cert, key) -> tuple[str, str]:
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("edgerun test CA", ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    server = issue("localhost", server_key, ca, ca_key, san=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue("edgerun-device", client_key, ca, ca_key)
    ca_path, _ = write("ca", ca, ca_key)
    cert, key = write("server", server, server_key)
    client_cert, client_key_path = write("client", client, client_key)
    return {"ca": ca_path, "cert": cert, "key": key, "client_cert": client_cert,
            "client_key": client_key_path}


def test_readme_example_runs(tmp_path):
    """The README's daemon example, over the `models/` and `demo/` its earlier sections make."""
    import re
    import sys

    add_version(tmp_path / "models", "digits", "1", digits_like_onnx())
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "infer.json").write_bytes(orjson.dumps({"inputs": [
        {"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S)
                   if "edgerun daemon" in b)
    script = example.replace("1883", str(free_port())) + "wait\n"
    script = script.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    result = subprocess.run(["bash", "-ec", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    status, answer = result.stdout.strip().splitlines()[-2:]
    assert orjson.loads(status)["state"] == "online"
    assert orjson.loads(answer)["outputs"][0]["name"] == "label", answer


def digits_like_onnx() -> bytes:
    """The demo classifier's interface (X [batch, 64] -> label, probabilities), untrained:
    training the real one takes a minute on a busy machine and adds nothing here."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)], "digits",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# ------------------------------------------------------------- extension point
class Recorder:
    """A stand-in for the OTA agent: a topic of its own, an answer, and a status field."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.events: list[str] = []
        self.threads: set[str] = set()
        daemon.subscribe(f"edgerun/{daemon.device_id}/jobs/#", self.on_job)
        daemon.add_status_fields(lambda: {"agent": {"slot": "A"}})
        daemon.add_telemetry_fields(lambda: {"agent_jobs": len(self.events)})

    def start(self) -> None:
        self.events.append(f"start {sorted(self.daemon.repository.versions('mlp'))}")

    def stop(self) -> None:
        self.events.append("stop")

    def on_job(self, message) -> None:
        self.threads.add(threading.current_thread().name)
        self.events.append(message.payload.decode())
        self.daemon.publish(f"edgerun/{self.daemon.device_id}/jobs-done",
                            {"job": message.payload.decode()})


def test_extension_point(tmp_path, repo):
    from edgerun.adapters.mqtt import Daemon, load_config

    with running_broker(tmp_path / "b") as broker:
        config = load_config(None, repository=repo, broker=broker.url, device_id="ext",
                             data_dir=tmp_path / "state", poll_interval=0,
                             telemetry_interval=0.3)
        daemon = Daemon(config)
        recorder = Recorder(daemon)
        daemon.add_extension(recorder)
        runner = threading.Thread(target=daemon.run)
        runner.start()
        try:
            status = wait_online(broker, "ext")
            assert status["agent"] == {"slot": "A"}
            assert (tmp_path / "state").is_dir()
            client = connect(broker)
            done: list[dict] = []
            got = threading.Event()
            client.on_message = lambda c, u, m: (done.append(orjson.loads(m.payload)),
                                                 got.set())
            client.subscribe("edgerun/ext/jobs-done", 1)
            time.sleep(0.3)
            client.publish("edgerun/ext/jobs/1", b"job-1", 1).wait_for_publish(5)
            assert got.wait(10)
            assert done == [{"job": "job-1"}]
            telemetry = read_retained(broker, "edgerun/ext/telemetry", timeout=3)
            assert telemetry["agent_jobs"] == 2  # start, job-1
            client.disconnect()
            client.loop_stop()
            requester = Requester(broker)
            payload, _ = requester.ask("edgerun/ext/infer/mlp", INFER_JSON)
            requester.close()
            assert outputs(payload).shape == (1, 3)
        finally:
            daemon.stop()
            runner.join(30)
        assert not runner.is_alive()
        assert recorder.events == ["start ['1', '2']", "job-1", "stop"]
        assert all(name.startswith("edgerun-extension") for name in recorder.threads)
        offline = read_retained(broker, "edgerun/ext/status")
        assert offline["state"] == "offline" and offline["agent"] == {"slot": "A"}


class TokenAuth(Hook):
    """An auth hook as a platform team installs it: MQTT calls without `authorization: good`
    are refused."""

    def before(self, call: Call) -> None:
        if call.attributes("authorization") != "good":
            raise Unauthenticated("no or a wrong authorization user property")


def test_a_hook_refuses_an_npz_request_before_its_payload_is_decoded(tmp_path, repo):
    """HTTP reads a body, and gRPC parses a message, only once the hooks let the call through;
    the daemon decoded an `.npz` payload before them, so a caller the hook refuses still had
    the device decode (and inflate) its payload, and a malformed one was answered
    invalid_input, not refused."""
    from edgerun.adapters.mqtt import Daemon, load_config

    with running_broker(tmp_path / "b") as broker:
        config = load_config(None, repository=repo, broker=broker.url, device_id="hooked",
                             data_dir=tmp_path / "state", poll_interval=0)
        daemon = Daemon(config)
        daemon.plane.hooks.add(TokenAuth())
        runner = threading.Thread(target=daemon.run)
        runner.start()
        try:
            wait_online(broker, "hooked")
            requester = Requester(broker)
            malformed = b"PK\x03\x04not a zip at all"
            answer, properties = requester.ask("edgerun/hooked/infer/mlp", malformed,
                                               content_type=npz.CONTENT_TYPE)
            assert orjson.loads(answer)["kind"] == "unauthenticated", answer
            assert user_properties(properties)["edgerun-error"] == "unauthenticated"
            x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
            buffer = io.BytesIO()
            np.savez(buffer, x=x)
            answer, properties = requester.ask("edgerun/hooked/infer/mlp", buffer.getvalue(),
                                               content_type=npz.CONTENT_TYPE,
                                               user=[("authorization", "good")])
            assert properties.ContentType == npz.CONTENT_TYPE
            np.testing.assert_allclose(npz.decode(answer)["y"], expected(x), rtol=1e-5)
            answer, _ = requester.ask("edgerun/hooked/infer/mlp", malformed,
                                      content_type=npz.CONTENT_TYPE,
                                      user=[("authorization", "good")])
            assert orjson.loads(answer)["kind"] == "invalid_input"  # let through: decoded
            requester.close()
        finally:
            daemon.stop()
            runner.join(30)
        assert not runner.is_alive()


@contextlib.contextmanager
def daemon_in_process(tmp_path: Path, repo: Path, broker: Broker, device_id: str):
    """A `Daemon` run on a thread of the test (its event loop's), online."""
    from edgerun.adapters.mqtt import Daemon, load_config

    config = load_config(None, repository=repo, broker=broker.url, device_id=device_id,
                         data_dir=tmp_path / f"state-{device_id}", poll_interval=0)
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run, name="daemon-loop")
    runner.start()
    try:
        wait_online(broker, device_id)
        yield daemon, runner
    finally:
        daemon.stop()
        runner.join(30)
    assert not runner.is_alive()


def test_a_big_npz_request_is_decoded_and_answered_off_the_event_loop(tmp_path, repo,
                                                                       monkeypatch):
    """JSON, binary and gRPC bodies of 1 MiB or more are converted on the data plane's worker
    thread; an `.npz` payload was decoded, and its answer encoded, on the daemon's event loop,
    so a big one stalled every other request on the device. The hook holds the big decode
    until a small request sent meanwhile is answered: on the loop, it never would be."""
    from edgerun.adapters.dataplane.plane import OFF_LOOP_BYTES

    decoding, answered_meanwhile = threading.Event(), threading.Event()
    ran_on: dict[str, threading.Thread] = {}
    decode, encode = npz.decode, npz.encode

    def held_decode(payload: bytes, *args):
        if len(payload) >= OFF_LOOP_BYTES:
            ran_on["decode"] = threading.current_thread()
            decoding.set()
            answered_meanwhile.wait(20)
        return decode(payload, *args)

    def recorded_encode(arrays):
        if sum(a.nbytes for a in arrays.values()) >= OFF_LOOP_BYTES:
            ran_on["encode"] = threading.current_thread()
        return encode(arrays)

    monkeypatch.setattr(npz, "decode", held_decode)
    monkeypatch.setattr(npz, "encode", recorded_encode)
    x = np.random.default_rng(3).normal(size=(100_000, 4)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, x=x)
    with running_broker(tmp_path / "b") as broker, \
            daemon_in_process(tmp_path, repo, broker, "bignpz") as (_, loop):
        requester = Requester(broker)
        try:
            big = requester.send("edgerun/bignpz/infer/mlp", buffer.getvalue(),
                                 content_type=npz.CONTENT_TYPE)
            assert decoding.wait(30)
            answer, _ = requester.ask("edgerun/bignpz/infer/mlp", INFER_JSON, timeout=15)
            answered_meanwhile.set()
            assert outputs(answer).shape == (1, 3)
            requester.wait([big], timeout=60)
            payload, properties = requester.answers[big][0]
        finally:
            answered_meanwhile.set()
            requester.close()
    assert properties.ContentType == npz.CONTENT_TYPE
    np.testing.assert_allclose(decode(payload)["y"], expected(x), rtol=1e-4, atol=1e-6)
    assert set(ran_on) == {"decode", "encode"}
    assert loop not in ran_on.values(), ran_on


def test_a_json_body_is_parsed_once_for_its_id_and_reply_topic(tmp_path, repo, monkeypatch):
    """An error reply to an MQTT v5 request parsed the whole body again, on the event loop,
    to echo its "id"; a request naming no Response Topic (MQTT 3.1.1) was parsed whole on the
    loop for its "reply_to", then again by the data plane: a big body twice, once where it
    stalls every other request. Each parse of a request body is recorded, with its thread."""
    from edgerun.adapters.codecs import oip as codec
    from edgerun.adapters.dataplane.plane import OFF_LOOP_BYTES

    parses: list[tuple[bytes, threading.Thread]] = []

    def recorded(parse):
        def run(body, *args):
            if bytes(body[:9]) == b'{"marker"':
                parses.append((bytes(body[:24]), threading.current_thread()))
            return parse(body, *args)
        return run

    monkeypatch.setattr(codec, "_parse", recorded(codec._parse))
    monkeypatch.setattr(codec, "loads", recorded(codec.loads))

    def body(marker: str, rows: int, columns: int = 4, **fields) -> bytes:
        return orjson.dumps({"marker": marker, **fields, "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, columns],
             "data": [0.25] * (rows * columns)}]})

    with running_broker(tmp_path / "b") as broker, \
            daemon_in_process(tmp_path, repo, broker, "once") as (_, loop):
        requester = Requester(broker)
        v311 = connect(broker, protocol=mqtt.MQTTv311)
        got: queue.Queue[bytes] = queue.Queue()
        v311.on_message = lambda c, u, m: got.put(m.payload)
        v311.subscribe("replies/once", 1)
        time.sleep(0.3)
        try:
            # v5, an error the data plane met once it had parsed the body
            answer, _ = requester.ask("edgerun/once/infer/mlp", body("v5-bad", 1, 5, id="e1"))
            assert orjson.loads(answer)["id"] == "e1"
            assert orjson.loads(answer)["kind"] == "invalid_input"
            # no Response Topic, a small body and a big one (decoded off the loop)
            big = body("v311-big", 80_000, reply_to="replies/once", id="b1")
            assert len(big) >= OFF_LOOP_BYTES
            for payload in (body("v311-small", 1, reply_to="replies/once", id="s1"), big):
                v311.publish("edgerun/once/infer/mlp", payload, 1)
                answer = orjson.loads(got.get(timeout=60))
                assert "error" not in answer and answer["id"] in ("s1", "b1")
            # and refused before its decode: the body is read once, for its reply topic and id
            v311.publish("edgerun/once/infer/nope",
                         body("v311-nope", 1, reply_to="replies/once", id="n1"), 1)
            assert orjson.loads(got.get(timeout=20))["id"] == "n1"
        finally:
            v311.disconnect()
            v311.loop_stop()
            requester.close()
    counted: dict[bytes, int] = {}
    for head, _ in parses:
        counted[head] = counted.get(head, 0) + 1
    assert set(counted.values()) == {1} and len(counted) == 4, counted
    big_parses = [thread for head, thread in parses if b"v311-big" in head]
    assert len(big_parses) == 1 and big_parses[0] is not loop  # on the worker thread


def test_daemon_speaking_mqtt_311(tmp_path, repo):
    with running_broker(tmp_path / "b") as broker, \
            running_daemon(repo, broker, "old", "--protocol", "3.1.1"):
        status = read_retained(broker, "edgerun/old/status")
        assert status["protocol"] == "3.1.1"
        client = connect(broker, protocol=mqtt.MQTTv311)
        got: list[bytes] = []
        done = threading.Event()
        client.on_message = lambda c, u, m: (got.append(m.payload), done.set())
        client.subscribe("replies/old", 1)
        time.sleep(0.3)
        request = orjson.loads(INFER_JSON)
        request.update(id=7, reply_to="replies/old")
        client.publish("edgerun/old/infer/mlp", orjson.dumps(request), 1)
        assert done.wait(20)
        client.disconnect()
        client.loop_stop()
    assert orjson.loads(got[0])["id"] == "7"
    assert outputs(got[0]).shape == (1, 3)


def test_daemon_imports_no_web_framework():
    code = ("import sys\nimport edgerun.adapters.mqtt.daemon, edgerun.adapters.mqtt.cli\n"
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'sklearn',"
            " 'onnx', 'rich') if m in sys.modules))")
    import sys
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_npz_answer_that_cannot_be_encoded_is_counted_as_the_error_sent(tmp_path):
    """An `.npz` answer was encoded after the data plane had counted the call `ok`: an output
    .npz cannot carry (strings, which need pickle) was answered invalid_input but counted ok.
    It is now made inside the call (`infer_async`'s `encode`), and counted as what is sent."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)], "to_text",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["n", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    repo = tmp_path / "models"
    add_version(repo, "text", "1", model.SerializeToString())
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((1, 2), np.float32))
    with running_broker(tmp_path / "b") as broker, \
            daemon_in_process(tmp_path, repo, broker, "texts") as (daemon, _):
        requester = Requester(broker)
        answer, properties = requester.ask("edgerun/texts/infer/text", buffer.getvalue(),
                                           content_type=npz.CONTENT_TYPE)
        requester.close()
        assert orjson.loads(answer)["kind"] == "invalid_input", answer
        assert "holds strings" in orjson.loads(answer)["error"]
        text = prometheus.render(daemon.repository.registry)
    counted = {line.split("outcome=\"")[1].split("\"")[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines()
               if line.startswith("edgerun_requests_total{") and 'model="text"' in line}
    assert counted == {"invalid_input": 1.0}, counted


@pytest.mark.parametrize("setting", ["device_id", "group"])
def test_a_device_id_or_group_no_topic_level_can_hold_is_refused(tmp_path, setting):
    # Mosquitto drops a client whose SUBSCRIBE holds a control character: the daemon would
    # connect, subscribe and be dropped, over and over, never serving
    from edgerun.adapters.mqtt.config import load_config

    given = {"device_id": "dev1", "group": "", setting: "dev\x01"}
    with pytest.raises(ValueError, match=f"{'device id' if setting == 'device_id' else 'group'} "
                                         r"'dev\\x01' must be one MQTT topic level"):
        load_config(None, repository=str(tmp_path), broker="mqtt://127.0.0.1:1883", **given)
