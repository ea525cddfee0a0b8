"""Cloud Functions entry points through functions-framework's own app and test client."""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import functions_framework
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from edgerun.examples import mlp_onnx
from edgerun.runtime import create_bundle
from tests.serving import free_port

MAIN = Path(__file__).resolve().parents[1] / "functions" / "gcf" / "main.py"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("gcf")
    (work / "mlp.onnx").write_bytes(mlp_onnx([8, 16, 4], seed=1))
    create_bundle(work / "mlp.onnx", work / "mlp", name="mlp", version="2")
    return work / "mlp"


@pytest.fixture(scope="module")
def clients(bundle_dir):
    previous = os.environ.get("EDGERUN_MODEL")
    os.environ["EDGERUN_MODEL"] = str(bundle_dir)
    try:
        yield {target: functions_framework.create_app(target, str(MAIN)).test_client()
               for target in ("infer", "pubsub")}
    finally:
        if previous is None:
            os.environ.pop("EDGERUN_MODEL", None)
        else:
            os.environ["EDGERUN_MODEL"] = previous


@pytest.fixture(scope="module")
def reference(bundle_dir):
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda rows: session.run(["y"], {"x": rows})[0]


def request(rows: np.ndarray, name: str = "x") -> dict:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.ravel().tolist()}]}


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_a_result_line_is_strict_json_even_with_nan(capsys):
    """Cloud Logging reads structured lines as strict JSON: json.dumps wrote NaN tokens."""
    from edgerun.adapters.gcf.function import log_result

    log_result("m-1", b'{"outputs": [{"name": "y", "data": [NaN, 1.0]}]}')
    log_result("m-2", b'{"outputs": [{"name": "y", "data": [0.5]}]}')
    def strict(token: str) -> None:
        raise ValueError(token)
    nan, finite = (json.loads(line, parse_constant=strict)
                   for line in capsys.readouterr().out.splitlines())
    assert nan["pubsub_message"] == "m-1" and "NaN" in nan["result"]
    assert finite["result"] == {"outputs": [{"name": "y", "data": [0.5]}]}


def test_http_function_serves_oip_v2(clients, reference):
    http = clients["infer"]
    x = rows(4)
    answer = http.post("/v2/models/mlp/infer", json=request(x),
                       headers={"X-Request-Id": "gcf-1"})
    assert answer.status_code == 200
    assert answer.headers["X-Request-Id"] == "gcf-1"
    body = answer.get_json()
    assert body["model_version"] == "2"
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(4, 4), reference(x),
                               rtol=1e-5, atol=1e-6)
    assert http.get("/v2/health/ready").get_json() == {"ready": True}
    assert http.get("/v2/models/mlp").get_json()["inputs"][0]["shape"] == [-1, 8]
    predict = http.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert predict.status_code == 200 and len(predict.get_json()["predictions"]) == 4
    assert "edgerun_requests_total" in http.get("/metrics").get_data(as_text=True)


def test_http_function_maps_errors_like_the_fleet_server(clients):
    http = clients["infer"]
    wrong = http.post("/v2/models/mlp/infer", json=request(rows(1), name="z"))
    assert wrong.status_code == 400 and "'z'" in wrong.get_json()["error"]
    assert http.post("/v2/models/nope/infer", json=request(rows(1))).status_code == 404
    not_allowed = http.get("/v2/models/mlp/infer")
    assert not_allowed.status_code == 405 and "POST" in not_allowed.headers["Allow"]
    assert http.get("/nowhere").status_code == 404
    bad_json = http.post("/v2/models/mlp/infer", data=b"{nope",
                         content_type="application/json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.get_json()["error"]
    brotli = http.post("/v2/models/mlp/infer", data=b"...", headers={"Content-Encoding": "br"})
    assert brotli.status_code == 415
    for action in ("unload", "load"):  # the function's model is fixed: nobody may unload it
        assert http.post(f"/v2/repository/models/mlp/{action}").status_code == 404
    assert http.post("/v2/models/mlp/infer", json=request(rows(1))).status_code == 200


def test_answers_no_route_reaches_carry_the_request_id_as_the_lambdas_do(clients):
    """The Lambda (and the fleet server) echo X-Request-Id on a 404 or 405; the function's
    answer had none, so the same request could not be traced here."""
    http = clients["infer"]
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/v2/models/mlp/infer", 405),
                                 ("PUT", "/v2/models/mlp/infer", 405)):
        answer = http.open(path, method=method, headers={"X-Request-Id": "gcf-missing"})
        assert answer.status_code == status
        assert answer.headers["X-Request-Id"] == "gcf-missing"
    assert len(http.get("/nowhere").headers["X-Request-Id"]) == 32  # none given: a new one


def test_a_model_that_does_not_load_is_a_json_500_naming_edgerun_model(clients, tmp_path,
                                                                      monkeypatch):
    """functions-framework answered an HTML page; the next request tries to load again."""
    from edgerun.adapters.gcf import function
    monkeypatch.setattr(function, "_current", None)
    monkeypatch.setenv("EDGERUN_MODEL", str(tmp_path / "nothing-here"))
    http = functions_framework.create_app("infer", str(MAIN)).test_client()
    for _ in range(2):
        answer = http.post("/v2/models/mlp/infer", json=request(rows(1)))
        assert answer.status_code == 500 and answer.is_json, answer.get_data()[:200]
        error = answer.get_json()["error"]
        assert "EDGERUN_MODEL=" in error and "no such bundle folder or archive" in error


def test_http_function_reads_gzip_bodies(clients, reference):
    x = rows(2)
    body = gzip.compress(json.dumps(request(x)).encode())
    answer = clients["infer"].post("/v2/models/mlp/infer", data=body,
                                   headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.get_data()
    np.testing.assert_allclose(np.array(answer.get_json()["outputs"][0]["data"]).reshape(2, 4),
                               reference(x), rtol=1e-5, atol=1e-6)


class SocketInput(io.BytesIO):
    """A request body as a WSGI server's input stream, remembering the largest piece any one
    read took from it: what the function (or functions-framework after it) held at once."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        piece = super().read(size)
        self.largest = max(self.largest, len(piece))
        return piece


def test_a_chunked_body_over_the_limit_is_a_413_holding_no_more_than_it(clients, reference):
    """A chunked body (no Content-Length) was read whole and decoded whatever its size: the
    limit held only for a declared length or a compressed body. Now it is refused with the
    413 naming the limit, and no read holds more of it than the limit + 1 bytes (not even
    functions-framework's, which reads what is left of each request before it answers).
    gunicorn, the server functions-framework runs, hands such a body on as
    `wsgi.input_terminated`; the app is called here as gunicorn calls it."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    from edgerun.adapters.gcf.function import MAX_BODY_BYTES

    app = functions_framework.create_app("infer", str(MAIN))

    def post_chunked(body: bytes) -> tuple[int, bytes, SocketInput]:
        environ = EnvironBuilder(method="POST", path="/v2/models/mlp/infer",
                                 headers={"Transfer-Encoding": "chunked"}).get_environ()
        assert "CONTENT_LENGTH" not in environ
        stream = SocketInput(body)
        environ.update({"wsgi.input": stream, "wsgi.input_terminated": True})
        answer, status, _ = run_wsgi_app(app, environ)
        return int(status.split()[0]), b"".join(answer), stream

    x = rows(2)
    status, body, _ = post_chunked(json.dumps(request(x)).encode())
    assert status == 200, body
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(2, 4),
                               reference(x), rtol=1e-5, atol=1e-6)
    for size in (MAX_BODY_BYTES + 1, 3 * MAX_BODY_BYTES):
        status, body, stream = post_chunked(b" " * size)
        assert status == 413, body[:200]
        assert json.loads(body)["error"] == f"request body is over the {MAX_BODY_BYTES}-byte limit"
        assert stream.largest <= MAX_BODY_BYTES + 1


def test_the_functions_framework_server_refuses_a_chunked_body_over_the_limit(bundle_dir):
    """The real server, the body sent chunked by httpx: a 413 naming the limit reaches the
    caller (it was a 400 once the 33 MiB had been parsed as JSON)."""
    from edgerun.adapters.gcf.function import MAX_BODY_BYTES

    def chunked():
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)

    with functions_framework_server({"EDGERUN_MODEL": str(bundle_dir)}) as (server, port):
        assert infer_until_answered(port, server).status_code == 200
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", content=chunked(),
                            timeout=60)
        assert answer.status_code == 413
        assert answer.json()["error"] == f"request body is over the {MAX_BODY_BYTES}-byte limit"
        assert infer_until_answered(port, server).status_code == 200


def pubsub_event(payload: bytes, attributes: dict | None = None, message_id: str = "1"):
    return {"message": {"data": base64.b64encode(payload).decode(),
                        "attributes": attributes or {}, "messageId": message_id,
                        "publishTime": "2024-05-01T12:00:00.000Z"},
            "subscription": "projects/demo/subscriptions/edgerun"}


def post_cloudevent(client, data: dict, event_id: str):
    return client.post("/", json=data, headers={
        "ce-id": event_id, "ce-specversion": "1.0",
        "ce-source": "//pubsub.googleapis.com/projects/demo/topics/edgerun",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished"})


def test_pubsub_function_infers_and_reports(clients, reference, capsys, caplog):
    pubsub = clients["pubsub"]
    x = rows(2, seed=5)
    answer = post_cloudevent(pubsub, pubsub_event(json.dumps(request(x)).encode(),
                                                  message_id="m-1"), "e-1")
    assert answer.status_code == 200
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pubsub_message"] == "m-1"
    np.testing.assert_allclose(np.array(line["result"]["outputs"][0]["data"]).reshape(2, 4),
                               reference(x), rtol=1e-5, atol=1e-6)
    # binary outputs asked for: the result is logged all in JSON (it once raised, redelivered)
    binary = {**request(x), "parameters": {"binary_data_output": True}}
    answer = post_cloudevent(pubsub, pubsub_event(json.dumps(binary).encode(),
                                                  message_id="m-b"), "e-b")
    assert answer.status_code == 200
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pubsub_message"] == "m-b"
    np.testing.assert_allclose(np.array(line["result"]["outputs"][0]["data"]).reshape(2, 4),
                               reference(x), rtol=1e-5, atol=1e-6)
    # input that can never succeed is acknowledged (logged), not redelivered forever
    for payload, attributes in [(b"{nope", None), (json.dumps(request(x)).encode(),
                                                   {"model": "missing"})]:
        assert post_cloudevent(pubsub, pubsub_event(payload, attributes), "e-2").status_code \
            == 200
    assert "invalid_input" in caplog.text and "model_not_found" in caplog.text
    # a request that may succeed later is raised: Pub/Sub delivers it again
    late = post_cloudevent(pubsub, pubsub_event(json.dumps(request(x)).encode(),
                                                {"x-request-timeout-ms": "0.000001"}), "e-3")
    assert late.status_code == 500


@pytest.mark.parametrize("data", [
    "not an object", [1], {"message": "x"}, {"message": [1]},
    {"message": {"data": 5}}, {"message": {"data": ["e30="]}},
    {"message": {"data": "e30=", "attributes": ["model", "mlp"]}},
    {"message": {"data": "e30=", "attributes": "model=mlp"}},
])
def test_a_cloudevent_that_is_no_pubsub_envelope_is_acknowledged(clients, caplog, data):
    """Fields of the wrong type (a CloudEvent POSTed by hand) raised AttributeError or
    TypeError: a 500, which Pub/Sub would deliver again forever. Such a message can never
    succeed: it is logged and acknowledged like any bad input."""
    answer = post_cloudevent(clients["pubsub"], data, "e-envelope")
    assert answer.status_code == 200
    assert "invalid_input" in caplog.text


def test_a_failed_pubsub_message_is_logged_with_its_request_id(clients, caplog):
    """The failure line named the message id only: the publisher's `x-request-id` (or the
    id the data plane gave) was missing, so a failure could not be found from the sender's
    side, as the Lambda adapter's record failures can."""
    pubsub = clients["pubsub"]
    x = rows(1)
    cases = [(json.dumps(request(x, name="nope")).encode(), {"x-request-id": "trace-41"}),
             (json.dumps(request(x)).encode(), {"model": "missing", "x-request-id": "trace-42"}),
             (b"{nope", {})]
    for number, (payload, attributes) in enumerate(cases):
        event = pubsub_event(payload, attributes, message_id=f"f-{number}")
        assert post_cloudevent(pubsub, event, f"e-f{number}").status_code == 200
    event = {**pubsub_event(b""), "message": {"data": "not base64!", "messageId": "f-3",
                                               "attributes": {"x-request-id": "trace-43"}}}
    assert post_cloudevent(pubsub, event, "e-f3").status_code == 200
    lines = {line["pubsub_message"]: line for line in (
        json.loads(record.getMessage()) for record in caplog.records
        if record.getMessage().startswith('{"message": "pubsub message failed"'))}
    assert lines["f-0"]["request_id"] == "trace-41" and lines["f-0"]["kind"] == "invalid_input"
    assert lines["f-1"]["request_id"] == "trace-42"
    assert lines["f-1"]["kind"] == "model_not_found"
    assert len(lines["f-2"]["request_id"]) == 32  # none given: the one the data plane made
    assert lines["f-3"]["request_id"] == "trace-43"


def test_the_gcf_adapter_imports_no_web_framework():
    done = subprocess.run([sys.executable, "-c", "import sys, edgerun.adapters.gcf.function; "
                           "print(sorted({m.split('.')[0] for m in sys.modules}))"],
                          capture_output=True, text=True, timeout=60)
    loaded = set(eval(done.stdout))
    assert not loaded & {"flask", "functions_framework", "fastapi", "starlette", "werkzeug"}


def test_an_archive_that_does_not_load_leaves_no_copy_at_each_retry(bundle_dir, tmp_path,
                                                                     monkeypatch):
    """Each request loads a model that failed to load again: its unpacked copy (in /tmp, the
    instance's memory) goes with each failure, not at the worker's exit."""
    from edgerun.adapters.gcf import function
    from edgerun.runtime import Bundle
    from edgerun.runtime.bundle import (GOLDEN, MANIFEST, FileEntry, read_manifest,
                                        sha256_file, write_manifest)

    folder = tmp_path / "wrong"
    shutil.copytree(bundle_dir, folder)
    with np.load(folder / GOLDEN) as golden:
        arrays = dict(golden)
    arrays["output_0"] = arrays["output_0"] + 1.0  # a claim this build does not reproduce
    np.savez(folder / GOLDEN, **arrays)
    manifest = read_manifest(folder)
    manifest.files[GOLDEN] = FileEntry(sha256_file(folder / GOLDEN),
                                       (folder / GOLDEN).stat().st_size)
    write_manifest(folder, manifest)
    with Bundle.open(folder) as opened:
        archive = opened.pack(tmp_path / "wrong.tar.gz")
    monkeypatch.setattr(function, "_current", None)
    monkeypatch.setenv("EDGERUN_MODEL", str(archive))
    monkeypatch.setenv("EDGERUN_CACHE_DIR", str(tmp_path / "cache"))
    http = functions_framework.create_app("infer", str(MAIN)).test_client()
    for _ in range(3):
        answer = http.post("/v2/models/mlp/infer", json=request(rows(1)))
        assert answer.status_code == 500 and "golden check" in answer.get_json()["error"]
        assert not list((tmp_path / "cache").rglob(MANIFEST))


def test_a_cache_dir_an_archive_cannot_be_unpacked_in_is_named(bundle_dir, tmp_path,
                                                                monkeypatch):
    """EDGERUN_CACHE_DIR naming a file (or a folder below one) was "EDGERUN_MODEL: the model
    did not load: FileExistsError: ...": the variable to fix was not named."""
    from edgerun.adapters.gcf import function
    from edgerun.runtime import Bundle

    with Bundle.open(bundle_dir) as opened:
        archive = opened.pack(tmp_path / "mlp.tar.gz")
    (tmp_path / "notes").write_text("mine")
    http = functions_framework.create_app("infer", str(MAIN)).test_client()
    for cache in (tmp_path / "notes", tmp_path / "notes" / "cache"):
        monkeypatch.setattr(function, "_current", None)
        monkeypatch.setenv("EDGERUN_MODEL", str(archive))
        monkeypatch.setenv("EDGERUN_CACHE_DIR", str(cache))
        answer = http.get("/v2/health/ready")
        assert answer.status_code == 500 and answer.is_json
        assert answer.get_json()["error"] == (
            f"EDGERUN_MODEL={str(archive)!r}: EDGERUN_CACHE_DIR={str(cache)!r}: the archive "
            f"cannot be unpacked there: {tmp_path / 'notes'} is not a folder")
    assert (tmp_path / "notes").read_text() == "mine"


def test_the_functions_framework_server_answers_from_its_forked_worker(bundle_dir):
    """The real server: gunicorn imports the module in its master and serves from a fork."""
    with functions_framework_server({"EDGERUN_MODEL": str(bundle_dir)}) as (server, port):
        answer = infer_until_answered(port, server)
        assert answer.status_code == 200 and answer.json()["model_version"] == "2"


def worker_of(server: subprocess.Popen) -> int | None:
    """The pid of the gunicorn worker functions-framework's master has forked, if any."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return int(children[0]) if children else None


@contextlib.contextmanager
def functions_framework_server(environ: dict[str, str], base: dict[str, str] | None = None
                               ) -> Iterator[tuple[subprocess.Popen, int]]:
    """A real `functions-framework` process serving `infer` on a free port, stopped after."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("functions-framework")), "--source", str(MAIN),
         "--target", "infer", "--host", "127.0.0.1", "--port", str(port)],
        env={**(os.environ if base is None else base), **environ},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield server, port
    finally:
        server.terminate()
        server.wait(timeout=30)


def infer_until_answered(port: int, server: subprocess.Popen) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer",
                              json=request(rows(1)), timeout=30)
        except httpx.TransportError:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)


def test_a_killed_worker_leaves_no_unpacked_archive_in_tmp(bundle_dir, tmp_path):
    """On Cloud Functions /tmp is memory. Each gunicorn worker unpacked a local `.tar.gz`
    model into a temporary folder of its own; one killed (past its timeout, by the OOM killer)
    left its copy for good and the worker gunicorn started next unpacked another, a model's
    size of the instance's memory gone each time. The next load removes dead workers' copies,
    as Lambda's starts do."""
    from edgerun.runtime import Bundle
    from edgerun.runtime.bundle import MANIFEST

    with Bundle.open(bundle_dir) as opened:
        archive = opened.pack(tmp_path / "mlp-2.tar.gz")
    tmp = tmp_path / "tmp"  # the instance's /tmp
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERUN_")}
    with functions_framework_server({"EDGERUN_MODEL": str(archive), "TMPDIR": str(tmp)},
                                    env) as (server, port):
        for _ in range(2):
            assert infer_until_answered(port, server).status_code == 200
            os.kill(worker_of(server), signal.SIGKILL)
            while worker_of(server) is None:  # gunicorn forks the next one
                assert server.poll() is None
                time.sleep(0.1)
        assert infer_until_answered(port, server).status_code == 200
        assert len(list(tmp.rglob(MANIFEST))) == 1  # the serving worker's copy alone
    assert not list(tmp.rglob(MANIFEST))  # and that one goes with its worker


PACKAGED_CHECK = """
import sys, functions_framework
folder = sys.argv[1]
client = functions_framework.create_app("infer", folder + "/main.py").test_client()
answer = client.post("/v2/models/mlp/infer", json={"inputs": [
    {"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]})
import edgerun
print(answer.status_code, answer.get_json()["model_version"], edgerun.__file__)
"""


def test_the_packaged_source_folder_serves_on_its_own(bundle_dir, tmp_path):
    folder = tmp_path / "gcf"
    done = subprocess.run([str(Path(sys.executable).with_name("edgerun")), "package", "gcf",
                           str(bundle_dir), "-o", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gcloud functions deploy" in done.stdout
    requirements = (folder / "requirements.txt").read_text().split()
    assert "functions-framework>=3.5" in requirements and "onnxruntime>=1.17" in requirements
    assert (folder / "model" / "manifest.json").is_file()
    assert (folder / "edgerun" / "adapters" / "gcf" / "function.py").is_file()
    for left_out in ("cli", "optimizers", "adapters/aws_lambda", "adapters/http/app.py",
                     "adapters/gcf/packaging.py", "runtime/backends/tvm.py"):
        assert not (folder / "edgerun" / left_out).exists(), left_out
    # what gcloud would upload answers from its own copy of edgerun, the model in model/
    done = subprocess.run([sys.executable, "-c", PACKAGED_CHECK, str(folder)], cwd=folder,
                          env={**os.environ, "EDGERUN_MODEL": "model"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, version, module = done.stdout.split()
    assert (status, version) == ("200", "2")
    assert Path(module).is_relative_to(folder)
    again = subprocess.run([str(Path(sys.executable).with_name("edgerun")), "package", "gcf",
                            str(bundle_dir), "-o", str(folder)], capture_output=True, text=True)
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_an_answer_over_the_response_limit_is_a_413_naming_it(bundle_dir):
    """Cloud Functions (2nd gen) passes on answers of up to 32 MiB (not streamed); a larger one
    was handed on and refused by the platform with a bare error, at every retry. The Lambda
    adapter answers 413 naming its limit, with the request id; so does this one."""
    from werkzeug.test import EnvironBuilder

    from edgerun.adapters.dataplane import DataPlane
    from edgerun.adapters.gcf.function import MAX_RESPONSE_BYTES, CloudFunction
    from edgerun.adapters.single_bundle import serve_bundle
    assert MAX_RESPONSE_BYTES == 32 * 2**20
    repository, source = serve_bundle(str(bundle_dir))
    try:
        function = CloudFunction(DataPlane(repository), default_model=source.name,
                                 max_response_bytes=20_000)

        def post(n: int) -> tuple[bytes, int, dict[str, str]]:
            return function.http(EnvironBuilder(
                method="POST", path="/v2/models/mlp/infer", json=request(rows(n)),
                headers={"X-Request-Id": "gcf-large"}).get_request())

        body, status, _ = post(10)
        assert status == 200 and len(body) <= 20_000
        body, status, headers = post(1000)
        assert status == 413 and len(body) <= 20_000
        assert "20000-byte limit" in json.loads(body)["error"]
        assert headers == {"Content-Type": "application/json", "X-Request-Id": "gcf-large"}
    finally:
        repository.close()


def test_an_answer_over_the_response_limit_is_counted_as_the_413_it_is(bundle_dir):
    """The answer was checked against the limit after the data plane had counted it `ok` and
    its hooks had seen it succeed, while the caller got a 413: both now see payload_too_large,
    the kind the 413 maps to, and the 413 still names the limit."""
    from werkzeug.test import EnvironBuilder

    from edgerun.adapters.codecs import prometheus
    from edgerun.adapters.dataplane import Call, DataPlane, Hook
    from edgerun.adapters.gcf.function import CloudFunction
    from edgerun.adapters.single_bundle import serve_bundle
    from edgerun.runtime.errors import EdgerunError

    class Outcomes(Hook):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def after(self, call: Call, error: EdgerunError | None) -> None:
            self.seen.append("ok" if error is None else error.kind)

    def counted(outcome: str) -> float:
        labels = f'model="mlp",version="2",transport="gcf",outcome="{outcome}"'
        return sum(float(line.rsplit(" ", 1)[1])
                   for line in prometheus.render(repository.registry).splitlines()
                   if line.startswith("edgerun_requests_total{") and labels in line)

    repository, source = serve_bundle(str(bundle_dir))
    try:
        outcomes = Outcomes()
        plane = DataPlane(repository)
        plane.hooks.add(outcomes)
        function = CloudFunction(plane, default_model=source.name, max_response_bytes=20_000)
        ok, too_large = counted("ok"), counted("payload_too_large")
        body, status, _ = function.http(EnvironBuilder(
            method="POST", path="/v2/models/mlp/infer", json=request(rows(1000))).get_request())
        assert status == 413 and "20000-byte limit" in json.loads(body)["error"]
        assert outcomes.seen == ["payload_too_large"]
        assert counted("payload_too_large") == too_large + 1
        assert counted("ok") == ok
    finally:
        repository.close()


def test_the_model_folder_of_a_source_folder_from_an_archive_is_0755(bundle_dir, tmp_path):
    """A .tar.gz bundle is opened in a 0700 temporary folder, whose mode copytree kept."""
    from edgerun.adapters.gcf.packaging import package_gcf
    from edgerun.runtime import Bundle
    with Bundle.open(bundle_dir) as opened:
        archive = opened.pack(tmp_path / "mlp-2.tar.gz")
    model = package_gcf(archive, tmp_path / "gcf") / "model"
    assert model.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in model.rglob("*") if p.is_file()} == {0o644}
