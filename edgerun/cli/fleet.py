"""`edgerun fleet serve|push|deploy|abort|rollback|status|enroll|revoke|acl`: the registry, rollouts and
their progress, device credentials and the broker files made from them."""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from rich.console import Console
from rich.errors import NotRenderableError
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from edgerun.cli import fleet_auth
from edgerun.cli.arguments import port, positive
from edgerun.runtime.errors import EdgerunError

out = Console(highlight=False)
STATES = ("pending", "queued", "downloading", "verifying", "staged", "active", "failed",
          "rolled_back", "cancelled")


class FleetError(EdgerunError):
    kind = "fleet_error"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("fleet", help="registry of signed bundles and OTA rollouts")
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    fleet_auth.register_token_commands(sub)

    serve = sub.add_parser("serve", help="run the registry and the rollout orchestrator")
    serve.add_argument("--data", type=Path, required=True, help="folder for bundles and fleet.db")
    serve.add_argument("--broker", required=True,
                       help="mqtt://HOST:PORT, or mqtt://USER:PASS@HOST:PORT for a broker with "
                            "passwords (edgerun fleet acl --orchestrator-user)")
    serve.add_argument("--broker-password-file", type=Path, default=None, metavar="FILE",
                       help="the password of --broker mqtt://USER@HOST:PORT, kept off the "
                            "command line")
    serve.add_argument("--db", default=None, metavar="URL",
                       help="fleet database: postgresql://USER@HOST/DB (several registries "
                            "may share it) or a SQLite path (default DATA/fleet.db)")
    serve.add_argument("--lease-ttl", type=positive(float), default=15.0, metavar="SECONDS",
                       help="how soon another registry on the same database takes over "
                            "driving rollouts when this one dies")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8700)
    serve.add_argument("--public-url", default=None,
                       help="URL devices download from (default http://HOST:PORT)")
    serve.add_argument("--trust", type=Path, action="append", required=True, metavar="PUBKEY",
                       help="public key whose signatures the registry accepts (repeatable)")
    serve.add_argument("--tokens", type=Path, default=None, metavar="TOKENS",
                       help="hashed bearer tokens (edgerun fleet token create); without it "
                            "the registry listens on loopback only, every route open")
    serve.add_argument("--log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=_serve)

    push = sub.add_parser("push", help="upload a signed bundle (folder or archive)")
    push.add_argument("bundle", type=Path)
    push.add_argument("--server", required=True, help="registry URL")
    fleet_auth.add_token_option(push)
    push.set_defaults(handler=_push)

    deploy = sub.add_parser("deploy", help="roll NAME:VERSION out to devices in waves")
    deploy.add_argument("target", metavar="NAME:VERSION")
    deploy.add_argument("--server", required=True)
    targets = deploy.add_mutually_exclusive_group()
    targets.add_argument("--group", default=None, help="every device of this group")
    targets.add_argument("--devices", default=None, help="comma-separated device ids")
    deploy.add_argument("--waves", default="100%", help="cumulative shares, e.g. 5%%,25%%,100%%")
    deploy.add_argument("--max-failures", default="0%",
                        help="abort and roll back when a larger share of the devices reached "
                             "so far fail (default 0%%)")
    deploy.add_argument("--gate", default=None,
                        help='health gate between waves, e.g. "p99<50ms,errors<1%%"')
    deploy.add_argument("--job-timeout", type=positive(float), default=600.0, metavar="SECONDS")
    deploy.add_argument("--gate-timeout", type=positive(float), default=300.0, metavar="SECONDS")
    deploy.add_argument("--wait", action="store_true", help="follow the rollout to its end")
    fleet_auth.add_token_option(deploy)
    deploy.set_defaults(handler=_deploy)

    abort = sub.add_parser("abort", help="stop a rollout and roll every updated device back")
    abort.add_argument("rollout")
    abort.add_argument("--server", required=True)
    fleet_auth.add_token_option(abort)
    abort.set_defaults(handler=_abort)

    rollback = sub.add_parser("rollback", help="send a rollout's updated devices back to "
                                                "their previous version (admin)")
    rollback.add_argument("rollout")
    rollback.add_argument("--server", required=True)
    fleet_auth.add_token_option(rollback)
    rollback.set_defaults(handler=_rollback)

    enroll = sub.add_parser("enroll", help="a device's own secret, printed alone on stdout")
    enroll.add_argument("device_id", metavar="DEVICE_ID")
    enroll.add_argument("--server", required=True)
    enroll.add_argument("--group", action="append", default=[], dest="groups",
                        help="a group whose shared requests the device may serve (repeatable)")
    fleet_auth.add_token_option(enroll)
    enroll.set_defaults(handler=_enroll)

    revoke = sub.add_parser("revoke", help="refuse a device's credential from now on")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.add_argument("--server", required=True)
    fleet_auth.add_token_option(revoke)
    revoke.set_defaults(handler=_revoke)

    acl = sub.add_parser("acl", help="Mosquitto passwd, acl and mosquitto.conf from the "
                                     "enrolled devices (then SIGHUP the broker)")
    acl.add_argument("--server", required=True)
    acl.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    acl.add_argument("--orchestrator-user", default=None, metavar="USER",
                     help="the MQTT user fleet serve connects as (--broker mqtt://USER:PASS@...)")
    acl.add_argument("--orchestrator-password-file", type=Path, default=None, metavar="FILE")
    acl.add_argument("--device-listener", default=None, metavar="[HOST:]PORT",
                     help="with --fleet-listener: the devices' listener, where each user has "
                          "the session of its username alone (whatever client id it sends); "
                          "the orchestrator logs in on the fleet's, where nobody else can")
    acl.add_argument("--fleet-listener", default=None, metavar="[HOST:]PORT")
    acl.add_argument("--device-certfile", type=Path, default=None, metavar="PEM",
                     help="TLS on the devices' listener (with --device-keyfile)")
    acl.add_argument("--device-keyfile", type=Path, default=None, metavar="PEM")
    fleet_auth.add_token_option(acl)
    acl.set_defaults(handler=_acl)

    status = sub.add_parser("status", help="rollouts, or one rollout's devices by state")
    status.add_argument("rollout", nargs="?", default=None)
    status.add_argument("--server", required=True)
    status.add_argument("--json", action="store_true", help="machine-readable")
    fleet_auth.add_token_option(status)
    status.set_defaults(handler=_status)


def _segment(text: str) -> str:
    """An id as one URL path segment: a space ended the client in a traceback, and '?', '#'
    or '/' asked another route; the server names what is wrong with the id itself."""
    return quote(text, safe="")


def _server(url: str) -> str:
    """The registry's base URL: http(s) only. urllib also opens ftp:// (two minutes to time
    out against a web server) and file:// (a local file read as the registry's answer)."""
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise FleetError(f"--server {url}: the registry's URL is http://HOST:PORT or "
                         f"https://HOST:PORT" + (f", not {scheme}://" if "://" in url else ""))
    return url.rstrip("/")


def _request(url: str, data: bytes | None = None, content_type: str = "application/json",
             method: str | None = None, token: str | None = None) -> Any:
    request = urllib.request.Request(url, data=data, method=method,
                                     headers=fleet_auth.auth_headers(token))
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with fleet_auth.open_url(request, timeout=120) as response:
            body = response.read()
            kind = response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
        except (ValueError, OSError, http.client.HTTPException):
            answer = None
        # a proxy's error page, or JSON of another shape ("Bad gateway", a list)
        message = answer.get("error", exc.reason) if isinstance(answer, dict) else exc.reason
        refused = fleet_auth.refusal(exc.code, message, token)
        if refused is not None:
            raise FleetError(f"{url}: {refused}") from None
        raise FleetError(f"{url}: HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise FleetError(f"{url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # closed or timed out mid-answer
        raise FleetError(f"{url}: {str(exc) or type(exc).__name__}") from None
    try:
        return json.loads(body)
    except ValueError:  # a proxy's or another server's page: the parser's words named neither
        raise FleetError(f"{url}: the answer ({kind}, {len(body):,} bytes) is not JSON: is "
                         "--server an edgerun fleet registry?") from None


@contextmanager
def _answer(url: str, data: bytes | None = None, content_type: str = "application/json",
            token: str | None = None) -> Iterator[Any]:
    """The registry's JSON answer, for the block that reads it: JSON of another shape (`{}`,
    `[]`, a number where a list goes) ends in one line naming the URL, not in a KeyError or
    TypeError traceback of whichever field the block read first."""
    answer = _request(url, data, content_type, token=token)
    try:
        yield answer
    except EdgerunError:  # the block's own refusal (a bad name in it), said as it is
        raise
    except (LookupError, TypeError, AttributeError, ValueError, NotRenderableError) as exc:
        what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
        raise FleetError(f"{url}: the answer is JSON but not the registry's ({what}): is "
                         "--server an edgerun fleet registry?") from None


def _serve(args: argparse.Namespace) -> int:
    try:
        from edgerun.adapters.http.registry import serve_fleet
    except ImportError as exc:
        raise ModuleNotFoundError(f"edgerun fleet serve needs the fleet extra: pip install "
                                  f"'edgerun[fleet]' ({exc})", name=exc.name) from None
    from edgerun.runtime import signing

    try:  # a file there (or on the way) was "[Errno 17] File exists: 'FILE'"
        args.data.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FleetError(f"--data {args.data}: a file is there (or on the way), not a "
                         "folder for bundles and fleet.db") from None
    host = fleet_auth.protected_host(args.host, args.tokens is not None)
    serve_fleet(str(args.data), args.broker, host=host, port=args.port,
                public_url=args.public_url, trusted=signing.load_public_keys(args.trust),
                tokens=args.tokens, log_level=args.log_level, db=args.db,
                lease_ttl=args.lease_ttl,
                broker_password=(fleet_auth.read_secret(args.broker_password_file)
                                 if args.broker_password_file else None))
    return 0


def _push(args: argparse.Namespace) -> int:
    from edgerun.runtime.bundle import Bundle

    server = _server(args.server)
    with tempfile.TemporaryDirectory(prefix="edgerun-push-") as scratch:
        path = args.bundle
        if path.is_dir():
            with Bundle.open(path, verify=False) as bundle:
                path = bundle.pack(Path(scratch) / "bundle.tar.gz")
        body = path.read_bytes()
    with _answer(server + "/bundles", body, "application/gzip",
                 token=fleet_auth.client_token(args.token_file)) as answer:
        verb = "accepted" if answer["created"] else "already held"
        out.print(f"{verb} {answer['model']} version {answer['version']} ({answer['size']:,} "
                  f"bytes, sha256 {answer['sha256'][:12]}…, signed by {answer['key_id']})")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from edgerun.adapters.fleet.gate import parse_gate, parse_percentage, parse_percentages

    name, sep, version = args.target.partition(":")
    if not sep or not name or not version:
        raise FleetError(f"{args.target!r}: expected NAME:VERSION")
    parse_gate(args.gate)  # refuse a bad gate before anything is sent
    spec = {"model": name, "version": version, "group": args.group,
            "devices": args.devices.split(",") if args.devices else None,
            "waves": parse_percentages(args.waves),
            "max_failures": parse_percentage(args.max_failures), "gate": args.gate,
            "job_timeout": args.job_timeout, "gate_timeout": args.gate_timeout}
    server = _server(args.server)
    token = fleet_auth.client_token(args.token_file)
    with _answer(server + "/rollouts", json.dumps(spec).encode(), token=token) as status:
        rollout = status["id"]
        out.print(f"rollout [bold]{escape(rollout)}[/]: {name} version {version} to "
                  f"{status['devices']} devices in {status['waves']} waves")
    return _follow(server, rollout, token) if args.wait else 0


def _abort(args: argparse.Namespace) -> int:
    with _answer(f"{_server(args.server)}/rollouts/{_segment(args.rollout)}/abort", b"{}",
                 token=fleet_auth.client_token(args.token_file)) as status:
        out.print(f"rollout {status['id']}: {status['state']} ({escape(str(status['reason']))})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    with _answer(f"{_server(args.server)}/rollouts/{_segment(args.rollout)}/rollback", b"{}",
                 token=fleet_auth.client_token(args.token_file)) as status:
        out.print(f"rollout {status['id']}: {status['state']} ({escape(str(status['reason']))})")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    with _answer(f"{_server(args.server)}/devices/{_segment(args.device_id)}/enroll",
                 json.dumps({"groups": args.groups}).encode(),
                 token=fleet_auth.client_token(args.token_file)) as answer:
        print(answer["secret"])  # alone, for `> device.secret`
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _answer(f"{_server(args.server)}/devices/{_segment(args.device_id)}/revoke", b"{}",
                 token=fleet_auth.client_token(args.token_file)) as answer:
        if answer["revoked"] is not True:  # another server's 200 is no revocation
            raise ValueError(f"revoked is {answer['revoked']!r}")
    out.print(f"revoked {args.device_id}: the registry refuses it now; regenerate the broker "
              "files (edgerun fleet acl) and SIGHUP the broker")
    return 0


def _acl(args: argparse.Namespace) -> int:
    from edgerun.adapters.auth import mosquitto

    listeners = None
    if (args.device_listener is None) != (args.fleet_listener is None):
        raise FleetError("--device-listener and --fleet-listener go together")
    if (args.device_certfile is None) != (args.device_keyfile is None):
        raise FleetError("--device-certfile and --device-keyfile go together")
    if args.device_certfile is not None and args.device_listener is None:
        raise FleetError("--device-certfile needs --device-listener")
    if args.device_listener is not None:
        device_listener = mosquitto.Listener.parse(args.device_listener)
        if args.device_certfile is not None:
            device_listener = replace(device_listener, certfile=str(args.device_certfile),
                                      keyfile=str(args.device_keyfile))
        listeners = (device_listener, mosquitto.Listener.parse(args.fleet_listener))
    with _answer(f"{_server(args.server)}/credentials",
                 token=fleet_auth.client_token(args.token_file)) as rows:
        if not isinstance(rows, list):  # `{}` read as no devices wrote files that admit none
            raise TypeError(f"a list of devices was expected, not {type(rows).__name__}")
        devices = [mosquitto.Device(r["device_id"], r["password_hash"], tuple(r["groups"]))
                   for r in rows]
    orchestrator = None
    if args.orchestrator_user:
        if args.orchestrator_password_file is None:
            raise FleetError("--orchestrator-user needs --orchestrator-password-file")
        orchestrator = mosquitto.Orchestrator(args.orchestrator_user, mosquitto.hash_password(
            fleet_auth.read_secret(args.orchestrator_password_file)))
    files = mosquitto.write_broker_files(args.output, devices, orchestrator=orchestrator,
                                         listeners=listeners)
    written = [files.passwd, files.fleet_passwd, files.acl, files.conf]
    out.print(f"{len(devices)} devices: " + ", ".join(str(f) for f in written if f))
    return 0


def _follow(server: str, rollout_id: str, token: str | None) -> int:
    """Show the rollout's progress until it ends: 0 when it completed, else 1."""
    url = f"{server}/rollouts/{_segment(rollout_id)}"
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} active  {task.fields[states]}"),
                  console=out) as progress:
        task = None
        while True:
            with _answer(url, token=token) as status:
                states = "  ".join(f"{k} {v}" for k, v in status["counts"].items())
                if task is None:
                    task = progress.add_task(rollout_id, total=status["devices"], states=states)
                progress.update(task, completed=status["counts"].get("active", 0),
                                states=states,
                                description=f"{rollout_id} wave {status['wave'] + 1}/"
                                            f"{status['waves']} {status['state']}")
                if status["state"] in ("completed", "aborted"):
                    state = status["state"]
                    ended = (f"rollout {status['id']} {state}: "
                             f"{escape(str(status['reason']))}")
                    break
            time.sleep(0.5)
    out.print(ended)
    return 0 if state == "completed" else 1


def _status(args: argparse.Namespace) -> int:
    server = _server(args.server)
    path = f"/rollouts/{_segment(args.rollout)}" if args.rollout else "/rollouts"
    with _answer(server + path, token=fleet_auth.client_token(args.token_file)) as status:
        return _show_status(status, args.rollout, args.json)


def _show_status(status: Any, rollout: str | None, as_json: bool) -> int:
    """The status as tables, or with --json as the registry sent it: read as the tables read
    it either way, so that another server's JSON is one line naming the URL (`_answer`), never
    printed as if it were the registry's."""
    shown = _status_tables(status) if rollout is None else _rollout_tables(status)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    for part in shown:
        out.print(part)
    return 0


def _status_tables(status: Any) -> list[Any]:
    """Every rollout, the registry's models and versions, and the devices."""
    table = Table("rollout", "model", "version", "state", "wave", "devices", "by state")
    for r in status["rollouts"]:
        table.add_row(*(escape(str(r[key])) for key in ("id", "model", "version", "state")),
                      f"{r['wave'] + 1}/{r['waves']}", str(r["devices"]),
                      "  ".join(f"{k} {v}" for k, v in r["counts"].items()))
    models = Table("model", "version", "size", "sha256", "signed by")
    for v in status["models"]:
        models.add_row(v["model"], v["version"], f"{v['size']:,}", v["sha256"][:12],
                       v["key_id"])
    devices = Table("device", "group", "state", "serving", "last seen (s ago)")
    for device in status["devices"]:
        # what each device says of itself: text, whatever its shape (never markup)
        devices.add_row(*(escape(str(text)) for text in (
            device["device_id"], device["grp"] or "", device["state"],
            _serving(device["status"]))), f"{time.time() - device['last_seen']:.0f}")
    return [table, models, devices]


def _rollout_tables(status: Any) -> list[Any]:
    """One rollout: its state, its devices by state, and every device's job."""
    rollout, model, version, state = (escape(str(status[key]))
                                       for key in ("id", "model", "version", "state"))
    header = (f"rollout [bold]{rollout}[/] {model} version {version}: [bold]{state}[/] wave "
              f"{status['wave'] + 1}/{status['waves']}"
              + (f" ({escape(status['reason'])})" if status["reason"] else ""))
    progress = Progress(TextColumn("{task.description:>12}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), console=out)
    for state in STATES:
        if status["counts"].get(state):
            progress.add_task(state, total=status["devices"], completed=status["counts"][state])
    table = Table("device", "wave", "job", "state", "version", "previous", "detail")
    for job in status["jobs"]:
        table.add_row(escape(job["device_id"]), str(job["wave"] + 1), job["kind"],
                      job["state"], _version_cell(job["version"]),
                      _version_cell(job["previous_version"]), escape(job["detail"] or ""))
    return [header, progress, table]


def _serving(status: Any) -> str:
    """The models and versions a device's status names (`{"models": {name: [versions]}}`)."""
    models = status.get("models") if isinstance(status, dict) else None
    if not isinstance(models, dict):
        return "" if models is None else str(models)
    return "  ".join(f"{m} {','.join(map(str, v)) if isinstance(v, list) else v}"
                     for m, v in models.items())


def _version_cell(version: str | None) -> str:
    """None: not reported yet; "": no version (served none before, or a rollback to none)."""
    return "" if version is None else version or "(none)"
