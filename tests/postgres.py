"""A throwaway PostgreSQL cluster: `initdb` and `pg_ctl` from Debian's `postgresql` package.

They refuse to run as root, so as root they run as the `postgres` user (`runuser`), in a temp
folder that user owns; as anyone else, as that user. The server listens on a free loopback
port and on a unix socket in the same folder, trusts local connections, and is stopped (fast
shutdown) and deleted at the end of the session. `fresh_database(url)` gives each test its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import free_port


def pg_bin(tool: str) -> str:
    found = shutil.which(tool) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))[-1:]
    assert found, f"{tool} not found: apt-get install postgresql"
    return found if isinstance(found, str) else found[0]


def as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class PostgresCluster:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="edgerun-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(as_postgres(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                                   "-A", "trust", "-E", "UTF8", "--no-sync", "--no-locale"),
                       check=True, capture_output=True)
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.folder} -c fsync=off")
        subprocess.run(as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-l",
                                   str(self.folder / "server.log"), "-o", options, "-w", "-t",
                                   "60", "start"), check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                   "stop"), capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


def fresh_database(url: str) -> str:
    """A new, empty database on the cluster of `url`; its URL."""
    import psycopg
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"
