"""Fleet state: models, versions, devices, rollouts and per-device jobs, in SQL.

SQLite is the embedded default. The SQL is kept to what PostgreSQL runs unchanged: plain
types (TEXT, BIGINT, DOUBLE PRECISION), no AUTOINCREMENT or rowid (ids are made here),
`INSERT ... ON CONFLICT (...) DO UPDATE`, and parameters written `?` that `Store` turns into the
driver's style. `schema_version` records which migrations have run.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the first schema
        "CREATE TABLE schema_version (version BIGINT NOT NULL)",
        """CREATE TABLE models (
            name TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE versions (
            model TEXT NOT NULL REFERENCES models (name),
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size BIGINT NOT NULL,
            key_id TEXT NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (model, version))""",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            grp TEXT,
            state TEXT NOT NULL,
            status TEXT,
            telemetry TEXT,
            telemetry_at DOUBLE PRECISION,
            last_seen DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            state TEXT NOT NULL,
            spec TEXT NOT NULL,
            wave BIGINT NOT NULL,
            reason TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE jobs (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id),
            device_id TEXT NOT NULL,
            wave BIGINT NOT NULL,
            job_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            version TEXT NOT NULL,
            previous_version TEXT,
            state TEXT NOT NULL,
            detail TEXT NOT NULL,
            deadline DOUBLE PRECISION,
            baseline TEXT,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (rollout_id, device_id))""",
        "CREATE INDEX jobs_by_job_id ON jobs (job_id)",
    ),
)


class Store:
    """One connection, serialized by a lock; `?` parameters; rows as dicts."""

    def __init__(self, connection: Any, paramstyle: str = "qmark") -> None:
        self._db = connection
        self._paramstyle = paramstyle
        self._lock = threading.RLock()
        self.migrate()

    @classmethod
    def sqlite(cls, path: str | Path) -> Store:
        connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return cls(connection)

    def _sql(self, sql: str) -> str:
        return sql if self._paramstyle == "qmark" else sql.replace("?", "%s")

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock:
            self._db.execute(self._sql(sql), tuple(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(self._sql(sql), tuple(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def migrate(self) -> None:
        with self.transaction():
            exists = self.query("SELECT COUNT(*) AS n FROM sqlite_master WHERE name = ?",
                                ("schema_version",)) if self._paramstyle == "qmark" else \
                self.query("SELECT COUNT(*) AS n FROM information_schema.tables "
                           "WHERE table_name = ?", ("schema_version",))
            current = 0
            if exists[0]["n"]:
                row = self.one("SELECT MAX(version) AS v FROM schema_version")
                current = int(row["v"] or 0)
            for number, statements in enumerate(MIGRATIONS, start=1):
                if number <= current:
                    continue
                for statement in statements:
                    self.execute(statement)
                self.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ registry
    def add_version(self, model: str, version: str, sha256: str, size: int, key_id: str,
                    path: str) -> None:
        now = time.time()
        with self.transaction():
            self.execute("INSERT INTO models (name, created_at) VALUES (?, ?) "
                         "ON CONFLICT (name) DO NOTHING", (model, now))
            self.execute("INSERT INTO versions (model, version, sha256, size, key_id, path, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (model, version, sha256, size, key_id, path, now))

    def version(self, model: str, version: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM versions WHERE model = ? AND version = ?",
                        (model, version))

    def versions(self) -> list[dict[str, Any]]:
        return self.query("SELECT model, version, sha256, size, key_id, created_at "
                          "FROM versions ORDER BY model, created_at")

    # ------------------------------------------------------------------- devices
    def see_device(self, device_id: str, *, state: str | None = None, group: str | None = None,
                   status: dict | None = None, telemetry: dict | None = None) -> None:
        now = time.time()
        self.execute(
            "INSERT INTO devices (device_id, grp, state, status, telemetry, telemetry_at, "
            "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "grp = COALESCE(excluded.grp, devices.grp), "
            "state = COALESCE(?, devices.state), "
            "status = COALESCE(excluded.status, devices.status), "
            "telemetry = COALESCE(excluded.telemetry, devices.telemetry), "
            "telemetry_at = COALESCE(excluded.telemetry_at, devices.telemetry_at), "
            "last_seen = excluded.last_seen",
            (device_id, group, state or "online", _json(status), _json(telemetry),
             now if telemetry is not None else None, now, state))

    def devices(self, group: str | None = None) -> list[dict[str, Any]]:
        if group is None:
            rows = self.query("SELECT * FROM devices ORDER BY device_id")
        else:
            rows = self.query("SELECT * FROM devices WHERE grp = ? ORDER BY device_id", (group,))
        for row in rows:
            row["status"] = _unjson(row["status"])
            row["telemetry"] = _unjson(row["telemetry"])
        return rows

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = [d for d in self.devices() if d["device_id"] == device_id]
        return rows[0] if rows else None

    # ------------------------------------------------------------------ rollouts
    def add_rollout(self, rollout_id: str, model: str, version: str, spec: dict,
                    jobs: list[tuple[str, int]]) -> None:
        now = time.time()
        with self.transaction():
            self.execute("INSERT INTO rollouts (id, model, version, state, spec, wave, reason, "
                         "created_at, updated_at) VALUES (?, ?, ?, 'running', ?, -1, '', ?, ?)",
                         (rollout_id, model, version, json.dumps(spec), now, now))
            for device_id, wave in jobs:
                self.execute("INSERT INTO jobs (rollout_id, device_id, wave, job_id, kind, "
                             "version, previous_version, state, detail, deadline, updated_at) "
                             "VALUES (?, ?, ?, '', 'install', ?, NULL, 'pending', '', NULL, ?)",
                             (rollout_id, device_id, wave, version, now))

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self.one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if row is not None:
            row["spec"] = json.loads(row["spec"])
        return row

    def rollouts(self, state: str | None = None) -> list[dict[str, Any]]:
        if state is None:
            rows = self.query("SELECT * FROM rollouts ORDER BY created_at")
        else:
            rows = self.query("SELECT * FROM rollouts WHERE state = ? ORDER BY created_at",
                              (state,))
        for row in rows:
            row["spec"] = json.loads(row["spec"])
        return rows

    def update_rollout(self, rollout_id: str, **fields: Any) -> None:
        self._update("rollouts", "id = ?", (rollout_id,), fields)

    def jobs(self, rollout_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM jobs WHERE rollout_id = ? ORDER BY wave, device_id",
                          (rollout_id,))

    def device_has_job(self, device_id: str, model: str, version: str) -> bool:
        """Whether a rollout ever addressed `model` `version` to the device (a download may
        come late, after a retry or a restart, so a finished job still counts)."""
        return self.one("SELECT 1 AS found FROM jobs JOIN rollouts ON rollouts.id = "
                        "jobs.rollout_id WHERE jobs.device_id = ? AND rollouts.model = ? AND "
                        "jobs.version = ?", (device_id, model, version)) is not None

    def job_by_id(self, job_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))

    def update_job(self, rollout_id: str, device_id: str, **fields: Any) -> None:
        self._update("jobs", "rollout_id = ? AND device_id = ?", (rollout_id, device_id), fields)

    def _update(self, table: str, where: str, keys: tuple, fields: dict[str, Any]) -> None:
        fields = {**fields, "updated_at": time.time()}
        columns = ", ".join(f"{name} = ?" for name in fields)  # names come from this module
        self.execute(f"UPDATE {table} SET {columns} WHERE {where}", (*fields.values(), *keys))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _unjson(value: str | None) -> Any:
    return None if value is None else json.loads(value)
