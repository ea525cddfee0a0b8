"""A leader lease: one process at a time drives rollouts; another takes over when it dies.

A row per lease holds the holder, when it expires (by the database's clock, so hosts need not
agree on the time) and an epoch that grows each time the lease changes hands. `acquire()` takes
a free or expired lease, or renews one already held, in one atomic upsert (its WHERE clause is
the compare-and-set), on SQLite and PostgreSQL alike. The holder calls it well within `ttl`
(every ttl/3, say); a holder that stops renewing (crashed, partitioned) loses the lease at
expiry, and `held` turns False locally by then too, so two leaders never act at once as long as
the holder stops acting when `held` is False. A holder can stall after that check (a GC or VM
pause) and wake after another took over: so what it writes goes in a transaction that first
calls `fence()`, which checks, by the database, that this holder still has the lease at the
epoch it won, and keeps anyone from taking it over until that transaction ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgerun.adapters.fleetdb.db import POSTGRESQL, Database
from edgerun.adapters.fleetdb.migrations import Migration, migrate

log = logging.getLogger(__name__)

MIGRATIONS = (
    Migration(1, "leases", ("""CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        epoch BIGINT NOT NULL)""",)),
)


@dataclass(frozen=True)
class LeaseState:
    name: str
    holder: str
    expires_at: float
    epoch: int


class Lease:
    """The lease `name` as seen by `holder` (unique per process: host, pid, a random part)."""

    def __init__(self, db: Database, name: str, holder: str, ttl: float = 15.0) -> None:
        if ttl <= 0:
            raise ValueError("a lease needs a positive ttl")
        self.db, self.name, self.holder, self.ttl = db, name, holder, ttl
        self.epoch: int | None = None
        self._valid_until = 0.0
        migrate(db, MIGRATIONS, component="leases")

    def acquire(self) -> bool:
        """Take the lease or renew it; True when this holder has it now."""
        started = time.monotonic()
        now = self.db.now
        with self.db.transaction():
            self.db.execute(
                f"INSERT INTO leases (name, holder, expires_at, epoch) VALUES (?, ?, {now} + ?, 1) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at, epoch = CASE WHEN leases.holder = "
                "excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END "
                f"WHERE leases.holder = excluded.holder OR leases.expires_at < {now}",
                (self.name, self.holder, self.ttl))
            state = self.state()
        if state is not None and state.holder == self.holder:
            self.epoch = state.epoch
            # measured from before the renewal was sent: never later than the database's view
            self._valid_until = started + self.ttl
            return True
        self.epoch, self._valid_until = None, 0.0
        return False

    @property
    def held(self) -> bool:
        """Whether this holder may act now (it renewed within ttl)."""
        return time.monotonic() < self._valid_until

    def fence(self) -> bool:
        """Inside the caller's transaction: whether this holder still has the lease, unexpired
        and at the epoch it won, by the database. The lease row then stays locked until the
        transaction ends (PostgreSQL: FOR UPDATE; SQLite: its write lock, taken at BEGIN), so
        the caller's writes commit under the lease or not at all. On PostgreSQL a holder that
        stalls inside the transaction past the ttl has its session ended by the server, which
        frees the lease for the next holder and drops what the stalled one wrote."""
        if self.epoch is None:
            return False
        if self.db.dialect == POSTGRESQL:
            self.db.execute(f"SET LOCAL idle_in_transaction_session_timeout = "
                            f"{max(1, int(self.ttl * 1000))}")
        lock = " FOR UPDATE" if self.db.dialect == POSTGRESQL else ""
        return self.db.one(
            f"SELECT epoch FROM leases WHERE name = ? AND holder = ? AND epoch = ? AND "
            f"expires_at > {self.db.now}{lock}", (self.name, self.holder, self.epoch)) is not None

    def release(self) -> None:
        """Give the lease up at once (expired now, epoch kept), e.g. on a clean shutdown."""
        self.db.execute(f"UPDATE leases SET expires_at = {self.db.now} - 1 "
                        "WHERE name = ? AND holder = ?", (self.name, self.holder))
        self.epoch, self._valid_until = None, 0.0

    def state(self) -> LeaseState | None:
        row = self.db.one("SELECT name, holder, expires_at, epoch FROM leases WHERE name = ?",
                          (self.name,))
        return None if row is None else LeaseState(row["name"], row["holder"],
                                                   float(row["expires_at"]), int(row["epoch"]))


class Leadership:
    """Renews a lease on a thread of its own; `leading` says whether to act right now.

    A rollout driver checks `leading` before each step (and writes `epoch` with what it
    changes). `on_change(leading)` runs on the renewal thread when leadership is won or lost.
    A database error counts as a failed renewal: the lease then lapses by itself at expiry.
    """

    def __init__(self, lease: Lease, *, renew_every: float | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.lease = lease
        self.renew_every = renew_every if renew_every is not None else lease.ttl / 3
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_leading = False

    @property
    def leading(self) -> bool:
        return self.lease.held

    def fence(self) -> bool:
        """See `Lease.fence`: call it first in each transaction that acts as the leader."""
        return self.lease.fence()

    def start(self) -> Leadership:
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.lease.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            held_until = self.lease._valid_until
            try:
                self.lease.acquire()
            except Exception as exc:  # the database is away: the lease lapses at expiry
                log.warning("lease %s: renewal failed: %s", self.lease.name, exc)
            # a renewal that waited (a slow database, the connection busy with a long
            # transaction) past the lease's end: this process did not lead meanwhile, and
            # ignored what came then, even if it leads again now
            self._notify(lapsed=time.monotonic() >= held_until)
            self._stop.wait(self.renew_every)

    def _notify(self, lapsed: bool = False) -> None:
        """Tell `on_change` of a change (a lapse as a loss, then a win if it leads again);
        one that raised (the database or broker away) is told again at the next renewal, and
        never ends the renewal thread (the lease would lapse)."""
        if lapsed and self._was_leading:
            self._tell(False)
            self._was_leading = False
        leading = self.leading
        if leading != self._was_leading and self._tell(leading):
            self._was_leading = leading

    def _tell(self, leading: bool) -> bool:
        log.info("lease %s: %s leadership", self.lease.name, "won" if leading else "lost")
        if self.on_change is not None:
            try:
                self.on_change(leading)
            except Exception:
                log.exception("lease %s: acting on the change failed; trying again",
                              self.lease.name)
                return False
        return True

    def stop(self, release: bool = True) -> None:
        """Stop renewing; `release` hands the lease over at once (a clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if release and self.lease.held:
            self.lease.release()
        self._notify()
