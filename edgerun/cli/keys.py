"""`edgerun keys generate`: the fleet's Ed25519 signing key pair."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("keys", help="signing keys for bundles")
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = sub.add_parser("generate", help="write a new Ed25519 key pair: fleet.key "
                                               "(owner-only) and fleet.pub")
    generate.add_argument("-o", "--output", type=Path, required=True, help="folder")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from edgerun.runtime import signing

    private, public = signing.generate_keys(args.output)
    key = signing.load_public_key(public)
    out.print(f"private key {private} (mode 0600: keep it off devices)\n"
              f"public key  {public} (key id {key.key_id}: give it to devices and the registry)")
    return 0
