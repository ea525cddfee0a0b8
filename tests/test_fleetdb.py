"""Fleet state groundwork on SQLite and on a real PostgreSQL: URLs, parameters, migrations run
at start-up, and a leader lease that passes to another process when its holder dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgerun.adapters.fleetdb import (Leadership, Lease, Migration, SchemaTooNew, connect,
                                      migrate, redact)
from edgerun.adapters.fleetdb.db import to_pyformat
from edgerun.runtime.errors import InvalidInput
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (the fixture)

MIGRATIONS = (
    Migration(1, "devices", ("""CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        grp TEXT,
        last_seen DOUBLE PRECISION NOT NULL)""",)),
    Migration(2, "device secrets", (
        "ALTER TABLE devices ADD COLUMN password_hash TEXT",
        {"sqlite": "CREATE INDEX devices_by_group ON devices (grp)",
         "postgresql": "CREATE INDEX devices_by_group ON devices USING btree (grp)"})),
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleet.db"  # sqlite:/// + an absolute path
    return fresh_database(request.getfixturevalue("postgres_url"))


def test_urls_and_placeholders(tmp_path: Path) -> None:
    assert connect(tmp_path / "plain.db").dialect == "sqlite"
    assert (tmp_path / "plain.db").exists()
    assert to_pyformat("SELECT '?', ? WHERE x LIKE 'a%'") == "SELECT '?', %s WHERE x LIKE 'a%%'"
    assert redact("postgresql://fleet:hunter2@db:5432/fleet") == \
        "postgresql://fleet:***@db:5432/fleet"
    with pytest.raises(InvalidInput, match="mysql"):
        connect("mysql://root:pw@db/fleet")
    with pytest.raises(InvalidInput) as refused:
        connect("postgresql://fleet:hunter2@127.0.0.1:1/fleet")
    assert "hunter2" not in str(refused.value) and "***" in str(refused.value)


def test_migrations_apply_once_and_in_order(url: str) -> None:
    db = connect(url)
    assert migrate(db, MIGRATIONS[:1]) == [1]
    db.execute("INSERT INTO devices (device_id, grp, last_seen) VALUES (?, ?, ?)",
               ("dev-a", "line-1", 1.5))
    assert migrate(db, MIGRATIONS) == [2]  # a later release adds version 2 at start-up
    assert migrate(db, MIGRATIONS) == []
    db.execute("UPDATE devices SET password_hash = ? WHERE device_id = ?", ("$7$x", "dev-a"))
    assert db.query("SELECT device_id, grp, password_hash, last_seen FROM devices") == [
        {"device_id": "dev-a", "grp": "line-1", "password_hash": "$7$x", "last_seen": 1.5}]
    rows = db.query("SELECT component, version, name FROM schema_migrations ORDER BY version")
    assert rows == [{"component": "fleet", "version": 1, "name": "devices"},
                    {"component": "fleet", "version": 2, "name": "device secrets"}]
    with pytest.raises(SchemaTooNew, match="version 2"):
        migrate(db, MIGRATIONS[:1])  # an older edgerun on a newer schema
    broken = Migration(3, "broken", ("ALTER TABLE devices ADD COLUMN note TEXT",
                                     "CREATE TABLE devices (x TEXT)"))
    with pytest.raises(Exception):
        migrate(db, (*MIGRATIONS, broken))
    assert migrate(db, MIGRATIONS) == []  # version 3 rolled back whole: no `note` column
    db.execute("ALTER TABLE devices ADD COLUMN note TEXT")
    db.close()


def test_processes_starting_together_migrate_once(url: str) -> None:
    results: list[list[int]] = []

    def start() -> None:
        db = connect(url)
        results.append(migrate(db, MIGRATIONS))
        db.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [[], [], [], [1, 2]]


def test_a_fresh_sqlite_file_opened_by_many_at_once_opens_for_all(tmp_path: Path) -> None:
    # switching to WAL needs the file's exclusive lock, and SQLite refuses at once (no busy
    # wait) when the others hold a read lock: one in about ten such rounds failed before
    for round_ in range(100):
        url = f"sqlite:///{tmp_path}/fleet-{round_}.db"
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        applied: list[list[int]] = []

        def start() -> None:
            barrier.wait()
            try:
                db = connect(url)
                applied.append(migrate(db, MIGRATIONS))
                assert db.one("PRAGMA journal_mode") == {"journal_mode": "wal"}
                db.close()
            except BaseException as exc:  # noqa: BLE001  (reported below, by round)
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"round {round_}: {errors!r}"
        assert sorted(applied) == [[]] * 7 + [[1, 2]]


def test_one_holder_at_a_time_and_takeover_after_expiry(url: str) -> None:
    a = Lease(connect(url), "rollouts", "registry-a", ttl=1.0)
    b = Lease(connect(url), "rollouts", "registry-b", ttl=1.0)
    assert a.acquire() and a.held and a.epoch == 1
    assert not b.acquire() and not b.held
    assert a.acquire() and a.epoch == 1  # renewing keeps the epoch
    # a stops renewing (it died): b takes over once the lease expires, with a new epoch
    deadline = time.monotonic() + 10
    while not b.acquire():
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    assert b.epoch == 2 and b.state().holder == "registry-b"
    assert not a.acquire() and not a.held  # the old leader learns it lost, no split brain
    b.release()
    assert a.acquire() and a.epoch == 3  # released: taken at once


def test_many_contenders_one_winner(url: str) -> None:
    leases = [Lease(connect(url), "rollouts", f"registry-{n}", ttl=30) for n in range(6)]
    barrier = threading.Barrier(len(leases))
    won: list[str] = []

    def contend(lease: Lease) -> None:
        barrier.wait()
        if lease.acquire():
            won.append(lease.holder)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


HOLDER = """
import sys, time
from edgerun.adapters.fleetdb import Lease, connect
lease = Lease(connect(sys.argv[1]), "rollouts", "registry-child", ttl=1.0)
while True:
    if lease.acquire():
        print("leading", lease.epoch, flush=True)
    time.sleep(0.2)
"""


def test_a_killed_leaders_lease_passes_to_the_survivor(url: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().split() == ["leading", "1"]
        survivor = Lease(connect(url), "rollouts", "registry-parent", ttl=1.0)
        assert not survivor.acquire()
        assert child.stdout.readline().startswith("leading")  # still renewing
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while not survivor.acquire():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert survivor.epoch == 2
    finally:
        child.kill()
        child.wait()


def test_transactions_commit_or_roll_back_whole(url: str) -> None:
    db = connect(url)
    migrate(db, MIGRATIONS)
    insert = "INSERT INTO devices (device_id, grp, last_seen) VALUES (?, ?, ?)"
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.execute(insert, ("dev-a", None, 1.0))
            with db.transaction():  # joins the outer one
                db.execute(insert, ("dev-b", None, 1.0))
            raise RuntimeError("crash before commit")
    assert db.query("SELECT device_id FROM devices") == []
    with db.transaction():
        db.execute(insert, ("dev-a", "100%", 1.0))  # a literal % survives psycopg's format
    other = connect(url)  # committed: visible to another connection
    assert other.query("SELECT grp FROM devices WHERE grp LIKE '100%'") == [{"grp": "100%"}]


def test_leadership_moves_when_the_leader_stops_renewing(url: str) -> None:
    events: list[tuple[str, bool]] = []

    def leader(name: str) -> Leadership:
        lease = Lease(connect(url), "rollouts", name, ttl=2.0)
        return Leadership(lease, renew_every=0.1,
                          on_change=lambda leading: events.append((name, leading))).start()

    a = leader("registry-a")
    deadline = time.monotonic() + 10
    while not a.leading:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    b = leader("registry-b")
    time.sleep(0.5)
    assert a.leading and not b.leading
    a.stop(release=False)  # a crash: no hand-over, the lease must lapse
    while not b.leading:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not a.leading and b.lease.epoch == 2
    b.stop()  # a clean shutdown releases at once
    assert not b.leading and a.lease.acquire() and a.lease.epoch == 3
    # a crashed process tells nobody; b reports both its win and its clean hand-over
    assert events == [("registry-a", True), ("registry-b", True), ("registry-b", False)]


def test_the_lease_cannot_change_hands_inside_a_fenced_transaction(url: str) -> None:
    """What a holder writes after `fence()` commits before anyone else may take the lease,
    even if the lease expires meanwhile by the clock."""
    a = Lease(connect(url), "rollouts", "registry-a", ttl=2.0)
    b = Lease(connect(url), "rollouts", "registry-b", ttl=2.0)
    assert a.acquire()
    taken_at: list[float] = []

    def take_over() -> None:
        while not b.acquire():
            time.sleep(0.05)
        taken_at.append(time.monotonic())

    thread = threading.Thread(target=take_over)
    time.sleep(1.0)
    with a.db.transaction():
        assert a.fence()
        thread.start()
        time.sleep(1.5)  # the lease expires by the database's clock meanwhile
        assert not taken_at and not b.held
        committed_at = time.monotonic()
    thread.join(20)
    assert taken_at and taken_at[0] >= committed_at and b.epoch == 2
    with a.db.transaction():
        assert not a.fence()  # the old holder learns it from the database


def test_a_holder_stalled_inside_a_fenced_transaction_is_cut_off(postgres_url) -> None:
    """PostgreSQL ends the session of a holder idle in its transaction past the ttl: the
    lease is free for the next holder, and what the stalled one wrote never commits."""
    import psycopg

    url = fresh_database(postgres_url)
    a = Lease(connect(url), "rollouts", "registry-a", ttl=1.0)
    b = Lease(connect(url), "rollouts", "registry-b", ttl=30.0)
    assert a.acquire()
    with pytest.raises(psycopg.Error, match="idle-in-transaction"):
        with a.db.transaction():
            assert a.fence()
            a.db.execute("CREATE TABLE written_while_stalled (x BIGINT)")
            deadline = time.monotonic() + 20
            while not b.acquire():  # a is "stalled" here (a GC or VM pause) past its ttl
                assert time.monotonic() < deadline, "the stalled holder kept the lease"
                time.sleep(0.1)
    assert b.epoch == 2
    # a's connection was ended: the next statement opens a new one
    assert a.db.one("SELECT to_regclass('written_while_stalled') AS t") == {"t": None}
    assert not a.acquire()


def test_a_failing_leadership_callback_does_not_stop_the_renewals(url: str) -> None:
    """`on_change` (the MQTT link's re-subscribe and republish, which use the database and the
    broker) raised on the renewal thread and ended it: the lease lapsed and this process never
    led again; and what the callback failed to do is done at the next renewal."""
    calls: list[bool] = []

    def on_change(leading: bool) -> None:
        calls.append(leading)
        if len(calls) == 1:
            raise RuntimeError("republish failed")

    lease = Lease(connect(url), "rollouts", "registry-a", ttl=1.0)
    leadership = Leadership(lease, renew_every=0.05, on_change=on_change).start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 2:  # told again, on a renewal thread still alive
            assert time.monotonic() < deadline, "the renewal thread died with the callback"
            time.sleep(0.02)
        assert calls[:2] == [True, True] and leadership.leading
        epoch = lease.epoch
        assert Lease(connect(url), "rollouts", "registry-b", ttl=1.0).acquire() is False
        assert lease.epoch == epoch
    finally:
        leadership.stop()


def test_a_connection_the_server_closed_is_opened_again_before_the_next_statement(
        postgres_url) -> None:
    """A PostgreSQL restart (or a session ended by the server) cost the next statement: it
    failed on the dead connection, and a device's job report handled then was lost."""
    import psycopg

    url = fresh_database(postgres_url)
    db = connect(url)
    migrate(db, MIGRATIONS)
    pid = db.one("SELECT pg_backend_pid() AS pid")["pid"]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    db.execute("INSERT INTO devices (device_id, grp, last_seen) VALUES (?, ?, ?)",
               ("dev-a", None, 1.0))
    assert db.one("SELECT pg_backend_pid() AS pid")["pid"] != pid
    with db.transaction():  # a transaction too begins on a live connection
        pid = db.one("SELECT pg_backend_pid() AS pid")["pid"]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    with db.transaction():
        db.execute("UPDATE devices SET grp = ? WHERE device_id = ?", ("line-1", "dev-a"))
    assert connect(url).query("SELECT device_id, grp FROM devices") == [
        {"device_id": "dev-a", "grp": "line-1"}]


def test_a_lapse_while_the_renewal_waited_is_told_as_a_loss_and_a_new_win(url: str) -> None:
    """The renewal waits for the connection (behind the leader's own long transaction, or a
    slow database) past the ttl: the process stopped leading meanwhile (and ignored the job
    reports that came), then renewed. It was told nothing, so it never heard those reports
    again (the MQTT link re-subscribes on a win)."""
    calls: list[bool] = []
    lease = Lease(connect(url), "rollouts", "registry-a", ttl=1.0)
    leadership = Leadership(lease, renew_every=0.05, on_change=calls.append).start()
    try:
        deadline = time.monotonic() + 10
        while calls != [True]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with lease.db.transaction():  # the renewal waits for the connection
            while leadership.leading:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        deadline = time.monotonic() + 5
        while calls != [True, False, True]:
            assert time.monotonic() < deadline, f"told only {calls}"
            time.sleep(0.02)
    finally:
        leadership.stop()


def test_a_transaction_an_error_left_failed_does_not_pass_for_committed(postgres_url) -> None:
    """PostgreSQL answers COMMIT with ROLLBACK (no error) in a transaction a caught error
    left failed: its caller (the orchestrator, which then sends the step's messages) took
    writes that were dropped for committed ones."""
    db = connect(fresh_database(postgres_url))
    migrate(db, MIGRATIONS)
    with pytest.raises(RuntimeError, match="rolled back"):
        with db.transaction():
            db.execute("INSERT INTO devices (device_id, grp, last_seen) VALUES (?, ?, ?)",
                       ("dev-a", None, 1.0))
            with pytest.raises(Exception, match="division by zero"):
                db.one("SELECT 1 / 0 AS x")
    assert db.query("SELECT device_id FROM devices") == []
    with db.transaction():  # the connection is fine for the next one
        db.execute("INSERT INTO devices (device_id, grp, last_seen) VALUES (?, ?, ?)",
                   ("dev-a", None, 1.0))
    assert db.query("SELECT device_id FROM devices") == [{"device_id": "dev-a"}]
