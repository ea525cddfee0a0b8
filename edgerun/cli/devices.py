"""`edgerun devices list|show`: the shipped device profiles and what each compiles for."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgerun.devices import DeviceProfile, list_profiles, load_profile

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("devices", help="list and show device profiles")
    sub = parser.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="every shipped profile, one row each")
    listing.add_argument("--json", action="store_true", help="print the profiles as JSON")
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", help="every field of one profile")
    show.add_argument("name", help="profile name (see `edgerun devices list`) or a .toml path")
    show.add_argument("--json", action="store_true", help="print the profile as JSON")
    show.set_defaults(handler=_show)


def profile_json(profile: DeviceProfile) -> dict[str, Any]:
    data = dataclasses.asdict(profile)
    data["execution_providers"] = list(profile.execution_providers)
    data["accelerator"] = profile.accelerator
    return data


def _list(args: argparse.Namespace) -> int:
    profiles = [load_profile(name) for name in list_profiles()]
    if args.json:
        print(json.dumps([profile_json(p) for p in profiles], indent=2))
        return 0
    table = Table(title="device profiles")
    for column in ("name", "arch", "accelerator", "precision", "memory", "description"):
        table.add_column(column, overflow="fold")
    for p in profiles:
        table.add_row(p.name, p.arch, p.accelerator, p.precision,
                      f"{p.memory_mb} MiB" if p.memory_mb else "-", p.description)
    out.print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.name)
    except ValueError as exc:
        err.print(f"[bold red]error[/]: {escape(str(exc))}")
        return 2
    data = profile_json(profile)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"device profile {profile.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, shown)
    out.print(table)
    return 0
