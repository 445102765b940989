"""A throwaway PostgreSQL 15 cluster for tests: initdb + pg_ctl in a temp dir.

One cluster per test session, listening only on a unix socket in its own
directory (no TCP port to collide with), with fsync off (it is thrown away).
Started on first use, stopped and removed when the session ends. PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres``
user (``runuser``); clients connect as the cluster's superuser ``isrsync`` over
the socket with trust authentication.

Each test gets a database of its own (:func:`fresh_dsn`), migrated to the
current schema and dropped at teardown.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

_BIN_DIRS = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/local/bin", "/usr/bin"]


def _tool(name: str) -> str | None:
    for d in _BIN_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


class PgCluster:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="isrsync-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # KeyError: no such user, reported by start()
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {r.stderr.strip()[-1500:]}")

    def start(self) -> "PgCluster":
        initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
        if not initdb or not pg_ctl:
            pytest.skip("PostgreSQL server binaries are missing (scripts/setup installs postgresql-15)")
        self.sock.mkdir()
        if self._as:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run(initdb, "-D", str(self.data), "-U", "isrsync", "-A", "trust", "--no-sync", "-E", "UTF8")
        opts = (f"-k {self.sock} -p {self.port} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.base / "log"), "-w", "-t", "60", "start")
        atexit.register(self.stop)
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://isrsync@/{dbname}?host={self.sock}&port={self.port}"

    def stop(self) -> None:
        pg_ctl = _tool("pg_ctl")
        if self.data.exists() and pg_ctl:
            subprocess.run([*self._as, pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    def create_db(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return name

    def drop_db(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_cluster: PgCluster | None = None


def cluster() -> PgCluster:
    """The session's cluster, started on first use."""
    global _cluster
    if _cluster is None:
        _cluster = PgCluster().start()
    return _cluster


class FreshDb:
    """A migrated database of its own; ``close()`` drops it."""

    def __init__(self, *, migrate: bool = True) -> None:
        from isrsync.server import pg

        self.cluster = cluster()
        self.name = self.cluster.create_db()
        self.dsn = self.cluster.dsn(self.name)
        if migrate:
            pg.migrate(self.dsn)

    def close(self) -> None:
        self.cluster.drop_db(self.name)


def with_metadata(server, dsn: str, packs: str | None = None):
    """A LiveServer (tests/conftest.py) whose ``add_user`` writes to ``dsn``."""
    def add_user(name: str) -> str:
        from isrsync.server.repo import Repository

        repo = Repository(server.data, metadata=dsn, packs=packs)
        try:
            return repo.add_user(name)
        finally:
            repo.close()

    server.add_user = add_user
    return server


def isrsync_cmd() -> list[str]:
    """The installed console script, or the module (as tests/conftest.py finds it)."""
    import sys

    exe = shutil.which("isrsync", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "isrsync.cli.main"]


_moto = None


def s3_url() -> str:
    """A fresh bucket on the session's moto S3 server (loopback), as an s3:// address.

    moto's standalone server speaks the S3 HTTP protocol; the code under test
    knows only the endpoint. Credentials go in the environment, as for any S3.
    """
    global _moto
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    if _moto is None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            pytest.skip("moto[server] is not installed")
        _moto = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        _moto.start()
        atexit.register(_moto.stop)
    host, port = _moto.get_host_and_port()
    import boto3

    endpoint = f"http://{host}:{port}"
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/isrsync?endpoint={endpoint}"
