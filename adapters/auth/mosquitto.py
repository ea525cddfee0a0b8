"""Mosquitto password, ACL and config files for a fleet: each device only under its own topics.

Topics (issues 9 and 10), with `<id>` a device id (its MQTT username) or a group name:

    edgerun/<id>/infer/<model>[/<version>]     requests (groups: $share/<g>/edgerun/<g>/infer/#)
    edgerun/<id>/replies/<requester>/...       answers: the responder's namespace, then the
                                               requester's username (the v5 Response Topic a
                                               client sets, or "reply_to" for 3.1.1)
    edgerun/<id>/status, /telemetry            the device's retained status and telemetry
    edgerun/<id>/ota, /ota/report              OTA jobs to the device, its reports back

So a reply's topic proves who answered (only device `d` may write `edgerun/d/replies/...`) and
only the requester named in it may read it. `pattern` lines with `%u` give every user that
namespace; `user` blocks add a device's groups, an inference client's targets and the
orchestrator's fleet-wide view. Group names share the `edgerun/<id>/` level with usernames, so
they must differ from every username.

Passwords are stored as Mosquitto 2.0's `mosquitto_passwd` writes them: `$7$` (PBKDF2-HMAC-
SHA512), 101 iterations, a 12-byte random salt, base64 salt and 64-byte digest. A registry keeps
`hash_password(secret)` per device at enrolment, never the secret, and regenerates these files
from the hashes; after writing them, SIGHUP makes Mosquitto reload both files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgerun.runtime.errors import InvalidInput, PermissionDenied

ITERATIONS = 101
SALT_BYTES = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
#: A whole `$7$` hash and nothing more: a newline in one would add a passwd line of its own.
_HASH = re.compile(rf"\$7\$[1-9][0-9]{{0,9}}\${_B64}\${_B64}")
ALL = "+"  # an inference client's target meaning every device and group

DEVICE_PATTERNS = (
    ("read", "edgerun/%u/infer/#"),
    ("read", "edgerun/%u/ota"),
    ("write", "edgerun/%u/ota/report"),
    ("write", "edgerun/%u/status"),
    ("write", "edgerun/%u/telemetry"),
    ("write", "edgerun/%u/replies/#"),
    ("read", "edgerun/+/replies/%u/#"),
)
ORCHESTRATOR_TOPICS = (
    ("readwrite", "edgerun/+/ota"),
    ("read", "edgerun/+/ota/report"),
    ("read", "edgerun/+/status"),
    ("read", "edgerun/+/telemetry"),
)


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = ITERATIONS) -> str:
    """The `$7$` hash Mosquitto 2.0 checks a password against."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def new_password() -> tuple[str, str]:
    """A fresh device secret (256 random bits) and its `$7$` hash: hand the first to the device
    once (`fleet enroll` prints it), keep only the second."""
    secret = secrets.token_urlsafe(32)
    return secret, hash_password(secret)


def verify_password(password_hash: str, password: str) -> bool:
    """Check a password against a `$7$` hash (a registry authenticating a device's HTTP call)."""
    try:
        _, kind, iterations, salt, digest = password_hash.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                     int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


@dataclass(frozen=True)
class Device:
    """An enrolled device: username = device id; it may serve its groups' shared requests."""

    device_id: str
    password_hash: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceClient:
    """A service that sends requests to `targets` (device ids, group names, or "+" for all)
    and reads the replies addressed to it."""

    username: str
    password_hash: str
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Orchestrator:
    """The fleet server's own MQTT user: OTA jobs out, status, telemetry and reports in."""

    username: str
    password_hash: str


@dataclass(frozen=True)
class Listener:
    """Where a Mosquitto listener binds, `[HOST:]PORT` (no host: every interface; an IPv6
    host in brackets), and its TLS certificate and key, if it has them."""

    port: int
    host: str = ""
    certfile: str = ""
    keyfile: str = ""

    @classmethod
    def parse(cls, text: str) -> Listener:
        host, _, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif any(c in host for c in ":[]"):
            host = "?"  # an IPv6 address outside brackets (or half in): port and host blur
        if not port.isdigit() or not 0 < int(port) < 65536 or (host == "" and ":" in text) \
                or any(c.isspace() or c in "[]?" for c in host):
            raise InvalidInput(f"listener {text!r} is not [HOST:]PORT (an IPv6 host in [])")
        return cls(int(port), host)

    def overlaps(self, other: Listener) -> bool:
        """Whether both bind one port of one address (no host is every address)."""
        return self.port == other.port and (
            not self.host or not other.host or self.host == other.host)

    def lines(self) -> list[str]:
        tls = [f"certfile {Path(self.certfile).resolve()}",
               f"keyfile {Path(self.keyfile).resolve()}"] if self.certfile else []
        return [f"listener {self.port} {self.host}".rstrip(), *tls]


@dataclass(frozen=True)
class BrokerFiles:
    passwd: Path  # every user; with listeners, the devices and inference clients
    acl: Path
    conf: Path
    fleet_passwd: Path | None = None  # with listeners: the orchestrator alone


def check_name(kind: str, name: str) -> None:
    """Refuse a username, group or target that could escape its `edgerun/<name>/` topics."""
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"{kind} {name!r} must be 1-128 letters, digits or ._- starting "
                           "with a letter or digit (no MQTT wildcards, '/' or ':')")


def _validate(devices: list[Device], clients: list[InferenceClient],
              orchestrator: Orchestrator | None) -> None:
    users = [d.device_id for d in devices] + [c.username for c in clients]
    if orchestrator is not None:
        users.append(orchestrator.username)
        for device in devices:  # enrolled before the registry knew the name: say the way out
            if orchestrator.username in (device.device_id, *device.groups):
                what = (f"device {device.device_id!r}" if device.device_id ==
                        orchestrator.username else f"group {orchestrator.username!r} of "
                        f"device {device.device_id!r}")
                raise InvalidInput(f"{what} has the orchestrator's username "
                                   f"{orchestrator.username!r}: revoke it (edgerun fleet revoke "
                                   f"{device.device_id}) and enrol it under another name, or "
                                   "give the orchestrator another user")
    seen: set[str] = set()
    for user in users:
        check_name("username", user)
        if user in seen:
            raise InvalidInput(f"username {user!r} appears twice")
        seen.add(user)
    for device in devices:
        for group in device.groups:
            check_name("group", group)
            if group in seen:
                raise InvalidInput(f"group {group!r} is also a username: both would own "
                                   f"edgerun/{group}/")
    for client in clients:
        for target in client.targets:
            if target != ALL:
                check_name("target", target)


def acl_text(devices: Iterable[Device], clients: Iterable[InferenceClient] = (),
             orchestrator: Orchestrator | None = None) -> str:
    devices, clients = list(devices), list(clients)
    _validate(devices, clients, orchestrator)
    lines = ["# Generated by edgerun: regenerate rather than edit; SIGHUP reloads it.",
             "# Every user owns edgerun/<username>/ and reads replies addressed to it."]
    lines += [f"pattern {access} {topic}" for access, topic in DEVICE_PATTERNS]
    if orchestrator is not None:
        lines += ["", f"user {orchestrator.username}"]
        lines += [f"topic {access} {topic}" for access, topic in ORCHESTRATOR_TOPICS]
    for device in devices:
        if device.groups:
            lines += ["", f"user {device.device_id}"]
            for group in device.groups:
                lines += [f"topic read edgerun/{group}/infer/#",
                          f"topic write edgerun/{group}/replies/#"]
    for client in clients:
        if client.targets:
            lines += ["", f"user {client.username}"]
            lines += [f"topic write edgerun/{target}/infer/#" for target in client.targets]
    return "\n".join(lines) + "\n"


def passwd_text(devices: Iterable[Device], clients: Iterable[InferenceClient] = (),
                orchestrator: Orchestrator | None = None) -> str:
    devices, clients = list(devices), list(clients)
    _validate(devices, clients, orchestrator)  # a name with a newline would add a line too
    users = [(d.device_id, d.password_hash) for d in devices]
    users += [(c.username, c.password_hash) for c in clients]
    if orchestrator is not None:
        users.append((orchestrator.username, orchestrator.password_hash))
    for user, password_hash in users:
        if not password_hash.startswith("$7$"):
            raise InvalidInput("password hashes must be $7$ (hash_password), not secrets")
        if not _HASH.fullmatch(password_hash):  # the hash is not echoed: it may hold a secret
            raise InvalidInput(f"the password hash of {user!r} is not one $7$ hash "
                               "($7$<iterations>$<base64 salt>$<base64 digest>)")
    return "".join(f"{user}:{password_hash}\n" for user, password_hash in users)


def conf_text(passwd: Path, acl: Path) -> str:
    return ("# Generated by edgerun. Add your listener lines (TLS: see the device guide).\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {passwd.resolve()}\n"
            f"acl_file {acl.resolve()}\n")


def split_conf_text(files: BrokerFiles, devices: Listener, fleet: Listener) -> str:
    """Two listeners, each with its own users. Mosquitto's files tie topics to a user, never a
    client id, and sessions are the broker's, not a listener's: where users choose their
    client ids, one may send another's and take that session over. On the devices' listener
    (devices and inference clients) the username replaces the client id
    (`use_username_as_clientid`), so each user has its own session alone; the fleet's
    registries (one shared user, connected once per process) log in on the fleet's listener,
    where nobody else can."""
    assert files.fleet_passwd is not None
    acl = files.acl.resolve()
    lines = ["# Generated by edgerun (fleet acl): regenerate rather than edit; SIGHUP reloads",
             "# the users, a restart the listeners.",
             "per_listener_settings true", "",
             "# the fleet's registries", *fleet.lines(), "allow_anonymous false",
             f"password_file {files.fleet_passwd.resolve()}", f"acl_file {acl}", "",
             "# devices and inference clients: each has the session of its username alone",
             *devices.lines(), "use_username_as_clientid true", "allow_anonymous false",
             f"password_file {files.passwd.resolve()}", f"acl_file {acl}"]
    return "\n".join(lines) + "\n"


def _kept_owner(path: Path, secret: bool) -> tuple[int, int, int] | None:
    """(uid, gid, mode) the new `path` takes from the file it replaces, so a broker that reads
    it as its own user (a chown after the first run) can still read it after a regeneration.
    A password file gains no bits for others, and no file bits for others to write. None for
    a new file (or a dangling link). Refused, before anything is written, when this process
    could not give the new file that owner: the broker would then fail to reload it and
    refuse every login."""
    try:
        old = os.stat(path)  # through a link: the file it names (the link itself is 0777)
    except FileNotFoundError:
        return None
    uid, gid = old.st_uid, old.st_gid
    euid = os.geteuid()
    if euid != 0 and (uid != euid or gid not in (os.getegid(), *os.getgroups())):
        raise PermissionDenied(
            f"{path} is owned by uid {uid}, gid {gid}: run this as root or as that owner, or "
            "the file written in its place would be this user's and the broker could no "
            "longer read it")
    mode = old.st_mode & 0o777 | 0o600
    return uid, gid, mode & (0o640 if secret else 0o664)  # nothing others may write or run


def _write(path: Path, text: str, mode: int, owner: tuple[int, int, int] | None) -> None:
    """Write beside and rename over, so Mosquitto never reloads a half-written file. The
    staging file is new (O_EXCL: never a link someone left there, never a file others opened
    already), so the hashes are never written where `mode` does not hold. `owner` (uid, gid,
    mode) is the replaced file's (`_kept_owner`)."""
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as sink:
            if owner is not None:
                os.fchown(sink.fileno(), owner[0], owner[1])
                mode = owner[2]
            os.fchmod(sink.fileno(), mode)  # the umask may have taken bits `mode` wants
            sink.write(text)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_broker_files(directory: str | Path, devices: Iterable[Device],
                       clients: Iterable[InferenceClient] = (),
                       orchestrator: Orchestrator | None = None,
                       listeners: tuple[Listener, Listener] | None = None) -> BrokerFiles:
    """Write DIR/passwd, DIR/acl and DIR/mosquitto.conf for these users.

    Without `listeners` the config has none: add your own (one for all users). With
    `listeners` (the devices', the fleet's), it has both, and DIR/passwd holds the devices and
    clients, DIR/fleet.passwd the orchestrator (`split_conf_text`).
    New password files are owner-only (they hold hashes): run Mosquitto as that owner, or chown
    them to the broker's user once; a file written again keeps its owner, group and mode (a
    password file never readable by others), and a first fleet.passwd takes passwd's. Nothing
    is written unless every name checks out and every replaced file's owner can be kept.
    """
    directory = Path(directory)
    devices, clients = list(devices), list(clients)
    acl = acl_text(devices, clients, orchestrator)
    if listeners is None:
        passwords = {"passwd": passwd_text(devices, clients, orchestrator)}
    else:
        if listeners[0].overlaps(listeners[1]):
            raise InvalidInput(f"the devices' and the fleet's listeners both bind port "
                               f"{listeners[0].port} of one address: they must differ")
        passwords = {"passwd": passwd_text(devices, clients),
                     "fleet.passwd": passwd_text((), (), orchestrator)}
    directory.mkdir(parents=True, exist_ok=True)
    files = BrokerFiles(directory / "passwd", directory / "acl", directory / "mosquitto.conf",
                        None if listeners is None else directory / "fleet.passwd")
    texts = {directory / name: (text, True) for name, text in passwords.items()}  # secret
    texts[files.acl] = (acl, False)
    texts[files.conf] = (conf_text(files.passwd, files.acl) if listeners is None
                         else split_conf_text(files, *listeners), False)
    owners = {path: _kept_owner(path, secret) for path, (_, secret) in texts.items()}
    if files.fleet_passwd is not None and owners[files.fleet_passwd] is None:
        # The first split: the broker reads the new file as it reads passwd.
        owners[files.fleet_passwd] = owners[files.passwd]
    for path, (text, secret) in texts.items():
        _write(path, text, 0o600 if secret else 0o644, owners[path])
    return files
