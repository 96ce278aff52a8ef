"""Make sure the MLflow service account that jobs log with exists and has its password.

Run on the head by cluster.yaml right after the basic-auth MLflow server is healthy:

    python3 mlflow_service_user.py http://10.0.1.23:5000 ~/mlm-work/secrets/mlflow-client.env

The client file (KEY=VALUE lines, mode 0600, written once on the head) holds
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; every node's Ray processes get
them from it. The admin credentials come from the environment (MLFLOW_AUTH_ADMIN_USERNAME,
default `admin`, and MLFLOW_AUTH_ADMIN_PASSWORD), never from the command line, so no
password shows up in `ps`.

Idempotent: when the service account already logs in, nothing changes; when it does not
exist it is created (non-admin); when it exists with another password (the client file was
regenerated but the user store kept), the admin resets its password to the file's.
Exits non-zero with one line on stderr when the admin password is refused or the account
still cannot log in. Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

CREATE_USER = "/api/2.0/mlflow/users/create"
UPDATE_PASSWORD = "/api/2.0/mlflow/users/update-password"
# Any endpoint every authenticated user may call; 401 means the credentials are wrong.
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


class ProvisionError(RuntimeError):
    pass


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (an optional leading `export ` is accepted); # comments, blanks."""
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):]
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip().strip("'\"")
    return out


def _request(url: str, method: str, user: str, password: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def ensure_service_user(base_url: str, username: str, password: str, admin_user: str, admin_password: str) -> str:
    """Returns what was done: 'ok' (already logs in), 'created' or 'password reset'."""
    base_url = base_url.rstrip("/")
    status, _ = _request(base_url + PROBE, "GET", username, password)
    if status == 200:
        return "ok"
    status, text = _request(base_url + CREATE_USER, "POST", admin_user, admin_password,
                            {"username": username, "password": password})
    if status == 401:
        raise ProvisionError(
            "MLflow refused the admin credentials (401): the admin password in the server env file "
            "does not match the one stored in the auth database")
    if status == 403:
        if "Host header" in text:
            raise ProvisionError(f"MLflow rejected the Host header of {base_url} (403): use the address the "
                                 "server allows (a private IP or localhost, or set --allowed-hosts)")
        raise ProvisionError(f"the account {admin_user!r} may not create users (403): it is not an admin")
    if status == 200:
        action = "created"
    elif "RESOURCE_ALREADY_EXISTS" in text:
        status, text = _request(base_url + UPDATE_PASSWORD, "PATCH", admin_user, admin_password,
                                {"username": username, "password": password})
        if status != 200:
            raise ProvisionError(f"cannot reset the password of MLflow user {username!r} ({status}): {text[:200]}")
        action = "password reset"
    else:
        raise ProvisionError(f"cannot create MLflow user {username!r} ({status}): {text[:200]}")
    status, text = _request(base_url + PROBE, "GET", username, password)
    if status != 200:
        raise ProvisionError(f"MLflow user {username!r} still cannot log in ({status}): {text[:200]}")
    return action


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: mlflow_service_user.py TRACKING_URL CLIENT_ENV_FILE", file=sys.stderr)
        return 2
    url, client_file = argv[1], argv[2]
    client = read_env_file(client_file)
    username = client.get("MLFLOW_TRACKING_USERNAME", "")
    password = client.get("MLFLOW_TRACKING_PASSWORD", "")
    admin_password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    admin_user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    if not username or not password:
        print(f"{client_file}: needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", file=sys.stderr)
        return 2
    if not admin_password:
        print("MLFLOW_AUTH_ADMIN_PASSWORD is not set", file=sys.stderr)
        return 2
    if username == admin_user:
        print("the service account must not be the admin account", file=sys.stderr)
        return 2
    try:
        action = ensure_service_user(url, username, password, admin_user, admin_password)
    except (ProvisionError, OSError) as e:
        print(f"mlflow_service_user: {e}", file=sys.stderr)
        return 1
    print(f"MLflow service account {username!r}: {action}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
