"""What edgerun tells operators about itself: `/metrics` of a real `edgerun serve` as
Prometheus' own parser reads it, the MQTT daemon's telemetry and the fleet gate's arithmetic."""

from __future__ import annotations

import math
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgerun.adapters.codecs import prometheus
from edgerun.adapters.fleet.gate import check_gate, health, parse_gate
from edgerun.adapters.mqtt.telemetry import Telemetry, quantile
from edgerun.examples import mlp_onnx
from edgerun.runtime.metrics import LATENCY_BUCKETS, Registry
from tests.fleet_sim import wait_for
from tests.helpers import identity_onnx
from tests.serving import add_version, running_server

SLOW = "[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 1500000\nmax_queue_size = 2\n"
ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}]}
PAIR = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics") / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4]))
    add_version(repo, "slowq", "1", identity_onnx("float32", ["b", 2]))
    (repo / "slowq" / "config.toml").write_text(SLOW)
    with running_server(repo, "--metrics", "open", grpc=True) as running:
        yield running


def scrape(server) -> dict[str, object]:
    """/metrics through prometheus_client's parser, checked family by family as Prometheus
    would take it; the families by name."""
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for family in families.values():
        check_family(family)
    return families


def check_family(family) -> None:
    assert family.documentation, f"{family.name} has no HELP"
    assert family.type in ("counter", "gauge", "histogram"), family.type
    if family.type == "histogram":
        series: dict[tuple, dict[str, object]] = {}
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            entry = series.setdefault(tuple(sorted(labels.items())), {"buckets": []})
            if sample.name.endswith("_bucket"):
                entry["buckets"].append((float(sample.labels["le"]), sample.value))
            else:
                entry[sample.name.rsplit("_", 1)[1]] = sample.value
        for labels, entry in series.items():
            buckets = entry["buckets"]
            assert buckets and buckets[-1][0] == math.inf, (family.name, labels)
            assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
            assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), (family.name, labels)
            assert buckets[-1][1] == entry["count"], (family.name, labels)
            assert entry["sum"] >= 0, (family.name, labels)
    for sample in family.samples:
        assert sample.value >= 0 and not math.isnan(sample.value), sample
    if family.type == "counter":  # the parser strips _total; the exposition had it
        assert all(s.name == family.name + "_total" for s in family.samples), family.name


def value(families, name: str, sample: str | None = None, **labels) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    wanted = sample or (name + "_total" if family.type == "counter" else name)
    return sum(s.value for s in family.samples
               if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_outcome_over_http_and_grpc_is_counted_and_parses(server):
    before = scrape(server)
    http = {"model": "mlp", "version": "1", "transport": "http"}
    grpc_labels = {**http, "transport": "grpc"}
    assert httpx.post(server.url + "/v2/models/mlp/infer", json=ROW).status_code == 200
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0] * 3}]}
    assert httpx.post(server.url + "/v2/models/mlp/infer", json=bad).status_code == 400
    assert httpx.post(server.url + "/v2/models/mlp/versions/7/infer", json=ROW).status_code \
        == 404
    for name in ("ghost-1", "ghost-2", 'we"ird\\name'):  # callers' names never become labels
        httpx.post(server.url + f"/v2/models/{name}/infer", json=ROW)
    client = tgrpc.InferenceServerClient(server.grpc_address)
    x = tgrpc.InferInput("x", [1, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 8), np.float32))
    client.infer("mlp", [x])
    with pytest.raises(InferenceServerException):
        client.infer("ghost-3", [x])
    # overloaded, past its deadline (HTTP) and cancelled by its deadline (gRPC) on slowq
    waiting = [threading.Thread(target=httpx.post, args=(server.url + "/v2/models/slowq/infer",),
                                kwargs={"json": PAIR, "timeout": 30}) for _ in range(2)]
    for thread in waiting:
        thread.start()
    wait_for(lambda: value(scrape(server), "edgerun_queue_depth", model="slowq") == 2, 10,
             "slowq's queue to fill")
    assert httpx.post(server.url + "/v2/models/slowq/infer", json=PAIR).status_code == 503
    for thread in waiting:
        thread.join()
    late = httpx.post(server.url + "/v2/models/slowq/infer", json=PAIR,
                      headers={"X-Request-Timeout-Ms": "100"})
    assert late.status_code == 504
    pair = tgrpc.InferInput("x", [1, 2], "FP32")
    pair.set_data_from_numpy(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceServerException):  # its deadline is the server's budget
        client.infer("slowq", [pair], client_timeout=0.2)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 2],
        contents=pb.InferTensorContents(fp32_contents=[1, 2]))
    request = pb.ModelInferRequest(model_name="slowq", inputs=[tensor])
    with grpc.insecure_channel(server.grpc_address) as channel:
        future = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request)
        wait_for(lambda: value(scrape(server), "edgerun_queue_depth", model="slowq") == 1, 10,
                 "the gRPC call to queue")
        future.cancel()
    wait_for(lambda: value(scrape(server), "edgerun_inflight_requests", model="slowq") == 0, 10,
             "the cancelled gRPC call to leave")
    after = scrape(server)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "edgerun_requests"
    assert moved(requests, **http, outcome="ok") == 1
    assert moved(requests, **http, outcome="invalid_input") == 1
    assert moved(requests, **grpc_labels, outcome="ok") == 1
    assert moved(requests, model="mlp", version="", outcome="model_not_found") == 1
    assert moved(requests, model="", version="", outcome="model_not_found") == 4
    slowq = {"model": "slowq", "version": "1"}
    assert moved(requests, **slowq, transport="http", outcome="ok") == 2
    assert moved(requests, **slowq, transport="http", outcome="overloaded") == 1
    assert moved(requests, **slowq, transport="http", outcome="deadline_exceeded") == 1
    assert moved(requests, **slowq, transport="grpc", outcome="deadline_exceeded") == 1
    assert moved(requests, **slowq, transport="grpc", outcome="cancelled") == 1
    duration = "edgerun_request_duration_seconds"
    assert moved(duration, sample=duration + "_count", **http) == 2
    assert moved(duration, sample=duration + "_count", **slowq) == 6
    assert moved("edgerun_batch_size", sample="edgerun_batch_size_count", **slowq) >= 1
    assert moved("edgerun_batcher_errors", **slowq, kind="overloaded") == 1
    assert moved("edgerun_batcher_errors", **slowq, kind="deadline_exceeded") == 2
    labels = {tuple(sorted(s.labels.items())) for f in after.values() for s in f.samples}
    assert {dict(label).get("model") for label in labels} <= {"", "mlp", "slowq", None}
    assert {dict(label).get("transport") for label in labels} <= {"http", "grpc", None}


def test_a_version_swapped_out_or_unloaded_leaves_no_stale_series(tmp_path):
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    with running_server(repo, "--metrics", "open", "--poll-interval", "0.2") as server:
        assert httpx.post(server.url + "/v2/models/mlp/infer", json=ROW).status_code == 200
        add_version(repo, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
        wait_for(lambda: httpx.post(server.url + "/v2/models/mlp/infer",
                                    json=ROW).json().get("model_version") == "2", 20,
                 "version 2 to be served")
        (repo / "mlp" / "config.toml").write_text("[batching]\nmax_queue_delay_us = 100\n")
        time.sleep(1)  # a new config: version 2 again, reloaded under the same labels
        assert httpx.post(server.url + "/v2/models/mlp/infer", json=ROW).status_code == 200
        families = scrape(server)
        for name in ("edgerun_queue_wait_seconds", "edgerun_batch_size",
                     "edgerun_inference_seconds", "edgerun_queue_depth",
                     "edgerun_inflight_requests", "edgerun_requests",
                     "edgerun_request_duration_seconds"):
            versions = {s.labels["version"] for s in families[name].samples}
            assert versions == {"2"}, (name, versions)
        # version 2's requests before its reload stay counted: the same labels go on
        assert value(families, "edgerun_requests", model="mlp", version="2", outcome="ok") >= 2
        assert httpx.post(server.url + "/v2/repository/models/mlp/unload").status_code == 200
        families = scrape(server)
        for name in ("edgerun_queue_wait_seconds", "edgerun_batch_size", "edgerun_queue_depth",
                     "edgerun_inflight_requests", "edgerun_batcher_errors"):
            assert not families[name].samples, name


def registry_scrape(registry: Registry) -> dict[str, object]:
    """The registry as /metrics renders it, through Prometheus' own parser."""
    text = prometheus.render(registry)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        check_family(family)
    return families


def labelled(families, **labels) -> list[str]:
    """Every sample carrying these label values, as "name{labels}" to read in a failure."""
    return [f"{s.name}{s.labels}" for f in families.values() for s in f.samples
            if all(s.labels.get(k) == v for k, v in labels.items())]


def test_a_version_reloaded_in_place_counts_the_requests_both_copies_hold(tmp_path):
    # a new config reloads version 1 beside the copy still draining a request: the new copy's
    # function replaced the old one's, and the gauges read 0 while a request was in flight
    from edgerun.adapters.dataplane import Call, DataPlane
    from edgerun.adapters.dataplane.call import INFER
    from edgerun.runtime.repository import Repository

    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4]))
    config = repo / "mlp" / "config.toml"
    config.write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 1500000\n")
    registry = Registry()
    repository = Repository(repo, registry=registry)
    repository.load_all()
    plane = DataPlane(repository)
    body = httpx.Request("POST", "/", json=ROW).content
    replies = []

    def request() -> None:  # a lone request waits out the 1.5 s delay for company
        replies.append(plane.handle(Call(INFER, "mlp", body=body)))

    def gauges() -> tuple[float, float]:
        families = registry_scrape(registry)
        return (value(families, "edgerun_inflight_requests", model="mlp", version="1"),
                value(families, "edgerun_queue_depth", model="mlp", version="1"))

    old = repository.get("mlp")
    first = threading.Thread(target=request)
    first.start()
    wait_for(lambda: gauges() == (1, 1), 5, "the first request to queue")
    config.write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 1400000\n")
    reload = threading.Thread(target=repository.load, args=("mlp",))
    reload.start()
    wait_for(lambda: repository.get("mlp") is not old, 10, "the new copy to take requests")
    try:
        assert reload.is_alive(), "the old copy drains its request"
        assert gauges() == (1, 1), f"the old copy's request is in flight, queued: {gauges()}"
        second = threading.Thread(target=request)  # routed to the new copy
        second.start()
        wait_for(lambda: gauges() == (2, 2), 5, "both copies' requests to count")
        first.join(10)
        reload.join(10)
        assert not reload.is_alive() and gauges() == (1, 1), "the new copy's request is left"
        second.join(10)
        assert [r.error for r in replies] == [None, None]
        assert gauges() == (0, 0)
        families = registry_scrape(registry)
        assert value(families, "edgerun_requests", model="mlp", version="1", outcome="ok") == 2
        assert labelled(families, version="1"), "a reload of the same version keeps its series"
    finally:
        repository.close()


def test_a_retired_versions_series_all_go_and_a_reload_keeps_them(tmp_path):
    # the batcher's series went when a version was retired; the data plane's request counters
    # and histograms and the shadow comparisons naming it stayed for the life of the process
    from edgerun.adapters.dataplane import Call, DataPlane
    from edgerun.adapters.dataplane.call import INFER
    from edgerun.runtime.repository import Repository

    repo = tmp_path / "models"
    for version in ("1", "2"):
        add_version(repo, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    config = repo / "mlp" / "config.toml"
    traffic = '[traffic]\nweights = { "1" = 1 }\nshadow = "2"\n'
    config.write_text("version_policy = { all = true }\n" + traffic)
    registry = Registry()
    repository = Repository(repo, registry=registry)
    repository.load_all()
    plane = DataPlane(repository)
    body = httpx.Request("POST", "/", json=ROW).content
    try:
        assert plane.handle(Call(INFER, "mlp", body=body)).version == "1"
        assert plane.handle(Call(INFER, "mlp", "2", body=body)).error is None
        assert plane.handle(Call(INFER, "mlp", body=b"{", transport="mqtt")).error is not None
        wait_for(lambda: value(registry_scrape(registry), "edgerun_shadow_requests",
                               shadow_version="2") == 1, 10, "the shadow copy to be compared")
        before = registry_scrape(registry)
        for version in ("1", "2"):
            assert labelled(before, version=version), version
        # a reload of the same versions (a new batching config) keeps every series
        config.write_text("version_policy = { all = true }\n[batching]\nmax_batch_size = 4\n"
                          + traffic)
        assert repository.load("mlp") == ["1", "2"]
        kept = registry_scrape(registry)
        assert value(kept, "edgerun_requests", version="1") == 2
        assert value(kept, "edgerun_shadow_requests", version="1", shadow_version="2") == 1
        # version 3 under latest = 1 retires both: nothing names them any more
        add_version(repo, "mlp", "3", mlp_onnx([8, 16, 4], seed=3))
        config.write_text("version_policy = { latest = 1 }\n")
        assert repository.load("mlp") == ["3"]
        assert plane.handle(Call(INFER, "mlp", body=body)).version == "3"
        after = registry_scrape(registry)
        for version in ("1", "2"):
            assert labelled(after, version=version) == [], version
        assert labelled(after, shadow_version="2") == []
        assert value(after, "edgerun_requests", model="mlp", version="3", outcome="ok") == 1
        # version 1 served again starts its series afresh
        config.write_text('version_policy = { specific = ["1", "3"] }\n')
        assert repository.load("mlp") == ["1", "3"]
        assert plane.handle(Call(INFER, "mlp", "1", body=body)).error is None
        again = registry_scrape(registry)
        assert value(again, "edgerun_requests", model="mlp", version="1", outcome="ok") == 1
        assert value(again, "edgerun_inflight_requests", model="mlp", version="1") == 0
        assert labelled(again, model="mlp", version="1", transport="http")
    finally:
        repository.close()


# ------------------------------------------------------------------------ the fleet gate
def test_gate_counts_every_error_of_a_daemon_that_restarted_after_its_update():
    """A daemon that restarts counts from zero: once it has served more requests than the
    baseline again, subtracting the baseline's errors hid the ones it made since."""
    gate = parse_gate("errors<1%")
    baseline = {"requests": 1000, "errors": 50}
    restarted = {"requests": 1100, "errors": 40}  # fewer errors than before: counts reset
    assert health(restarted, baseline)["errors"] == pytest.approx(100 * 40 / 1100)
    assert check_gate(gate, restarted, baseline) == ["errors 3.63636 breaks errors<1%"]
    # no restart: only what came after the update is judged
    assert health({"requests": 1100, "errors": 52}, baseline)["errors"] == pytest.approx(2.0)
    assert health({"requests": 10, "errors": 1}, baseline)["errors"] == pytest.approx(10.0)
    assert health({"requests": 1000, "errors": 50}, baseline)["errors"] == 0.0
    assert health({"requests": 0, "errors": 0}, None)["errors"] == 0.0
    # a restart both counts have already passed again shows only in the start time
    since = {**baseline, "since": 100.0}
    assert health({"requests": 1100, "errors": 60, "since": 100.0}, since)["errors"] == \
        pytest.approx(100 * 10 / 100)
    assert health({"requests": 1100, "errors": 60, "since": 200.0}, since)["errors"] == \
        pytest.approx(100 * 60 / 1100)


# ------------------------------------------------------------------- the daemon's telemetry
def test_telemetry_reads_the_data_planes_histograms(tmp_path):
    from edgerun.adapters.dataplane import DataPlane
    from edgerun.adapters.dataplane.call import INFER, Call
    from edgerun.runtime.repository import Repository

    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4]))
    registry = Registry()
    repository = Repository(repo, registry=registry)
    repository.load("mlp")
    plane, telemetry = DataPlane(repository), Telemetry(registry)
    try:
        idle = telemetry.traffic()
        assert (idle["requests"], idle["errors"]) == (0, 0)
        assert idle["latency_ms"] == {"p50": None, "p99": None, "window_requests": 0}
        body = httpx.Request("POST", "/", json=ROW).content
        assert plane.handle(Call(INFER, "mlp", body=body, transport="mqtt")).error is None
        one = telemetry.traffic()
        families = {family.name: family for family in registry.collect()}
        histogram = families["edgerun_request_duration_seconds"].labels("mlp", "1", "mqtt")
        buckets, total, count = histogram.snapshot()
        upper = next(bound for bound, seen in buckets if seen == 1)
        lower = max([0.0] + [bound for bound, seen in buckets if seen == 0])
        assert count == 1 and one["latency_ms"]["window_requests"] == 1
        for q in ("p50", "p99"):
            assert lower * 1000 <= one["latency_ms"][q] <= upper * 1000
        assert telemetry.traffic()["latency_ms"]["p99"] is None  # nothing since
        for call in (Call(INFER, "mlp", body=b"{", transport="mqtt"),
                     Call(INFER, "ghost", body=body, transport="mqtt")):
            assert plane.handle(call).error is not None
        after = telemetry.traffic()
        assert (after["requests"], after["errors"]) == (3, 2)
        assert after["outcomes"] == {"invalid_input": 1, "model_not_found": 1, "ok": 1}
        assert after["latency_ms"]["window_requests"] == 2
    finally:
        repository.close()


def test_telemetry_totals_survive_an_update_that_retires_the_served_version(tmp_path):
    """An update retires the old version's series; the totals the fleet's gate compares with
    its baseline must keep growing, and the window must hold the new requests only."""
    from edgerun.adapters.dataplane import DataPlane
    from edgerun.adapters.dataplane.call import INFER, Call
    from edgerun.runtime.repository import Repository

    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4]))
    (repo / "mlp" / "config.toml").write_text("version_policy = { latest = 1 }\n")
    registry = Registry()
    repository = Repository(repo, registry=registry)
    repository.load("mlp")
    plane, telemetry = DataPlane(repository), Telemetry(registry)
    body = httpx.Request("POST", "/", json=ROW).content

    def send(count: int, payload: bytes = body) -> None:
        for _ in range(count):
            plane.handle(Call(INFER, "mlp", body=payload, transport="mqtt"))

    try:
        send(5)
        send(2, b"{")
        before = telemetry.traffic()
        assert (before["requests"], before["errors"]) == (7, 2)
        add_version(repo, "mlp", "2", mlp_onnx([8, 16, 4]))
        assert repository.load("mlp") == ["2"]  # version 1 retired, its series gone
        send(3)
        after = telemetry.traffic()
        assert (after["requests"], after["errors"]) == (10, 2)
        assert after["outcomes"] == {"invalid_input": 2, "ok": 8}
        assert after["latency_ms"]["window_requests"] == 3
        assert after["latency_ms"]["p99"] > 0
        send(1)
        assert telemetry.traffic()["requests"] == 11
    finally:
        repository.close()


def test_quantiles_from_cumulative_buckets():
    assert quantile([], 0.99) is None
    assert quantile([(0.1, 0), (math.inf, 0)], 0.99) is None
    # one request between 5 and 10 ms: interpolated inside its bucket, as Prometheus does
    assert quantile([(0.005, 0), (0.01, 1), (math.inf, 1)], 0.5) == pytest.approx(0.0075)
    # past the last finite bound: that bound, the most the buckets can tell
    assert quantile([(0.005, 0), (10.0, 0), (math.inf, 3)], 0.99) == 10.0
    registry = Registry()
    family = registry.family("edgerun_request_duration_seconds", "latency", "histogram",
                             ("model",), LATENCY_BUCKETS)
    for seconds in [0.003] * 98 + [0.2] * 2:
        family.labels("m").observe(seconds)
    latency = Telemetry(registry).traffic()["latency_ms"]
    assert latency["p50"] == pytest.approx(2.5 + 2.5 * 50 / 98, abs=1e-3)
    assert latency["p99"] == pytest.approx(175.0)


def test_exposition_escapes_and_parses():
    registry = Registry()
    family = registry.family("edgerun_x_total", "Things, by name", "counter", ("name",))
    family.labels('a"b\\c\nd').inc(2)
    registry.family("edgerun_y_seconds", "Time", "histogram", ("name",)).labels("z").observe(3)
    text = prometheus.render(registry)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        check_family(family)
    assert families["edgerun_x"].samples[0].labels == {"name": 'a"b\\c\nd'}
    assert families["edgerun_x"].samples[0].value == 2
    le = [s.labels["le"] for s in families["edgerun_y_seconds"].samples if "le" in s.labels]
    assert le[-1] == "+Inf" and "2.5" in le and "0.00025" in le


def test_gate_thresholds_in_seconds_compare_as_written():
    """`p99<=1.001s` is 1001 ms, not 1000.9999999999999: a p99 of 1001 ms holds it."""
    assert [c.threshold for c in parse_gate("p99<=1.001s,p50<0.0041s")] == [1001.0, 4.1]
    telemetry = {"latency_ms": {"p50": 4.1, "p99": 1001.0}}
    assert check_gate(parse_gate("p99<=1.001s"), telemetry) == []
    assert check_gate(parse_gate("p50<0.0041s"), telemetry) == ["p50 4.1 breaks p50<4.1ms"]
