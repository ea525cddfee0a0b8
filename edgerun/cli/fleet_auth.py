"""`edgerun fleet token create|list|revoke`: bearer tokens for the fleet's servers; and the
client side every fleet command shares (`--token-file SECRET` or `EDGERUN_TOKEN`).

`register_token_commands(fleet_actions)` adds `token` to the `fleet` command's subparsers.
Until the `fleet` group of the registry lands, `register` makes a minimal one holding only it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgerun.adapters.auth.redirects import open_url
from edgerun.adapters.auth.tokens import (SCOPES, create_token, read_secret, read_tokens,
                                          revoke_token)

__all__ = ["add_token_option", "auth_headers", "client_token", "open_url", "protected_host",
           "read_secret", "refusal", "register_token_commands"]
from edgerun.runtime.errors import InvalidInput

log = logging.getLogger(__name__)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
TOKEN_ENV = "EDGERUN_TOKEN"


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


def protected_host(host: str, secured: bool) -> str:
    """Where `fleet serve` may listen: anywhere with tokens; without, loopback only (a
    development mode, as Redis's protected mode), said at start-up, so nothing is open to a
    network by default."""
    if secured:
        return host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidInput(f"refusing to listen on {host} without --tokens: every route would "
                           "be open to the network (create tokens with edgerun fleet token "
                           "create, or listen on 127.0.0.1)")
    err.print(f"development mode: no --tokens, so listening on {host} only, every route open "
              "to local users", style="yellow")
    return host


# ------------------------------------------------------------------ the client side
def add_token_option(parser: argparse.ArgumentParser) -> None:
    """`--token-file SECRET` on a fleet client command (falls back to $EDGERUN_TOKEN)."""
    parser.add_argument("--token-file", type=Path, default=None, metavar="SECRET",
                        help=f"bearer token for the server (default: ${TOKEN_ENV})")


def client_token(token_file: Path | None) -> str | None:
    """The token a client sends: from `--token-file`, else $EDGERUN_TOKEN, else None.

    Trimmed (a secret mounted from a file ends in a newline); whitespace left inside is
    refused here, naming where the token came from: http.client would refuse the header
    with the token itself in its message, printed to a terminal or a CI log."""
    if token_file is not None:
        if token_file.stat().st_mode & 0o077:
            log.warning("token file %s is readable by others: chmod 600", token_file)
        token, source = read_secret(token_file), f"token file {token_file}"
    else:
        token, source = (os.environ.get(TOKEN_ENV) or "").strip(), f"${TOKEN_ENV}"
    if any(c.isspace() or not c.isprintable() for c in token):
        raise InvalidInput(f"the {source} holds whitespace or a control character inside the "
                           "token (more than one line?): it must be the token alone")
    return token or None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def refusal(status: int, error: str, token: str | None) -> str | None:
    """What a client says when the server refused it (401 or 403), or None for other codes."""
    if status == 401:
        given = ("the token was not accepted (unknown or revoked)" if token else
                 f"no token was given: pass --token-file SECRET or set {TOKEN_ENV}")
        return f"unauthenticated (401): {given}. Server: {error}"
    if status == 403:
        return f"permission denied (403): the token's scope is too small. Server: {error}"
    return None
