"""The registry behind tokens and device credentials: a real `edgerun fleet serve` process."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.adapters.auth.tokens import create_token, read_secret
from edgerun.examples import mlp_onnx
from edgerun.runtime import signing
from tests.cli import edgerun, edgerun_command
from tests.fleet_sim import Broker, FleetServer, SimDevice, make_bundle, wait_for
from tests.mosquitto_broker import Peer
from tests.mosquitto_broker import broker as broker_on  # the test's `broker` is a fixture's
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (the fixture)
from tests.serving import free_port

# every route but health, with the scope it needs
ROUTES = [("POST", "/bundles", "admin"), ("GET", "/bundles", "read"),
          ("GET", "/bundles/m/1", "read"), ("GET", "/devices", "read"),
          ("POST", "/rollouts", "deploy"), ("GET", "/rollouts", "read"),
          ("GET", "/rollouts/r1", "read"), ("POST", "/rollouts/r1/abort", "deploy"),
          ("POST", "/devices/dev-q/enroll", "admin"), ("POST", "/devices/dev-q/revoke", "admin"),
          ("GET", "/credentials", "admin"), ("POST", "/rollouts/r1/rollback", "admin")]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet-auth")
    key, pub = signing.generate_keys(tmp / "keys")
    tokens = tmp / "tokens"
    secrets = {}
    for scope in ("read", "deploy", "admin"):
        create_token(scope, tokens, tmp / f"{scope}.secret", name=f"{scope}-key")
        secrets[scope] = tmp / f"{scope}.secret"
    broker = Broker(tmp / "broker")
    broker.start()
    server = FleetServer(tmp / "fleet", broker, [pub], ["--tokens", str(tokens)]).start()
    bundle = make_bundle(tmp / "bundles", mlp_onnx([8, 16, 4], seed=1), "m", "1", key)
    yield {"server": server, "secrets": secrets, "bundle": bundle, "tmp": tmp,
           "broker": broker, "key": key, "pub": pub}
    server.stop()
    broker.stop()


def call(server, method, path, token=None, **kw):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def test_health_is_open_and_every_other_route_needs_a_token(secured):
    server = secured["server"]
    assert call(server, "GET", "/health").status_code == 200
    for method, path, scope in ROUTES:
        answer = call(server, method, path)
        assert answer.status_code == 401, (method, path, answer.text)
        assert "bearer token" in answer.json()["error"]
        wrong = call(server, method, path, "edgerun_not-a-token")
        assert wrong.status_code == 401, (method, path)


def test_a_token_too_small_is_403_and_a_large_enough_one_passes(secured):
    server, secrets = secured["server"], secured["secrets"]
    read = read_secret(secrets["read"])
    for method, path, scope in ROUTES:
        answer = call(server, method, path, read)
        if scope == "read":
            assert answer.status_code not in (401, 403), (method, path, answer.text)
        else:
            assert answer.status_code == 403, (method, path, answer.text)
            assert "has scope 'read'" in answer.json()["error"]
    deploy = read_secret(secrets["deploy"])
    assert call(server, "POST", "/bundles", deploy, content=b"x").status_code == 403
    # deploy passes the check: the answer is about the missing rollout, not the token
    assert call(server, "POST", "/rollouts/r1/abort", deploy).status_code == 404


def test_cli_clients_send_tokens_and_say_which_refusal(secured, tmp_path):
    server, secrets, bundle = secured["server"], secured["secrets"], secured["bundle"]
    refused = edgerun("fleet", "push", str(bundle), "--server", server.url)
    assert refused.returncode != 0
    assert "401" in refused.stderr and "--token-file" in refused.stderr
    refused = edgerun("fleet", "push", str(bundle), "--server", server.url,
                      "--token-file", str(secrets["read"]))
    assert refused.returncode != 0 and "403" in refused.stderr, refused.stderr
    pushed = edgerun("fleet", "push", str(bundle), "--server", server.url,
                     "--token-file", str(secrets["admin"]))
    assert pushed.returncode == 0, pushed.stderr
    refused = edgerun("fleet", "abort", "r1", "--server", server.url,
                      "--token-file", str(secrets["read"]))
    assert refused.returncode != 0 and "403" in refused.stderr
    env = {"EDGERUN_TOKEN": read_secret(secrets["read"])}
    status = edgerun("fleet", "status", "--json", "--server", server.url, env=env)
    assert status.returncode == 0, status.stderr
    listed = json.loads(status.stdout)
    assert [(v["model"], v["version"]) for v in listed["models"]] == [("m", "1")]
    assert "devices" in listed and "rollouts" in listed
    secret = read_secret(secrets["admin"])
    assert secret not in (secured["tmp"] / "fleet" / "server.log").read_text()


def test_without_tokens_fleet_serve_refuses_a_public_address(tmp_path):
    pub = signing.generate_keys(tmp_path / "keys")[1]
    refused = edgerun("fleet", "serve", "--data", str(tmp_path / "d"), "--broker",
                      "mqtt://127.0.0.1:1", "--host", "0.0.0.0", "--trust", str(pub),
                      timeout=60)
    assert refused.returncode != 0
    assert "without --tokens" in refused.stderr


def test_devices_fetch_only_their_own_jobs_bundles_and_revocation_is_immediate(secured):
    server, secrets, tmp = secured["server"], secured["secrets"], secured["tmp"]
    admin = ["--token-file", str(secrets["admin"])]
    device_secrets = {}
    for device in ("dev-a", "dev-b"):
        enrolled = edgerun("fleet", "enroll", device, "--server", server.url, *admin)
        assert enrolled.returncode == 0, enrolled.stderr
        device_secrets[device] = enrolled.stdout.strip()
        assert enrolled.stdout == device_secrets[device] + "\n"  # the secret alone
    refused = edgerun("fleet", "enroll", "dev-c", "--server", server.url,
                      "--token-file", str(secrets["deploy"]))
    assert refused.returncode != 0 and "403" in refused.stderr

    key, trusted = secured["key"], [signing.load_public_key(secured["pub"])]
    v2 = make_bundle(tmp / "bundles", mlp_onnx([8, 16, 4], seed=2), "m", "2", key)
    for bundle in (secured["bundle"], v2):
        assert edgerun("fleet", "push", str(bundle), "--server", server.url,
                       *admin).returncode == 0
    def fetch(device: str, secret: str, version: str = "2") -> httpx.Response:
        return httpx.get(f"{server.url}/bundles/m/{version}", auth=(device, secret), timeout=30)

    devices = [SimDevice(d, tmp / d, secured["broker"], trusted, secured["bundle"],
                         credential=device_secrets[d]).start() for d in ("dev-a", "dev-b")]
    try:
        read = read_secret(secrets["read"])
        wait_for(lambda: len(call(server, "GET", "/devices", read).json()) == 2, 30,
                 "both devices to report")
        done = edgerun("fleet", "deploy", "m:2", "--devices", "dev-a", "--server", server.url,
                       "--wait", env={"EDGERUN_TOKEN": read_secret(secrets["deploy"])},
                       timeout=120)
        # dev-a downloaded with its own credential (HTTP Basic) and runs version 2
        assert done.returncode == 0 and "completed" in done.stdout, done.stdout + done.stderr
        assert "2" in devices[0].repository.versions("m")
        assert fetch("dev-a", device_secrets["dev-a"]).status_code == 200
        other = fetch("dev-b", device_secrets["dev-b"])
        assert other.status_code == 403 and "dev-b" in other.json()["error"]
        # an explicit rollback (admin only) sends dev-a back to version 1
        rollout = call(server, "GET", "/rollouts", read).json()["rollouts"][0]["id"]
        refused = edgerun("fleet", "rollback", rollout, "--server", server.url,
                          "--token-file", str(secrets["deploy"]))
        assert refused.returncode != 0 and "403" in refused.stderr
        rolled = edgerun("fleet", "rollback", rollout, "--server", server.url, *admin)
        assert rolled.returncode == 0, rolled.stderr
        wait_for(lambda: devices[0].served("m") == ["1"], 60, "dev-a back on version 1")
    finally:
        for device in devices:
            device.close()

    assert fetch("dev-b", device_secrets["dev-a"]).status_code == 401  # only as itself
    assert fetch("dev-a", "wrong").status_code == 401
    revoked = edgerun("fleet", "revoke", "dev-a", "--server", server.url, *admin)
    assert revoked.returncode == 0, revoked.stderr
    answer = fetch("dev-a", device_secrets["dev-a"])
    assert answer.status_code == 401 and "revoked" in answer.json()["error"]
    log = (tmp / "fleet" / "server.log").read_text()
    assert not any(secret in log for secret in device_secrets.values())


def test_broker_files_from_enrolled_devices_on_a_real_mosquitto(secured, tmp_path):
    """The orchestrator logs in as its own user on the fleet's listener; an enrolled daemon
    logs in with its credential on the devices' listener, over TLS (its username its client
    id); a revoked one is refused once the files are regenerated and Mosquitto reloads."""
    from tests.test_mqtt import make_certificates

    tokens_dir, secrets = secured["tmp"], secured["secrets"]
    admin = ["--token-file", str(secrets["admin"])]
    port, fleet_port = free_port(), free_port()
    tls = make_certificates(tmp_path / "tls")
    (tmp_path / "fleet.password").write_text("orchestrator-secret\n")
    broker = SimpleNamespace(url=f"mqtt://fleet@127.0.0.1:{fleet_port}")  # started below
    server = FleetServer(tmp_path / "fleet", broker, [secured["pub"]], [
        "--tokens", str(tokens_dir / "tokens"), "--broker-password-file",
        str(tmp_path / "fleet.password")]).start()
    daemon = None
    try:
        enrolled = edgerun("fleet", "enroll", "dev-x", "--server", server.url, *admin)
        assert enrolled.returncode == 0, enrolled.stderr
        credential = tmp_path / "dev-x.secret"
        credential.write_text(enrolled.stdout)
        files = tmp_path / "broker"

        def regenerate() -> None:
            made = edgerun("fleet", "acl", "--server", server.url, "-o", str(files),
                           "--orchestrator-user", "fleet", "--orchestrator-password-file",
                           str(tmp_path / "fleet.password"), "--device-listener",
                           f"127.0.0.1:{port}", "--fleet-listener", f"127.0.0.1:{fleet_port}",
                           "--device-certfile", tls["cert"], "--device-keyfile", tls["key"],
                           *admin)
            assert made.returncode == 0, made.stderr
            # TLS is in the file each regeneration writes (not lines to append by hand)
            assert f"certfile {tls['cert']}" in (files / "mosquitto.conf").read_text()

        regenerate()
        passwd = (files / "passwd").read_text()
        assert passwd.startswith("dev-x:$7$") and "fleet:" not in passwd
        assert (files / "fleet.passwd").read_text().startswith("fleet:$7$")
        assert enrolled.stdout.strip() not in passwd
        with broker_on(files, port, listening=True) as (_, process):
            models = tmp_path / "models"
            models.mkdir()
            daemon = subprocess.Popen(
                [*edgerun_command(), "daemon", "--repository", str(models), "--broker",
                 f"mqtts://127.0.0.1:{port}", "--ca-file", tls["ca"], "--device-id", "dev-x",
                 "--trust",
                 str(secured["pub"]), "--credential", str(credential)],
                stdout=(tmp_path / "daemon.log").open("wb"), stderr=subprocess.STDOUT)
            read = read_secret(secrets["read"])
            # the daemon's status reached the orchestrator: both logged in, the ACL let it
            wait_for(lambda: any(d["device_id"] == "dev-x" and d["state"] == "online"
                                 for d in call(server, "GET", "/devices", read).json()),
                     30, "dev-x online through the secured broker")
            assert Peer(port, "dev-x", "not-the-secret", ca=tls["ca"]).accepted is False
            assert not Peer(fleet_port, "dev-x", enrolled.stdout.strip()).accepted
            daemon.terminate()  # dev-x has one session, whatever its client id: the peer's
            daemon.wait(15)
            daemon = None
            # a device reports only as itself: the ACL drops a report under another's name
            watcher = Peer(fleet_port, "fleet", "orchestrator-secret")
            watcher.subscribe("edgerun/+/ota/report")
            device = Peer(port, "dev-x", enrolled.stdout.strip(), ca=tls["ca"])
            device.publish("edgerun/dev-y/ota/report", b"{}")
            assert watcher.nothing()
            device.publish("edgerun/dev-x/ota/report", b"{}")
            assert watcher.received()[0] == "edgerun/dev-x/ota/report"
            device.close()
            watcher.close()
            revoked = edgerun("fleet", "revoke", "dev-x", "--server", server.url, *admin)
            assert revoked.returncode == 0, revoked.stderr
            regenerate()
            assert "dev-x" not in (files / "passwd").read_text()
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: refused(port, "dev-x", enrolled.stdout.strip(), tls["ca"]), 10,
                     "the revoked device to be refused")
            orchestrator = Peer(fleet_port, "fleet", "orchestrator-secret")
            assert orchestrator.accepted
            orchestrator.close()
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(15)
        server.stop()
    log = (tmp_path / "fleet" / "server.log").read_text()
    assert "orchestrator-secret" not in log and enrolled.stdout.strip() not in log


def refused(port: int, username: str, password: str, ca: str | None = None) -> bool:
    peer = Peer(port, username, password, ca=ca)
    peer.close()
    return not peer.accepted


def test_no_secret_reaches_the_registry_logs_under_load(secured, tmp_path):
    tmp, secrets = secured["tmp"], secured["secrets"]
    server = FleetServer(tmp_path / "fleet", secured["broker"], [secured["pub"]], [
        "--tokens", str(tmp / "tokens"), "--log-level", "debug"]).start()
    try:
        admin = read_secret(secrets["admin"])
        device_secret = call(server, "POST", "/devices/dev-z/enroll", admin).json()["secret"]
        tokens = {scope: read_secret(path) for scope, path in secrets.items()}
        wrong = [tokens["read"][:-2] + "zz", "edgerun_" + "B" * 43]
        plans = [("GET", "/rollouts", {"authorization": f"Bearer {tokens['read']}"}, 200),
                 ("POST", "/bundles", {"authorization": f"Bearer {tokens['deploy']}"}, 403),
                 *[("GET", "/devices", {"authorization": f"Bearer {w}"}, 401) for w in wrong],
                 ("GET", "/bundles/m/1", {"authorization": basic_header("dev-z", device_secret)},
                  403),
                 ("GET", "/bundles/m/1", {"authorization": basic_header("dev-z", "nope")}, 401)]

        def one(n: int) -> tuple[int, int]:
            method, path, headers, expected = plans[n % len(plans)]
            return client.request(method, path, headers=headers).status_code, expected

        with httpx.Client(base_url=server.url, timeout=30) as client, \
                ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(240)))
        assert all(got == expected for got, expected in answers)
    finally:
        server.stop()
    log = (tmp_path / "fleet" / "server.log").read_text()
    assert "refused GET /devices" in log and "loaded 3 tokens" in log  # the log saw them
    for secret in [*tokens.values(), *wrong, device_secret]:
        assert secret not in log
        assert secret.removeprefix("edgerun_")[:16] not in log
    assert basic_header("dev-z", device_secret).split()[1] not in log


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_without_tokens_fleet_serve_says_it_is_in_development_mode(secured, tmp_path):
    server = FleetServer(tmp_path / "fleet", secured["broker"], [secured["pub"]]).start()
    try:
        assert call(server, "GET", "/rollouts").status_code == 200  # open, on loopback only
    finally:
        server.stop()
    log = (tmp_path / "fleet" / "server.log").read_text()
    assert "development mode: no --tokens, so listening on 127.0.0.1 only" in log


def test_enrol_takes_groups_as_a_list_of_names_only(secured):
    """Groups decide whose shared requests a device reads: `"groups": "field"` must not grant
    the groups f, i, e, l and d, nor a number become a group."""
    server, secrets = secured["server"], secured["secrets"]
    admin = read_secret(secrets["admin"])
    for groups in ("field", [1], {"field": 1}, None):
        answer = call(server, "POST", "/devices/dev-g/enroll", admin, json={"groups": groups})
        assert answer.status_code == 400, (groups, answer.text)
        assert "list of group names" in answer.json()["error"]
    enrolled = {d["device_id"] for d in call(server, "GET", "/credentials", admin).json()}
    assert "dev-g" not in enrolled
    answer = call(server, "POST", "/devices/dev-g/enroll", admin, json={"groups": ["field"]})
    assert answer.status_code == 201 and answer.json()["groups"] == ["field"]
    assert call(server, "POST", "/devices/dev-g/revoke", admin).status_code == 200


def test_no_device_or_group_is_enrolled_under_the_fleets_own_mqtt_username(secured, tmp_path):
    """A device (or group) enrolled under the orchestrator's MQTT username was accepted, and
    every `fleet acl` after it failed with "username 'fleet' appears twice" until it was
    revoked. Enrolment refuses the name up front; `fleet acl` names the device and the way
    out for one enrolled before (by a registry that did not know the name)."""
    admin = ["--token-file", str(secured["secrets"]["admin"])]
    (tmp_path / "fleet.password").write_text("orchestrator-secret\n")
    broker = SimpleNamespace(url=f"mqtt://fleet@127.0.0.1:{free_port()}")  # never reached
    server = FleetServer(tmp_path / "fleet", broker, [secured["pub"]], [
        "--tokens", str(secured["tmp"] / "tokens"), "--broker-password-file",
        str(tmp_path / "fleet.password")]).start()
    try:
        for extra in (["fleet"], ["dev-f", "--group", "fleet"]):
            refused = edgerun("fleet", "enroll", *extra, "--server", server.url, *admin)
            assert refused.returncode != 0 and refused.stdout == "", refused.stdout
            assert "'fleet' is the fleet's own MQTT username" in refused.stderr, refused.stderr
        assert call(server, "GET", "/credentials",
                    read_secret(secured["secrets"]["admin"])).json() == []
    finally:
        server.stop()
    # the shared registry has no broker username: it enrols "orch", then the operator names
    # the orchestrator "orch" in fleet acl
    server = secured["server"]
    assert edgerun("fleet", "enroll", "orch", "--server", server.url, *admin).returncode == 0
    try:
        made = edgerun("fleet", "acl", "--server", server.url, "-o", str(tmp_path / "files"),
                       "--orchestrator-user", "orch", "--orchestrator-password-file",
                       str(tmp_path / "fleet.password"), *admin)
        assert made.returncode != 0 and not (tmp_path / "files" / "acl").exists()
        assert "device 'orch' has the orchestrator's username" in made.stderr, made.stderr
        assert "edgerun fleet revoke orch" in made.stderr, made.stderr
    finally:
        assert edgerun("fleet", "revoke", "orch", "--server", server.url, *admin).returncode == 0


def test_a_rollout_body_that_is_not_an_object_is_a_400_not_a_500(secured):
    server, secrets = secured["server"], secured["secrets"]
    deploy = read_secret(secrets["deploy"])
    for body in (b"[1]", b'["model", "version"]', b'"m:1"', b"3"):
        answer = call(server, "POST", "/rollouts", deploy, content=body)
        assert answer.status_code == 400, (body, answer.text)
        assert "JSON body with model and version" in answer.json()["error"]


def test_cli_clients_send_no_token_to_another_host_they_are_redirected_to(secured):
    """urllib copies every header onto a redirect, wherever it points: a proxy in front of the
    registry that redirects elsewhere must not receive the operator's admin token."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"rollouts": [], "models": [], "devices": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(Elsewhere):
        def do_GET(self) -> None:  # same address, other host name: another origin
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    front = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (other, front):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status = edgerun("fleet", "status", "--json", "--server",
                         f"http://127.0.0.1:{front.server_port}",
                         "--token-file", str(secured["secrets"]["admin"]))
    finally:
        for server in (other, front):
            server.shutdown()
            server.server_close()
    assert status.returncode == 0, status.stderr
    assert seen == [None]


def test_a_token_with_a_stray_newline_is_sent_trimmed_or_refused_never_echoed(secured, tmp_path):
    """A token from a Kubernetes secret or `echo` ends in a newline: http.client refused the
    header with the whole value in its message, so the CLI printed the admin token to
    stderr (a CI log). Trailing whitespace is trimmed, as from a token file; one inside the
    token is refused, naming where it came from, not the token."""
    server, secrets = secured["server"], secured["secrets"]
    read = read_secret(secrets["read"])
    status = edgerun("fleet", "status", "--json", "--server", server.url,
                     env={"EDGERUN_TOKEN": read + "\n"})
    assert status.returncode == 0, status.stderr
    broken = tmp_path / "broken.secret"
    broken.write_text(read + "\n# made on the ops laptop\n")
    broken.chmod(0o600)
    for refused in (edgerun("fleet", "status", "--server", server.url,
                            env={"EDGERUN_TOKEN": read[:10] + "\n" + read[10:]}),
                    edgerun("fleet", "status", "--server", server.url, "--token-file",
                            str(broken))):
        assert refused.returncode == 2, refused.stderr
        assert read not in refused.stderr and read[10:] not in refused.stderr
        assert "Traceback" not in refused.stderr
        assert "whitespace" in refused.stderr, refused.stderr


def test_cli_ids_that_are_no_url_segment_get_the_servers_answer_not_a_traceback(secured):
    """A rollout or device id goes into the URL's path: one with a space (a paste, a typo)
    ended the client in http.client's InvalidURL traceback, one with '?' or '#' asked another
    route. Each is sent as one segment, so the server names what is wrong with it."""
    server, secrets = secured["server"], secured["secrets"]
    admin = ["--server", server.url, "--token-file", str(secrets["admin"])]
    for command, expected in ((("status", "my rollout"), "no rollout 'my rollout'"),
                              (("abort", "r1?x"), "no rollout 'r1?x'"),
                              (("enroll", "pi 1"), "device id 'pi 1' must be"),
                              (("revoke", "pi-1#x"), "no enrolled device 'pi-1#x'")):
        answer = edgerun("fleet", *command, *admin)
        assert answer.returncode == 2, (command, answer.stderr)
        assert "Traceback" not in answer.stderr and expected in answer.stderr, answer.stderr


def test_cli_clients_name_the_server_whose_answer_is_not_the_registrys():
    """--server at another web server (a proxy's page, a dashboard) printed the JSON parser's
    "Expecting value: line 1 column 1 (char 0)", untyped and naming no URL; an answer cut off
    before its head, http.client's words alone. Each is one line naming the URL."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotARegistry(BaseHTTPRequestHandler):
        def answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/rollouts/cut"):  # closed before any answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.answer(200, b"<html><body>Dashboard</body></html>", "text/html")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(502, b'"Bad gateway"', "application/json")

        def log_message(self, *args) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), NotARegistry)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{other.server_port}"
    try:
        answers = {
            ("status", "--server", url): f"{url}/rollouts: the answer (text/html, 35 bytes) "
                                         "is not JSON: is --server an edgerun fleet registry?",
            ("deploy", "m:1", "--server", url): f"{url}/rollouts: HTTP 502: Bad Gateway",
            ("status", "cut", "--server", url): f"{url}/rollouts/cut: Remote end closed "
                                                "connection without response"}
        for args, message in answers.items():
            result = edgerun("fleet", *args, timeout=60)
            assert (result.returncode, result.stderr) == (2, f"error (fleet_error): {message}\n")
    finally:
        other.shutdown()
        other.server_close()


def test_cli_clients_refuse_a_server_url_that_is_not_http():
    """urllib opens ftp:// (two minutes to time out against a web server) and file:// (a
    local file read as the registry's answer): --server names what it must be, sending
    nothing."""
    port = free_port()
    for server, scheme in ((f"ftp://127.0.0.1:{port}", ", not ftp://"),
                           ("file:///etc/hostname", ", not file://"),
                           (f"127.0.0.1:{port}", "")):
        result = edgerun("fleet", "status", "--server", server, timeout=60)
        assert (result.returncode, result.stderr) == (
            2, f"error (fleet_error): --server {server}: the registry's URL is "
               f"http://HOST:PORT or https://HOST:PORT{scheme}\n")


def test_cli_clients_name_the_server_whose_json_is_not_the_registrys(tmp_path):
    """JSON of another shape (`{}`, `[]`, a number where the rollouts go) ended each client
    in a KeyError or TypeError traceback; `revoke` said the device was revoked, `acl`
    read `{}` as no devices, writing broker files that admit none, and `status --json` printed
    it. Each is one line naming the URL, and nothing is written."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class WrongShape(BaseHTTPRequestHandler):
        body = b"{}"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.do_GET()

        def log_message(self, *args) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), WrongShape)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{other.server_port}"
    bundle = tmp_path / "m.tar.gz"
    bundle.write_bytes(b"not looked at by the client")
    out = tmp_path / "broker"
    cases = [
        (b"{}", ("status",), "/rollouts", "no 'rollouts'"),
        (b'{"rollouts": 5}', ("status",), "/rollouts", "'int' object is not iterable"),
        (b"[]", ("status", "r1"), "/rollouts/r1",
         "list indices must be integers or slices, not str"),
        # --json printed whatever JSON came, as if it were the registry's
        (b"{}", ("status", "--json"), "/rollouts", "no 'rollouts'"),
        (b'{"rollouts": [], "devices": []}', ("status", "--json"), "/rollouts", "no 'models'"),
        (b'{"id": "r1"}', ("status", "r1", "--json"), "/rollouts/r1", "no 'model'"),
        (b"{}", ("deploy", "m:1", "--wait"), "/rollouts", "no 'id'"),
        (b"{}", ("abort", "r1"), "/rollouts/r1/abort", "no 'id'"),
        (b"{}", ("rollback", "r1"), "/rollouts/r1/rollback", "no 'id'"),
        (b"{}", ("enroll", "dev-q"), "/devices/dev-q/enroll", "no 'secret'"),
        (b'{"ok": true}', ("revoke", "dev-q"), "/devices/dev-q/revoke", "no 'revoked'"),
        (b"{}", ("acl", "-o", str(out)), "/credentials",
         "a list of devices was expected, not dict"),
        (b"{}", ("push", str(bundle)), "/bundles", "no 'created'")]
    try:
        for body, args, path, why in cases:
            WrongShape.body = body
            result = edgerun("fleet", *args, "--server", url, timeout=60)
            assert (result.returncode, result.stderr) == (
                2, f"error (fleet_error): {url}{path}: the answer is JSON but not the "
                   f"registry's ({why}): is --server an edgerun fleet registry?\n"), args
            assert result.stdout == "", args
        assert not out.exists()
        # text in the registry's shape is shown as text: `[/x]` was a rich MarkupError
        WrongShape.body = json.dumps({
            "id": "r[/x]", "model": "m[/x]", "version": "1[/x]", "state": "running[/x]",
            "wave": 0, "waves": 1, "reason": None, "counts": {}, "devices": 0, "jobs": []}).encode()
        result = edgerun("fleet", "status", "r1", "--server", url, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "rollout r[/x] m[/x] version 1[/x]: running[/x]" in result.stdout, result.stdout
        WrongShape.body = json.dumps({"models": [], "devices": [], "rollouts": [{
            "id": "r[/x]", "model": "m", "version": "1", "state": "done", "wave": 0,
            "waves": 1, "devices": 0, "counts": {}}]}).encode()
        result = edgerun("fleet", "status", "--server", url, timeout=60)
        assert result.returncode == 0 and "r[/x]" in result.stdout, result.stderr
    finally:
        other.shutdown()
        other.server_close()


def test_a_rollout_to_a_device_id_no_topic_can_hold_is_refused_and_the_fleet_goes_on(secured):
    """A rollout's device ids become MQTT topics (`edgerun/<id>/ota`). One holding a NUL or
    control character was accepted (201), and Mosquitto dropped the orchestrator's connection
    ("malformed packet") at its job, then again at every reconnect's republish: no device was
    heard and no rollout moved, for good; a wildcard or one too long for a topic was a 500,
    its rollout stored all the same. Each is a 400 naming it, and nothing is stored."""
    server, secrets = secured["server"], secured["secrets"]
    pushed = edgerun("fleet", "push", str(secured["bundle"]), "--server", server.url,
                     "--token-file", str(secrets["admin"]))
    assert pushed.returncode == 0, pushed.stderr
    deploy, read = read_secret(secrets["deploy"]), read_secret(secrets["read"])
    before = len(call(server, "GET", "/rollouts", read).json()["rollouts"])
    for device in ("dev\u0000a", "dev\na", "dev\u0085", "dev\ufffe", "+", "dev#", "a/b",
                   "d" * 70000):
        answer = call(server, "POST", "/rollouts", deploy,
                      json={"model": "m", "version": "1", "devices": ["dev-fine", device]})
        assert answer.status_code == 400, (device[:20], answer.text)
        assert "must be a list of device ids" in answer.json()["error"]
    assert len(call(server, "GET", "/rollouts", read).json()["rollouts"]) == before
    watcher = Peer(secured["broker"].port, "watcher", "")
    try:
        watcher.subscribe("edgerun/dev-topic/ota")
        answer = call(server, "POST", "/rollouts", deploy,
                      json={"model": "m", "version": "1", "devices": ["dev-topic"]})
        assert answer.status_code == 201, answer.text
        topic, payload = watcher.received(timeout=15)  # the link is up: the job went out
        assert topic == "edgerun/dev-topic/ota" and json.loads(payload)["version"] == "1"
    finally:
        watcher.close()
        call(server, "POST", f"/rollouts/{answer.json()['id']}/abort", deploy)
    assert "Traceback" not in (secured["tmp"] / "fleet" / "server.log").read_text()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_nul_in_an_id_or_a_device_credential_is_a_4xx_on_either_database(secured, tmp_path,
                                                                           request, db):
    """PostgreSQL stores no NUL (0x00) in text: an id with one in the path, a rollout's group,
    or the device id of a Basic credential (before any secret was checked) reached it and came
    back a 500 with psycopg's traceback in the log. Each is refused as the caller's input, the
    same on SQLite, and the registry goes on serving."""
    extra = ["--tokens", str(secured["tmp"] / "tokens")]
    if db == "postgresql":
        extra += ["--db", fresh_database(request.getfixturevalue("postgres_url"))]
    server = FleetServer(tmp_path / "fleet", secured["broker"], [secured["pub"]], extra).start()
    try:
        admin = read_secret(secured["secrets"]["admin"])
        secret = call(server, "POST", "/devices/dev-n/enroll", admin).json()["secret"]
        for header, path, status in (
                (basic_header("dev\0", "x"), "/bundles/m/1", 401),
                (basic_header("dev-n", secret), "/bundles/m%00/1", 400),
                (basic_header("dev-n", secret), "/bundles/m/1%00", 400),
                (f"Bearer {admin}", "/rollouts/r%00", (400, 404))):
            answer = httpx.get(server.url + path, headers={"authorization": header}, timeout=30)
            assert answer.status_code in (status if isinstance(status, tuple) else (status,)), \
                (path, answer.text)
            assert answer.json()["error"]
        for path, body in (("/rollouts/r%00/abort", None), ("/rollouts/r%00/rollback", None),
                           ("/devices/dev%00/revoke", None),
                           ("/rollouts", {"model": "m", "version": "1", "group": "g\0"})):
            answer = call(server, "POST", path, admin, json=body)
            assert 400 <= answer.status_code < 500, (path, answer.text)
            assert answer.json()["error"], path
        assert call(server, "GET", "/credentials", admin).status_code == 200
    finally:
        server.stop()
    log = (tmp_path / "fleet" / "server.log").read_text()
    assert "Traceback" not in log and secret not in log


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device=st.text(min_size=1, max_size=12))
def test_any_device_id_a_rollout_names_is_deployed_or_refused_never_a_500(secured, device):
    """Whatever text a rollout names as a device: a 201 for an id a topic can hold (the
    rollout aborted again here), else a 400 naming the rule; never a 500."""
    from edgerun.adapters.topics import topic_segment

    server, deploy = secured["server"], read_secret(secured["secrets"]["deploy"])
    answer = call(server, "POST", "/rollouts", deploy,
                  json={"model": "m", "version": "1", "devices": [device]})
    if answer.status_code == 201:
        assert topic_segment(device)
        call(server, "POST", f"/rollouts/{answer.json()['id']}/abort", deploy)
    elif topic_segment(device):  # run alone, before m 1 was pushed
        assert answer.status_code == 404 and "no m version 1" in answer.json()["error"]
    else:
        assert answer.status_code == 400, answer.text
        assert "must be a list of device ids" in answer.json()["error"]


def test_a_range_the_registry_cannot_serve_is_ignored_or_a_json_416_naming_it(secured, tmp_path):
    """A bundle download's Range of another unit, or a malformed one, got Starlette's plain-text
    400 (RFC 9110: ignore it, and send the whole file), and one past the end a plain-text 416;
    every other refusal of the registry is JSON. The ranges an OTA agent resumes with stay
    byte-exact."""
    from edgerun.adapters.ota.download import download

    server, secrets = secured["server"], secured["secrets"]
    pushed = edgerun("fleet", "push", str(secured["bundle"]), "--server", server.url,
                     "--token-file", str(secrets["admin"]))
    assert pushed.returncode == 0, pushed.stderr
    read = {"authorization": f"Bearer {read_secret(secrets['read'])}"}
    url = f"{server.url}/bundles/m/1"

    def get(asked: str, **extra: str) -> httpx.Response:
        return httpx.get(url, headers={**read, "range": asked, **extra}, timeout=30)

    whole = httpx.get(url, headers=read, timeout=30)
    body, size, etag = whole.content, len(whole.content), whole.headers["etag"]
    for asked in ("bytes=abc", "items=0-5", "bytes", "bytes=", "bytes=5-3", "bytes=0-5,x",
                  "bytes=-", "bytes=1-2-3", "bytes=" + ",".join(["0-1"] * 101)):
        answer = get(asked)
        assert (answer.status_code, answer.content) == (200, body), asked
    for asked in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0",
                  f"bytes={size}-,{size + 5}-"):
        answer = get(asked)
        assert answer.status_code == 416, (asked, answer.text)
        assert answer.headers["content-range"] == f"bytes */{size}"
        assert answer.json() == {"error": f"range {asked!r} is not satisfiable: m version 1 "
                                          f"is {size} bytes"}
    assert get(f"bytes={size}-", **{"if-range": '"other"'}).content == body  # stale: whole
    for asked, part in (("bytes=100-", body[100:]), ("bytes=0-9", body[:10]),
                        ("bytes=-20", body[-20:]), (f"bytes=10-{size * 2}", body[10:]),
                        (f"BYTES=0-9 , {size}-", body[:10])):
        answer = get(asked, **{"if-range": etag})
        assert (answer.status_code, answer.content) == (206, part), asked
    dest = tmp_path / "m-1.tar.gz"
    dest.with_name(dest.name + ".part").write_bytes(body[:700])
    sha256 = etag.strip('"')
    assert download(url, dest, sha256, size, headers=read) == size - 700
    assert dest.read_bytes() == body


def test_a_rollout_or_enrolment_body_over_the_limit_is_a_413_unread(secured):
    """Rollout and enrolment bodies were read whole, however large: a runaway client (or a
    Content-Length of gigabytes, then a trickle) held the registry's memory, or a request open
    for as long as it kept sending. Over `MAX_JSON_BYTES` is a 413 naming the limit, from the
    Content-Length before a byte is read, else once the body passes it."""
    import http.client

    from edgerun.adapters.http.registry import MAX_JSON_BYTES

    server, secrets = secured["server"], secured["secrets"]
    host, port = server.url.removeprefix("http://").split(":")

    def post(path: str, scope: str, body, headers: dict[str, str]) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        try:
            if isinstance(body, bytes):  # a head that promises more than is sent
                connection.putrequest("POST", path)
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.putheader("Authorization", f"Bearer {read_secret(secrets[scope])}")
                connection.endheaders(body)
            else:
                connection.request("POST", path, body=body, encode_chunked=True, headers={
                    **headers, "Authorization": f"Bearer {read_secret(secrets[scope])}"})
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            connection.close()

    huge = {"Content-Type": "application/json", "Content-Length": str(5 << 30)}
    for path, scope, what in (("/rollouts", "deploy", "rollout"),
                              ("/devices/dev-big/enroll", "admin", "enrolment")):
        assert post(path, scope, b'{"model": "m", "version": "1", "groups": [', huge) == (
            413, {"error": f"{what} of {5 << 30} bytes is over the {MAX_JSON_BYTES}-byte "
                           "limit"}), path
    # no Content-Length: a chunked body, refused once past the limit
    names = [f'"dev-{i:07d}"'.encode() for i in range(MAX_JSON_BYTES // 12 + 10)]
    chunks = [b'{"model": "nosuch", "version": "1", "devices": [', b",".join(names), b"]}"]
    chunked = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    assert post("/rollouts", "deploy", iter(chunks), chunked) == (
        413, {"error": f"rollout is over the {MAX_JSON_BYTES}-byte limit"})
    admin = read_secret(secrets["admin"])
    assert "dev-big" not in {d["device_id"] for d in
                             call(server, "GET", "/credentials", admin).json()}
    assert call(server, "GET", "/health").status_code == 200


def test_unknown_routes_and_wrong_methods_are_json_errors_with_allow(secured):
    """An unknown route or a wrong method got Starlette's plain text ("Not Found", "Method Not
    Allowed"), and the Allow of a path with a route per method named the first route's alone
    (`DELETE /bundles`: "POST", though GET lists them). Each is a JSON error naming the path or
    the method, as every other refusal of the registry and the inference server's own; a 405's
    Allow names every method the path takes."""
    server, secrets = secured["server"], secured["secrets"]
    admin = read_secret(secrets["admin"])
    answer = call(server, "GET", "/nowhere", admin)
    assert answer.status_code == 404, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": "no route /nowhere"}
    assert call(server, "GET", "/bundles/m/1/x").json() == {"error": "no route /bundles/m/1/x"}
    for method, path, allowed in (("DELETE", "/bundles", "GET, HEAD, POST"),
                                  ("PUT", "/rollouts", "GET, HEAD, POST"),
                                  ("GET", "/rollouts/r1/abort", "POST"),
                                  ("DELETE", "/rollouts/r1", "GET, HEAD"),
                                  ("POST", "/devices", "GET, HEAD"),
                                  ("POST", "/health", "GET, HEAD"),
                                  ("DELETE", "/credentials", "GET, HEAD"),
                                  ("POST", "/bundles/m/1", "GET, HEAD")):
        answer = call(server, method, path, admin)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["allow"] == allowed, (method, path)
        assert answer.json() == {"error": f"method {method} is not allowed on {path}"}
    assert call(server, "HEAD", "/health").status_code == 200
    assert call(server, "GET", "/devices", admin).status_code == 200
