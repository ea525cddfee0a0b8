"""One database connection, SQLite or PostgreSQL, behind the same small interface.

SQL is written once, with `?` parameters (translated to psycopg's `%s`) and the types and
statements both databases run unchanged: TEXT, BIGINT, DOUBLE PRECISION, no AUTOINCREMENT,
`INSERT ... ON CONFLICT (...) DO UPDATE`. Where they differ (the clock, locks), `dialect` says
which one this is. Connections run in autocommit mode; `transaction()` groups statements. A
PostgreSQL connection the server closed (a restart, a timeout that ended the session) is opened
again before the next statement, so a registry outlives its database's restarts.
"""

from __future__ import annotations

import functools
import random
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgerun.adapters.urls import redact
from edgerun.runtime.errors import InvalidInput

SQLITE, POSTGRESQL = "sqlite", "postgresql"
#: The database's own clock in seconds since the epoch: every process of a fleet reads the
#: same clock, so the times one replica stores (leases, job updates and deadlines, telemetry)
#: compare with another's even where the hosts' clocks disagree. PostgreSQL: the time of the
#: statement itself (`clock_timestamp()`), not `now()`, which is the transaction's start and
#: would date a write in a transaction that waited for a lock to before the wait. SQLite (its
#: processes share one host, so one clock): the host's clock to the microsecond, as SQLite's
#: own `julianday('now')` keeps only milliseconds and a telemetry message and a job update in
#: the same millisecond could not be told apart.
NOW = {SQLITE: "edgerun_now()",
       POSTGRESQL: "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"}


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """`?` placeholders (outside quoted literals) to `%s`, and literal `%` to `%%`."""
    out, quoted = [], False
    for char in sql:
        if char == "'":
            quoted = not quoted
        out.append("%s" if char == "?" and not quoted else "%%" if char == "%" else char)
    return "".join(out)


class Database:
    """A connection shared by threads (one statement at a time), rows as dicts."""

    def __init__(self, connection: Any, dialect: str,
                 reconnect: Callable[[], Any] | None = None) -> None:
        self.connection = connection
        self.dialect = dialect
        self._reconnect = reconnect
        self.now = NOW[dialect]
        self._lock = threading.RLock()
        self._depth = 0

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == SQLITE else to_pyformat(sql)

    def _open(self) -> Any:
        """The connection, opened again if the server closed it (outside a transaction only:
        a transaction cut off by the server is lost, and its caller hears so)."""
        if self._reconnect is not None and not self._depth and self._closed():
            self.connection.close()
            self.connection = self._reconnect()
        return self.connection

    def _closed(self) -> bool:
        """Whether the server ended this (idle) session. psycopg learns it only when a
        statement fails, and that statement (a device's report, an operator's deploy) would
        be lost: but a server that ends a session (a restart, a timeout) says so and hangs up,
        which leaves the idle socket readable, so read that first. Nothing is sent."""
        connection = self.connection
        if connection.closed:
            return True
        try:
            for _ in range(8):  # its FATAL message (libpq keeps it as a notice), then EOF
                if not _readable(connection.fileno()):
                    return False  # nothing (more) said since the last answer
                connection.pgconn.consume_input()
        except Exception:  # psycopg.OperationalError: the server hung up
            return True
        return bool(connection.closed)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """Statements that commit together; nested uses join the outer transaction. SQLite
        takes its write lock at the start (BEGIN IMMEDIATE), so two writers never deadlock."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._open().execute("BEGIN IMMEDIATE" if self.dialect == SQLITE else "BEGIN")
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                if not getattr(self.connection, "closed", False):
                    self.connection.execute("ROLLBACK")
                raise
            self._depth = 0
            cursor = self.connection.execute("COMMIT")
            if getattr(cursor, "statusmessage", None) == "ROLLBACK":
                # PostgreSQL's answer to COMMIT in a transaction an error (caught inside it)
                # left failed: nothing was written, and the caller must not act as if it was
                raise RuntimeError("the transaction failed (an error inside it was caught) "
                                   "and was rolled back")

    @contextmanager
    def savepoint(self, name: str) -> Iterator[None]:
        """Inside a transaction: what the block does is undone alone if it raises, and the
        transaction goes on (PostgreSQL would refuse every later statement otherwise)."""
        self.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            raise
        finally:
            self.execute(f"RELEASE SAVEPOINT {name}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        params = _checked(params)
        with self._lock:
            cursor = self._open().execute(self._sql(sql), params)
            return cursor.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        params = _checked(params)
        with self._lock:
            cursor = self._open().execute(self._sql(sql), params)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self.connection.close()


def _checked(params: Sequence[Any]) -> tuple[Any, ...]:
    """The parameters, if no text among them holds a NUL: PostgreSQL stores none (psycopg's
    DataError, a 500 for an id sent in a URL or a credential), so neither database takes one
    and the caller hears which value it was."""
    for value in params:
        if isinstance(value, str) and "\0" in value:
            raise InvalidInput(f"{value!r:.60} holds a NUL character (0x00), which no name, id "
                               "or text stored here may")
    return tuple(params)


def _readable(fd: int) -> bool:
    """Whether the socket has something to read now (poll: no 1024-descriptor limit)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


SQLITE_BUSY_TIMEOUT_S = 30.0


def _wal(connection: sqlite3.Connection) -> None:
    """Readers never wait for the writer. Switching a file to WAL needs its exclusive lock, and
    SQLite answers "locked" at once, without waiting out the busy timeout, when processes
    starting together all hold a read lock and want it: so wait here."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.04)


def _sqlite(path: str) -> Database:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                 timeout=SQLITE_BUSY_TIMEOUT_S)
    _wal(connection)
    connection.execute("PRAGMA foreign_keys=ON")
    connection.create_function("edgerun_now", 0, time.time)  # NOW[SQLITE]
    return Database(connection, SQLITE)


def _postgresql(url: str) -> Database:
    try:
        import psycopg
    except ImportError as exc:
        raise InvalidInput(f"{redact(url)} needs psycopg 3: pip install 'edgerun[fleet]' "
                           f"({exc})") from None

    def open_connection() -> Any:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            # psycopg's message names host and user, never the password
            raise InvalidInput(f"cannot connect to {redact(url)}: {exc}".strip()) from None

    return Database(open_connection(), POSTGRESQL, reconnect=open_connection)


def connect(url: str | Path) -> Database:
    """`postgresql://USER[:PASS]@HOST[:PORT]/DB`, `sqlite:///relative.db`,
    `sqlite:////absolute.db` (SQLAlchemy's spelling), or a plain path to a SQLite file."""
    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        return _postgresql(text)
    if scheme == "sqlite":
        return _sqlite(text[len("sqlite:///"):] if text.startswith("sqlite:///") else "")
    if scheme:
        raise InvalidInput(f"database URL {redact(text)!r}: use postgresql://, sqlite:/// or "
                           "a file path")
    return _sqlite(text)
