"""The OTA agent inside `edgerun daemon`: `--trust PUBKEY` turns it on.

`attach` wires an agent to the daemon's extension point: the daemon's repository (its source
becomes the A/B slots, with the daemon's folder behind them), its `publish`, a subscription to
`edgerun/<device>/ota`, and the slots in every status and telemetry message. Start-up runs the
agent's recovery once the repository is loaded and before the daemon connects.

Its `[ota]` table takes `trust`, `credential`, `speed_limit`, `speed_time` and
`download_patience`; the flags (`--trust`, `--credential`, `--ota-speed-limit`,
`--ota-speed-time`, `--ota-download-patience`) override it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgerun.adapters.auth.tokens import read_secret
from edgerun.adapters.mqtt.extensions import ExtensionSpec
from edgerun.adapters.ota.agent import CLOSE_WAIT_S, DOWNLOAD_PATIENCE_S, OtaAgent
from edgerun.adapters.ota.download import SpeedLimit, SpeedLimitError
from edgerun.runtime import signing
from edgerun.runtime.model_config import finite_number


class OtaExtension:
    def __init__(self, agent: OtaAgent, daemon: Any) -> None:
        self.agent = agent
        self.daemon = daemon

    def start(self) -> None:
        self.agent.recover()

    def stop(self) -> None:
        self.agent.close()


def use_credential(daemon: Any, secret: str) -> None:
    """The device's secret (edgerun fleet enroll) as its MQTT password, username = device id,
    unless the daemon's configuration names a user of its own."""
    if daemon.config.username:
        return
    daemon.config = replace(daemon.config, username=daemon.device_id, password=secret)
    daemon.client.username_pw_set(daemon.device_id, secret)  # the client made before this


def attach(daemon: Any, trust_keys: Iterable[str | Path],
           credential: str | None = None,
           speed_limit: SpeedLimit = SpeedLimit(),
           download_patience: float = DOWNLOAD_PATIENCE_S) -> OtaExtension:
    """An OTA agent on this daemon, trusting bundles signed by any of `trust_keys`; with the
    device's `credential`, downloads and the MQTT connection present it; a download slower
    than `speed_limit` is cut off and retried, for `download_patience` seconds."""
    if credential is not None:
        use_credential(daemon, credential)
    agent = OtaAgent(publish=daemon.publish, repository=daemon.repository,
                     device_id=daemon.device_id, data_dir=daemon.data_dir,
                     trusted=signing.load_public_keys(trust_keys),
                     group=daemon.group or None, on_change=daemon.publish_status,
                     credential=credential, speed_limit=speed_limit,
                     download_patience=download_patience)
    daemon.subscribe(agent.topic, lambda message: agent.handle_job(message.payload), qos=1)
    slots = lambda: {"ota": agent.describe()["ota"]}  # noqa: E731
    daemon.add_status_fields(slots)
    daemon.add_telemetry_fields(slots)
    return OtaExtension(agent, daemon)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", type=Path, action="append", default=None, metavar="PUBKEY",
                        help="take OTA updates signed by this public key (repeatable); "
                             "without one the OTA agent stays off")
    parser.add_argument("--credential", type=Path, default=None, metavar="FILE",
                        help="this device's secret from edgerun fleet enroll: its password for "
                             "the registry and the broker (username = device id)")
    default = SpeedLimit()
    parser.add_argument("--ota-speed-limit", type=float, default=None, metavar="BYTES_PER_S",
                        help="an OTA download averaging under this over --ota-speed-time is "
                             f"cut off and retried (default {default.bytes_per_s:g}; 0 turns "
                             "it off)")
    parser.add_argument("--ota-speed-time", type=float, default=None, metavar="SECONDS",
                        help=f"the window of --ota-speed-limit (default {default.seconds:g})")
    parser.add_argument("--ota-download-patience", type=float, default=None, metavar="SECONDS",
                        help="how long an OTA download broken off or too slow is retried before "
                             f"its job fails (default {DOWNLOAD_PATIENCE_S:g}; 0: never retried)")


def _create(daemon: Any, args: argparse.Namespace, table: dict[str, Any]) -> OtaExtension | None:
    keys = args.trust or table.get("trust") or []
    if isinstance(keys, (str, Path)):
        keys = [keys]
    path = args.credential or table.get("credential")
    if not isinstance(keys, list) or not all(isinstance(key, (str, Path)) for key in keys):
        raise ValueError(f"[ota] trust must be a path or a list of paths, got {keys!r}")
    if path is not None and not isinstance(path, (str, Path)):
        raise ValueError(f"[ota] credential must be a path, got {path!r}")
    credential = read_secret(path) if path else None
    if credential is not None and not keys:
        use_credential(daemon, credential)
    if not keys:
        return None
    return attach(daemon, keys, credential, _speed_limit(args, table),
                  _download_patience(args, table))


def _setting(args: argparse.Namespace, table: dict[str, Any], key: str,
             fallback: Any) -> tuple[Any, str]:
    """The flag `--ota-KEY`, else the table's `KEY`, else `fallback`, with where it came from:
    a bad value is named as the flag or the `[ota]` key (a bad flag was once blamed on an
    `[ota]` table the device may not even have)."""
    flag, given = getattr(args, f"ota_{key}", None), table.get(key)
    if flag is not None:
        return flag, "--ota-" + key.replace("_", "-")
    return (given, f"[ota] {key}") if given is not None else (fallback, key)


def _speed_limit(args: argparse.Namespace, table: dict[str, Any]) -> SpeedLimit:
    default = SpeedLimit()
    chosen = {key: _setting(args, table, key, fallback) for key, fallback in
              (("speed_limit", default.bytes_per_s), ("speed_time", default.seconds))}
    try:
        return SpeedLimit(chosen["speed_limit"][0], chosen["speed_time"][0])
    except SpeedLimitError as exc:
        raise ValueError(f"{chosen[exc.key][1]} {exc.reason}") from None


def _download_patience(args: argparse.Namespace, table: dict[str, Any]) -> float:
    value, where = _setting(args, table, "download_patience", DOWNLOAD_PATIENCE_S)
    if not finite_number(value) or value < 0:
        raise ValueError(f"{where} must be a number of seconds of at least 0 (0: a download "
                         f"broken off is not retried), got {value!r}")
    return float(value)


SPEC = ExtensionSpec("ota", _add_arguments, _create, paths=("trust", "credential"),
                     stop_wait_s=CLOSE_WAIT_S,
                     keys=("trust", "credential", "speed_limit", "speed_time",
                           "download_patience"))
