"""A throwaway PostgreSQL cluster for tests (Debian's ``postgresql`` server binaries).

``postgres_cluster`` (session) runs ``initdb`` in a temporary directory (as the
``postgres`` user when the tests run as root, since PostgreSQL refuses to run
as root), starts the server on 127.0.0.1 at a free port with trust
authentication, and removes everything afterwards.  ``postgres_url`` gives each
test a fresh, empty database on it.  The cluster runs with ``fsync=off``: the
tests crash clients, never the server, and this keeps them fast.

Missing binaries are an error, not a skip: CI installs them (see ``.ci/run``).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One running PostgreSQL server in a temporary directory."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="facegate-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def start(self) -> PostgresCluster:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start the server (again) on the same port and data directory."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            f"-c fsync=off -c max_connections=200"
        )
        self._run(
            self.bin / "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            self.data,
            "-l",
            self.root / "server.log",
            "-o",
            options,
        )

    def stop_server(self) -> None:
        """Stop the server (``fast``: clients are disconnected), keeping its data."""
        self._run(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w")

    def server_pids(self) -> list[int]:
        """The postmaster and every backend it runs."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def stop(self) -> None:
        try:
            self._run(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"facegate_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server for the whole test session."""
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """The URL of a fresh, empty database (``postgresql://postgres@127.0.0.1:<port>/<db>``)."""
    return postgres_cluster.create_database()
