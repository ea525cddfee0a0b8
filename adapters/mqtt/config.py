"""The daemon's settings: one typed dataclass, read from device.toml and overridden by flags.

device.toml holds the same keys as the flags (underscores, not dashes) at top level; tables
other than those keys (`[ota]`, ...) are kept in `extensions` for the daemon's extensions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgerun.adapters.auth.tokens import read_secret
from edgerun.adapters.topics import topic_segment
from edgerun.adapters.urls import redact
from edgerun.devices.profile import is_integer
from edgerun.runtime.model_config import finite_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

PROTOCOLS = ("auto", "5", "3.1.1")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingError(ValueError):
    """A setting that cannot work; `settings` names those at fault, for `load_config` to name
    the file where one came from it (a flag's value is in no file)."""

    def __init__(self, message: str, *settings: str) -> None:
        super().__init__(message)
        self.settings = settings


@dataclass(frozen=True)
class Broker:
    """Where to connect: `mqtt://[user:password@]host[:port]` or `mqtts://...` (TLS)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> Broker:
        """The URL's parts; a ValueError naming the URL (password hidden) for a bad one:
        urllib's own messages ("Port out of range 0-65535") named neither."""
        try:
            parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        except ValueError as exc:  # "Invalid IPv6 URL"
            raise ValueError(f"broker URL {redact(url)!r}: {exc}") from None
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {redact(url)!r}: the scheme must be mqtt:// or "
                             "mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {redact(url)!r} names no host")
        port = _port(url, parts.netloc.rpartition("@")[2].rpartition("]")[2])
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def _port(url: str, host: str) -> int | None:
    """The port `host` (the URL's host[:port]) names, or None; 0 is refused, not taken for
    the default port as urllib's `port` let it be."""
    text = host.rpartition(":")[2] if ":" in host else ""
    if not text:
        return None
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"broker URL {redact(url)!r}: port {text!r} is not a number")
    if not 1 <= int(text) <= 65535:
        raise ValueError(f"broker URL {redact(url)!r}: port {int(text)} is not between 1 and "
                         "65535")
    return int(text)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `edgerun daemon` needs; defaults suit a device on a flaky network."""

    repository: Path
    broker: str
    device_id: str
    group: str = ""
    #: Where the daemon and its extensions keep state ("" = `<repository>/.edgerun`).
    data_dir: Path | None = None
    device: str | None = None
    poll_interval: float | None = 5.0
    #: "auto" tries MQTT v5 and falls back to 3.1.1 when the broker refuses v5.
    protocol: str = "auto"
    qos: int = 1
    keepalive: int = 30
    #: How long the broker keeps the session (and queues QoS 1 requests) while we are away.
    session_expiry: int = 3600
    username: str | None = None
    password: str | None = None
    #: The password's file, read at every connect: a flag's value shows in `ps` to every user.
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    telemetry_interval: float = 30.0
    #: Requests accepted but not yet answered; beyond it, requests get an Overloaded reply.
    max_inbox: int = 1024
    #: SIGTERM waits this long for in-flight requests before publishing offline.
    drain_timeout: float = 10.0
    #: The `edgerun` loggers' level (`--log-level`, or `log_level` in device.toml).
    log_level: str = "info"
    #: Extra TOML tables (`[ota]`, ...) for the daemon's extensions.
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if not topic_segment(self.device_id):  # the broker drops a client sending controls
            raise SettingError(f"device id {self.device_id!r:.40} must be one MQTT topic level: "
                               "non-empty, no / + #, no control characters", "device_id")
        if self.group and not topic_segment(self.group):
            raise SettingError(f"group {self.group!r:.40} must be one MQTT topic level: no "
                               "/ + #, no control characters", "group")
        if self.group == self.device_id:
            # both subscriptions match edgerun/<id>/infer/...: every request came twice
            raise SettingError(f"group {self.group!r:.40} must differ from the device id",
                               "group", "device_id")
        if self.protocol not in PROTOCOLS:
            raise SettingError(f"protocol must be one of {', '.join(PROTOCOLS)}", "protocol")
        if self.log_level not in LOG_LEVELS:
            raise SettingError(f"log_level must be one of {', '.join(LOG_LEVELS)}", "log_level")
        if self.qos not in (0, 1, 2):
            raise SettingError("qos must be 0, 1 or 2", "qos")
        if self.max_inbox < 1:
            raise SettingError("max_inbox must be >= 1", "max_inbox")
        for name, zero_allowed in _DURATIONS.items():
            value = getattr(self, name)
            if value is None and name == "poll_interval":
                continue
            # a negative poll interval polled without pause (a core at 100 %)
            if not finite_number(value) or value < 0 or (value == 0 and not zero_allowed):
                raise SettingError(f"{name} must be a number of seconds "
                                   f"{'of at least' if zero_allowed else 'above'} 0, got "
                                   f"{value!r:.40}", name)
        if self.keepalive > 0xFFFF:
            raise SettingError("keepalive must be at most 65535 seconds, got "
                               f"{self.keepalive!r:.40}", "keepalive")
        if self.session_expiry > 0xFFFFFFFF:  # a four-byte CONNECT property: struct.error
            raise SettingError("session_expiry must be at most 4294967295 seconds (never "
                               f"expires), got {self.session_expiry!r:.40}", "session_expiry")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingError("reconnect_max_s must be at least reconnect_min_s",
                               "reconnect_max_s", "reconnect_min_s")
        if self.password is not None and self.password_file is not None:
            raise SettingError("give password or password_file, not both", "password",
                               "password_file")
        if self.password_file is not None:
            read_secret(self.password_file)  # a missing or unreadable file fails here, not later
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                # paho's tls_set raised a bare "No such file or directory" inside the daemon
                raise SettingError(f"{name} {str(path)!r} is not a readable file", name)
        try:
            Broker.parse(self.broker)
        except ValueError as exc:
            raise SettingError(str(exc), "broker") from None

    def _check_types(self) -> None:
        """TOML gives what was written: "1024" or 30.5 where an integer belongs, 1234 where a
        string does. Unchecked, they failed inside the daemon (a traceback, or a daemon that
        stayed up but never subscribed)."""
        for name, kind in _KINDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            ok = is_integer(value) if kind is int else isinstance(value, kind)
            if not ok:
                raise SettingError(f"{name} must be {_KIND_NAMES[kind]}, got {value!r:.40}", name)

    @property
    def broker_address(self) -> Broker:
        broker = Broker.parse(self.broker)
        password = (read_secret(self.password_file) if self.password_file is not None
                    else self.password)
        return replace(broker, username=self.username or broker.username,
                       password=password or broker.password)

    @property
    def state_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.repository / ".edgerun"


#: Settings in seconds, and whether 0 is allowed (it turns polling and telemetry off).
_DURATIONS = {"poll_interval": True, "keepalive": True, "session_expiry": True,
              "reconnect_min_s": False, "reconnect_max_s": False, "telemetry_interval": True,
              "drain_timeout": True}



#: The type each setting must have (durations are checked as numbers in `_DURATIONS`).
_KINDS: dict[str, type] = {
    "repository": Path, "broker": str, "device_id": str, "group": str, "data_dir": Path,
    "device": str, "protocol": str, "qos": int, "keepalive": int, "session_expiry": int,
    "username": str, "password": str, "password_file": Path, "ca_file": Path,
    "cert_file": Path, "key_file": Path, "max_inbox": int, "log_level": str}
_OPTIONAL = {"data_dir", "device", "username", "password", "password_file", "ca_file",
             "cert_file", "key_file"}
_KIND_NAMES = {str: "a string", int: "an integer", Path: "a path (a string)"}
_PATHS = {"repository", "data_dir", "password_file", "ca_file", "cert_file", "key_file"}
KEYS = {f.name for f in fields(DaemonConfig)} - {"extensions"}
#: Two forms of one setting: a flag giving either overrides the file's, as flags do.
_SECRETS = {"password", "password_file"}


def expand_user(path: str | Path, setting: str) -> Path:
    """`path` with a leading `~` or `~user` expanded; ValueError naming it where there is no
    such user (pathlib's RuntimeError "Could not determine home directory" was a traceback
    that named neither the path nor the setting)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ValueError(f"{setting} {str(path)!r}: there is no user "
                         f"{Path(path).parts[0][1:]!r} whose home folder ~ could name") from None


def relative_to(folder: Path, table: dict[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """`table` with the relative paths under `keys` (one or a list) taken from `folder`."""
    def resolved(value: Any, key: str) -> Any:
        if isinstance(value, list):
            return [resolved(item, key) for item in value]
        return folder / expand_user(value, key) if isinstance(value, str) else value

    return {key: resolved(value, key) if key in keys else value for key, value in table.items()}


def load_config(path: Path | None = None, **overrides: Any) -> DaemonConfig:
    """The file's settings (if any) with every override that is not None on top.

    Relative paths in the file are relative to the file's folder (systemd starts the daemon
    in /var/lib/edgerun, not beside /etc/edgerun/device.toml); those of flags, to the current
    directory.
    """
    data: dict[str, Any] = {}
    extensions: dict[str, dict[str, Any]] = {}
    if path is not None:
        with open(path, "rb") as handle:
            try:
                raw = tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:  # "Invalid value (at line 2)": of which file?
                raise ValueError(f"{path}: {exc}") from None
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text, as TOML must be ({exc.reason} at "
                                 f"byte {exc.start})") from None
            except RecursionError:  # tomllib parses arrays and tables recursively
                raise ValueError(f"{path}: arrays or tables nested too deep") from None
        for key, value in raw.items():
            key = key.replace("-", "_")
            if key in KEYS:
                data[key] = value
            elif isinstance(value, dict):
                extensions[key] = value
            else:
                raise ValueError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(KEYS))}")
        try:
            data = relative_to(path.parent, data, _PATHS)
            device = data.get("device")
            if isinstance(device, str) and device.endswith(".toml"):  # a profile's file
                data["device"] = str(path.parent / expand_user(device, "device"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    given = {k: v for k, v in overrides.items() if v is not None and k in KEYS}
    if given.keys() & _SECRETS:  # a flag's password replaces the file's, whichever form
        for key in _SECRETS - given.keys():
            data.pop(key, None)
    from_file = data.keys() - given.keys()
    data.update(given)
    for key in _PATHS & data.keys():
        if isinstance(data[key], (str, Path)):
            data[key] = expand_user(data[key], key)
    missing = [k for k in ("repository", "broker", "device_id") if not data.get(k)]
    if missing:
        raise ValueError(f"missing setting(s): {', '.join(missing)} (give the flags or put them "
                         "in --config)")
    if isinstance(data.get("protocol"), (int, float)):
        data["protocol"] = str(data["protocol"])
    try:
        return DaemonConfig(**data, extensions=extensions)
    except SettingError as exc:  # "telemetry_interval must be ...": set where?
        if path is None or not from_file & set(exc.settings):
            raise
        raise SettingError(f"{path}: {exc}", *exc.settings) from None
