"""Bearer tokens and the API-key hook: hashed at rest, reloaded live, on every route."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerun.adapters.auth import ApiKeyHook, TokenStore, create_token, revoke_token
from edgerun.adapters.auth.tokens import basic, bearer, read_secret
from edgerun.adapters.dataplane import Call, DataPlane
from edgerun.adapters.dataplane import call as routes
from edgerun.adapters.http.status import error_headers, status_of
from edgerun.cli import main
from edgerun.examples import mlp_onnx
from edgerun.runtime.errors import InvalidInput, PermissionDenied, Unauthenticated
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from tests.serving import add_version


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    tokens = tmp_path / "tokens"
    secrets = {}
    for scope in ("read", "deploy", "admin"):
        create_token(scope, tokens, tmp_path / f"{scope}.secret", name=f"{scope}-key")
        secrets[scope] = read_secret(tmp_path / f"{scope}.secret")
    return tokens, secrets


def test_only_hashes_reach_the_tokens_file(tmp_path: Path, keys) -> None:
    tokens, secrets = keys
    text = tokens.read_text()
    assert all(secret not in text for secret in secrets.values())
    assert len(text.splitlines()) == 3 and text.startswith("read sha256:")
    assert (tmp_path / "admin.secret").stat().st_mode & 0o777 == 0o600
    assert tokens.stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidInput, match="refusing to overwrite"):
        create_token("read", tokens, tmp_path / "admin.secret")
    with pytest.raises(InvalidInput, match="already has a token named"):
        create_token("read", tokens, tmp_path / "other.secret", name="admin-key")
    with pytest.raises(InvalidInput, match="scope 'root'"):
        create_token("root", tokens, tmp_path / "x.secret")


def test_scopes_nest(keys) -> None:
    tokens, secrets = keys
    store = TokenStore(tokens)
    for granted in ("read", "deploy", "admin"):
        for needed in ("read", "deploy", "admin"):
            order = ("read", "deploy", "admin")
            if order.index(granted) >= order.index(needed):
                assert store.check(secrets[granted], needed).name == f"{granted}-key"
            else:
                with pytest.raises(PermissionDenied, match=f"{granted}-key"):
                    store.check(secrets[granted], needed)
    for missing in (None, ""):
        with pytest.raises(Unauthenticated, match="required"):
            store.check(missing, "read")
    with pytest.raises(Unauthenticated, match="not valid") as refused:
        store.check(secrets["admin"][:-1] + "x", "read")
    assert secrets["admin"][:-1] not in str(refused.value)


def test_no_other_string_is_a_token(keys) -> None:
    tokens, secrets = keys
    store = TokenStore(tokens)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80) | st.sampled_from(list(secrets.values())).map(lambda s: s[:-1]))
    def check(text: str) -> None:
        assert store.authenticate(text) is None

    check()
    assert {store.authenticate(s).scope for s in secrets.values()} == set(secrets)


def test_the_file_reloads_without_a_restart(tmp_path: Path, keys) -> None:
    tokens, secrets = keys
    store = TokenStore(tokens)
    create_token("read", tokens, tmp_path / "new.secret", name="new-key")  # appended
    assert store.check(read_secret(tmp_path / "new.secret"), "read").name == "new-key"
    tokens.chmod(0o640)  # readable by the server's group: revoking keeps that
    revoke_token(tokens, "admin-key")  # renamed over: a new inode
    assert tokens.stat().st_mode & 0o777 == 0o640
    with pytest.raises(Unauthenticated):
        store.check(secrets["admin"], "read")
    assert store.check(secrets["deploy"], "deploy").name == "deploy-key"
    # an in-place edit that keeps size and inode still shows in the mtime
    before = tokens.read_text()
    tokens.write_text(before.replace("deploy sha256", "admin  sha256", 1))
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.check(secrets["deploy"], "admin").name == "deploy-key"
    # a torn or bad line costs that line only; a vanished file grants nothing
    with tokens.open("a") as sink:
        sink.write("admin sha256:abc half-written\n")
    assert store.check(secrets["read"], "read").name == "read-key"
    with tokens.open("ab") as raw:  # not UTF-8: once a 500 on every request
        raw.write(b"# caf\xe9\nadmin sha256:" + b"\xff" * 64 + b" bad-bytes\n")
    assert store.check(secrets["read"], "read").name == "read-key"
    tokens.chmod(0o666)  # anyone could add an admin token now: nothing is trusted
    with pytest.raises(Unauthenticated):
        store.check(secrets["read"], "read")
    with pytest.raises(InvalidInput, match="writable by group or others"):
        TokenStore(tokens)
    tokens.chmod(0o640)
    assert store.check(secrets["read"], "read").name == "read-key"
    tokens.unlink()
    with pytest.raises(Unauthenticated):
        store.check(secrets["read"], "read")
    with pytest.raises(InvalidInput, match="does not exist"):
        TokenStore(tokens)


def test_header_parsing(keys) -> None:
    assert bearer("Bearer abc") == bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None
    pair = "Basic " + base64.b64encode(b"dev-a:s3:cret").decode()
    assert basic(pair) == ("dev-a", "s3:cret")
    assert basic("Basic !!") is None and basic("Bearer x") is None and basic(None) is None
    assert basic("Basic " + base64.b64encode(b"no-colon").decode()) is None
    tokens, secrets = keys
    assert TokenStore(tokens).check_header(f"Bearer {secrets['read']}", "read").name == "read-key"


# ----------------------------------------------------------------- the data plane hook
@pytest.fixture
def plane(tmp_path: Path, keys) -> tuple[DataPlane, Registry, dict[str, str]]:
    tokens, secrets = keys
    add_version(tmp_path / "models", "mlp", "1", mlp_onnx([4, 8, 2], seed=1))
    registry = Registry()
    repository = Repository(tmp_path / "models", registry=registry)
    repository.load_all()
    plane = DataPlane(repository)
    plane.hooks.add(ApiKeyHook(TokenStore(tokens), registry=registry))
    yield plane, registry, secrets
    repository.close()


BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": np.ones(4).tolist()}]}).encode()
NEEDS = {routes.LIVE: None, routes.READY: None, routes.INFER: "read", routes.PREDICT: "read",
         routes.SERVER_METADATA: "read", routes.MODEL_METADATA: "read",
         routes.MODEL_READY: "read", routes.MODEL_STATUS: "read",
         routes.REPOSITORY_INDEX: "read", routes.METRICS: "read", routes.LOAD: "deploy",
         routes.UNLOAD: "deploy"}


def call(route: str, token: str | None = None) -> Call:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = BODY if route == routes.INFER else (
        b'{"instances": [[1, 1, 1, 1]]}' if route == routes.PREDICT else b"")
    return Call(route, model="mlp", body=body, attributes=headers.get)


def test_every_route_but_health_needs_a_key_of_its_scope(plane) -> None:
    plane, registry, secrets = plane
    assert set(NEEDS) == {getattr(routes, n) for n in dir(routes) if n.isupper()
                          and isinstance(getattr(routes, n), str) and n not in ("JSON", "BINARY")}
    for route, needed in NEEDS.items():
        if route == routes.UNLOAD:
            continue  # checked last: it takes the model away
        anonymous = plane.handle(call(route))
        if needed is None:
            assert anonymous.ok, route
            continue
        assert status_of(anonymous.error) == 401, route
        assert error_headers(anonymous.error) == {"WWW-Authenticate": "Bearer"}
        assert json.loads(anonymous.body)["error"]
        assert status_of(plane.handle(call(route, "edgerun_wrong")).error) == 401
        assert plane.handle(call(route, secrets[needed])).ok, route
    denied = plane.handle(call(routes.UNLOAD, secrets["read"]))
    assert status_of(denied.error) == 403 and "read-key" in json.loads(denied.body)["error"]
    assert plane.handle(call(routes.UNLOAD, secrets["deploy"])).ok
    family = next(f for f in registry.collect() if f.name == "edgerun_auth_refusals_total")
    counts = {labels: child.value for labels, child in family.children()}
    assert counts[("http", "missing")] == 9 and counts[("http", "invalid")] == 9
    assert counts[("http", "scope")] == 1


def test_decoded_calls_and_open_metrics(tmp_path: Path, plane, keys) -> None:
    from edgerun.adapters.codecs import oip
    plane, registry, secrets = plane
    request = oip.decode_request(BODY, None)
    grpc_call = Call(routes.INFER, model="mlp", transport="grpc",
                     attributes={"authorization": "Bearer nope"}.get)
    with pytest.raises(Unauthenticated):
        plane.infer(grpc_call, request)
    good = Call(routes.INFER, model="mlp", transport="grpc",
                attributes={"authorization": f"Bearer {secrets['read']}"}.get)
    assert plane.infer(good, request).outputs
    assert good.identity == "read-key"
    opened = DataPlane(plane.repository)
    opened.hooks.add(ApiKeyHook(TokenStore(keys[0]), metrics_open=True, registry=registry))
    assert opened.handle(call(routes.METRICS)).ok
    assert status_of(opened.handle(call(routes.MODEL_READY)).error) == 401


def test_fleet_token_commands(tmp_path: Path, capsys) -> None:
    tokens, secret = tmp_path / "tokens", tmp_path / "ops.secret"
    assert main(["fleet", "token", "create", "--scope", "deploy", "--tokens", str(tokens),
                 "-o", str(secret), "--name", "ci-deployer"]) == 0
    token = read_secret(secret)
    assert main(["fleet", "token", "list", "--tokens", str(tokens)]) == 0
    assert main(["fleet", "token", "create", "--scope", "read", "--tokens", str(tokens),
                 "-o", str(secret)]) == 2  # never overwrites a secret
    shown = capsys.readouterr()
    assert "ci-deployer" in shown.out and "deploy" in shown.out
    assert token not in shown.out + shown.err
    assert TokenStore(tokens).check(token, "deploy").name == "ci-deployer"
    assert main(["fleet", "token", "revoke", "ci-deployer", "--tokens", str(tokens)]) == 0
    assert TokenStore(tokens).authenticate(token) is None


def test_fleet_clients_find_their_token(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from edgerun.cli.fleet_auth import add_token_option, auth_headers, client_token, refusal
    parser = argparse.ArgumentParser()
    add_token_option(parser)
    create_token("read", tmp_path / "tokens", tmp_path / "secret")
    secret = read_secret(tmp_path / "secret")
    monkeypatch.setenv("EDGERUN_TOKEN", "from-env")
    assert client_token(parser.parse_args(["--token-file", str(tmp_path / "secret")])
                        .token_file) == secret
    assert client_token(parser.parse_args([]).token_file) == "from-env"
    monkeypatch.delenv("EDGERUN_TOKEN")
    assert client_token(None) is None and auth_headers(None) == {}
    assert auth_headers(secret) == {"Authorization": f"Bearer {secret}"}
    assert "--token-file" in refusal(401, "a bearer token is required", None)
    assert "revoked" in refusal(401, "not valid", secret)
    assert secret not in refusal(401, "x", secret)
    assert "scope" in refusal(403, "token 'ci' has scope 'read'", secret)
    assert refusal(404, "no such model", secret) is None


def test_without_tokens_fleet_serve_stays_on_loopback(capsys) -> None:
    from edgerun.cli.fleet_auth import protected_host
    assert protected_host("0.0.0.0", secured=True) == "0.0.0.0"
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert protected_host(loopback, secured=False) == loopback
    assert "development mode" in capsys.readouterr().err
    for public in ("0.0.0.0", "::", "10.0.0.5", "fleet.example.com"):
        with pytest.raises(InvalidInput, match="without --tokens"):
            protected_host(public, secured=False)


def test_a_secret_file_other_users_may_read_is_used_with_a_warning(tmp_path, caplog):
    from edgerun.adapters.auth.tokens import read_secret

    secret = tmp_path / "pi-1.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)  # as `fleet enroll ... > pi-1.secret` leaves it under umask 022
    assert read_secret(secret) == "s3cret"
    assert f"other users may read it (mode 644): chmod 600 {secret}" in caplog.text
    assert "s3cret" not in caplog.text
    caplog.clear()
    secret.chmod(0o600)
    assert read_secret(secret) == "s3cret" and caplog.text == ""


def test_revoke_takes_a_tokens_file_with_a_stray_non_utf8_byte(tmp_path: Path, keys) -> None:
    """The server skips only the line a Latin-1 comment spoils: revoking must work there too,
    or a token could not be revoked at all."""
    tokens, secrets = keys
    original = tokens.read_bytes()
    tokens.write_bytes(b"# J\xfcrgen's laptop\n" + original)
    store = TokenStore(tokens)
    assert store.authenticate(secrets["read"]) is not None
    revoke_token(tokens, "read-key")
    assert store.authenticate(secrets["read"]) is None
    assert store.authenticate(secrets["admin"]) is not None
    assert tokens.read_bytes().startswith(b"# J\xfcrgen's laptop\n")  # the rest as it was


def test_revoke_matches_token_lines_only_never_a_comment(tmp_path: Path, keys) -> None:
    """A comment whose third word is the name is no token: revoking a name no token has is an
    error, not a success that leaves the operator believing a live token is gone."""
    tokens, secrets = keys
    tokens.write_text("# ops laptop token, issued by Ana\n" + tokens.read_text())
    before = tokens.read_bytes()
    with pytest.raises(InvalidInput, match="no token named 'laptop'"):
        revoke_token(tokens, "laptop")
    assert tokens.read_bytes() == before
