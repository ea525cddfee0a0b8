"""`edgerun daemon`: serve a model repository over MQTT (the edge daemon)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "daemon", help="serve a model repository over MQTT on a device",
        description="Answer inference requests on edgerun/<device-id>/infer/<model>[/<version>] "
                    "(and a group's shared topic) from DIR/<model>/<version>/ bundles.")
    try:
        from edgerun.adapters.mqtt.cli import add_arguments
    except ImportError as exc:  # paho-mqtt missing
        parser.set_defaults(handler=lambda args, error=exc: _missing(error))
        return
    add_arguments(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from edgerun.adapters.mqtt.cli import run
    return run(args)


def _missing(exc: ImportError) -> int:
    raise ModuleNotFoundError(f"edgerun daemon needs the mqtt extra: pip install "
                              f"'edgerun[mqtt]' ({exc})", name=exc.name)
