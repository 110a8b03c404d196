"""A real PostgreSQL server for the tests (and the README's cluster steps): its own data directory, 127.0.0.1,
a free port, the unix socket inside its own directory, one database and one password role for MLflow.

initdb and postgres refuse to run as root, so when the tests run as root every server command runs as the
`postgres` system user (Debian's package creates it) through `runuser`; the server's directory is a fresh
temp directory that user owns (pytest's own tmp dirs are private to root, so it could not reach those).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from tests.support.net import free_port

INSTALL_HINT = "install Debian's `postgresql` (apt-get install postgresql; `make system-deps` does it)"


def bin_dir() -> Path:
    """The newest PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin), else the one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))  # type: ignore[union-attr]
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError(f"PostgreSQL's initdb not found in /usr/lib/postgresql/*/bin nor on PATH: {INSTALL_HINT}")


class PostgresError(RuntimeError):
    pass


class PostgresServer:
    """`postgres` on 127.0.0.1:<free port> with database `database` owned by role `user` (password login).

    `url` is the SQLAlchemy URL MLflow takes; `start()` and `stop()` (or `with`) run it; the server's log is
    `log`, named by every error, and is copied into `log_dir` (if given) when the server stops."""

    def __init__(self, log_dir: Path | None = None, user: str = "mlflow", database: str = "mlflow",
                 os_user: str = "postgres") -> None:
        self.bin = bin_dir()
        self.port = free_port()
        self.user, self.database = user, database
        self.password = secrets.token_hex(12)
        # as root, the server runs as an unprivileged system user; otherwise as whoever we are
        self.os_user = os_user if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="clipline-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.log_dir = Path(log_dir) if log_dir else None
        if self.os_user:
            ent = pwd.getpwnam(self.os_user)
            os.chown(self.root, ent.pw_uid, ent.pw_gid)

    @property
    def url(self) -> str:
        # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, and what is installed
        # (the test extra) is psycopg2
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> dict[str, str | int]:
        """Keyword arguments for psycopg2.connect, over TCP on 127.0.0.1 as the MLflow role."""
        return {"host": "127.0.0.1", "port": self.port, "user": self.user, "password": self.password,
                "dbname": self.database}

    def _run(self, *cmd: str, timeout: float = 120, input_text: str | None = None) -> str:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        try:
            done = subprocess.run(argv, check=False, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                                  input=input_text, env={**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"})
        except subprocess.TimeoutExpired:
            raise PostgresError(f"{cmd[0]} did not finish in {timeout:.0f}s (server log {self.log})") from None
        if done.returncode != 0:
            raise PostgresError(f"{' '.join(cmd[:2])} failed with exit {done.returncode}: "
                                f"{(done.stderr or done.stdout).strip()[-2000:]}{self._log_tail()}")
        return done.stdout

    def _log_tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return f" (no server log at {self.log})"
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"\nlast lines of the server log {self.log}:\n" + "\n".join(tail)

    def start(self) -> Self:
        # superuser: the OS user, by peer-less trust on the socket in our own 0700 directory; every TCP
        # login (MLflow's) needs its password
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-instructions")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            # a throwaway test database: durability buys nothing, speed does
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# clipline test server\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        # the password goes on stdin, never on a command line other users can read in ps
        self.psql_admin(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';\n"
                        f"CREATE DATABASE {self.database} OWNER {self.user};\n")
        return self

    def psql_admin(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; psql's unaligned, tuples-only output."""
        return self._run("psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", database,
                         "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", input_text=sql)

    @property
    def running(self) -> bool:
        """The postmaster's pid file is there: pg_ctl started it (or is starting it) and it has not stopped."""
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended), keep its log, remove its directory."""
        try:
            if self.running:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            if self.log_dir and self.log.exists():
                self.log_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.log, self.log_dir / "postgres.log")
            if not self.running:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()  # a half-started server: nothing is left running or on disk but the copied log
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
