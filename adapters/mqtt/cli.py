"""The daemon's command line, shared by `edgerun daemon` and the one-file device binary.

Kept free of rich and of the rest of the `edgerun` command so the binary bundles only this.
Flags override device.toml; extensions (see `extensions.py`) add their own flags here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgerun.adapters.mqtt.config import LOG_LEVELS, PROTOCOLS, load_config, relative_to
from edgerun.adapters.mqtt.extensions import specs
from edgerun.devices.profile import key_text
from edgerun.runtime.errors import EdgerunError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's flags; every one defaults to None so device.toml's value stands."""
    add = parser.add_argument
    add("--config", type=Path, help="device.toml with these settings (flags override it)")
    add("--repository", type=Path, help="model repository folder (DIR/<model>/<version>/)")
    add("--broker", help="mqtt://[user:pass@]HOST:PORT, or mqtts:// for TLS")
    add("--device-id", help="this device's id: requests arrive on edgerun/<id>/infer/<model>")
    add("--group", help="also take a share of edgerun/<group>/infer/<model> (shared "
                        "subscription)")
    add("--data-dir", type=Path, help="state folder (default <repository>/.edgerun)")
    add("--device", help="device profile (default: cpu)")
    add("--poll-interval", type=float, metavar="SECONDS",
        help="hot-swap repository changes every SECONDS (default 5; 0 turns it off)")
    add("--protocol", choices=PROTOCOLS, help="MQTT version (default auto: 5, else 3.1.1)")
    add("--qos", type=int, choices=(0, 1, 2), help="QoS of subscriptions and answers "
                                                  "(default 1)")
    add("--keepalive", type=int, metavar="SECONDS")
    add("--session-expiry", type=int, metavar="SECONDS",
        help="how long the broker keeps requests for us while we are away (default 3600)")
    add("--username")
    add("--password", help="visible to every user in `ps`: prefer --password-file")
    add("--password-file", type=Path, metavar="FILE",
        help="the broker password's file (its first line; keep it chmod 600)")
    add("--ca-file", type=Path, help="CA certificate for mqtts://")
    add("--cert-file", type=Path, help="client certificate for mqtts://")
    add("--key-file", type=Path, help="client key for mqtts://")
    add("--reconnect-min-s", type=float, metavar="SECONDS",
        help="first reconnect delay, doubled up to --reconnect-max-s, with jitter")
    add("--reconnect-max-s", type=float, metavar="SECONDS")
    add("--telemetry-interval", type=float, metavar="SECONDS", help="default 30; 0 turns it off")
    add("--max-inbox", type=int, help="requests in flight before Overloaded replies "
                                      "(default 1024)")
    add("--drain-timeout", type=float, metavar="SECONDS")
    add("--log-level", choices=LOG_LEVELS, help="default info")
    for spec in specs():
        spec.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from edgerun.adapters.mqtt.daemon import Daemon

    # a setting that cannot work (a missing trust key or credential, unreadable TLS files)
    # ends start-up with its reason and status 2, never a traceback (the one-file binary has no
    # other handler)
    try:
        config = load_config(args.config, **vars(args))
        logging.getLogger("edgerun").setLevel(config.log_level.upper())
        known = specs()
        unknown = sorted(set(config.extensions) - {spec.name for spec in known})
        if unknown:  # `[oat]` for `[ota]` left the OTA agent off without a word
            raise ValueError(f"{args.config}: unknown table(s) "
                             f"{', '.join(map(key_text, unknown))}; known: "
                             f"{', '.join(sorted(spec.name for spec in known))}")
        for spec in known:
            strange = sorted(set(config.extensions.get(spec.name, {})) - set(spec.keys))
            if strange:
                raise ValueError(f"{args.config}: unknown key(s) "
                                 f"{', '.join(map(key_text, strange))} in "
                                 f"[{spec.name}]; known: {', '.join(spec.keys)}")
        daemon = Daemon(config)
        for spec in known:
            table = config.extensions.get(spec.name, {})
            if args.config is not None:
                try:
                    table = relative_to(Path(args.config).parent, table, spec.paths)
                except ValueError as exc:
                    raise ValueError(f"{args.config}: [{spec.name}] {exc}") from None
            extension = spec.create(daemon, args, table)
            if extension is not None:
                daemon.add_extension(extension)
    except (OSError, ValueError, EdgerunError) as exc:
        print(f"edgerun daemon: {exc}", file=sys.stderr)
        return 2
    daemon.run()
    from edgerun.runtime.repository import exit_if_still_loading
    exit_if_still_loading(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The one-file binary's entry point: `edgerun-daemon --broker ... --device-id ...`."""
    parser = argparse.ArgumentParser(prog="edgerun-daemon",
                                     description="Serve a model repository over MQTT.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)
