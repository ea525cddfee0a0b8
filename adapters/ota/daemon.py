"""The OTA agent inside `edgerun daemon`: `--trust PUBKEY` turns it on.

`attach` wires an agent to the daemon's extension point: the daemon's repository (its source
becomes the A/B slots, with the daemon's folder behind them), its `publish`, a subscription to
`edgerun/<device>/ota`, and the slots in every status and telemetry message. Start-up runs the
agent's recovery once the repository is loaded and before the daemon connects.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgerun.adapters.mqtt.extensions import ExtensionSpec
from edgerun.adapters.ota.agent import OtaAgent
from edgerun.runtime import signing


class OtaExtension:
    def __init__(self, agent: OtaAgent, daemon: Any) -> None:
        self.agent = agent
        self.daemon = daemon

    def start(self) -> None:
        self.agent.recover()

    def stop(self) -> None:
        self.agent.close()


def attach(daemon: Any, trust_keys: Iterable[str | Path]) -> OtaExtension:
    """An OTA agent on this daemon, trusting bundles signed by any of `trust_keys`."""
    agent = OtaAgent(publish=daemon.publish, repository=daemon.repository,
                     device_id=daemon.device_id, data_dir=daemon.data_dir,
                     trusted=signing.load_public_keys(trust_keys),
                     group=daemon.group or None, on_change=daemon.publish_status)
    daemon.subscribe(agent.topic, lambda message: agent.handle_job(message.payload), qos=1)
    slots = lambda: {"ota": agent.describe()["ota"]}  # noqa: E731
    daemon.add_status_fields(slots)
    daemon.add_telemetry_fields(slots)
    return OtaExtension(agent, daemon)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", type=Path, action="append", default=None, metavar="PUBKEY",
                        help="take OTA updates signed by this public key (repeatable); "
                             "without one the OTA agent stays off")


def _create(daemon: Any, args: argparse.Namespace, table: dict[str, Any]) -> OtaExtension | None:
    keys = args.trust or table.get("trust") or []
    if isinstance(keys, (str, Path)):
        keys = [keys]
    return attach(daemon, keys) if keys else None


SPEC = ExtensionSpec("ota", _add_arguments, _create)
