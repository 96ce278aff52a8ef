"""Offline checks for the Ray cluster-launcher config ``cluster.yaml``.

Validation uses Ray's own machinery, the same way ``ray up`` does before it
makes any cloud call:

* ``ray/autoscaler/ray-schema.json`` (shipped inside the installed ``ray``
  package) is applied with ``jsonschema`` to the raw YAML, and
* ``ray.autoscaler._private.util.prepare_config`` (merge provider defaults,
  merge setup commands, fill min/max workers) followed by
  ``ray.autoscaler._private.util.validate_config`` (the schema again, plus
  cross-field checks such as head_node_type / max_workers) is applied to the
  result, mirroring ``ray.autoscaler._private.commands._bootstrap_config``.

Negative cases mutate a copy of the config and require the validator to
reject it, so a silently no-op validator cannot make this file pass.

Also asserted: project-specific invariants (GPU worker scales from zero and
advertises a GPU, the head starts MLflow, nothing binds the dashboard or
MLflow to 0.0.0.0, the repo is synced and installed, ...), and the
credentials: Ray token authentication on every node, MLflow basic auth with
secrets generated on the head (never written in the repository), the admin
password and the database URIs kept away from the Ray processes, MLflow's
stores on PostgreSQL (head-local by default, or the operator's database).

The start commands that handle secrets are also *executed*, in a temporary
directory standing in for /home/ubuntu, with stubs for `mlflow`, `ray`, `curl`,
`ip` and `sudo` (the head-local PostgreSQL's `psql`) that record their
arguments, stdin and environment: files and modes, regeneration on a second
start, and which process sees which secret. The real deploy/aws/mlflow_store.py
runs there; tests/integration/test_registry_ops.py runs it against a real
PostgreSQL and a real MLflow server.

No cluster is started and no network is used.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).resolve().parent / "ray-schema.json"

GPU_WORKER = "gpu_worker"
HOME = "/home/ubuntu"
REPO_MOUNT = "/home/ubuntu/mlm"
TOKEN_PATH = "/home/ubuntu/.ray/auth_token"
SECRETS_DIR = "/home/ubuntu/mlm-work/secrets"
CLIENT_ENV = SECRETS_DIR + "/mlflow-client.env"
SERVER_ENV = SECRETS_DIR + "/mlflow-server.env"
DB_ENV = SECRETS_DIR + "/mlflow-db.env"
BACKEND_ENV = SECRETS_DIR + "/mlflow-backend.env"
AUTH_INI = SECRETS_DIR + "/mlflow-auth.ini"
STORE_SCRIPT = "deploy/aws/mlflow_store.py"
# Files only the MLflow server's start command may read: admin password, database URIs.
SERVER_ONLY = ("mlflow-server.env", "mlflow-db.env", "mlflow-backend.env", "mlflow-auth.ini", "mlflow_store.py")
PUBLIC_BIND_ADDRESSES = {"0.0.0.0", "::", "[::]", "*"}
LOOPBACK_ADDRESSES = {"127.0.0.1", "localhost", "::1"}

COMMAND_SECTIONS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


# --------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------
def _load_cluster_yaml() -> Dict[str, Any]:
    # `ray up` reads the file with yaml.safe_load as well.
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture
def config() -> Dict[str, Any]:
    return _load_cluster_yaml()


@pytest.fixture(scope="module")
def ray_schema() -> Dict[str, Any]:
    with open(RAY_SCHEMA) as f:
        return json.load(f)


def _commands(cfg: Dict[str, Any], *sections: str) -> List[str]:
    out: List[str] = []
    for section in sections or COMMAND_SECTIONS:
        out.extend(cfg.get(section) or [])
    return out


def _flag_value(command: str, flag: str) -> str | None:
    """Value of ``--flag=value`` or ``--flag value`` in a shell command."""
    tokens = shlex.split(command)
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def _ray_up_validate(cfg: Dict[str, Any]) -> None:
    """What `ray up` does to the YAML before touching the cloud provider."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


# --------------------------------------------------------------------------
# Ray's own schema / validation
# --------------------------------------------------------------------------
def test_schema_file_ships_with_ray():
    assert RAY_SCHEMA.is_file(), f"ray {ray.__version__} has no {RAY_SCHEMA}"


def test_yaml_is_a_mapping(config):
    assert isinstance(config, dict)
    assert config["provider"]["type"] == "aws"


def test_raw_yaml_matches_ray_schema(config, ray_schema):
    # Strict check of exactly what is in the file (before defaults are merged).
    jsonschema.validate(config, ray_schema)


def test_passes_ray_up_validation(config):
    _ray_up_validate(config)


def _set(path, value):
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


SCHEMA_VIOLATIONS = {
    "unknown top-level key": _set(("max_worker",), 4),
    "max_workers not an int": _set(("max_workers",), "4"),
    "GPU count not an int": _set(
        ("available_node_types", GPU_WORKER, "resources", "GPU"), "1"
    ),
    "negative GPU count": _set(
        ("available_node_types", GPU_WORKER, "resources", "GPU"), -1
    ),
    "typo in node-type key": _set(("available_node_types", GPU_WORKER, "min_worker"), 0),
    "node type without node_config": _delete(
        ("available_node_types", GPU_WORKER, "node_config")
    ),
    "setup command not a string": _set(("setup_commands",), [["pip", "install"]]),
    "unknown auth key": _set(("auth", "ssh_password"), "hunter2"),
}


@pytest.mark.parametrize("mutation", SCHEMA_VIOLATIONS.values(), ids=SCHEMA_VIOLATIONS.keys())
def test_schema_violations_are_rejected(config, ray_schema, mutation):
    broken = copy.deepcopy(config)
    mutation(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)
    with pytest.raises(jsonschema.ValidationError):
        _ray_up_validate(broken)


CROSS_FIELD_VIOLATIONS = {
    "head_node_type not a node type": _set(("head_node_type",), "no_such_type"),
    "sum(min_workers) > max_workers": _set(
        ("available_node_types", GPU_WORKER, "min_workers"), 99
    ),
}


@pytest.mark.parametrize(
    "mutation", CROSS_FIELD_VIOLATIONS.values(), ids=CROSS_FIELD_VIOLATIONS.keys()
)
def test_cross_field_violations_are_rejected(config, mutation):
    broken = copy.deepcopy(config)
    mutation(broken)
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------
# project invariants
# --------------------------------------------------------------------------
def test_gpu_worker_scales_from_zero_and_has_a_gpu(config):
    node_types = config["available_node_types"]
    assert GPU_WORKER in node_types
    assert config["head_node_type"] != GPU_WORKER
    gpu = node_types[GPU_WORKER]
    assert gpu.get("min_workers") == 0
    assert 1 <= gpu.get("max_workers", 0) <= config["max_workers"]
    assert gpu["resources"].get("GPU", 0) >= 1
    # The head must not advertise GPUs, or Ray Train could land on it.
    head = node_types[config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0


def _mlflow_server_commands(cfg: Dict[str, Any]) -> List[str]:
    return [
        c
        for c in _commands(cfg, "head_setup_commands", "head_start_ray_commands")
        if re.search(r"\bmlflow server\b", c)
    ]


def test_head_starts_mlflow_server(config):
    cmds = _mlflow_server_commands(config)
    assert len(cmds) == 1, "exactly one head command must start `mlflow server`"
    cmd = cmds[0]
    assert "nohup" in cmd, "MLflow must outlive the SSH session that starts it"
    # The store's URI holds the database password: it reaches `mlflow server` through
    # MLFLOW_BACKEND_STORE_URI (from a 0600 file), never through its command line.
    assert "--backend-store-uri" not in cmd and "sqlite:" not in cmd
    load = cmd.index('. "$SECRETS/mlflow-backend.env"')
    assert cmd.index(f"python3 {REPO_MOUNT}/{STORE_SCRIPT}") < load < cmd.index("mlflow server")
    assert "--serve-artifacts" in cmd
    assert "--artifacts-destination" in cmd
    assert re.search(r"MLFLOW_ARTIFACTS_DESTINATION=s3://\S+", cmd) or re.search(
        r"--artifacts-destination\s+s3://", cmd
    ), "artifacts must go to an S3 destination"
    assert "--port 5000" in cmd
    # Workers never start MLflow.
    assert not any(
        re.search(r"\bmlflow server\b", c)
        for c in _commands(config, "setup_commands", "worker_setup_commands", "worker_start_ray_commands")
    )


def test_mlflow_is_not_bound_to_all_interfaces(config):
    (cmd,) = _mlflow_server_commands(config)
    # The server command sits inside `bash -c '...'`, so match the flag with a
    # regex rather than shlex.
    args = cmd.split("mlflow server", 1)[1]
    hosts = re.findall(r"""(?:--host|-h)[= ]+["']?([^"'\s]+)""", args)
    assert len(hosts) == 1, "pass --host exactly once instead of relying on defaults"
    assert hosts[0] not in PUBLIC_BIND_ADDRESSES


def _ray_start_head_commands(cfg: Dict[str, Any]) -> List[str]:
    return [
        c for c in _commands(cfg, "head_start_ray_commands") if re.search(r"\bray start\b.*--head\b", c)
    ]


def test_dashboard_is_loopback_only(config):
    cmds = _ray_start_head_commands(config)
    assert len(cmds) == 1, "exactly one `ray start --head` command expected"
    host = _flag_value(cmds[0], "--dashboard-host")
    assert host is not None, "set --dashboard-host explicitly"
    assert host not in PUBLIC_BIND_ADDRESSES
    assert host in LOOPBACK_ADDRESSES


def test_nothing_binds_to_all_interfaces(config):
    for cmd in _commands(config):
        assert "0.0.0.0" not in cmd, cmd


def test_ray_start_commands_exist(config):
    assert _ray_start_head_commands(config)
    assert any(
        re.search(r"\bray start\b.*--address=\$RAY_HEAD_IP:6379", c)
        for c in _commands(config, "worker_start_ray_commands")
    )


def test_workers_get_mlflow_tracking_uri(config):
    worker_cmds = " ".join(_commands(config, "worker_start_ray_commands"))
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_cmds
    # ...and it must be in the environment of the `ray start` that spawns the
    # Ray worker processes.
    (start,) = [c for c in _commands(config, "worker_start_ray_commands") if "ray start" in c]
    assert start.index("mlflow.env") < start.index("ray start")


def test_repo_is_synced_and_installed_editable(config):
    assert config["file_mounts"].get(REPO_MOUNT) == "."
    setup = _commands(config, "setup_commands")
    assert any(re.search(rf"pip install -e {re.escape(REPO_MOUNT)}\b", c) for c in setup)
    # Must reach both node types after Ray merges setup commands.
    prepared = prepare_config(copy.deepcopy(config))
    for section in ("head_setup_commands", "worker_setup_commands"):
        assert any(f"pip install -e {REPO_MOUNT}" in c for c in prepared[section]), section


def test_cluster_ray_version_matches_launcher(config):
    pins = re.findall(r"ray\[[^\]]*\]==([0-9][0-9A-Za-z.+-]*)", " ".join(_commands(config)))
    assert pins, "pin Ray on the cluster"
    assert set(pins) == {ray.__version__}, (
        f"cluster pins ray {pins}, launcher has {ray.__version__}; `ray up` "
        "requires matching versions"
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
def test_every_command_is_valid_bash(config):
    # YAML folding (`>-`) can silently glue shell lines together; parse each
    # command with `bash -n` (syntax check only, nothing is executed).
    for cmd in _commands(config):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{res.stderr}\n--- in command ---\n{cmd}"


# --------------------------------------------------------------------------
# credentials: Ray token auth, MLflow basic auth
# --------------------------------------------------------------------------
def _ray_start_commands(cfg: Dict[str, Any]) -> Dict[str, str]:
    (head,) = _ray_start_head_commands(cfg)
    (worker,) = [c for c in _commands(cfg, "worker_start_ray_commands") if re.search(r"\bray start\b", c)]
    return {"head": head, "worker": worker}


@pytest.mark.parametrize("node", ["head", "worker"])
def test_ray_token_auth_on_every_node(config, node):
    cmd = _ray_start_commands(config)[node]
    start = cmd.index("ray start")
    mode = re.search(r"export RAY_AUTH_MODE=token\b", cmd)
    assert mode and mode.start() < start, "RAY_AUTH_MODE=token must be exported before `ray start`"
    # A missing/empty token file stops the node before Ray starts.
    check = cmd.find(f"[ ! -s {TOKEN_PATH} ]") if node == "head" else cmd.find(TOKEN_PATH)
    assert 0 <= check < start
    assert "RAY_AUTH_MODE=disabled" not in " ".join(_commands(config))


def test_ray_token_reaches_every_node_from_outside_the_repo(config):
    mounts = config["file_mounts"]
    assert TOKEN_PATH in mounts, "the token must be file-mounted to Ray's default token path"
    local = Path(os.path.expanduser(mounts[TOKEN_PATH]))
    assert local == Path.home() / ".ray" / "auth_token", "use the path `ray get-auth-token --generate` writes"
    assert REPO_ROOT not in local.parents, "the token file must live outside the repository"
    # File mounts survive Ray's config preparation (head and, through the head, workers).
    assert TOKEN_PATH in prepare_config(copy.deepcopy(config))["file_mounts"]
    # And the node makes it owner-only.
    assert any(f"chmod 600 {TOKEN_PATH}" in c for c in _commands(config, "setup_commands"))


def test_interactive_shells_use_token_auth(config):
    setup = " ".join(_commands(config, "setup_commands"))
    assert re.search(r"echo 'export RAY_AUTH_MODE=token[^']*' >> ~/.bashrc", setup)


def test_mlflow_server_requires_login(config):
    (cmd,) = _mlflow_server_commands(config)
    args = cmd.split("mlflow server", 1)[1]
    assert re.search(r"--app-name[= ]basic-auth\b", args)
    # basic-auth imports Flask-WTF: the head installs the `auth` extra.
    assert any('"mlflow[auth]' in c for c in _commands(config, "head_setup_commands"))


def _auth_ini_template(cmd: str) -> Path:
    m = re.search(rf'python3 {re.escape(REPO_MOUNT)}/{re.escape(STORE_SCRIPT)} "\$SECRETS" (\S+)', cmd)
    assert m, "the head renders the auth config from the repository's template"
    remote = m.group(1).rstrip(";")
    assert remote.startswith(REPO_MOUNT + "/"), remote
    return REPO_ROOT / remote[len(REPO_MOUNT) + 1:]


def test_mlflow_auth_config_has_no_password(config):
    (cmd,) = _mlflow_server_commands(config)
    ini_path = _auth_ini_template(cmd)
    assert ini_path.is_file(), ini_path
    ini = configparser.ConfigParser()
    ini.read(ini_path)
    section = ini["mlflow"]
    assert "admin_password" not in section, "the admin password is generated on the head, not committed"
    # The auth store's URI carries the database password: the head fills it in, in secrets/.
    assert "database_uri" not in section
    assert section["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert section["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    m = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+?);", cmd)
    assert m and m.group(1) == AUTH_INI, "MLflow must read the rendered (0600) auth config"


def test_mlflow_secrets_are_generated_once_on_the_head(config):
    (cmd,) = _mlflow_server_commands(config)
    assert "secrets.token_urlsafe(32)" in cmd or re.search(r"openssl rand -(hex|base64) (3[2-9]|[4-9]\d)", cmd)
    assert "umask 077" in cmd
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD"):
        assert f"{var}=%s" in cmd, f"{var} must be filled from a generated secret"
    # ... only when absent, so restarts keep the passwords the stores already know.
    assert '[ ! -s "$SECRETS/mlflow-server.env" ]' in cmd
    assert '[ ! -s "$SECRETS/mlflow-client.env" ]' in cmd
    assert cmd.index("umask 077") < cmd.index("mlflow-server.env")


def test_admin_password_stays_with_the_mlflow_server(config):
    # Only the server's own command reads the server env file and the database URIs...
    server_cmds = _mlflow_server_commands(config)
    assert [c for c in _commands(config) if "mlflow-server.env" in c] == server_cmds
    for name in SERVER_ONLY:
        assert not [c for c in _commands(config) if name in c and c not in server_cmds], name
    # ... the workers receive only the service account ...
    assert config.get("cluster_synced_files") == [CLIENT_ENV]
    # ... and the Ray start commands never load it.
    for cmd in _ray_start_commands(config).values():
        assert "MLFLOW_AUTH_ADMIN" not in cmd and "MLFLOW_BACKEND_STORE_URI" not in cmd
        assert not any(name in cmd for name in SERVER_ONLY)


def test_service_account_is_provisioned_after_health_check(config):
    (cmd,) = _mlflow_server_commands(config)
    m = re.search(rf"python3 {re.escape(REPO_MOUNT)}/(deploy/aws/mlflow_service_user\.py)\b", cmd)
    assert m, "the head must create the service account through MLflow's auth API"
    assert (REPO_ROOT / m.group(1)).is_file()
    assert cmd.index("/health") < m.start()


def test_head_installs_the_postgresql_store(config):
    setup = _commands(config, "head_setup_commands")
    pip = [c for c in setup if "pip install" in c]
    # The head installs what pyproject.toml's `server` extra lists (psycopg2 for PostgreSQL).
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^server = \[(.*)\]$", pyproject, re.M).group(1)
    for req in re.findall(r'"([A-Za-z0-9_.-]+)', extra):
        assert any(re.search(rf"\b{re.escape(req)}\b", c) for c in pip), req
    assert "psycopg2-binary" in extra
    assert any("apt-get" in c and "install -y" in c and "postgresql" in c for c in setup)
    # Workers never run PostgreSQL.
    prepared = prepare_config(copy.deepcopy(config))
    assert not any("postgresql" in c for c in prepared["worker_setup_commands"])


def test_no_literal_secrets_in_cluster_yaml():
    text = CLUSTER_YAML.read_text()
    assert "password1234" not in text  # MLflow's old default admin password
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), "looks like a committed token"
    assert not re.search(r"postgres(ql)?(\+\w+)?://[^\s:/@]+:[^\s@]+@", text), "a database password in cluster.yaml"
    for var in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_BACKEND_STORE_URI"):
        for m in re.finditer(rf"\b{var}=(\S*)", text):
            assert m.group(1).startswith(("%s", "$", "//")), f"literal value for {var}: {m.group(0)}"


# --------------------------------------------------------------------------
# the secret-handling start commands, executed against stubs
# --------------------------------------------------------------------------
STUB_IP = """#!/bin/sh
echo "8.8.8.8 via 10.0.1.1 dev eth0 src 10.0.1.23 uid 1000"
"""
STUB_CURL = "#!/bin/sh\nexit 0\n"
# The server stub records its argv and environment, then stays up like a server.
STUB_MLFLOW = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_LOG/mlflow.args"
env > "$STUB_LOG/mlflow.env.part" && mv "$STUB_LOG/mlflow.env.part" "$STUB_LOG/mlflow.env"  # whole when seen
exec sleep 300
"""
STUB_RAY = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_LOG/ray.args"
env > "$STUB_LOG/ray.env.part" && mv "$STUB_LOG/ray.env.part" "$STUB_LOG/ray.env"
"""
# `sudo -u postgres psql ...` (the head-local PostgreSQL) and `dpkg -s`: record, answer 0
# (or $STUB_SUDO_RC / $STUB_DPKG_RC).
STUB_SUDO = """#!/bin/sh
printf '%s\\n' "$@" -- >> "$STUB_LOG/sudo.args"
cat >> "$STUB_LOG/sudo.stdin"
exit "${STUB_SUDO_RC:-0}"
"""
STUB_DPKG = """#!/bin/sh
exit "${STUB_DPKG_RC:-0}"
"""
STUB_SERVICE_USER = """import os, sys
open(os.path.join(os.environ["STUB_LOG"], "service_user.args"), "w").write("\\n".join(sys.argv[1:]))
open(os.path.join(os.environ["STUB_LOG"], "service_user.admin"), "w").write(
    os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", ""))
"""


class Sandbox:
    """A stand-in for /home/ubuntu plus stub executables; runs a start command."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.bin = root / "bin"
        self.log = root / "log"
        for d in (self.home / "mlm" / "deploy" / "aws", self.home / "mlm-work", self.home / ".ray", self.bin, self.log):
            d.mkdir(parents=True, exist_ok=True)
        for name, body in (("ip", STUB_IP), ("curl", STUB_CURL), ("mlflow", STUB_MLFLOW), ("ray", STUB_RAY),
                           ("sudo", STUB_SUDO), ("dpkg", STUB_DPKG)):
            (self.bin / name).write_text(body)
            (self.bin / name).chmod(0o755)
        (self.bin / "python3").symlink_to(sys.executable)
        aws = self.home / "mlm" / "deploy" / "aws"
        (aws / "mlflow_service_user.py").write_text(STUB_SERVICE_USER)
        for real in ("mlflow_store.py", "mlflow-auth.ini"):  # the real ones, as the head runs them
            shutil.copy(REPO_ROOT / "deploy" / "aws" / real, aws / real)

    def path(self, remote: str) -> Path:
        assert remote.startswith(HOME)
        return self.home / remote[len(HOME) + 1:]

    def run(self, cmd: str, **env: str) -> subprocess.CompletedProcess:
        cmd = cmd.replace(HOME, str(self.home))
        cmd = cmd.replace("s3://CHANGE-ME-mlm-bucket/mlflow-artifacts", "s3://test-bucket/mlflow-artifacts")
        full_env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home), "STUB_LOG": str(self.log), **env}
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=full_env, timeout=60,
                              stdin=subprocess.DEVNULL)

    def sudo_calls(self) -> List[List[str]]:
        log = self.log / "sudo.args"
        if not log.exists():
            return []
        calls, cur = [], []
        for arg in log.read_text().split("\n")[:-1]:
            if arg == "--":
                calls.append(cur)
                cur = []
            else:
                cur.append(arg)
        return calls

    def recorded_env(self, name: str) -> Dict[str, str]:
        lines = (self.log / f"{name}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def stop_server(self) -> None:
        pid_file = self.path("/home/ubuntu/mlm-work/mlflow.pid")
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _read_env_file(path: Path) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    yield box
    box.stop_server()


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")


@needs_bash
def test_head_mlflow_start_generates_and_keeps_secrets(config, sandbox):
    (cmd,) = _mlflow_server_commands(config)
    res = sandbox.run(cmd)
    assert res.returncode == 0, res.stderr
    _wait_for(sandbox.log / "mlflow.env")

    secrets_dir = sandbox.path(SECRETS_DIR)
    server_env, client_env = sandbox.path(SERVER_ENV), sandbox.path(CLIENT_ENV)
    assert _mode(secrets_dir) == 0o700
    assert _mode(server_env) == 0o600 and _mode(client_env) == 0o600
    server, client = _read_env_file(server_env), _read_env_file(client_env)
    assert server["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert client["MLFLOW_TRACKING_USERNAME"] == "mlm"

    # The head-local PostgreSQL: a generated password for the role `mlflow`, two databases.
    db_env = sandbox.path(DB_ENV)
    assert _mode(db_env) == 0o600
    db = _read_env_file(db_env)
    m = re.fullmatch(r"postgresql\+psycopg2://mlflow:([\w-]+)@127\.0\.0\.1:5432/mlflow", db["MLM_MLFLOW_DB_URI"])
    assert m, db["MLM_MLFLOW_DB_URI"]
    db_password = m.group(1)
    assert db["MLM_MLFLOW_AUTH_DB_URI"] == db["MLM_MLFLOW_DB_URI"] + "_auth"
    generated = [server["MLFLOW_AUTH_ADMIN_PASSWORD"], server["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                 client["MLFLOW_TRACKING_PASSWORD"], db_password]
    assert len(set(generated)) == 4 and all(len(v) >= 40 for v in generated)
    assert "password1234" not in generated
    # ... set up as the `postgres` superuser, the password on psql's stdin, not in its argv.
    (psql,) = sandbox.sudo_calls()
    assert psql[:5] == ["-n", "-u", "postgres", "psql", "-X"] and psql[psql.index("-p") + 1] == "5432"
    assert not any(db_password in a for a in psql)
    sql = (sandbox.log / "sudo.stdin").read_text()
    assert f"ALTER ROLE \"mlflow\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{db_password}';" in sql
    for name in ("mlflow", "mlflow_auth"):
        assert f"SELECT format('CREATE DATABASE %I OWNER %I', '{name}', 'mlflow')" in sql

    # The server got the admin password and secret key in its environment, not on its command line.
    seen = sandbox.recorded_env("mlflow")
    assert seen["MLFLOW_AUTH_ADMIN_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert seen["MLFLOW_FLASK_SERVER_SECRET_KEY"] == server["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # The stores: tracking URI in the environment, the auth store's in the rendered 0600 ini.
    assert seen["MLFLOW_BACKEND_STORE_URI"] == db["MLM_MLFLOW_DB_URI"]
    assert seen["MLFLOW_AUTH_CONFIG_PATH"] == str(sandbox.path(AUTH_INI))
    assert _mode(sandbox.path(AUTH_INI)) == 0o600 and _mode(sandbox.path(BACKEND_ENV)) == 0o600
    assert _auth_config(sandbox.path(AUTH_INI)).database_uri == db["MLM_MLFLOW_AUTH_DB_URI"]
    argv = (sandbox.log / "mlflow.args").read_text().split("\n")
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    assert argv[argv.index("--host") + 1] == "10.0.1.23"
    assert "--backend-store-uri" not in argv
    assert not any(secret in " ".join(argv) for secret in generated)

    # The provisioning step ran as admin against the server, with the client file.
    assert (sandbox.log / "service_user.args").read_text().split("\n") == [
        "http://10.0.1.23:5000", str(client_env)]
    assert (sandbox.log / "service_user.admin").read_text() == server["MLFLOW_AUTH_ADMIN_PASSWORD"]

    # mlflow.env (sourced by the Ray start commands and shells) loads the service account only.
    mlflow_env = sandbox.path("/home/ubuntu/mlm-work/mlflow.env").read_text()
    assert "MLFLOW_TRACKING_URI=http://10.0.1.23:5000" in mlflow_env
    assert str(client_env) in mlflow_env and "mlflow-server.env" not in mlflow_env

    # A restart replaces the server process and keeps every secret.
    first_pid = sandbox.path("/home/ubuntu/mlm-work/mlflow.pid").read_text()
    (sandbox.log / "mlflow.env").unlink()
    res = sandbox.run(cmd)
    assert res.returncode == 0, res.stderr
    _wait_for(sandbox.log / "mlflow.env")
    assert sandbox.path("/home/ubuntu/mlm-work/mlflow.pid").read_text() != first_pid
    assert _read_env_file(server_env) == server and _read_env_file(client_env) == client
    assert _read_env_file(db_env) == db and sandbox.recorded_env("mlflow")["MLFLOW_BACKEND_STORE_URI"] == db["MLM_MLFLOW_DB_URI"]


def _auth_config(path: Path):
    """The auth config as MLflow itself reads it (MLFLOW_AUTH_CONFIG_PATH), with MLflow's own
    reader: mlflow/server/auth/config.py, loaded by path (importing the `mlflow.server`
    package would build the whole server app: seconds)."""
    import importlib.util

    import mlflow

    spec = importlib.util.spec_from_file_location(
        "_mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
        return module.read_auth_config()


def _start_with_db_env(sandbox: Sandbox, config, text: str) -> subprocess.CompletedProcess:
    sandbox.path(SECRETS_DIR).mkdir(parents=True, exist_ok=True)
    sandbox.path(DB_ENV).write_text(text)
    (cmd,) = _mlflow_server_commands(config)
    return sandbox.run(cmd)


@needs_bash
def test_head_mlflow_start_uses_the_operators_database(config, sandbox):
    # RDS-style: a %-escaped password, TLS options with `&` (the file is never sourced by a shell).
    uri = ("postgresql+psycopg2://mlflow:s3cr%25et%26x@mlm.abc123.us-west-2.rds.amazonaws.com:5432/mlflow"
           "?sslmode=verify-full&sslrootcert=/home/ubuntu/rds-ca.pem")
    res = _start_with_db_env(sandbox, config, f"# the team's RDS\nMLM_MLFLOW_DB_URI='{uri}'\n")
    assert res.returncode == 0, res.stderr
    _wait_for(sandbox.log / "mlflow.env")
    assert sandbox.sudo_calls() == []  # nothing done to a head-local PostgreSQL
    assert sandbox.recorded_env("mlflow")["MLFLOW_BACKEND_STORE_URI"] == uri
    auth = _auth_config(sandbox.path(AUTH_INI))
    assert auth.database_uri == uri.replace("/mlflow?", "/mlflow_auth?")
    assert auth.default_permission == "MANAGE" and auth.admin_username == "admin"
    assert "mlm.abc123.us-west-2.rds.amazonaws.com" in res.stdout and "s3cr" not in res.stdout + res.stderr


@needs_bash
def test_head_mlflow_start_leaves_a_tunnel_on_loopback_alone(config, sandbox):
    # A Cloud SQL Auth Proxy (or SSH tunnel) on the head's loopback is not the head's PostgreSQL.
    uri = "postgresql+psycopg2://mlflow:pw-123@127.0.0.1:6543/mlflow"
    res = _start_with_db_env(sandbox, config, f"MLM_MLFLOW_DB_URI={uri}\n")
    assert res.returncode == 0, res.stderr
    _wait_for(sandbox.log / "mlflow.env")
    assert sandbox.sudo_calls() == []
    assert sandbox.recorded_env("mlflow")["MLFLOW_BACKEND_STORE_URI"] == uri


@needs_bash
@pytest.mark.parametrize("line,error", [
    ("MLM_MLFLOW_DB_URI=postgres://u:p@db.example.com/mlflow", "postgresql://"),
    ("MLM_MLFLOW_DB_URI=http://10.0.1.5:5000", "scheme"),
    ("MLM_MLFLOW_DB_URI=postgresql+psycopg2://u:p@db.example.com:5432/", "no database name"),
    ("MLM_MLFLOW_AUTH_DB_URI=postgresql+psycopg2://u:p@db.example.com/auth", "MLM_MLFLOW_DB_URI is empty"),
], ids=["postgres-scheme", "not-a-database", "no-database", "no-store-uri"])
def test_head_mlflow_start_refuses_a_bad_database_uri(config, sandbox, line, error):
    res = _start_with_db_env(sandbox, config, line + "\n")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow_store: ") and error in lines[0], res.stderr
    assert "u:p@" not in res.stderr  # the error line never repeats a password
    assert not (sandbox.log / "mlflow.args").exists() and sandbox.sudo_calls() == []


@needs_bash
def test_head_mlflow_start_keeps_an_earlier_sqlite_store_only_when_asked(config, sandbox):
    """A head from before PostgreSQL has ~/mlm-work/mlflow.db: switching to an empty store
    silently would hide every registered model, so the start stops and says what to write."""
    legacy = sandbox.path("/home/ubuntu/mlm-work/mlflow.db")
    legacy.write_bytes(b"SQLite format 3\x00")
    (cmd,) = _mlflow_server_commands(config)
    res = sandbox.run(cmd)
    assert res.returncode != 0 and "mlflow-db.env" in res.stderr and "sqlite:///" in res.stderr
    assert not (sandbox.log / "mlflow.args").exists() and not sandbox.path(DB_ENV).exists()
    res = _start_with_db_env(sandbox, config, f"MLM_MLFLOW_DB_URI=sqlite:///{legacy}\n")
    assert res.returncode == 0, res.stderr
    _wait_for(sandbox.log / "mlflow.env")
    assert sandbox.recorded_env("mlflow")["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{legacy}"
    assert _auth_config(sandbox.path(AUTH_INI)).database_uri == f"sqlite:///{legacy.with_name('mlflow-auth.db')}"
    assert sandbox.sudo_calls() == []


@needs_bash
@pytest.mark.parametrize("installed", [True, False])
def test_head_setup_installs_postgresql_once(config, sandbox, installed):
    (cmd,) = [c for c in _commands(config, "head_setup_commands") if "postgresql" in c]
    res = sandbox.run(cmd, STUB_DPKG_RC="0" if installed else "1")
    assert res.returncode == 0, res.stderr
    calls = [" ".join(c) for c in sandbox.sudo_calls()]
    apt = [c for c in calls if "apt-get" in c]
    assert (apt == []) == installed
    if not installed:
        assert "install -y -q postgresql" in apt[-1] and "DEBIAN_FRONTEND=noninteractive" in apt[-1]
    assert calls[-1] == "systemctl enable --now postgresql"


@needs_bash
def test_head_mlflow_start_refuses_placeholder_bucket(config, sandbox):
    (cmd,) = _mlflow_server_commands(config)
    res = sandbox.run(cmd.replace("s3://CHANGE-ME-mlm-bucket/mlflow-artifacts", "s3://CHANGE-ME"))
    assert res.returncode != 0 and "MLFLOW_ARTIFACTS_DESTINATION" in res.stderr
    assert not sandbox.path(SECRETS_DIR).exists()


def _write_node_files(sandbox: Sandbox, *, token: bool = True, client: bool = True) -> None:
    if token:
        sandbox.path(TOKEN_PATH).write_text("ab" * 32)
    if client:
        sandbox.path(SECRETS_DIR).mkdir(parents=True, exist_ok=True)
        sandbox.path(CLIENT_ENV).write_text("MLFLOW_TRACKING_USERNAME=mlm\nMLFLOW_TRACKING_PASSWORD=pw-from-head\n")


@needs_bash
def test_worker_ray_start_gets_token_auth_and_service_account(config, sandbox):
    _write_node_files(sandbox)
    res = sandbox.run(_ray_start_commands(config)["worker"], RAY_HEAD_IP="10.0.1.23")
    assert res.returncode == 0, res.stderr
    env = sandbox.recorded_env("ray")
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.1.23:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] == "mlm" and env["MLFLOW_TRACKING_PASSWORD"] == "pw-from-head"
    assert env["MLM_HOME"].endswith("/mlm-work")
    assert not any(k.startswith("MLFLOW_AUTH_") for k in env)
    assert (sandbox.log / "ray.args").read_text().split("\n")[:2] == ["start", "--address=10.0.1.23:6379"]
    assert _mode(sandbox.path(CLIENT_ENV)) == 0o600


@needs_bash
@pytest.mark.parametrize("missing", ["token", "client"])
def test_worker_without_token_or_credentials_does_not_start_ray(config, sandbox, missing):
    _write_node_files(sandbox, token=missing != "token", client=missing != "client")
    res = sandbox.run(_ray_start_commands(config)["worker"], RAY_HEAD_IP="10.0.1.23")
    assert res.returncode != 0 and "missing" in res.stderr
    assert not (sandbox.log / "ray.args").exists()


@needs_bash
def test_head_ray_start_gets_token_auth_and_refuses_without_token(config, sandbox):
    cmd = _ray_start_commands(config)["head"]
    _write_node_files(sandbox, token=False)
    sandbox.path("/home/ubuntu/mlm-work/mlflow.env").write_text(
        "export MLFLOW_TRACKING_URI=http://10.0.1.23:5000\n"
        f"set -a; . {sandbox.path(CLIENT_ENV)}; set +a\n")
    res = sandbox.run(cmd)
    assert res.returncode != 0 and "ray get-auth-token --generate" in res.stderr
    assert not (sandbox.log / "ray.args").exists()

    _write_node_files(sandbox)
    res = sandbox.run(cmd)
    assert res.returncode == 0, res.stderr
    env = sandbox.recorded_env("ray")
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["MLFLOW_TRACKING_USERNAME"] == "mlm"
    assert not any(k.startswith("MLFLOW_AUTH_") for k in env)
    args = (sandbox.log / "ray.args").read_text().split("\n")
    assert "--head" in args and "--dashboard-host=127.0.0.1" in args
