"""Fleet state: models, versions, devices, rollouts and per-device jobs, in SQL.

The tables live in the fleet database (`edgerun.adapters.fleetdb`): SQLite, the embedded
default, or PostgreSQL (`fleet serve --db postgresql://...`) for fleets that outgrow one file
or want two registry processes. The SQL is what both run unchanged (TEXT, BIGINT, DOUBLE
PRECISION, ids made here, `INSERT ... ON CONFLICT (...) DO UPDATE`, `?` parameters); the
schema is versioned in `schema_migrations` under the component "registry".

Every time stored here is the database's clock (`Database.now`, inside the statement): with
several replicas on one database, one replica's times are compared with another's (a device's
telemetry with its job's update, a deadline with the time of a later leader's tick), and the
hosts' own clocks need not agree.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgerun.adapters.fleetdb import Database, Migration, connect, migrate
from edgerun.adapters.fleetdb.db import SQLITE

COMPONENT = "registry"
#: Job states of the store's own: not yet published (no job id yet); dropped by an abort
#: before it was sent, or withdrawn after (cleared from the broker before any report).
PENDING, CANCELLED = "pending", "cancelled"
MIGRATIONS = (
    Migration(1, "models, versions, devices, rollouts, jobs", (
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
    )),
)


class Store:
    """The registry's queries over one fleet database connection (shared by threads)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.migrate()

    @classmethod
    def open(cls, url: str | Path) -> Store:
        """`postgresql://...`, `sqlite:///...` or a SQLite file path."""
        return cls(connect(url))

    @classmethod
    def sqlite(cls, path: str | Path) -> Store:
        return cls(connect(path))

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        with self.db.transaction():
            yield self

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.db.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        return self.db.one(sql, params)

    def migrate(self) -> None:
        _adopt_schema_version(self.db)
        migrate(self.db, MIGRATIONS, component=COMPONENT)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ registry
    def add_version(self, model: str, version: str, sha256: str, size: int, key_id: str,
                    path: str) -> dict[str, Any]:
        """Record a version unless one is recorded already; returns the row that stands (this
        one, or the one a concurrent push recorded first)."""
        now = self.db.now
        with self.transaction():
            self.execute(f"INSERT INTO models (name, created_at) VALUES (?, {now}) "
                         "ON CONFLICT (name) DO NOTHING", (model,))
            self.execute("INSERT INTO versions (model, version, sha256, size, key_id, path, "
                         f"created_at) VALUES (?, ?, ?, ?, ?, ?, {now}) "
                         "ON CONFLICT (model, version) DO NOTHING",
                         (model, version, sha256, size, key_id, path))
            row = self.version(model, version)
        assert row is not None  # inserted, or there already
        return row

    def version(self, model: str, version: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM versions WHERE model = ? AND version = ?",
                        (model, version))

    def versions(self) -> list[dict[str, Any]]:
        return self.query("SELECT model, version, sha256, size, key_id, created_at "
                          "FROM versions ORDER BY model, created_at")

    # ------------------------------------------------------------------- devices
    def see_device(self, device_id: str, *, state: str | None = None, group: str | None = None,
                   status: dict | None = None, telemetry: dict | None = None) -> None:
        """Record what a device said, stamped by the database's clock in the same statement
        (no extra round trip: telemetry comes from every device all the time)."""
        now = self.db.now
        telemetry_at = now if telemetry is not None else "NULL"
        self.execute(
            "INSERT INTO devices (device_id, grp, state, status, telemetry, telemetry_at, "
            f"last_seen) VALUES (?, ?, ?, ?, ?, {telemetry_at}, {now}) "
            "ON CONFLICT (device_id) DO UPDATE SET "
            "grp = COALESCE(excluded.grp, devices.grp), "
            "state = COALESCE(?, devices.state), "
            "status = COALESCE(excluded.status, devices.status), "
            "telemetry = COALESCE(excluded.telemetry, devices.telemetry), "
            "telemetry_at = COALESCE(excluded.telemetry_at, devices.telemetry_at), "
            "last_seen = excluded.last_seen",
            (device_id, group, state or "online", _json(status), _json(telemetry), state))

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
        now = self.db.now
        with self.transaction():
            self.execute("INSERT INTO rollouts (id, model, version, state, spec, wave, reason, "
                         "created_at, updated_at) VALUES (?, ?, ?, 'running', ?, -1, '', "
                         f"{now}, {now})", (rollout_id, model, version, json.dumps(spec)))
            for device_id, wave in jobs:
                self.execute("INSERT INTO jobs (rollout_id, device_id, wave, job_id, kind, "
                             "version, previous_version, state, detail, deadline, updated_at) "
                             f"VALUES (?, ?, ?, '', 'install', ?, NULL, ?, '', NULL, {now})",
                             (rollout_id, device_id, wave, version, PENDING))

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self.one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if row is not None:
            row["spec"] = json.loads(row["spec"])
        return row

    def rollouts(self, *states: str, lock: bool = False) -> list[dict[str, Any]]:
        """Every rollout, or those in `states`; `lock` (inside a transaction) holds their rows
        until it ends (PostgreSQL; SQLite's write lock holds everything), so an abort asked of
        another process waits for, then sees, what this transaction does to them."""
        where = f" WHERE state IN ({_marks(states)})" if states else ""
        suffix = " FOR UPDATE" if lock and self.db.dialect != SQLITE else ""
        rows = self.query(f"SELECT * FROM rollouts{where} ORDER BY created_at{suffix}", states)
        for row in rows:
            row["spec"] = json.loads(row["spec"])
        return rows

    def update_rollout(self, rollout_id: str, **fields: Any) -> None:
        self._update("rollouts", "id = ?", (rollout_id,), fields)

    def move_rollout(self, rollout_id: str, states: Sequence[str], **fields: Any) -> bool:
        """Update the rollout only if it is in one of `states` (a compare-and-set any process
        may do); whether it was."""
        return self._update("rollouts", f"id = ? AND state IN ({_marks(states)})",
                            (rollout_id, *states), fields) > 0

    def jobs(self, rollout_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM jobs WHERE rollout_id = ? ORDER BY wave, device_id",
                          (rollout_id,))

    def busy_devices(self, rollout_id: str, idle: Collection[str]) -> set[str]:
        """Devices with a job of another rollout in a state not in `idle` (under way)."""
        rows = self.query(f"SELECT DISTINCT device_id FROM jobs WHERE rollout_id <> ? AND "
                          f"state NOT IN ({_marks(idle)})", (rollout_id, *idle))
        return {row["device_id"] for row in rows}

    def busy_with(self, rollout_id: str, device_id: str, idle: Collection[str]) -> list[str]:
        """The other rollouts with a job under way (a state not in `idle`) on `device_id`:
        the job that device's one retained job topic holds is theirs."""
        rows = self.query(f"SELECT DISTINCT rollout_id FROM jobs WHERE rollout_id <> ? AND "
                          f"device_id = ? AND state NOT IN ({_marks(idle)}) ORDER BY rollout_id",
                          (rollout_id, device_id, *idle))
        return [row["rollout_id"] for row in rows]

    def installed_since(self, rollout_id: str, device_id: str, model: str,
                        since: float) -> list[str]:
        """The other rollouts whose install of `model` ended active on `device_id` after
        `since`: the device runs their version now, over whatever was there before."""
        rows = self.query("SELECT jobs.rollout_id FROM jobs JOIN rollouts ON rollouts.id = "
                          "jobs.rollout_id WHERE jobs.rollout_id <> ? AND jobs.device_id = ? "
                          "AND rollouts.model = ? AND jobs.kind = 'install' AND "
                          "jobs.state = 'active' AND jobs.updated_at > ? "
                          "ORDER BY jobs.updated_at DESC",
                          (rollout_id, device_id, model, since))
        return [row["rollout_id"] for row in rows]

    def rolled_back_since(self, rollout_id: str, device_id: str, model: str,
                          since: float) -> tuple[str, str] | None:
        """The other rollout whose rollback of `model` ended last on `device_id` after `since`,
        and the version it left there ("" for none): the device runs that one now."""
        rows = self.query("SELECT jobs.rollout_id, jobs.version FROM jobs JOIN rollouts ON "
                          "rollouts.id = jobs.rollout_id WHERE jobs.rollout_id <> ? AND "
                          "jobs.device_id = ? AND rollouts.model = ? AND jobs.kind = 'rollback' "
                          "AND jobs.state = 'rolled_back' AND jobs.updated_at > ? "
                          "ORDER BY jobs.updated_at DESC LIMIT 1",
                          (rollout_id, device_id, model, since))
        return (rows[0]["rollout_id"], rows[0]["version"]) if rows else None

    def device_has_job(self, device_id: str, model: str, version: str) -> bool:
        """Whether the fleet sent the device an install of `model` `version` and did not
        withdraw it: the one rule for both a device's download of that bundle and a rollback
        job's offer of it.

        Sent: a job gets its id when it is published, so a pending job, or one an abort
        cancelled before its wave, grants nothing (a device could fetch a version not yet, or
        never, meant for it). Withdrawn: an abort cancels a sent job no report came for and
        clears it from the broker; the offer goes with it, or a device that still got the job
        would install the version the operator stopped. A job the device picked up grants
        after it ends (active, failed, timed out, rolled back): a download may come late,
        after a retry or a restart.

        Only the rollout's own version counts: a rollback job names the version the device
        itself said it ran before (its report's `previous`), and a device's word must grant it
        no other bundle."""
        return self.one("SELECT 1 AS found FROM jobs JOIN rollouts ON rollouts.id = "
                        "jobs.rollout_id WHERE jobs.device_id = ? AND rollouts.model = ? AND "
                        "rollouts.version = ? AND jobs.job_id <> '' AND jobs.state <> ?",
                        (device_id, model, version, CANCELLED)) is not None

    def job_by_id(self, job_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))

    def update_job(self, rollout_id: str, device_id: str, **fields: Any) -> None:
        match, key = self._device_key(device_id)
        self._update("jobs", f"rollout_id = ? AND {match}", (rollout_id, key), fields)

    def _device_key(self, device_id: str) -> tuple[str, Any]:
        """`device_id = ?` and its parameter. An id holding a NUL is in a SQLite store from
        before ids were checked alone (PostgreSQL stores none), and `Database` takes no NUL in
        a parameter: such an id is matched as its UTF-8 bytes, cast to text."""
        if "\0" in device_id and self.db.dialect == SQLITE:
            return "device_id = CAST(? AS TEXT)", device_id.encode()
        return "device_id = ?", device_id

    def _update(self, table: str, where: str, keys: tuple, fields: dict[str, Any]) -> int:
        """Set `fields` and `updated_at` (the database's clock, which the gate compares with
        the telemetry another replica may have recorded)."""
        columns = ", ".join(f"{name} = ?" for name in fields)  # names come from this module
        stamp = f"updated_at = {self.db.now}"
        return self.db.execute(f"UPDATE {table} SET {columns + ', ' if columns else ''}{stamp} "
                               f"WHERE {where}", (*fields.values(), *keys))

    def now(self) -> float:
        """The database's clock (one round trip): for times worked out in Python (deadlines,
        the gate's wait) that a replica taking the lease over later compares with its own."""
        row = self.one(f"SELECT {self.db.now} AS now")
        assert row is not None
        return float(row["now"])


def _marks(values: Collection[str]) -> str:
    """One `?` placeholder per value, for `IN (...)`."""
    return ", ".join("?" * len(values))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _unjson(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _adopt_schema_version(db: Database) -> None:
    """A SQLite file made before `schema_migrations` (its own `schema_version` table, at 1):
    record registry version 1 as applied and drop the old table."""
    if db.dialect != SQLITE or not db.query(
            "SELECT name FROM sqlite_master WHERE name = 'schema_version'"):
        return
    with db.transaction():
        migrate(db, (), component=COMPONENT)  # makes schema_migrations
        db.execute("INSERT INTO schema_migrations (component, version, name, applied_at) "
                   f"VALUES (?, 1, ?, {db.now}) ON CONFLICT (component, version) DO NOTHING",
                   (COMPONENT, MIGRATIONS[0].name))
        db.execute("DROP TABLE schema_version")
