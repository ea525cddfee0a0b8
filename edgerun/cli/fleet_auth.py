"""`edgerun fleet token create|list|revoke`: bearer tokens for the fleet's servers.

`register_token_commands(fleet_actions)` adds `token` to the `fleet` command's subparsers.
Until the `fleet` group of the registry lands, `register` makes a minimal one holding only it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgerun.adapters.auth.tokens import SCOPES, create_token, read_tokens, revoke_token

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("fleet", help="fleet credentials")
    register_token_commands(parser.add_subparsers(dest="fleet_command", required=True,
                                                  metavar="ACTION"))


def register_token_commands(fleet_actions: argparse._SubParsersAction) -> None:
    token = fleet_actions.add_parser(
        "token", help="create, list and revoke bearer tokens",
        description="A tokens file holds one hashed token per line (scope, sha256, name, "
                    "created-at); servers given it with --api-keys or --tokens reload it when "
                    "it changes.")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="write a new token to SECRET, its hash to TOKENS")
    create.add_argument("--scope", choices=SCOPES, required=True,
                        help="read < deploy < admin (each implies the ones before)")
    create.add_argument("--tokens", type=Path, required=True, metavar="TOKENS")
    create.add_argument("-o", "--output", type=Path, required=True, metavar="SECRET",
                        help="file for the token (created owner-only; never overwritten)")
    create.add_argument("--name", default=None,
                        help="what logs and errors call the token (default SCOPE-<random>)")
    create.set_defaults(handler=_create)

    listing = actions.add_parser("list", help="names, scopes and dates (never secrets)")
    listing.add_argument("--tokens", type=Path, required=True, metavar="TOKENS")
    listing.set_defaults(handler=_list)

    revoke = actions.add_parser("revoke", help="remove a token; running servers refuse it at "
                                               "their next check")
    revoke.add_argument("name")
    revoke.add_argument("--tokens", type=Path, required=True, metavar="TOKENS")
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace) -> int:
    entry = create_token(args.scope, args.tokens, args.output, name=args.name)
    out.print(f"created {entry.scope} token {entry.name!r}: secret in {args.output}, "
              f"hash in {args.tokens}")
    return 0


def _list(args: argparse.Namespace) -> int:
    table = Table("name", "scope", "created", "sha256 (prefix)")
    for entry in read_tokens(args.tokens):
        table.add_row(entry.name, entry.scope, entry.created_at, entry.digest.hex()[:12])
    out.print(table)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    revoke_token(args.tokens, args.name)
    out.print(f"revoked token {args.name!r} in {args.tokens}")
    return 0
