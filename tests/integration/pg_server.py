"""A throwaway PostgreSQL server on loopback for tests: the distribution's own binaries
(`initdb`, `postgres`, `pg_isready`, `pg_ctl`), in a temporary folder, for one test session.

    with postgres_server() as pg:
        uri = pg.create_database("registry")   # postgresql+psycopg2://mlm:PW@127.0.0.1:PORT/registry
        os.environ["MLFLOW_TRACKING_URI"] = uri

or, in a test, the session fixture `postgres` (registered in conftest.py).

* Binds to 127.0.0.1 only, on a port the OS hands out, with its Unix socket in the
  temporary folder (never /var/run/postgresql); TCP logins need the generated password
  (scram-sha-256 for every connection, local ones too).
* initdb and postgres refuse to run as root: as root the server runs as an unprivileged
  account (`postgres` when the package created it, else `nobody`) that owns the folder.
* Durability is off (fsync, synchronous_commit, full_page_writes): the data lives for one
  session, and this saves seconds of disk flushes per MLflow migration.
* `postgres` runs as this process's child (so it is reaped, and killed with its process
  group if `pg_ctl stop -m immediate` fails when the context ends); then the folder goes.

Binaries: $MLM_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin (Debian/Ubuntu),
else `pg_config --bindir`, else initdb on PATH. Without any: RuntimeError naming the
package to install (never a skip).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
SUPERUSER = "mlm"
START_TIMEOUT_S = 60


class PostgresServer:
    """A running server; `uri(dbname)` is what SQLAlchemy / MLflow take."""

    def __init__(self, port: int, user: str, password: str, root: Path, bindir: Path):
        self.host, self.port, self.user, self.password = HOST, port, user, password
        self.root, self.bindir = root, bindir
        self.socket_dir = root

    def uri(self, dbname: str = "postgres", driver: str | None = "psycopg2") -> str:
        """``postgresql+psycopg2://user:password@127.0.0.1:PORT/dbname`` (``driver=None``: no
        ``+driver``; SQLAlchemy >= 2.1 then loads psycopg 3, which the `test` extra lacks)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        pw = urllib.parse.quote(self.password, safe="")
        return f"{scheme}://{self.user}:{pw}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=10)

    def query(self, sql: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """A new, empty database (an error if it exists); returns its URI."""
        from psycopg2 import sql

        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.uri(name)

    def databases(self) -> set[str]:
        return {r[0] for r in self.query("SELECT datname FROM pg_database WHERE NOT datistemplate")}

    def __repr__(self) -> str:
        return f"PostgresServer({self.host}:{self.port}, user={self.user})"


def find_bindir(install: bool = True) -> Path:
    """The PostgreSQL server binaries; on a machine without them (a fresh one), as root
    with apt, Debian's package is installed first, so the README's test command needs
    nothing beforehand."""
    try:
        return _find_bindir()
    except RuntimeError:
        if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
            raise
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    return _find_bindir()


def _find_bindir() -> Path:
    candidates = []
    if os.environ.get("MLM_PG_BINDIR"):
        candidates.append(Path(os.environ["MLM_PG_BINDIR"]))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                    key=lambda p: [int(x) if x.isdigit() else x for x in Path(p).parts[-3].split(".")])
    candidates += [Path(p).parent for p in reversed(debian)]
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for c in candidates:
        if all((c / b).is_file() for b in ("initdb", "pg_ctl", "postgres", "pg_isready", "psql")):
            return c
    raise RuntimeError("no PostgreSQL server binaries (initdb, postgres, pg_ctl, pg_isready, psql): install them "
                       "(Debian/Ubuntu: apt-get install -y postgresql) or set MLM_PG_BINDIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _account() -> pwd.struct_passwd | None:
    """The unprivileged account to run as, or None when this process is not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no `postgres` or `nobody` account to run PostgreSQL as")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    account = _account()
    root = Path(tempfile.mkdtemp(prefix="mlm-pg-", dir="/tmp"))  # short: the socket path must stay < 108 bytes
    data, log = root / "data", root / "server.log"
    password = secrets.token_urlsafe(24)
    as_user: dict = {}
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "LC_ALL": "C", "TZ": "UTC"}

    def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout, **as_user)

    proc = None
    try:
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        out = run(bindir / "initdb", "-D", data, "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                  "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
        pwfile.unlink()
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
        for attempt in range(3):  # the port is free when chosen; someone may take it before postgres binds
            port = _free_port()
            # postgres itself as our child (not pg_ctl start, which leaves it to init): we reap it.
            with log.open("ab") as log_file:
                proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                     "-c", f"listen_addresses={HOST}", "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=100"],
                    cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
            if _wait_ready(bindir, port, root, proc, env, as_user):
                break
            _stop(proc, bindir, data, run)
            proc = None
            tail = log.read_text()[-2000:] if log.exists() else ""
            if "could not bind" not in tail or attempt == 2:
                raise RuntimeError(f"PostgreSQL did not start; tail of its log: {tail}")
        server = PostgresServer(port, SUPERUSER, password, root, bindir)
        server.query("SELECT 1")  # the password works over TCP
        yield server
    finally:
        if proc is not None:
            _stop(proc, bindir, data, run)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bindir: Path, port: int, root: Path, proc: subprocess.Popen, env: dict, as_user: dict) -> bool:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        ok = subprocess.run([str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "2"],
                            cwd=root, env=env, capture_output=True, **as_user)
        if ok.returncode == 0:
            return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen, bindir: Path, data: Path, run) -> None:
    """`pg_ctl stop -m immediate` (SIGQUIT to the postmaster), SIGKILL to the group if that fails."""
    if proc.poll() is None:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (see `postgres_server`);
    `postgres.create_database(name)` returns a fresh database's URI."""
    with postgres_server() as server:
        yield server
