"""Bearer tokens: a secret for the caller, only its hash on the server.

A tokens file holds one token per line, never the token itself:

    # scope  hash                   name        created-at
    admin    sha256:9f86d08...      ops-laptop  2026-11-25T16:00:00Z

A token is 256 random bits (`edgerun_` + 43 url-safe characters). Its hash is plain SHA-256, not
a slow password hash: slow hashes (bcrypt, scrypt, PBKDF2) exist to make guessing a *low-entropy*
password expensive, but nobody can enumerate 2**256 secrets, so a single fast hash is as safe
here and keeps the check per request to microseconds. The file reveals no usable secret.

`TokenStore` checks a presented token against every entry with `hmac.compare_digest` (no early
exit, so timing tells nothing about which or whether an entry matched), notices when the file
changes (inode, size, mtime or mode) and reloads it before the next check, with no restart. It logs
token names, never tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgerun.runtime.errors import InvalidInput, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

#: Scopes from least to most: each implies the ones before it.
SCOPES = ("read", "deploy", "admin")
PREFIX = "edgerun_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def allows(granted: str, needed: str) -> bool:
    """admin implies deploy implies read."""
    return SCOPES.index(granted) >= SCOPES.index(needed)


@dataclass(frozen=True)
class TokenEntry:
    """One line of a tokens file: what a token may do and what to call it in logs."""

    scope: str
    digest: bytes  # the raw SHA-256 of the token
    name: str
    created_at: str

    def line(self) -> str:
        return f"{self.scope} sha256:{self.digest.hex()} {self.name} {self.created_at}\n"


def _parse_line(line: str) -> TokenEntry:
    fields = line.split()
    if len(fields) != 4:
        raise ValueError(f"expected 4 fields (scope hash name created-at), got {len(fields)}")
    scope, digest, name, created_at = fields
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError("hash is not sha256:<64 hex digits>")
    return TokenEntry(scope, bytes.fromhex(match.group(1)), name, created_at)


def read_tokens(path: str | Path) -> list[TokenEntry]:
    """Every valid entry of a tokens file; bad lines are skipped with a warning naming them.

    Skipping (rather than refusing the whole file) keeps a half-written last line from locking
    every caller out, while a removed line always takes effect.
    """
    entries = []
    # a stray non-UTF-8 byte (in a comment, say) spoils its own line only: not every request
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(_parse_line(line))
        except ValueError as exc:
            log.warning("%s line %d ignored: %s", path, number, exc)
    return entries


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"token name {name!r} must be 1-64 letters, digits or ._@- "
                           "(starting with a letter or digit)")


def create_token(scope: str, tokens_file: str | Path, secret_file: str | Path,
                 name: str | None = None) -> TokenEntry:
    """Write a new token to `secret_file` (mode 0600, never overwritten) and its hash to
    `tokens_file` (appended, created 0600). The token exists nowhere else."""
    if scope not in SCOPES:
        raise InvalidInput(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    name = name or f"{scope}-{secrets.token_hex(4)}"
    _check_name(name)
    tokens_file, secret_file = Path(tokens_file), Path(secret_file)
    if tokens_file.exists() and any(e.name == name for e in read_tokens(tokens_file)):
        raise InvalidInput(f"{tokens_file} already has a token named {name!r}")
    token = PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = TokenEntry(scope, hashlib.sha256(token.encode()).digest(), name, created)
    try:
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{secret_file} exists; refusing to overwrite a secret") from None
    with os.fdopen(fd, "w") as sink:
        sink.write(token + "\n")
    # one write on an O_APPEND descriptor: concurrent creators never interleave lines
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "w") as sink:
        sink.write(entry.line())
    log.info("created %s token %r in %s", scope, name, tokens_file)
    return entry


def revoke_token(tokens_file: str | Path, name: str) -> None:
    """Remove the named token: the file is rewritten beside and renamed over the old one, so a
    running `TokenStore` sees a new inode and refuses the token on its next check."""
    tokens_file = Path(tokens_file)
    # bytes, as read_tokens tolerates them: a stray non-UTF-8 byte must not block a revocation,
    # and every other line is written back as it was
    lines = tokens_file.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if not _names(line, name)]
    if len(kept) == len(lines):
        raise InvalidInput(f"{tokens_file} has no token named {name!r}")
    staging = tokens_file.with_name(f".{tokens_file.name}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        sink.writelines(kept)
        sink.flush()
        os.fsync(sink.fileno())
    # keep the owner and mode a server's user was given to read it
    original = tokens_file.stat()
    os.chmod(staging, original.st_mode & 0o777)
    if os.geteuid() == 0:
        os.chown(staging, original.st_uid, original.st_gid)
    os.replace(staging, tokens_file)
    log.info("revoked token %r in %s", name, tokens_file)


def _names(line: bytes, name: str) -> bool:
    """Whether a tokens-file line is a token named `name` (a comment never is, whatever its
    third word: revoking a name only a comment has must fail, not report success)."""
    fields = line.split()
    return bool(fields) and not fields[0].startswith(b"#") and fields[2:3] == [name.encode()]


def _unsafe(mode: int) -> bool:
    return bool(mode & 0o022)


def read_secret(path: str | Path) -> str:
    """A token as `create_token` wrote it (the first line, whitespace stripped). A file other
    users may read (`fleet enroll ... > pi-1.secret` under the usual umask) is used, with a
    warning: on a shared host that is how a device's or an operator's secret leaks."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s holds a secret and other users may read it (mode %03o): chmod 600 %s",
                    path, mode, path)
    return path.read_text(encoding="utf-8").strip()


class TokenStore:
    """The tokens of one file, reloaded whenever the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._entries: tuple[TokenEntry, ...] = ()
        self._problem = ""
        if not self.path.is_file():  # a folder was said not to exist
            raise InvalidInput(f"tokens file {self.path} "
                               f"{'is not a file' if self.path.exists() else 'does not exist'}")
        if _unsafe(self.path.stat().st_mode):
            raise InvalidInput(f"tokens file {self.path} is writable by group or others, so "
                               "anyone who can write it can grant themselves admin: chmod 600")
        self._refresh()

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        self._refresh()
        return self._entries

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_mode)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return
            # fail closed: a tokens file that vanished or that others may write grants nothing
            entries: tuple[TokenEntry, ...] = ()
            if stamp is None:
                problem = "is missing"
            elif _unsafe(stamp[-1]):
                problem = "is writable by group or others (chmod 600)"
            else:
                try:
                    entries, problem = tuple(read_tokens(self.path)), ""
                except OSError as exc:
                    stamp, problem = None, f"is unreadable ({exc.strerror})"
            if not problem:
                log.info("loaded %d tokens from %s", len(entries), self.path)
            elif problem != self._problem:  # once, not once per refused request
                log.error("tokens file %s %s: refusing every token", self.path, problem)
            self._entries, self._stamp, self._problem = entries, stamp, problem

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry whose hash matches, comparing against every entry in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def check(self, token: str | None, needed: str) -> TokenEntry:
        """The caller's entry if `token` is valid and its scope covers `needed`; otherwise
        Unauthenticated (no or unknown token) or PermissionDenied (scope too small)."""
        if not token:
            raise Unauthenticated("a bearer token is required: send "
                                  "'Authorization: Bearer <token>'")
        entry = self.authenticate(token)
        if entry is None:
            raise Unauthenticated("the bearer token is not valid (unknown or revoked)")
        if not allows(entry.scope, needed):
            raise PermissionDenied(f"token {entry.name!r} has scope {entry.scope!r}; this "
                                   f"needs {needed!r}")
        return entry

    def check_header(self, authorization: str | None, needed: str) -> TokenEntry:
        """`check` on an `Authorization` header value (HTTP, or gRPC metadata)."""
        return self.check(bearer(authorization), needed)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def basic(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` value: how a device presents its id
    and secret to the registry, the same pair it uses as its MQTT username and password."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode(
            ).partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if colon and user else None
