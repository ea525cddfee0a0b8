"""Device credentials: one secret per device, for the registry (HTTP Basic) and the broker.

`fleet enroll` makes a device's secret, hands it over once and keeps only its `$7$` hash (the
Mosquitto format, so the broker's password file is generated from the same rows); `revoke`
marks the row, so the registry refuses the device at its next request and the regenerated
broker files (then SIGHUP) drop it from MQTT. Groups are granted here by the operator at
enrolment, never taken from what a device reports: a group decides whose shared requests a
device may read. The rows live in the fleet database (`edgerun.adapters.fleetdb`), SQLite or
PostgreSQL, in a table of their own.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence

from edgerun.adapters.auth.mosquitto import (Device, check_name, hash_password, new_password,
                                             verify_password)
from edgerun.adapters.auth.tokens import basic
from edgerun.adapters.fleetdb import Database, Migration, migrate
from edgerun.adapters.fleetdb.db import POSTGRESQL
from edgerun.runtime.errors import InvalidInput, Unauthenticated

MIGRATIONS = (
    Migration(1, "device credentials", ("""CREATE TABLE device_credentials (
        device_id TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        device_groups TEXT NOT NULL,
        enrolled_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION)""",)),
)
#: Checked against when a device id is unknown, so a refusal takes as long either way and
#: timing does not tell which device ids exist.
_DUMMY = hash_password("edgerun-no-such-device")
#: PostgreSQL advisory lock key: one enrolment at a time across registries on one database.
_ENROL_LOCK = zlib.crc32(b"edgerun-device-enrolment")


class DeviceCredentials:
    """Enrolled devices and their secrets' hashes."""

    def __init__(self, db: Database, reserved: Collection[str] = ()) -> None:
        """`reserved`: names no device or group may take (the fleet's own MQTT username)."""
        self.db = db
        self.reserved = frozenset(reserved)
        migrate(db, MIGRATIONS, component="device_credentials")

    def enroll(self, device_id: str, groups: Sequence[str] = ()) -> str:
        """A new secret for the device (enrolling again rotates it: the old one stops
        working); the caller hands it to the device once. Nothing keeps the secret."""
        for kind, name in (("device id", device_id), *(("group", g) for g in groups)):
            check_name(kind, name)  # the broker files' rules, checked before anything is kept
            if name in self.reserved:  # else every later `fleet acl` fails until it is revoked
                raise InvalidInput(f"{kind} {name!r} is the fleet's own MQTT username (fleet "
                                   f"serve --broker): both would own edgerun/{name}/; choose "
                                   "another")
        secret, password_hash = new_password()
        # the check and the row in one transaction, one enrolment at a time (SQLite: BEGIN
        # IMMEDIATE; PostgreSQL: a lock): else two registries enrolling device x in group y
        # and device y at once would both pass the check
        with self.db.transaction():
            if self.db.dialect == POSTGRESQL:
                self.db.query("SELECT pg_advisory_xact_lock(?)", (_ENROL_LOCK,))
            self._check_namespace(device_id, groups)
            self.db.execute(
                "INSERT INTO device_credentials (device_id, password_hash, device_groups, "
                f"enrolled_at, revoked_at) VALUES (?, ?, ?, {self.db.now}, NULL) "
                "ON CONFLICT (device_id) DO UPDATE SET password_hash = excluded.password_hash, "
                "device_groups = excluded.device_groups, enrolled_at = excluded.enrolled_at, "
                "revoked_at = NULL",
                (device_id, password_hash, ",".join(groups)))
        return secret

    def _check_namespace(self, device_id: str, groups: Sequence[str]) -> None:
        """Refuse what the broker files would: a device and a group that both own
        `edgerun/<name>/`. Refused here, where it is caused, rather than in every later
        `fleet acl`, which could then not drop a revoked device from the broker."""
        enrolled = self.groups()
        others = {g for d, gs in enrolled.items() if d != device_id for g in gs}
        if device_id in others:
            raise InvalidInput(f"device id {device_id!r} is already a group's name: both would "
                               f"own edgerun/{device_id}/")
        for group in groups:
            if group == device_id or group in enrolled:
                raise InvalidInput(f"group {group!r} is already a device id: both would own "
                                   f"edgerun/{group}/")

    def revoke(self, device_id: str) -> None:
        changed = self.db.execute(f"UPDATE device_credentials SET revoked_at = {self.db.now} "
                                  "WHERE device_id = ? AND revoked_at IS NULL", (device_id,))
        if not changed:
            raise InvalidInput(f"no enrolled device {device_id!r} to revoke")

    def verify(self, device_id: str, secret: str) -> bool:
        try:  # an id no device can be enrolled under (a NUL, say) is unknown, not an error
            check_name("device id", device_id)
        except InvalidInput:
            verify_password(_DUMMY, secret)  # as long as any other refusal
            return False
        row = self.db.one("SELECT password_hash FROM device_credentials WHERE device_id = ? "
                          "AND revoked_at IS NULL", (device_id,))
        matches = verify_password(row["password_hash"] if row else _DUMMY, secret)
        return matches and row is not None

    def authenticate(self, authorization: str | None) -> str:
        """The device id of an `Authorization: Basic <id:secret>` header, or Unauthenticated."""
        credentials = basic(authorization)
        if credentials is None or not self.verify(*credentials):
            raise Unauthenticated("device credentials missing, wrong or revoked: send "
                                  "'Authorization: Basic <device-id:secret>'")
        return credentials[0]

    def groups(self, device_id: str | None = None) -> dict[str, tuple[str, ...]]:
        """The groups granted to every device not revoked, or to `device_id` alone (an empty
        mapping when it is not enrolled): one indexed lookup per device message."""
        where, params = ("AND device_id = ? ", (device_id,)) if device_id is not None else ("", ())
        rows = self.db.query("SELECT device_id, device_groups FROM device_credentials "
                             f"WHERE revoked_at IS NULL {where}", params)
        return {r["device_id"]: tuple(g for g in r["device_groups"].split(",") if g)
                for r in rows}

    def devices(self) -> list[Device]:
        """Every device not revoked, as the broker files want them."""
        rows = self.db.query("SELECT device_id, password_hash, device_groups "
                             "FROM device_credentials WHERE revoked_at IS NULL "
                             "ORDER BY device_id")
        return [Device(r["device_id"], r["password_hash"],
                       tuple(g for g in r["device_groups"].split(",") if g)) for r in rows]
