"""The databases of the head's MLflow server: runs and the model registry, and the
basic-auth users and permissions, both on PostgreSQL.

Run by cluster.yaml on the head, before the MLflow server starts:

    python3 mlflow_store.py ~/mlm-work/secrets ~/mlm/deploy/aws/mlflow-auth.ini

Input: SECRETS/mlflow-db.env (KEY=VALUE lines, mode 0600, on the head only):

    MLM_MLFLOW_DB_URI       tracking and registry store, e.g.
                            postgresql+psycopg2://mlflow:PW@db.example.rds.amazonaws.com:5432/mlflow?sslmode=verify-full
    MLM_MLFLOW_AUTH_DB_URI  basic-auth store (optional; default: the same server and login,
                            database `<name>_auth`)

`postgresql://` is read as `postgresql+psycopg2://`: psycopg2 is the driver the head installs
(pyproject.toml's `server` extra), and SQLAlchemy >= 2.1 would otherwise load psycopg 3.

Without the file (the default, first start): head-local PostgreSQL on 127.0.0.1:5432, role
`mlflow` with a password generated here, databases `mlflow` and `mlflow_auth`; the file is
written with those URIs. To use RDS / Cloud SQL, write the file yourself
(docs/operations.md, "MLflow's database").

For a head-local URI (host 127.0.0.1, localhost or ::1, port 5432 or $MLM_LOCAL_PG_PORT: a
tunnel or Cloud SQL Auth Proxy on the head's loopback uses another port) the role and both databases are
created when missing and the role's password is set to the file's, as the `postgres`
superuser through `sudo -u postgres psql` (peer authentication on the Unix socket; the SQL
goes on stdin, so no password appears in a process list). External databases are used as
they are: create the databases there yourself.

Outputs, both mode 0600 in SECRETS, both rewritten on every start:

    mlflow-backend.env  MLFLOW_BACKEND_STORE_URI='...' (shell-quoted), sourced for the MLflow
                        server only: `mlflow server` reads it from the environment, so the
                        password is never on its command line
    mlflow-auth.ini     the template with `database_uri` set; MLFLOW_AUTH_CONFIG_PATH points at
                        it (MLflow reads the auth store's URI from this file only)

Idempotent. Exit status 2 with one line on stderr for a bad file or URI, 1 when the
head-local PostgreSQL cannot be set up. Standard library only.
"""

from __future__ import annotations

import configparser
import io
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

DB_FILE = "mlflow-db.env"
BACKEND_FILE = "mlflow-backend.env"
AUTH_INI = "mlflow-auth.ini"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOCAL_ROLE, LOCAL_DB = "mlflow", "mlflow"
# The head's own PostgreSQL (Ubuntu's first cluster); MLM_LOCAL_PG_PORT if you moved it.
LOCAL_PORT = int(os.environ.get("MLM_LOCAL_PG_PORT") or 5432)
# Dialects MLflow's SQLAlchemy store runs on (`+driver` suffixes allowed).
DIALECTS = {"postgresql", "mysql", "mssql", "sqlite"}
PSQL = ["sudo", "-n", "-u", "postgres", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"]


class StoreError(ValueError):
    pass


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (optional `export `, optional quotes around the value); # comments.
    Never sourced by a shell, so a URI's `&` or `$` needs no quoting."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if sep:
            out[key.strip()] = value
    return out


def check_uri(name: str, uri: str) -> urllib.parse.SplitResult:
    """A database URI MLflow can open, or StoreError with one line saying what is wrong."""
    if not uri:
        raise StoreError(f"{name} is empty")
    parts = urllib.parse.urlsplit(uri)
    dialect = parts.scheme.split("+", 1)[0]
    if dialect == "postgres":
        raise StoreError(f"{name}: write postgresql:// (or postgresql+psycopg2://), not postgres://")
    if dialect not in DIALECTS:
        raise StoreError(f"{name}: {parts.scheme or 'no'} scheme; use postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB")
    if dialect != "sqlite":
        if not parts.hostname:
            raise StoreError(f"{name}: no host in the URI")
        if not parts.path.strip("/"):
            raise StoreError(f"{name}: no database name in the URI (…/DBNAME)")
    return parts


def with_driver(uri: str) -> str:
    """`postgresql://` -> `postgresql+psycopg2://` (an explicit driver is kept)."""
    return "postgresql+psycopg2://" + uri[len("postgresql://"):] if uri.startswith("postgresql://") else uri


def auth_uri_for(uri: str) -> str:
    """Same server, login and options, database `<name>_auth` (SQLite: `<file>-auth.db`)."""
    if uri.startswith("sqlite"):
        prefix, sep, path = uri.partition(":///")
        p = Path(path)
        return f"{prefix}{sep}{p.with_name(p.stem + '-auth' + p.suffix)}"
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path="/" + parts.path.strip("/") + "_auth"))


def redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def is_local(parts: urllib.parse.SplitResult) -> bool:
    """The head's own PostgreSQL: loopback, port 5432 (a tunnel or Cloud SQL Auth Proxy on
    the head listens on loopback too, on another port, and is left alone)."""
    return (parts.scheme.startswith("postgresql") and (parts.hostname or "") in LOCAL_HOSTS
            and (parts.port or LOCAL_PORT) == LOCAL_PORT)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def local_setup_sql(role: str, password: str, databases: list[str]) -> str:
    """Idempotent: the role (LOGIN, the given password, no other rights) and its databases."""
    r = _sql_literal(role)
    lines = [
        f"SELECT format('CREATE ROLE %I LOGIN', {r}) WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {r})\\gexec",
        f"ALTER ROLE {_sql_ident(role)} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {_sql_literal(password)};",
    ]
    for db in dict.fromkeys(databases):
        d = _sql_literal(db)
        lines.append(f"SELECT format('CREATE DATABASE %I OWNER %I', {d}, {r}) WHERE NOT EXISTS "
                     f"(SELECT FROM pg_database WHERE datname = {d})\\gexec")
    return "\n".join(lines) + "\n"


def ensure_local(uris: list[str], attempts: int = 15, delay_s: float = 2.0) -> None:
    """Role and databases on the head-local server (all URIs must use the same login)."""
    parsed = [urllib.parse.urlsplit(u) for u in uris]
    logins = {(p.username, p.password) for p in parsed}
    if len(logins) != 1:
        raise StoreError("the head-local tracking and auth URIs must use the same user and password")
    (user, password), = logins
    if not user or not password:
        raise StoreError("a head-local PostgreSQL URI needs a user and a password (postgresql+psycopg2://USER:PW@127.0.0.1:5432/DB)")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    dbs = [urllib.parse.unquote(p.path.strip("/")) for p in parsed]
    sql = local_setup_sql(user, password, dbs)
    argv = [*PSQL, "-p", str(LOCAL_PORT)]
    for attempt in range(attempts):  # right after boot the server may still be starting
        out = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            return
        if attempt + 1 < attempts:
            time.sleep(delay_s)
    first = (out.stderr or out.stdout).strip().splitlines()
    raise RuntimeError("cannot set up the head-local PostgreSQL as `postgres` "
                       f"({first[0] if first else 'exit ' + str(out.returncode)}); "
                       "is the postgresql package installed and running (systemctl status postgresql)?")


def render_auth_ini(template: Path, database_uri: str) -> str:
    ini = configparser.ConfigParser(interpolation=None)
    with open(template) as f:
        ini.read_file(f)
    if "admin_password" in ini["mlflow"]:
        raise StoreError(f"{template}: no admin_password here (the head generates it)")
    # MLflow reads the file with ConfigParser's default interpolation: a literal % is %%.
    ini["mlflow"]["database_uri"] = database_uri.replace("%", "%%")
    buf = io.StringIO()
    buf.write(f"# Generated on every start from {template} by {Path(__file__).name}; holds a password.\n")
    ini.write(buf)
    return buf.getvalue()


def prepare(secrets_dir: Path, template: Path) -> dict[str, str]:
    """Read (or create) mlflow-db.env, set up a head-local database, write the outputs."""
    db_file = secrets_dir / DB_FILE
    if not db_file.is_file():
        legacy = secrets_dir.parent / "mlflow.db"
        if legacy.exists():
            raise StoreError(
                f"{legacy} is the SQLite store of an earlier cluster.yaml and {db_file} does not exist: to keep it, "
                f"write MLM_MLFLOW_DB_URI=sqlite:///{legacy} and MLM_MLFLOW_AUTH_DB_URI=sqlite:///"
                f"{legacy.with_name('mlflow-auth.db')} into {db_file}; to start an empty PostgreSQL store, move it away")
        password = secrets.token_urlsafe(32)
        base = f"postgresql+psycopg2://{LOCAL_ROLE}:{password}@127.0.0.1:{LOCAL_PORT}"
        _write_private(db_file, "# head-local PostgreSQL, generated on the first start (mlflow_store.py)\n"
                                f"MLM_MLFLOW_DB_URI={base}/{LOCAL_DB}\nMLM_MLFLOW_AUTH_DB_URI={base}/{LOCAL_DB}_auth\n")
    os.chmod(db_file, 0o600)
    env = read_env_file(db_file)
    uri = with_driver(env.get("MLM_MLFLOW_DB_URI", ""))
    check_uri(f"{db_file}: MLM_MLFLOW_DB_URI", uri)
    auth = with_driver(env.get("MLM_MLFLOW_AUTH_DB_URI") or auth_uri_for(uri))
    check_uri(f"{db_file}: MLM_MLFLOW_AUTH_DB_URI", auth)
    local = [u for u in (uri, auth) if is_local(urllib.parse.urlsplit(u))]
    if local:
        ensure_local(local)
    _write_private(secrets_dir / BACKEND_FILE, f"MLFLOW_BACKEND_STORE_URI={shlex.quote(uri)}\n")
    _write_private(secrets_dir / AUTH_INI, render_auth_ini(template, auth))
    return {"store": uri, "auth": auth}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: mlflow_store.py SECRETS_DIR AUTH_INI_TEMPLATE", file=sys.stderr)
        return 2
    try:
        uris = prepare(Path(argv[1]), Path(argv[2]))
    except (StoreError, OSError, configparser.Error, KeyError) as e:
        print(f"mlflow_store: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.SubprocessError) as e:
        print(f"mlflow_store: {e}", file=sys.stderr)
        return 1
    print(f"MLflow store {redact(uris['store'])}, auth store {redact(uris['auth'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
