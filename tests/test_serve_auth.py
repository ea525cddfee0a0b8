"""`edgerun serve --api-keys` as a real process: 401/403 over HTTP, live revocation, and no
secret in its logs under a load of good and bad keys."""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edgerun.adapters.auth import create_token, revoke_token
from edgerun.adapters.auth.tokens import read_secret
from edgerun.examples import mlp_onnx
from tests.cli import edgerun_command
from tests.serving import Server, add_version, free_port, wait_until

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.fixture
def secured(tmp_path: Path):
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 2], seed=1))
    tokens = tmp_path / "tokens"
    secrets = {}
    for name, scope in (("app", "read"), ("ops", "deploy"), ("leaver", "read"),
                        ("never-used", "admin")):
        create_token(scope, tokens, tmp_path / f"{name}.secret", name=name)
        secrets[name] = read_secret(tmp_path / f"{name}.secret")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as sink:  # debug logs and the access log: all the server would say
        process = subprocess.Popen(
            [*edgerun_command(), "-v", "serve", "--repository", str(repo), "--port", str(port),
             "--api-keys", str(tokens), "--access-log", "--log-level", "debug"],
            stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, port, log)
    try:
        wait_until(server, "/v2/health/ready")  # probes need no key
        yield server, tokens, secrets
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_keys_scopes_and_probes_over_http(secured) -> None:
    server, tokens, secrets = secured
    url = server.url
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    missing = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "bearer token is required" in missing.json()["error"]
    assert httpx.get(f"{url}/metrics").status_code == 401  # closed by default
    assert httpx.get(f"{url}/metrics", headers=auth(secrets["app"])).status_code == 200
    assert httpx.get(f"{url}/v2/models/mlp/ready").status_code == 401
    denied = httpx.post(f"{url}/v2/repository/models/mlp/unload", headers=auth(secrets["app"]))
    assert denied.status_code == 403 and "'app' has scope 'read'" in denied.json()["error"]
    ok = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, headers=auth(secrets["app"]))
    assert ok.status_code == 200 and ok.json()["model_name"] == "mlp"
    # tritonclient, as users call Triton behind a gateway that wants a bearer token
    client = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32), binary_data=True)
    result = client.infer("mlp", [tensor], headers=auth(secrets["app"]))
    assert result.as_numpy(ok.json()["outputs"][0]["name"]).shape == (1, 2)
    with pytest.raises(InferenceServerException, match="not valid"):
        client.infer("mlp", [tensor], headers=auth(secrets["app"] + "x"))
    revoke_token(tokens, "app")  # takes effect on the next request, no restart
    again = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, headers=auth(secrets["app"]))
    assert again.status_code == 401
    assert httpx.post(f"{url}/v2/repository/models/mlp/load",
                      headers=auth(secrets["ops"])).status_code == 200


def test_no_secret_reaches_the_logs_under_load(secured) -> None:
    server, tokens, secrets = secured
    revoke_token(tokens, "leaver")
    wrong = [secrets["app"][:-2] + "zz", "edgerun_" + "A" * 43, secrets["leaver"]]
    plans = [(secrets["app"], 200), (secrets["ops"], 200)] + [(w, 401) for w in wrong]

    def one(n: int) -> tuple[int, int]:
        token, expected = plans[n % len(plans)]
        got = client.post("/v2/models/mlp/infer", json=BODY, headers=auth(token))
        if n % 7 == 0:  # a read key on a deploy route
            denied = client.post("/v2/repository/models/mlp/unload",
                                 headers=auth(secrets["app"]))
            assert denied.status_code == 403
        return got.status_code, expected

    with httpx.Client(base_url=server.url) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(200)))
    assert all(got == expected for got, expected in answers)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    output = server.output()
    assert "refused infer mlp over http (invalid)" in output  # the logs did see the refusals
    assert "loaded 4 tokens" in output and "/v2/models/mlp/infer" in output
    for secret in [*secrets.values(), *wrong[:2]]:
        assert secret not in output
        assert secret.removeprefix("edgerun_")[:16] not in output
    assert json.dumps(secrets["app"])[1:-1] not in output


README = Path(__file__).parents[1] / "README.md"


def readme_block(language: str, marker: str) -> str:
    import re
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
                if marker in b)


def test_readme_security_examples_are_true(tmp_path: Path) -> None:
    import sys

    from edgerun.adapters.auth.mosquitto import Device, InferenceClient, Orchestrator, acl_text
    add_version(tmp_path / "models", "digits", "1", mlp_onnx([4, 8, 2], seed=1))
    script = readme_block("bash", "--api-keys").replace("8001", str(free_port())).replace(
        ".venv/bin/", str(Path(sys.executable).parent) + "/")
    result = subprocess.run(["bash", "-ec", script + "wait\n"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "created read token 'app'" in out and "revoked token 'app'" in out
    assert out.count("401\n") == 2 and out.index("401") < out.index('"name":"digits"')
    token = (tmp_path / "app.token").read_text().strip()
    assert token not in result.stdout + result.stderr
    hashed = "$7$x"
    assert readme_block("text", "pattern") == acl_text(
        [Device("dev-a", hashed, groups=("line-1",)), Device("dev-b", hashed)],
        [InferenceClient("client-c", hashed, targets=("dev-a", "line-1"))],
        Orchestrator("fleet", hashed))


def test_metrics_open_and_a_missing_tokens_file(tmp_path: Path) -> None:
    from tests.cli import edgerun
    from tests.serving import running_server
    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 2], seed=1))
    refused = edgerun("serve", "--repository", str(repo), "--api-keys", str(tmp_path / "nope"))
    assert refused.returncode == 2 and "tokens file" in refused.stderr and "nope" in refused.stderr
    create_token("read", tmp_path / "tokens", tmp_path / "read.secret")
    with running_server(repo, "--api-keys", str(tmp_path / "tokens"), "--metrics",
                        "open") as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/mlp").status_code == 401


def test_api_keys_guard_grpc_through_the_same_hook(tmp_path) -> None:
    """`--api-keys` and `--grpc-port` together: gRPC metadata `authorization` is checked by the
    same hook chain as HTTP; health probes stay open."""
    import grpc
    import tritonclient.grpc as triton_grpc

    from tests.serving import running_server

    repo = tmp_path / "models"
    add_version(repo, "mlp", "1", mlp_onnx([4, 8, 2], seed=1))
    tokens = tmp_path / "tokens"
    create_token("read", tokens, tmp_path / "app.secret", name="app")
    key = read_secret(tmp_path / "app.secret")
    with running_server(repo, "--api-keys", str(tokens), grpc=True) as server:
        client = triton_grpc.InferenceServerClient(server.grpc_address)
        assert client.is_server_live() and client.is_server_ready()  # probes: no key
        tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        bearer = {"authorization": f"Bearer {key}"}  # gRPC metadata keys are lower-case
        for headers in ({}, {"authorization": f"Bearer {key}x"}):
            with pytest.raises(InferenceServerException) as info:
                client.infer("mlp", [tensor], headers=headers)
            assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED), info.value
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("mlp")
        assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        result = client.infer("mlp", [tensor], headers=bearer)
        assert result.as_numpy(result.get_response().outputs[0].name).shape == (1, 2)
        # bytes that are not a ModelInferRequest pass the same hook first: no key, no say
        with grpc.insecure_channel(server.grpc_address) as channel:
            garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for headers, code in (({}, grpc.StatusCode.UNAUTHENTICATED),
                                  (bearer, grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as caught:
                    garbage(b"\xff" * 16, metadata=list(headers.items()))
                assert caught.value.code() == code, caught.value
        assert key not in server.output()


def test_a_big_grpc_request_without_a_key_is_never_decoded(tmp_path) -> None:
    """A big gRPC request (millions of typed integers, converted one at a time on a worker
    thread) was decoded before the hook chain ran: a caller without a key made the server spend
    the decoding's CPU (0.2 to 0.5 s per 4 million INT64) before being told UNAUTHENTICATED.
    The hooks now run first, and only a call they let through is decoded."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    from tests.helpers import identity_onnx
    from tests.serving import running_server
    from tests.test_http_edges import cpu_ticks

    repo = tmp_path / "models"
    add_version(repo, "identity", "1", identity_onnx("int64", ["b", "n"]))
    tokens = tmp_path / "tokens"
    create_token("read", tokens, tmp_path / "app.secret", name="app")
    bearer = [("authorization", f"Bearer {read_secret(tmp_path / 'app.secret')}")]

    def request(count: int) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="identity")
        tensor = message.inputs.add(name="x", datatype="INT64", shape=[1, count])
        tensor.contents.int64_contents.extend(range(count))
        return message

    big = request(4_000_000)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with running_server(repo, "--api-keys", str(tokens), grpc=True) as server, \
            grpc.insecure_channel(server.grpc_address, options=options) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        assert list(infer(request(8), metadata=bearer).outputs[0].contents.int64_contents) == \
            list(range(8))  # loaded and warm

        def off_loop_ticks(metadata) -> tuple[int, object]:
            """CPU ticks (10 ms each: work, not waiting, whatever the host's load) the server's
            threads but the event loop's spent on the big request (grpcio receives and parses
            it on the loop's thread, for every caller), and its outcome."""
            loop, total = cpu_ticks(server.process.pid)
            try:
                outcome = infer(big, metadata=metadata)
            except grpc.RpcError as exc:
                outcome = exc.code()
            loop_after, total_after = cpu_ticks(server.process.pid)
            return (total_after - loop_after) - (total - loop), outcome

        refused, code = off_loop_ticks([])
        assert code == grpc.StatusCode.UNAUTHENTICATED
        refused_bad, code = off_loop_ticks([("authorization", bearer[0][1] + "x")])
        assert code == grpc.StatusCode.UNAUTHENTICATED
        answered, answer = off_loop_ticks(bearer)
        values = answer.outputs[0].contents.int64_contents
        assert len(values) == 4_000_000 and values[-1] == 3_999_999
    # the worker decodes (about half of the answered request's ticks off the loop) and encodes
    # the answer: decoded before the hooks, each refusal took 0.4 to 0.6 of the answer's ticks
    assert max(refused, refused_bad) * 4 < answered, (refused, refused_bad, answered)


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/a:b/infer"])
def test_a_body_without_a_key_is_refused_before_it_is_read(secured, path) -> None:
    """The body was read, and inflated, before the hook chain ran: a caller without a key made
    the server hold up to --max-body-bytes a request (16 gzip bodies of 60 KB, each inflating
    to 60 MiB, took it from 0.1 to 1.3 GB) before it was told 401. The hooks now run first, so
    the 401 comes as soon as the head is in, the body unread (the lean app and, for a name the
    lean table does not take, the FastAPI app); the connection stays usable."""
    import gzip
    import socket

    server, _, secrets = secured
    bomb = gzip.compress(b"\0" * (60 << 20))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                     f"Content-Length: {len(bomb)}\r\n\r\n".encode())
        with sock.makefile("rb") as answer:  # before a byte of the body is sent
            assert answer.readline() == b"HTTP/1.1 401 Unauthorized\r\n"
            length = 0
            while (line := answer.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                length = int(value) if name.lower() == "content-length" else length
            assert b"bearer token is required" in answer.read(length)
            # the body, then a request with a key, on the same connection
            request = json.dumps(BODY).encode()
            sock.sendall(bomb + f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {secrets['app']}\r\n"
                         f"Content-Length: {len(request)}\r\n\r\n".encode() + request)
            assert answer.readline() == b"HTTP/1.1 200 OK\r\n"
