"""Fleet state on SQLite (embedded default) or PostgreSQL (fleets that outgrow one file):
one connection wrapper with `?` parameters, versioned migrations, and a leader lease."""

from edgerun.adapters.fleetdb.db import Database, connect, redact
from edgerun.adapters.fleetdb.lease import Lease, Leadership, LeaseState
from edgerun.adapters.fleetdb.migrations import Migration, SchemaTooNew, migrate

__all__ = ["Database", "Leadership", "Lease", "LeaseState", "Migration", "SchemaTooNew", "connect", "migrate",
           "redact"]
