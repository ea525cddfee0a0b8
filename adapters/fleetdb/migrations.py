"""Versioned schema migrations, run at start-up on SQLite and PostgreSQL alike.

`schema_migrations` records each applied (component, version), so independent parts (the
registry's tables, the leases) migrate on their own numbering in one database. All pending
migrations of a component apply in one transaction under a lock (PostgreSQL: an advisory
transaction lock; SQLite: its write lock), so processes starting together apply each once, and
a failing migration leaves the schema as it was (DDL is transactional on both).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgerun.adapters.fleetdb.db import POSTGRESQL, Database
from edgerun.runtime.errors import EdgerunError, InvalidInput

log = logging.getLogger(__name__)

TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version))"""


class SchemaTooNew(EdgerunError):
    """The database was migrated by a newer edgerun than this one."""

    kind = "schema_too_new"


@dataclass(frozen=True)
class Migration:
    """Statements that move a schema to `version`; a statement may be a {dialect: SQL} map
    where the two databases need different SQL."""

    version: int
    name: str
    statements: tuple[str | Mapping[str, str], ...]


def migrate(db: Database, migrations: Sequence[Migration], component: str = "fleet") -> list[int]:
    """Apply the migrations the database lacks, in order; the versions applied now."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise InvalidInput(f"{component} migrations must have increasing versions from 1, got "
                           f"{versions}")
    with db.transaction():
        if db.dialect == POSTGRESQL:
            db.query("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(b"edgerun-migrations"),))
        db.execute(TABLE)
        row = db.one("SELECT MAX(version) AS v FROM schema_migrations WHERE component = ?",
                     (component,))
        current = int(row["v"]) if row and row["v"] is not None else 0
        known = versions[-1] if versions else 0
        if current > known:
            raise SchemaTooNew(f"the database's {component} schema is at version {current}; "
                               f"this edgerun knows versions up to {known}: upgrade edgerun")
        applied = []
        for migration in migrations:
            if migration.version <= current:
                continue
            for statement in migration.statements:
                db.execute(statement if isinstance(statement, str) else statement[db.dialect])
            db.execute(f"INSERT INTO schema_migrations (component, version, name, applied_at) "
                       f"VALUES (?, ?, ?, {db.now})",
                       (component, migration.version, migration.name))
            applied.append(migration.version)
    if applied:
        log.info("%s schema migrated to version %d (%s)", component, applied[-1],
                 ", ".join(str(v) for v in applied))
    return applied
