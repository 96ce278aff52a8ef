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
MLflow to 0.0.0.0, the repo is synced and installed, ...).

No cluster is started and no network is used.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
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
REPO_MOUNT = "/home/ubuntu/mlm"
MLFLOW_DB_URI = "sqlite:////home/ubuntu/mlm-work/mlflow.db"
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
    assert f"--backend-store-uri {MLFLOW_DB_URI}" in cmd
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
