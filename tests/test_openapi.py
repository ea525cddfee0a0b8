"""The OpenAPI document is the contract: an API fuzzer holds a real `edgerun serve` to it.

schemathesis reads /openapi.json from a running server, generates requests from it (valid and
invalid, every operation; its coverage, fuzzing and stateful phases) and runs every check it has
on each answer: no 5xx, every status code, media type, header and body documented, valid
requests accepted, invalid ones rejected, 405 with `Allow` for undocumented methods. The seed is
fixed so a failure reproduces. At 25 examples per operation a run makes about 1,100 requests
(the coverage phase adds its own), in about a minute on 2 cores. tests/schemathesis.toml holds
the one allowance (see there). One worker: schemathesis' threads trip a CPython 3.11
`ast.parse` race in hypothesis.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from edgerun.adapters.http.routes import ROUTES
from edgerun.examples import mlp_onnx
from tests.helpers import identity_onnx
from tests.serving import add_version, running_server

CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = "20261125"
EXAMPLES_PER_OPERATION = "25"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("openapi") / "models"
    add_version(repo, "mlp", "1", mlp_onnx([8, 16, 4]))
    add_version(repo, "identity", "1", identity_onnx("float32", ["b", "n"]))
    add_version(repo, "identity", "2", identity_onnx("float32", ["b", "n"]))
    with running_server(repo) as running:
        yield running


def schemathesis(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG),
               "--no-color", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_every_route_documents_what_it_answers(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert len(spec["paths"]) == len(ROUTES)
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["responses"]) == {"200", "400", "401", "403", "404", "413", "415", "500",
                                       "503", "504"}
    assert infer["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert "Retry-After" in infer["responses"]["503"]["headers"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                    "application/octet-stream"}
    assert "Inference-Header-Content-Length" in {p["name"] for p in infer["parameters"]}
    request = spec["components"]["schemas"]["InferRequest"]
    assert request["required"] == ["inputs"] and request["properties"]["inputs"]["minItems"] == 1
    tensor = spec["components"]["schemas"]["RequestInput"]
    assert set(tensor["required"]) == {"name", "shape", "datatype", "data"}
    assert tensor["properties"]["shape"]["items"] == {"type": "integer", "minimum": 0}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]


def test_405_says_allow_and_head_answers_like_get(server):
    for method, path, allow in [("DELETE", "/v2/health/live", {"GET", "HEAD"}),
                                ("GET", "/v2/models/mlp/infer", {"POST"}),
                                ("PUT", "/openapi.json", {"GET", "HEAD"})]:  # FastAPI's part
        answer = httpx.request(method, server.url + path)
        assert answer.status_code == 405, (method, path)
        assert set(answer.headers["allow"].split(", ")) == allow, (method, path)
        assert "error" in answer.json()
    head = httpx.head(server.url + "/v2/models/mlp")
    get = httpx.get(server.url + "/v2/models/mlp")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]


def test_the_server_keeps_its_openapi_contract(server):
    run = schemathesis("run", server.url + "/openapi.json", "--checks", "all",
                       "--max-examples", EXAMPLES_PER_OPERATION, "--seed", SEED,
                       "--generation-database", "none", "--workers", "1")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-20000:]
    generated = re.search(r"(\d+) generated, \1 passed", log)
    assert generated and int(generated.group(1)) >= 500, log[-5000:]
    print(generated.group(0))
    assert f"Tested: {len(ROUTES)}" in log
    assert server.process.poll() is None, "the server died under the fuzzer"
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
