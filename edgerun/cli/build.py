"""`edgerun build daemon`: the MQTT daemon as one executable to flash onto a device."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("build", help="build what runs on a device")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    daemon = targets.add_parser(
        "daemon", help="one-file executable of `edgerun daemon` + systemd unit + device.toml",
        description="PyInstaller builds for this machine's architecture only; build aarch64 "
                    "binaries on the device or in an arm64 container (devices/README.md).")
    daemon.add_argument("--device", default="cpu", help="device profile (default: cpu)")
    daemon.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    daemon.set_defaults(handler=_build_daemon)


def _build_daemon(args: argparse.Namespace) -> int:
    from edgerun.devices.daemon_build import build_daemon

    try:
        with console.status(f"building the daemon for {args.device} with PyInstaller "
                            "(a minute or two)"):
            built = build_daemon(args.device, args.output)
    except (ValueError, RuntimeError) as exc:
        console.print(f"[bold red]error[/]: {escape(str(exc))}", highlight=False)
        return 2
    size = built.binary.stat().st_size / 2**20
    console.print(f"[green]built[/] {built.binary} ({size:.1f} MiB), {built.unit.name}, "
                  f"{built.config.name}", highlight=False)
    return 0
