"""A throwaway PostgreSQL cluster for Kong in DB mode and hybrid control planes: Debian's
PostgreSQL 15 binaries (initdb, pg_ctl) on a free loopback port in a temporary directory,
password login with SCRAM, never the system service, always stopped.

PostgreSQL refuses to run as root: started as root, the cluster belongs to an unprivileged
user (`postgres` where Debian's package made it, else `nobody`) and its commands run through
runuser.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

from .processes import _RUNNING, free_port, temp_dir

PG_BIN_ENV = "PGWSHARD_PG_BIN"  # a directory with initdb and pg_ctl, where Debian's is not
DEBIAN_PG_BIN = "/usr/lib/postgresql/15/bin"


def postgres_bin() -> str | None:
    """$PGWSHARD_PG_BIN, else Debian's PostgreSQL 15, else pg_ctl's directory on PATH; None if none."""
    for candidate in (os.environ.get(PG_BIN_ENV), DEBIAN_PG_BIN):
        if candidate and os.access(os.path.join(candidate, "pg_ctl"), os.X_OK):
            return candidate
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found else None


def _cluster_user() -> str | None:
    """Who owns the cluster when we are root (PostgreSQL will not run as root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists")


class Postgres:
    """One cluster with one database and its owner role, for Kong's pg_* settings."""

    def __init__(self, database: str = "kong", user: str = "kong", bin_dir: str | None = None):
        self.bin_dir = bin_dir or postgres_bin()
        if self.bin_dir is None:
            raise RuntimeError(f"no PostgreSQL: install Debian's postgresql-15 or set {PG_BIN_ENV}")
        self.os_user = _cluster_user()
        self.dir = temp_dir("pgwshard-postgres-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.database = database
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self.started = False

    def _run(self, tool: str, *args: str, input: str | None = None, timeout: float = 60) -> str:
        argv = [os.path.join(self.bin_dir, tool), *args]  # type: ignore[arg-type]
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): "
                               f"{done.stderr[-2000:]}{done.stdout[-1000:]}")
        return done.stdout

    def start(self) -> Postgres:
        """initdb (SCRAM for every TCP login), pg_ctl start on 127.0.0.1:<port> (its socket in
        our directory, not /run/postgresql), then the role and database Kong logs in with."""
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o700)
        pwfile = os.path.join(self.dir, "superuser.pw")
        superuser_password = secrets.token_urlsafe(16)
        Path(pwfile).write_text(superuser_password + "\n")
        if self.os_user:
            os.chown(pwfile, pwd.getpwnam(self.os_user).pw_uid, -1)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--pwfile", pwfile,
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        os.unlink(pwfile)
        _RUNNING.add(self)
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "postgres.log"),
                  "-o", options, "-w", "-t", "60", "start")
        self.started = True
        self.sql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';"
                 f"CREATE DATABASE {self.database} OWNER {self.user};")
        return self

    def sql(self, statements: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the cluster's own unix socket (trust)."""
        return self._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.dir, "-p", str(self.port),
                         "-U", "postgres", "-d", database, "-At", input=statements)

    def kong_settings(self) -> dict[str, str]:
        """The kong.conf keys of a node on this database (TCP, SCRAM password login)."""
        return {"database": "postgres", "pg_host": "127.0.0.1", "pg_port": str(self.port),
                "pg_user": self.user, "pg_password": self.password, "pg_database": self.database}

    def stop(self, timeout: float = 30) -> None:
        """pg_ctl stop -m fast: the cluster and its files go with the test session."""
        _RUNNING.discard(self)
        if self.started:
            self.started = False
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", str(int(timeout)), "stop")
            except RuntimeError:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
