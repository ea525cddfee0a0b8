"""The data plane in-process, as the Lambda, MQTT and OTA adapters drive it: threads, no loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Call, DataPlane, Hook
from edgerun.adapters.dataplane import call as routes
from edgerun.adapters.dataplane.plane import OFF_LOOP_BYTES
from edgerun.adapters.http.asgi import EdgerunASGI
from edgerun.adapters.http.status import status_of
from edgerun.examples import mlp_onnx
from edgerun.runtime import (BundleError, InferenceError, InvalidInput, Model, ModelNotReady,
                             Overloaded, Unauthenticated, create_bundle)
from edgerun.runtime.bundle import Bundle
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from edgerun.runtime.sources import FolderSource
from tests.helpers import identity_onnx, two_input_onnx
from tests.serving import add_version


def infer_body(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}], **extra}).encode()


def headers(**values: str):
    lowered = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lowered.get


def series(registry: Registry, name: str) -> dict[tuple[str, ...], float]:
    family = next(f for f in registry.collect() if f.name == name)
    return {labels: child.value for labels, child in family.children()}


@pytest.fixture
def canary_repo(tmp_path) -> Path:
    root = tmp_path / "models"
    for version in ("1", "2", "3"):
        add_version(root, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    (root / "mlp" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\nweights = { "1" = 70, "2" = 30 }\n'
        'sticky_key = "x-user"\nshadow = "3"\n')
    return root


def test_32_threads_with_a_canary_and_a_shadow_all_get_right_answers(canary_repo):
    registry = Registry()
    repository = Repository(canary_repo, registry=registry)
    repository.load_all()
    plane = DataPlane(repository)
    expected = {v: Model.load(canary_repo / "mlp" / v) for v in ("1", "2")}
    rng = np.random.default_rng(0)
    answers: list[tuple[str, np.ndarray, np.ndarray, str | None]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        for _ in range(25):
            x = rng.standard_normal((1, 8)).astype(np.float32)
            user = f"user-{index % 5}" if index % 2 else None
            reply = plane.handle(Call(routes.INFER, "mlp", body=infer_body(x), transport="mqtt",
                                      attributes=headers(**({"x_user": user} if user else {}))))
            with lock:
                if reply.error is not None:
                    failures.append(str(reply.error))
                else:
                    out = json.loads(reply.body)["outputs"][0]
                    answers.append((reply.version, x, np.float32(out["data"]).reshape(1, 4),
                                    user))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(answers) == 800
    for version, x, y, _ in answers:
        np.testing.assert_allclose(y, expected[version].predict({"x": x})["y"], rtol=1e-4,
                                   atol=1e-5)
    unkeyed = [v for v, _, _, user in answers if user is None]
    share = unkeyed.count("2") / len(unkeyed)
    assert 0.2 < share < 0.4, share  # 30 % +- 4 sigma at n=400
    for user in {u for *_, u in answers if u is not None}:
        assert len({v for v, *_, u in answers if u == user}) == 1, f"{user} moved"
    assert {v for v, *_ in answers} == {"1", "2"}, "the shadow version never answers"
    deadline = time.monotonic() + 10
    while True:  # every answered request sent a copy to version 3, compared on its worker
        shadow = series(registry, "edgerun_shadow_requests_total")
        if sum(shadow.values()) >= 800 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(shadow.values()) == 800
    assert {labels[3] for labels in shadow} == {"mismatch"}, "version 3 differs from 1 and 2"
    assert repository.get("mlp", "3").in_flight == 0, "shadow copies release their version"
    repository.close()


def test_sticky_key_from_attributes_pins_a_caller(canary_repo):
    repository = Repository(canary_repo, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    x = np.zeros((1, 8), np.float32)
    for user in ("alice", "bob", "carol", "dave"):
        seen = {plane.handle(Call(routes.INFER, "mlp", body=infer_body(x),
                                  attributes=headers(x_user=user))).version for _ in range(15)}
        assert len(seen) == 1, user
    repository.close()


def test_a_sticky_key_no_http_header_can_name_is_absent_over_http(tmp_path):
    """A sticky key meant for MQTT user properties, which are UTF-8 (`benutzer-中`), is no
    header name: both HTTP apps raised UnicodeEncodeError looking it up, and every request
    naming no version was a 500. Over HTTP it is now absent (the split is random), and over
    MQTT it still pins its caller."""
    from edgerun.adapters.http.app import create_app

    root = tmp_path / "models"
    for version in ("1", "2"):
        add_version(root, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    (root / "mlp" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\nweights = { "1" = 1, "2" = 1 }\n'
        'sticky_key = "Benutzer-\u4e2d"\n')
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    body = infer_body(np.zeros((1, 8), np.float32))

    async def run(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://sticky") as http:
            return [await http.post("/v2/models/mlp/infer", content=body,
                                    headers={"x-user": "u"}) for _ in range(20)]

    try:
        for app in (EdgerunASGI(plane), create_app(plane)):
            answers = asyncio.run(run(app))
            assert [a.status_code for a in answers] == [200] * 20, answers[0].text
            assert {a.json()["model_version"] for a in answers} == {"1", "2"}
        pinned = {plane.handle(Call(routes.INFER, "mlp", body=body, transport="mqtt",
                                    attributes={"benutzer-\u4e2d": "alice"}.get)).version
                  for _ in range(20)}
        assert len(pinned) == 1, pinned
    finally:
        repository.close()


def test_async_and_sync_entry_points_agree(canary_repo):
    repository = Repository(canary_repo, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    body = infer_body(np.ones((2, 8), np.float32))
    sync = plane.handle(Call(routes.INFER, "mlp", "2", body=body))
    asynchronous = asyncio.run(plane.handle_async(Call(routes.INFER, "mlp", "2", body=body)))
    assert sync.body == asynchronous.body and sync.version == asynchronous.version == "2"
    repository.close()


@pytest.fixture
def plane(tmp_path):
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    registry = Registry()
    repository = Repository(root, registry=registry)
    repository.load_all()
    yield DataPlane(repository)
    repository.close()


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "soon", "1e400"])
def test_bad_timeout_header_is_refused_before_queueing(plane, value):
    batches = plane.repository.get("mlp").batcher.metrics.batch_size.count
    reply = plane.handle(Call(routes.INFER, "mlp", body=infer_body(np.zeros((1, 8), np.float32)),
                              attributes=headers(x_request_timeout_ms=value)))
    assert isinstance(reply.error, InvalidInput) and status_of(reply.error) == 400
    assert "x-request-timeout-ms must be a positive, finite number" in str(reply.error)
    assert plane.repository.get("mlp").batcher.metrics.batch_size.count == batches


def test_oip_timeout_true_is_refused(plane):
    reply = plane.handle(Call(routes.INFER, "mlp", body=infer_body(
        np.zeros((1, 8), np.float32), parameters={"timeout": True})))
    assert isinstance(reply.error, InvalidInput) and "parameters.timeout" in str(reply.error)


def test_unknown_requested_output_is_refused_before_the_forward_pass(plane):
    batches = plane.repository.get("mlp").batcher.metrics.batch_size.count
    reply = plane.handle(Call(routes.INFER, "mlp", body=infer_body(
        np.zeros((1, 8), np.float32), outputs=[{"name": "nope"}])))
    assert status_of(reply.error) == 400 and "requested output 'nope'" in str(reply.error)
    bad_parameters = plane.handle(Call(routes.INFER, "mlp", body=infer_body(
        np.zeros((1, 8), np.float32), outputs=[{"name": "y", "parameters": 3}])))
    assert status_of(bad_parameters.error) == 400
    assert plane.repository.get("mlp").batcher.metrics.batch_size.count == batches


def test_metrics_labels_stay_bounded_whatever_callers_send(plane):
    registry = plane.repository.registry
    body = infer_body(np.zeros((1, 8), np.float32))
    plane.handle(Call(routes.INFER, "mlp", body=body))
    before = set(series(registry, "edgerun_requests_total"))
    for i in range(100):
        assert status_of(plane.handle(Call(routes.INFER, "mlp", f"v{i}", body=body)).error) == 404
        assert status_of(plane.handle(Call(routes.INFER, f"ghost{i}", body=body)).error) == 404
    after = set(series(registry, "edgerun_requests_total"))
    assert after - before == {("mlp", "", "http", "model_not_found"),
                              ("", "", "http", "model_not_found")}


@pytest.mark.parametrize("traffic, described", [
    ('weights = { "1" = 90, "2" = 10 }\n', "1"),   # the canary split: most requests go to 1
    ('weights = { "1" = 1, "2" = 9 }\n', "2"),
    ('weights = { "1" = 5, "2" = 5 }\n', "2"),     # a tie: the newest
    ('weights = { "1" = 100 }\n', "1"),             # 2 is served only when named
    ('weights = { "2" = 0 }\n', "1"),               # 2 is kept dark
    ('', "2"),                                       # no split: the newest takes every request
])
def test_unnamed_metadata_describes_the_version_unnamed_requests_go_to(tmp_path, traffic,
                                                                       described):
    # the metadata of GET /v2/models/m (and gRPC ModelMetadata) was the newest version's:
    # under a 90/10 split a client built its requests for version 2's inputs "a" and "b",
    # and 90 % of them went to version 1, which takes "x"
    root = tmp_path / "models"
    add_version(root, "m", "1", mlp_onnx([8, 16, 4]))         # one input, "x" [b, 8]
    add_version(root, "m", "2", two_input_onnx())              # inputs "a" and "b"
    (root / "m" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\n' + traffic)
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    try:
        routed = [plane.handle(Call(routes.INFER, "m", body=b"{}")).version for _ in range(200)]
        metadata = json.loads(plane.handle(Call(routes.MODEL_METADATA, "m")).body)
        inputs = {"1": ["x"], "2": ["a", "b"]}[described]
        assert [t["name"] for t in metadata["inputs"]] == inputs, (traffic, metadata)
        assert metadata["versions"] == ["1", "2"], "every served version is listed"
        if "5 }" not in traffic:  # where most unnamed requests went (a tie has no most)
            assert max(("1", "2"), key=routed.count) == described, routed.count(described)
        named = plane.model_metadata("m", "2")
        assert named["versions"] == ["2"] and [t["name"] for t in named["inputs"]] == ["a", "b"]
        assert plane.handle(Call(routes.MODEL_READY, "m")).error is None
    finally:
        repository.close()


def test_metadata_max_batch_size_is_what_the_model_takes(tmp_path):
    # the metadata said the config's 64 rows while the bundle takes at most 8: a client that
    # sized its requests by it had every request refused
    root = tmp_path / "models"
    source = tmp_path / "m.onnx"
    source.write_bytes(mlp_onnx([8, 16, 4]))
    create_bundle(source, root / "m" / "1", name="m", version="1", max_batch_size=8)
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    try:
        advertised = plane.model_metadata("m")["parameters"]["max_batch_size"]
        assert advertised == 8
        reply = plane.handle(Call(routes.INFER, "m",
                                  body=infer_body(np.zeros((advertised, 8), np.float32))))
        assert reply.error is None, reply.error
    finally:
        repository.close()


def test_tf_serving_decodes_with_the_routed_versions_signature(tmp_path):
    root = tmp_path / "models"
    add_version(root, "m", "1", mlp_onnx([8, 16, 4]))         # one input, "x" [b, 8]
    add_version(root, "m", "2", two_input_onnx())              # inputs "a" and "b"
    (root / "m" / "config.toml").write_text(
        'version_policy = { all = true }\n[traffic]\nweights = { "1" = 100 }\n')
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    reply = plane.handle(Call(routes.PREDICT, "m", body=b'{"instances": [[1,2,3,4,5,6,7,8]]}'))
    assert reply.error is None and reply.version == "1", reply.body
    assert len(json.loads(reply.body)["predictions"][0]) == 4
    repository.close()


class _SlowSource(FolderSource):
    """A real folder whose bundles are handed over only once the test says so."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.go = threading.Event()

    def bundle_path(self, name: str, version: str) -> Path:
        assert self.go.wait(30)
        return super().bundle_path(name, version)


def test_a_loading_model_is_not_ready_everywhere_with_one_status(tmp_path):
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    source = _SlowSource(root)
    repository = Repository(source, registry=Registry())
    repository.start_loading()
    plane = DataPlane(repository)
    time.sleep(0.2)
    body = infer_body(np.zeros((1, 8), np.float32))
    for route in (routes.MODEL_READY, routes.INFER, routes.READY, routes.MODEL_METADATA):
        reply = plane.handle(Call(route, "mlp", body=body))
        assert isinstance(reply.error, ModelNotReady), (route, reply.error)
        assert status_of(reply.error) == 503
    source.go.set()
    deadline = time.monotonic() + 30
    while not repository.ready:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert plane.handle(Call(routes.MODEL_READY, "mlp")).error is None
    repository.close()


def test_a_load_asked_for_once_the_server_stops_is_a_503_saying_so(tmp_path):
    """POST .../load reaching the repository once it was closing loaded the model anyway
    (answered 200), and nothing ever released it."""
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    repository = Repository(root, registry=Registry())
    plane = DataPlane(repository)
    repository.close()
    reply = plane.handle(Call(routes.LOAD, "mlp", body=b"{}"))
    assert isinstance(reply.error, ModelNotReady) and status_of(reply.error) == 503
    assert "server is stopping" in json.loads(reply.body)["error"]
    assert "mlp" not in repository


def _surprise_while_loading(monkeypatch) -> set[Path]:
    """The bundle folders whose loading raises an exception that is no EdgerunError (as a
    KeyError inside numpy once did): what the repository must survive from any library."""
    broken: set[Path] = set()
    golden = Bundle.golden

    def failing(self: Bundle):
        if self.path.resolve() in broken:
            raise KeyError("input_0")
        return golden(self)

    monkeypatch.setattr(Bundle, "golden", failing)
    return broken


def test_any_exception_while_loading_leaves_the_rest_serving(tmp_path, monkeypatch):
    root = tmp_path / "models"
    broken = _surprise_while_loading(monkeypatch)
    broken.add(add_version(root, "aaa", "1", mlp_onnx([8, 16, 4], seed=1)).resolve())
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    repository = Repository(root, registry=Registry())
    repository.start_loading().join(60)
    assert "mlp" in repository and "aaa" not in repository, "the loader thread lived on"
    states = {(s.name, s.version): s for s in repository.index()}
    assert states[("aaa", "1")].state == "UNAVAILABLE"
    assert "KeyError" in states[("aaa", "1")].reason

    broken.add(add_version(root, "mlp", "2", mlp_onnx([8, 16, 4], seed=2)).resolve())
    threads = {t.name for t in threading.enumerate()}
    with pytest.raises(BundleError, match="version 2: .*KeyError"):
        repository.load("mlp")
    assert repository.get("mlp").version == "1", "version 1 keeps serving"
    assert {t.name for t in threading.enumerate()} - threads == set(), "nothing leaked"
    assert [s.state for s in repository.index() if s.name == "mlp"] == ["READY", "UNAVAILABLE"]
    repository.close()


def test_onnx_runtime_cpu_fallback_failure_is_a_bundle_error(tmp_path):
    from edgerun.devices import load_profile
    from edgerun.runtime.backends.onnxruntime import OnnxRuntimeBackend

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    # AzureExecutionProvider is in every PyPI build of ONNX Runtime: it is tried, then the CPU
    profile = load_profile("cpu").replace(
        execution_providers=("AzureExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(BundleError, match="cannot load it on the CPU either"):
        OnnxRuntimeBackend.load(broken, profile)


# ---------------------------------------------------------------------------- hook chain
class _Recorder(Hook):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def before(self, call: Call) -> None:
        if call.attributes("authorization") != "Bearer ok":
            raise Unauthenticated("no valid bearer token")

    def after(self, call: Call, error) -> None:
        self.seen.append((call.route, None if error is None else error.kind))


def test_every_route_of_the_lean_app_passes_the_hook_chain(plane):
    recorder = _Recorder()
    plane.hooks.add(recorder)
    app = EdgerunASGI(plane)
    good = {"authorization": "Bearer ok", "x-request-id": "abc-1"}
    body = infer_body(np.zeros((1, 8), np.float32))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://lean") as http:
            return [await http.post("/v2/models/mlp/infer", content=body, headers=good),
                    await http.post("/v1/models/mlp:predict", json={"instances": [[0] * 8]},
                                    headers=good),
                    await http.get("/v2/models/mlp", headers=good),
                    await http.post("/v2/models/mlp/infer", content=body),
                    await http.get("/v2/health/live")]

    infer, predict, metadata, refused, live = asyncio.run(run())
    assert [r.status_code for r in (infer, predict, metadata, refused, live)] == \
        [200, 200, 200, 401, 401]
    assert infer.headers["x-request-id"] == "abc-1"
    assert len(refused.headers["x-request-id"]) == 32, "a new id when none was given"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert recorder.seen == [("infer", None), ("predict", None), ("model_metadata", None),
                             ("infer", "unauthenticated"), ("live", "unauthenticated")]


def test_lean_app_answers_405_with_allow_and_404_as_json(plane):
    app = EdgerunASGI(plane)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://lean") as http:
            return (await http.get("/v2/models/mlp/infer"), await http.get("/nowhere"))

    wrong_method, missing = asyncio.run(run())
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert missing.status_code == 404 and "no route /nowhere" in missing.json()["error"]


def test_lifespan_around_every_invocation_keeps_the_models(plane):
    """Mangum runs the ASGI lifespan around each invocation; models must survive it."""
    app = EdgerunASGI(plane)

    async def lifespan_cycle() -> list[str]:
        sent: list[str] = []
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message["type"])

        await app({"type": "lifespan"}, receive, send)
        return sent

    body = infer_body(np.zeros((1, 8), np.float32))
    for _ in range(3):
        assert asyncio.run(lifespan_cycle()) == ["lifespan.startup.complete",
                                                 "lifespan.shutdown.complete"]
        assert plane.handle(Call(routes.INFER, "mlp", body=body)).error is None


def test_overloaded_carries_an_estimate_of_when_there_is_room(tmp_path):
    from edgerun.runtime import MicroBatcher

    root = tmp_path / "b"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    model = Model.load(root / "mlp" / "1")
    x = {"x": np.zeros((1, 8), np.float32)}
    with MicroBatcher(model, registry=Registry(), max_batch_size=8,
                      max_queue_delay_us=3_000_000, max_queue_size=2) as batcher:
        batcher.submit(x), batcher.submit(x)  # they wait out the 3 s delay
        time.sleep(0.5)
        with pytest.raises(Overloaded) as info:
            batcher.submit(x)
        assert 2.0 <= info.value.retry_after_s <= 2.6, info.value.retry_after_s


def test_decoded_requests_pass_hooks_routing_and_metrics(plane):
    """What a transport with its own tensor encoding (gRPC) calls, sync and async."""
    from edgerun.adapters.codecs import oip
    from edgerun.runtime import ModelNotFound

    request = oip.InferRequest(None, {"x": np.zeros((2, 8), np.float32)},
                               [oip.RequestedOutput("y", False)], False, None)
    first = plane.infer(Call(routes.INFER, "mlp", transport="grpc"), request)
    assert first.version == "1" and first.outputs["y"].shape == (2, 4)
    again = asyncio.run(plane.infer_async(Call(routes.INFER, "mlp", transport="grpc"), request))
    np.testing.assert_array_equal(first.outputs["y"], again.outputs["y"])
    with pytest.raises(ModelNotFound):
        plane.infer(Call(routes.INFER, "mlp", "9", transport="grpc"), request)
    bad = oip.InferRequest(None, {"x": np.zeros((2, 3), np.float32)}, None, False, None)
    with pytest.raises(InvalidInput, match="input 'x': dim 1 must be 8") as info:
        asyncio.run(plane.infer_async(Call(routes.INFER, "mlp", transport="grpc"), bad))
    assert info.value.version == "1"
    counts = {labels: value for labels, value in
              series(plane.repository.registry, "edgerun_requests_total").items()
              if labels[2] == "grpc"}
    assert counts == {("mlp", "1", "grpc", "ok"): 2, ("mlp", "", "grpc", "model_not_found"): 1,
                      ("mlp", "1", "grpc", "invalid_input"): 1}


def test_an_answer_encoded_in_the_data_plane_is_counted_as_what_its_caller_gets(plane):
    """gRPC encoded its answer after `infer_async` had counted the call `ok`: an answer it
    could not encode (an output dtype with no OIP datatype) reached the client as an error
    status and the metrics and hooks as a success. Encoded by `infer_async`, as an HTTP answer
    is encoded in its route, the failure is counted as the error sent."""
    seen: list[str] = []

    class Outcomes(Hook):
        def after(self, call: Call, error) -> None:
            seen.append("ok" if error is None else error.kind)

    plane.hooks.add(Outcomes())
    request = oip.InferRequest(None, {"x": np.zeros((2, 8), np.float32)}, None, False, None)

    def unencodable(result):  # as the gRPC codec meets an output numpy has and OIP has not
        return {name: oip.datatype_of(array.astype(np.complex64))
                for name, array in result.outputs.items()}

    async def off_loop(result):  # a big answer, encoded on a worker thread
        return await asyncio.to_thread(oip.encode_response, result.model, result.version,
                                       result.request, result.outputs)

    def grpc() -> Call:
        return Call(routes.INFER, "mlp", transport="grpc")

    with pytest.raises(InvalidInput, match="have no OIP datatype") as info:
        asyncio.run(plane.infer_async(grpc(), request, unencodable))
    assert info.value.version == "1"
    body, _ = asyncio.run(plane.infer_async(grpc(), request, off_loop))
    assert json.loads(body)["outputs"][0]["shape"] == [2, 4]
    assert asyncio.run(plane.infer_async(grpc(), request, lambda result: result.version)) == "1"
    assert seen == ["invalid_input", "ok", "ok"]
    counts = {labels: value for labels, value in
              series(plane.repository.registry, "edgerun_requests_total").items()}
    assert counts == {("mlp", "1", "grpc", "invalid_input"): 1, ("mlp", "1", "grpc", "ok"): 2}


def test_an_unexpected_failure_is_logged_with_the_request_id_its_caller_got(plane, caplog):
    """A hook's bug (a tracer's, say) answered 500 with an X-Request-Id, and logged a
    traceback that named no request: the operator could not find it from the caller's id."""

    class Tracer(Hook):
        def before(self, call: Call) -> None:
            if call.attributes("x-fail") == "before":
                raise KeyError("no span")

        def after(self, call: Call, error) -> None:
            if call.attributes("x-fail") == "after":
                raise KeyError("no span")

    plane.hooks.add(Tracer())
    body = infer_body(np.zeros((1, 8), np.float32))
    reply = plane.handle(Call(routes.INFER, "mlp", body=body,
                              attributes=headers(x_fail="before", x_request_id="trace-7")))
    assert status_of(reply.error) == 500 and reply.headers["X-Request-Id"] == "trace-7"
    request = oip.InferRequest(None, {"x": np.zeros((1, 8), np.float32)}, None, False, None)
    with pytest.raises(InferenceError):
        plane.infer(Call(routes.INFER, "mlp", transport="grpc",
                         attributes=headers(x_fail="before", x_request_id="trace-8")), request)
    reply = plane.handle(Call(routes.INFER, "mlp", body=body,
                              attributes=headers(x_fail="after", x_request_id="trace-9")))
    assert reply.ok and reply.headers["X-Request-Id"] == "trace-9"
    logged = [(record.getMessage(), record.exc_info is not None) for record in caplog.records
              if record.levelname == "ERROR"]
    assert len(logged) == 3 and all(traceback for _, traceback in logged), logged
    for (message, _), request_id in zip(logged, ("trace-7", "trace-8", "trace-9")):
        assert request_id in message, message


def test_a_decoder_runs_only_once_the_model_is_found(plane):
    # gRPC decoded before routing: an unknown model with a bad body was INVALID_ARGUMENT
    from edgerun.runtime import ModelNotFound

    def decoder():
        raise InvalidInput("the request has no inputs")

    with pytest.raises(ModelNotFound, match="ghost"):
        plane.infer(Call(routes.INFER, "ghost", transport="grpc"), decoder)
    with pytest.raises(InvalidInput, match="no inputs") as info:
        plane.infer(Call(routes.INFER, "mlp", transport="grpc"), decoder)
    assert info.value.version == "1"


def test_invalid_input_and_requests_answered_during_an_unload_keep_their_labels(tmp_path):
    # bad input on HTTP was counted under version ""; a request routed before an unload and
    # answered during its drain was counted under model "". An unloaded version's series go
    # (see test_metrics), and the request answered after its drain must not make one again.
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    (root / "mlp" / "config.toml").write_text("[batching]\nmax_queue_delay_us = 500000\n")
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    body = infer_body(np.zeros((1, 8), np.float32))
    assert status_of(plane.handle(Call(routes.INFER, "mlp", body=b'{"inputs": 3}')).error) \
        == 400
    assert series(repository.registry, "edgerun_requests_total") == \
        {("mlp", "1", "http", "invalid_input"): 1}
    replies = []
    waiting = threading.Thread(target=lambda: replies.append(
        plane.handle(Call(routes.INFER, "mlp", body=body))))
    waiting.start()  # a lone request: it waits half a second in the queue for company
    time.sleep(0.1)
    repository.unload("mlp")  # gone from the repository, then drained: the request is answered
    waiting.join(5)
    assert replies and replies[0].error is None and replies[0].version == "1"
    families = {family.name: family for family in repository.registry.collect()}
    for name in ("edgerun_requests_total", "edgerun_request_duration_seconds"):
        # none for version 1 once it is gone, and none under "" for the late answer
        assert [labels for labels, _ in families[name].children()] == [], name
    repository.close()


class _HoldAnswers(Hook):
    """Holds answered calls in `after`, once armed: the data plane counts them only then."""

    def __init__(self) -> None:
        self.armed, self.held, self.go = False, threading.Event(), threading.Event()

    def after(self, call: Call, error) -> None:
        if self.armed:
            self.held.set()
            assert self.go.wait(10)


def test_a_request_counted_after_its_version_retired_makes_no_series_again(tmp_path):
    # the version is drained once its requests are answered, and its series go; the data
    # plane counts an answer just after (hooks first), and that count made version 1's
    # request series again, to stay for the life of the process
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    repository = Repository(root, registry=Registry())
    repository.load_all()
    hold = _HoldAnswers()
    plane = DataPlane(repository)
    plane.hooks.add(hold)
    body = infer_body(np.zeros((1, 8), np.float32))
    assert plane.handle(Call(routes.INFER, "mlp", body=body)).version == "1"
    hold.armed = True
    replies = []
    answered = threading.Thread(target=lambda: replies.append(
        plane.handle(Call(routes.INFER, "mlp", body=body))))
    answered.start()
    try:
        assert hold.held.wait(10), "the request was answered"
        add_version(root, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
        assert repository.load("mlp") == ["2"]  # latest = 1: version 1 retired
        families = {family.name: family for family in repository.registry.collect()}
        assert ("mlp", "1", "http", "ok") not in dict(
            families["edgerun_requests_total"].children()), "retired with its version"
    finally:
        hold.go.set()
        answered.join(10)
    assert replies[0].error is None and replies[0].version == "1"
    for name in ("edgerun_requests_total", "edgerun_request_duration_seconds"):
        versions = {labels[1] for labels, _ in families[name].children()}
        assert versions == set(), (name, versions)
    hold.armed = False
    assert plane.handle(Call(routes.INFER, "mlp", body=body)).version == "2"
    assert set(series(repository.registry, "edgerun_requests_total")) == \
        {("mlp", "2", "http", "ok")}
    repository.close()


def test_a_big_body_is_answered_off_the_event_loop(tmp_path, monkeypatch):
    """A JSON body of 3 million short strings (12 MB) takes about half a second to decode,
    validate and encode; on the event loop every other caller would wait that long. Which
    thread decodes and encodes is what the test checks: the loop's longest stall, measured
    before, also holds the worker's C calls that keep the GIL, and moved with the load."""
    from edgerun.adapters.dataplane import plane as plane_module
    from edgerun.adapters.codecs import oip

    root = tmp_path / "models"
    add_version(root, "text", "1", identity_onnx("string", ["b"]))
    repository = Repository(root, registry=Registry())
    repository.load_all()
    plane = DataPlane(repository)
    count = 3_000_000
    body = b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [%d], "data": [%s]}]}' % (
        count, b",".join([b'"a"'] * count))
    assert len(body) >= OFF_LOOP_BYTES
    ran_on: dict[str, threading.Thread] = {}

    def recorded(step: str, work):
        def run(*args, **kwargs):
            ran_on[step] = threading.current_thread()
            return work(*args, **kwargs)
        return run

    monkeypatch.setattr(oip, "decode_request", recorded("decode", oip.decode_request))
    monkeypatch.setattr(plane_module, "_infer_reply",
                        recorded("encode", plane_module._infer_reply))

    async def answer_while_ticking() -> tuple[bytes, int]:
        answered, ticks = asyncio.ensure_future(plane.handle_async(
            Call(routes.INFER, "text", body=body))), 0
        while not answered.done():
            await asyncio.sleep(0.001)
            ticks += 1
        return (await answered).body, ticks

    try:
        answer, ticks = asyncio.run(answer_while_ticking())
    finally:
        repository.close()
    assert json.loads(answer)["outputs"][0]["shape"] == [count]
    assert set(ran_on) == {"decode", "encode"}
    assert threading.main_thread() not in ran_on.values(), ran_on  # the loop's thread
    assert ticks > 10  # and the loop went on meanwhile
