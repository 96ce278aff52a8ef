"""Offline checks for deploy/: the KubeRay manifests, the Dockerfile, the retrain crontab,
and the MLflow service-account script that cluster.yaml runs on the head.

No Kubernetes API server or CRD schema is available offline, so the manifests are checked
structurally against the fields of KubeRay's CRDs (ray.io/v1, KubeRay 1.6) and against this
project: Ray versions equal the installed ray, token auth on the cluster every job runs on,
no secret in any file, and every command line is parsed by the real `mlm` CLI (click) for
the subcommands that exist, so a renamed option fails here rather than at 02:17. The
autoscaler's Kubernetes credentials are checked against the paths the installed Ray's
KubeRay node provider reads; the MLflow server's start command (PostgreSQL URIs from a
Secret) is executed against a stub `mlflow` and its auth config read with MLflow's reader.
"""

from __future__ import annotations

import base64
import configparser
import copy
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import click
import pytest
import yaml

import ray

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRON_FILE = DEPLOY / "cron" / "mlm-retrain.cron"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVICE_USER_SCRIPT = DEPLOY / "aws" / "mlflow_service_user.py"

# `mlm` subcommands a deployment may run. Checked by name always, and parsed by click
# when the installed CLI has them (some are written concurrently with these manifests).
KNOWN_SUBCOMMANDS = {"pipeline", "prepare", "train", "retrain", "submit", "evaluate", "serve"}
ALLOWED_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
    ("ray.io/v1", "RayService"),
    ("batch/v1", "CronJob"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
NO_SPEC_KINDS = {"ServiceAccount"}
# spec fields of KubeRay's RayJob CRD (ray.io/v1); RayCronJob's jobTemplate is a RayJob spec.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend", "timeZone"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_KEY$", re.I)


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------
def _manifest_files() -> List[Path]:
    return sorted(KUBERAY.glob("*.yaml"))


def _docs() -> List[Tuple[Path, Dict[str, Any]]]:
    out = []
    for path in _manifest_files():
        with open(path) as f:
            out.extend((path, d) for d in yaml.safe_load_all(f) if d is not None)
    return out


def _of_kind(kind: str) -> List[Dict[str, Any]]:
    return [d for _, d in _docs() if d["kind"] == kind]


def _raycluster() -> Dict[str, Any]:
    (rc,) = _of_kind("RayCluster")
    return rc


def _pod_specs(doc: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Every pod spec inside a manifest, wherever the CRD nests it."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind == "RayCluster":
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["template"]["spec"]
    elif kind in ("RayJob", "RayCronJob"):
        job = spec if kind == "RayJob" else spec["jobTemplate"]
        if "rayClusterSpec" in job:
            yield from _pod_specs({"kind": "RayCluster", "spec": job["rayClusterSpec"]})
        if "submitterPodTemplate" in job:
            yield job["submitterPodTemplate"]["spec"]
    elif kind == "RayService":
        yield from _pod_specs({"kind": "RayCluster", "spec": spec["rayClusterConfig"]})
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Deployment":
        yield spec["template"]["spec"]


def _containers(doc: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    for pod in _pod_specs(doc):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# --------------------------------------------------------------------------
# parsing command lines with the real CLI
# --------------------------------------------------------------------------
def _mlm_cli() -> click.Group:
    from mlm.cli import cli

    return cli


def _check_mlm_command(argv: List[str]) -> None:
    """argv = ["mlm", SUBCOMMAND, ...]: known subcommand; parsed by click when it exists."""
    assert argv[0] == "mlm", argv
    sub = argv[1]
    assert sub in KNOWN_SUBCOMMANDS, f"`mlm {sub}` is not a subcommand a deployment should run"
    cli = _mlm_cli()
    if sub not in cli.commands:
        return  # being written elsewhere; the name check above still applies
    cmd = cli.commands[sub]
    args = argv[2:]
    if isinstance(cmd, click.Group):  # mlm pipeline run ...
        assert args and args[0] in cmd.commands, f"`mlm {sub} {args[:1]}`: no such subcommand"
        cmd, args = cmd.commands[args[0]], args[1:]
    ctx = cmd.make_context(f"mlm {sub}", list(args))  # raises on unknown options / bad choices
    if sub == "submit":
        inner = ctx.params["command"]
        assert inner in KNOWN_SUBCOMMANDS
        _check_mlm_command(["mlm", inner, *(["run"] if inner == "pipeline" else []), *ctx.params["args"]])


def _entrypoints() -> List[Tuple[str, List[str]]]:
    out = []
    for path, doc in _docs():
        if doc["kind"] == "RayJob":
            out.append((path.name, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            out.append((path.name, shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
        elif doc["kind"] == "CronJob":
            for c in _containers(doc):
                out.append((path.name, list(c.get("command", [])) + list(c.get("args", []))))
    return out


# --------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------
def test_expected_manifests_exist():
    names = {p.name for p in _manifest_files()}
    assert {"raycluster.yaml", "rayjob-pipeline.yaml", "raycronjob-retrain.yaml", "rayservice-serve.yaml"} <= names


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_parses_with_known_kinds(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs
    for d in docs:
        assert (d.get("apiVersion"), d.get("kind")) in ALLOWED_KINDS, (d.get("apiVersion"), d.get("kind"))
        meta = d.get("metadata", {})
        assert meta.get("name") or meta.get("generateName")
        assert "namespace" not in meta, "apply into the namespace of your choice (kubectl -n)"
        assert d["kind"] in NO_SPEC_KINDS or isinstance(d.get("spec"), dict)


def test_ray_version_matches_installed_ray():
    version = ray.__version__
    assert _raycluster()["spec"]["rayVersion"] == version
    images = [c["image"] for _, d in _docs() for c in _containers(d)]
    assert images
    for image in images:
        assert f"ray{version}" in image.rsplit(":", 1)[-1], f"{image}: tag must name ray {version}"
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(version)}-py\d+-gpu$", dockerfile, re.M)
    assert re.search(rf"^ARG RAY_VERSION={re.escape(version)}$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)


def test_image_python_matches_base_image():
    base_py = re.search(r"rayproject/ray:[\d.]+-(py\d+)-", DOCKERFILE.read_text()).group(1)
    for _, d in _docs():
        for c in _containers(d):
            assert f"-{base_py}-" in c["image"], c["image"]


def test_cluster_uses_token_auth():
    assert _raycluster()["spec"]["authOptions"]["mode"] == "token"


def test_every_job_runs_on_the_token_auth_cluster():
    name = _raycluster()["metadata"]["name"]
    jobs = [d["spec"] for d in _of_kind("RayJob")] + [d["spec"]["jobTemplate"] for d in _of_kind("RayCronJob")]
    assert jobs
    for job in jobs:
        assert set(job) <= RAYJOB_SPEC_FIELDS, set(job) - RAYJOB_SPEC_FIELDS
        assert job.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
        if "rayClusterSpec" in job:  # a job that brings its own cluster must enable auth too
            assert job["rayClusterSpec"]["authOptions"]["mode"] == "token"
        else:
            assert job["clusterSelector"] == {"ray.io/cluster": name}
        # Ray job metadata is a string map, not Kubernetes labels.
        assert all(isinstance(v, str) for v in job.get("metadata", {}).values())


def test_cronjob_submitter_gets_the_cluster_token_from_its_secret():
    name = _raycluster()["metadata"]["name"]
    cronjobs = _of_kind("CronJob")
    for cj in cronjobs:
        (c,) = list(_containers(cj))
        env = {e["name"]: e for e in c.get("env", [])}
        # KubeRay's authOptions Secret is named after the RayCluster, key auth_token.
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}
        argv = list(c["command"])
        assert argv[:2] == ["mlm", "submit"]
        assert argv[argv.index("--address") + 1] == f"http://{name}-head-svc:8265"
        assert cj["spec"]["concurrencyPolicy"] == "Forbid"


def test_ray_pods_get_mlflow_credentials_from_a_secret():
    rc = _raycluster()
    for c in _containers(rc):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == ["mlm-mlflow"], c["name"]
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, "from the Secret only"


def test_gpu_workers_scale_from_zero_and_head_has_no_gpu():
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_work_folder_is_shared_between_head_and_workers():
    (pvc,) = _of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pod_specs(_raycluster()):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]]
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert env["MLM_HOME"] in mounts


def test_pods_do_not_run_as_root():
    for _, d in _docs():
        for pod in _pod_specs(d):
            assert pod["securityContext"]["runAsNonRoot"] is True
        for c in _containers(d):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


# --------------------------------------------------------------------------
# Kubernetes API credentials: the autoscaler's, and nobody else's
# --------------------------------------------------------------------------
def _projected_token_volumes(pod: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes", [])
            if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))}


def _autoscaler_credentials_problem(rc: Dict[str, Any]) -> str | None:
    """None when the autoscaler sidecar KubeRay adds to the head pod can authenticate to
    the Kubernetes API (where the installed Ray's KubeRay node provider reads the token and
    CA) and nothing else in the cluster can; else what is wrong."""
    from ray.autoscaler._private.kuberay import node_provider

    spec = rc["spec"]
    if spec.get("enableInTreeAutoscaling") is not True:
        return "no in-tree autoscaler"
    head = spec["headGroupSpec"]["template"]["spec"]
    # KubeRay's ServiceAccount (named after the cluster) has the Role the autoscaler needs; a
    # serviceAccountName of our own would need its own ServiceAccount, Role and RoleBinding.
    if head.get("serviceAccountName") not in (None, rc["metadata"]["name"]):
        return "head pod names a ServiceAccount this repository does not grant the autoscaler's RBAC"
    token_dir = os.path.dirname(node_provider.IN_CLUSTER_TOKEN_PATH)
    assert os.path.dirname(node_provider.IN_CLUSTER_CA_CERT_PATH) == token_dir
    needed = {os.path.basename(node_provider.IN_CLUSTER_TOKEN_PATH), os.path.basename(node_provider.IN_CLUSTER_CA_CERT_PATH)}
    if head.get("automountServiceAccountToken") is not False:
        # Automounting also works, but hands the token to the ray-head container (job code).
        return "the head pod mounts its token into every container"
    volumes = _projected_token_volumes(head)
    mounts = [m for m in (spec.get("autoscalerOptions") or {}).get("volumeMounts", [])
              if m["name"] in volumes and os.path.normpath(m["mountPath"]) == token_dir]
    if len(mounts) != 1:
        return f"no token volume mounted at {token_dir} in the autoscaler container (autoscalerOptions.volumeMounts)"
    sources = volumes[mounts[0]["name"]]["projected"]["sources"]
    paths = set()
    for src in sources:
        if "serviceAccountToken" in src:
            paths.add(src["serviceAccountToken"]["path"])
            if src["serviceAccountToken"].get("expirationSeconds", 3600) > 86400:
                return "a token valid for more than a day"
        for item in src.get("configMap", {}).get("items", []):
            if src["configMap"]["name"] == "kube-root-ca.crt" and item["key"] == "ca.crt":
                paths.add(item["path"])
        for item in src.get("downwardAPI", {}).get("items", []):
            if item.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                paths.add(item["path"])
    if not needed | {"namespace"} <= paths:
        return f"the token volume lacks {sorted(needed | {'namespace'} - paths)}"
    for c in head["containers"]:
        if any(m["name"] in volumes for m in c.get("volumeMounts", [])):
            return f"container {c['name']} of the head pod mounts the autoscaler's token"
    return None


def test_autoscaler_can_reach_the_kubernetes_api_and_only_it():
    rc = _raycluster()
    assert _autoscaler_credentials_problem(rc) is None, _autoscaler_credentials_problem(rc)


@pytest.mark.parametrize("mutation", ["no-mount", "mount-elsewhere", "no-ca", "ray-head-mounts", "own-sa"])
def test_autoscaler_credentials_check_can_fail(mutation):
    rc = copy.deepcopy(_raycluster())
    spec = rc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    (name,) = _projected_token_volumes(head)
    if mutation == "no-mount":  # what broke scale-up from zero: no token anywhere in the head pod
        spec["autoscalerOptions"].pop("volumeMounts")
    elif mutation == "mount-elsewhere":
        spec["autoscalerOptions"]["volumeMounts"][0]["mountPath"] = "/var/run/secrets/token"
    elif mutation == "no-ca":
        vol = next(v for v in head["volumes"] if v["name"] == name)
        vol["projected"]["sources"] = [s for s in vol["projected"]["sources"] if "configMap" not in s]
    elif mutation == "ray-head-mounts":
        head["containers"][0]["volumeMounts"].append({"name": name, "mountPath": "/tmp/sa"})
    else:
        head["serviceAccountName"] = "my-own"
    assert _autoscaler_credentials_problem(rc) is not None


def test_no_other_pod_gets_kubernetes_api_credentials():
    for _, d in _docs():
        pods = list(_pod_specs(d))
        assert all(pod.get("automountServiceAccountToken") is False for pod in pods), d["kind"]
        others = pods[1:] if d["kind"] == "RayCluster" else pods  # the head (first) is checked above
        assert not any(_projected_token_volumes(pod) for pod in others), f"{d['kind']}: only the autoscaler gets a token"
    for doc in _of_kind("ServiceAccount"):
        assert doc.get("automountServiceAccountToken") is False


def test_no_plaintext_secrets_in_deploy():
    for path, doc in _docs():
        assert doc["kind"] != "Secret", f"{path.name}: create Secrets with kubectl, never commit them"
        for node in _walk(doc):
            if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
                if SECRET_NAME.search(str(node["name"])):
                    assert "value" not in node, f"{path.name}: {node['name']} has a literal value"
                    assert "secretKeyRef" in node["valueFrom"], f"{path.name}: {node['name']}"
    for path in [*_manifest_files(), CRON_FILE, DOCKERFILE]:
        text = path.read_text()
        assert "password1234" not in text, path
        assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path.name}: looks like a committed token"
        assert "Bearer " not in text, path
        assert not re.search(r"^\s*(export\s+)?RAY_AUTH_TOKEN=\S", text, re.M), path


@pytest.mark.parametrize("where,argv", _entrypoints(), ids=lambda x: x if isinstance(x, str) else None)
def test_entrypoints_run_real_mlm_subcommands(where, argv):
    _check_mlm_command(argv)


def test_entrypoint_check_rejects_what_the_cli_would():
    # The checker must be able to fail: an unknown subcommand, and (when the CLI has it) an
    # unknown option of a real one.
    with pytest.raises(AssertionError):
        _check_mlm_command(["mlm", "serve-everything"])
    if "pipeline" in _mlm_cli().commands:
        with pytest.raises(click.UsageError):
            _check_mlm_command(["mlm", "pipeline", "run", "--no-such-option"])


def _five_fields_ok(fields: List[str]) -> bool:
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for field, (lo, hi) in zip(fields, ranges):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not step.isdigit():
                return False
            if base == "*":
                continue
            lo_hi = base.split("-")
            if not all(x.isdigit() and lo <= int(x) <= hi for x in lo_hi) or len(lo_hi) > 2:
                return False
    return len(fields) == 5


def test_schedules_are_valid_and_agree():
    (rcj,) = _of_kind("RayCronJob")
    assert set(rcj["spec"]) <= RAYCRONJOB_SPEC_FIELDS
    schedules = {rcj["spec"]["schedule"]} | {cj["spec"]["schedule"] for cj in _of_kind("CronJob")}
    schedules.add(" ".join(_cron_job_line()[0]))
    assert len(schedules) == 1, f"the retrain triggers disagree: {schedules}"
    assert _five_fields_ok(schedules.pop().split())
    assert not _five_fields_ok(["61", "2", "*", "*", "*"])  # the validator can fail


# --------------------------------------------------------------------------
# crontab
# --------------------------------------------------------------------------
def _cron_job_line() -> Tuple[List[str], str, Dict[str, str]]:
    env: Dict[str, str] = {}
    jobs = []
    for line in CRON_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        jobs.append(line)
    assert len(jobs) == 1, jobs
    parts = jobs[0].split(None, 5)
    return parts[:5], parts[5], env


def test_cron_line_parses_and_submits_retrain():
    fields, command, env = _cron_job_line()
    assert _five_fields_ok(fields)
    assert command.startswith("mlm submit ")
    # crontab turns a bare % into a newline: every % must be escaped.
    assert not re.search(r"(?<!\\)%", command)
    shell_cmd, redirect, log = command.partition(" >> ")
    assert redirect and log.endswith("2>&1"), "append the job's output to a log file"
    argv = shlex.split(shell_cmd.replace("\\%", "%"))
    assert "--follow" in argv
    assert argv[argv.index("--working-dir") + 1] == "", "upload nothing from cron's working directory"
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    _check_mlm_command(argv)
    assert "retrain" in argv


def test_cron_reads_the_token_from_a_file():
    _, command, env = _cron_job_line()
    assert env.get("RAY_AUTH_TOKEN_PATH") == "/home/ubuntu/.ray/auth_token"  # 0600 on the head (cluster.yaml)
    assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN=" not in command
    assert env.get("PATH", "").split(":")[0] == "/opt/pytorch/bin"
    assert env.get("MLM_HOME") == "/home/ubuntu/mlm-work"


def test_cron_token_path_is_where_cluster_yaml_puts_it():
    cfg = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    _, _, env = _cron_job_line()
    assert env["RAY_AUTH_TOKEN_PATH"] in cfg["file_mounts"]


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------
def test_dockerfile_installs_the_project_and_nothing_local():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+(\S+)$", text, re.M)
    sources = {s for srcs, _ in copies for s in srcs.split()}
    assert sources == {"pyproject.toml", "README.md", "mlm", "pipelines"}, sources
    # The project with its `server` extra (the MLflow server of deploy/kuberay/mlflow-server.yaml).
    assert re.search(r'pip install[^\n]*\\\n[^\n]*"ray\[default,data,train\]==\$\{RAY_VERSION\}"[^\n]* "\.\[server\]"', text)
    assert not re.search(r"^ENV\s+[^\n]*(TOKEN|PASSWORD|SECRET)", text, re.M)


# --------------------------------------------------------------------------
# deploy/aws/mlflow_service_user.py against a fake MLflow auth API
# --------------------------------------------------------------------------
def _load_service_user_module():
    spec = importlib.util.spec_from_file_location("mlflow_service_user", SERVICE_USER_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeAuthServer:
    """The three endpoints the script uses, with MLflow's status codes and error body."""

    def __init__(self, admin_password: str, users: Dict[str, str] | None = None, reject_host: bool = False):
        self.users = {"admin": admin_password, **(users or {})}
        self.calls: List[Tuple[str, str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                return user if fake.users.get(user) == pw else None

            def _reply(self, status: int, body: Dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                user = self._user()
                fake.calls.append((self.command, self.path.split("?")[0], user or "-"))
                if reject_host:
                    return self._reply(403, {"message": "Invalid Host header - possible DNS rebinding attack"})
                if user is None:
                    return self._reply(401, {"message": "You are not authenticated."})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?")[0]
                if path == "/api/2.0/mlflow/experiments/search" and self.command == "GET":
                    return self._reply(200, {"experiments": []})
                if user != "admin":
                    return self._reply(403, {"message": "Permission denied"})
                if path == "/api/2.0/mlflow/users/create" and self.command == "POST":
                    if body["username"] in fake.users:
                        return self._reply(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                                 "message": f"User (username={body['username']}) already exists."})
                    fake.users[body["username"]] = body["password"]
                    return self._reply(200, {"user": {"username": body["username"]}})
                if path == "/api/2.0/mlflow/users/update-password" and self.command == "PATCH":
                    fake.users[body["username"]] = body["password"]
                    return self._reply(200, {})
                return self._reply(404, {"message": "not found"})

            do_GET = do_POST = do_PATCH = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_mlflow():
    servers = []

    def make(**kw):
        s = FakeAuthServer(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def client_env(tmp_path):
    path = tmp_path / "mlflow-client.env"
    path.write_text("MLFLOW_TRACKING_USERNAME=mlm\nMLFLOW_TRACKING_PASSWORD=service-pw-123456\n")
    return path


@pytest.mark.parametrize(
    "existing,expected",
    [({}, "created"), ({"mlm": "old-password-123"}, "password reset"), ({"mlm": "service-pw-123456"}, "ok")],
    ids=["new", "stale-password", "up-to-date"],
)
def test_service_user_is_created_or_repaired(fake_mlflow, client_env, monkeypatch, capsys, existing, expected):
    server = fake_mlflow(admin_password="admin-pw-123456", users=dict(existing))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-pw-123456")
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    mod = _load_service_user_module()
    assert mod.main(["x", server.url, str(client_env)]) == 0
    assert f"'mlm': {expected}" in capsys.readouterr().out
    assert server.users["mlm"] == "service-pw-123456"
    assert server.users["admin"] == "admin-pw-123456"  # the admin is never touched
    admin_calls = [c for c in server.calls if c[2] == "admin"]
    assert (admin_calls == []) == (expected == "ok")


def test_service_user_reports_a_wrong_admin_password(fake_mlflow, client_env, monkeypatch, capsys):
    server = fake_mlflow(admin_password="the-real-one-123")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-stale-one-1234")
    assert _load_service_user_module().main(["x", server.url, str(client_env)]) == 1
    assert "does not match" in capsys.readouterr().err
    assert "mlm" not in server.users


def test_service_user_reports_a_rejected_host(fake_mlflow, client_env, monkeypatch, capsys):
    server = fake_mlflow(admin_password="admin-pw-123456", reject_host=True)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-pw-123456")
    assert _load_service_user_module().main(["x", server.url, str(client_env)]) == 1
    assert "Host header" in capsys.readouterr().err


def test_service_user_refuses_bad_input(client_env, tmp_path, monkeypatch):
    mod = _load_service_user_module()
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    assert mod.main(["x", "http://127.0.0.1:9", str(client_env)]) == 2
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-pw-123456")
    admin_file = tmp_path / "admin.env"
    admin_file.write_text("MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=admin-pw-123456\n")
    assert mod.main(["x", "http://127.0.0.1:9", str(admin_file)]) == 2  # jobs never get the admin account
    assert mod.read_env_file(str(client_env)) == {
        "MLFLOW_TRACKING_USERNAME": "mlm", "MLFLOW_TRACKING_PASSWORD": "service-pw-123456"}


# --------------------------------------------------------------------------
# the MLflow server for KubeRay: PostgreSQL URIs from a Secret
# --------------------------------------------------------------------------
MLFLOW_SERVER_SECRET = "mlm-mlflow-server"
# Records argv and environment, like the real server would receive them.
STUB_MLFLOW = """#!/usr/bin/env python3
import json, os, sys
json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, open(os.environ["STUB_LOG"], "w"))
"""


def _mlflow_module(relpath: str):
    """A module of the installed MLflow, loaded by path: importing the `mlflow.server`
    package would build the whole server app (seconds)."""
    import mlflow

    spec = importlib.util.spec_from_file_location(f"_mlflow_{Path(relpath).stem}", Path(mlflow.__file__).parent / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlflow_deployment() -> Dict[str, Any]:
    (dep,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    return dep


def _mlflow_container() -> Dict[str, Any]:
    (c,) = _mlflow_deployment()["spec"]["template"]["spec"]["containers"]
    return c


def _run_mlflow_container(tmp_path: Path, secret: Dict[str, str]) -> Tuple[subprocess.CompletedProcess, Dict[str, Any] | None]:
    """The container's command as Kubernetes runs it: the manifest's env, the Secret's keys
    (envFrom), a stub `mlflow` first on PATH."""
    c = _mlflow_container()
    env = {e["name"]: e["value"] for e in c["env"]}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(run_dir / Path(env["MLFLOW_AUTH_CONFIG_PATH"]).name)
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    (stub_dir / "mlflow").write_text(STUB_MLFLOW.replace("/usr/bin/env python3", sys.executable))
    (stub_dir / "mlflow").chmod(0o755)
    log = tmp_path / "mlflow.json"
    env.update(secret, PATH=f"{stub_dir}:/usr/bin:/bin", STUB_LOG=str(log))
    assert c["command"][0] == "python"
    out = subprocess.run([sys.executable, *c["command"][1:]], env=env, capture_output=True, text=True, timeout=60)
    return out, (json.loads(log.read_text()) if log.exists() else None)


def test_mlflow_server_gets_its_databases_from_a_secret():
    c = _mlflow_container()
    assert c["envFrom"] == [{"secretRef": {"name": MLFLOW_SERVER_SECRET}}]
    names = {e["name"] for e in c["env"]}
    assert not names & {"MLM_MLFLOW_DB_URI", "MLM_MLFLOW_AUTH_DB_URI", "MLFLOW_BACKEND_STORE_URI",
                        "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}, "from the Secret only"
    # The same image as the Ray pods (it carries the `server` extra: psycopg2, mlflow[auth]).
    images = {x["image"] for x in _containers(_raycluster())}
    assert c["image"] in images
    # The rendered auth config (it holds a password) lives in memory.
    pod = _mlflow_deployment()["spec"]["template"]["spec"]
    (mount,) = c["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"
    assert os.path.dirname({e["name"]: e.get("value") for e in c["env"]}["MLFLOW_AUTH_CONFIG_PATH"]) == mount["mountPath"]


def test_mlflow_server_command_runs_on_postgresql(tmp_path):
    uri = "postgresql://mlflow:p%25w&x@db.example.com:5432/mlflow?sslmode=verify-full"
    out, seen = _run_mlflow_container(tmp_path, {"MLM_MLFLOW_DB_URI": uri, "MLFLOW_AUTH_ADMIN_PASSWORD": "adm-pw-1234",
                                                 "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 40})
    assert out.returncode == 0, out.stderr
    argv, env = seen["argv"], seen["env"]
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://CHANGE-ME-bucket/mlflow-artifacts"
    assert "--backend-store-uri" not in argv and not any("p%25w" in a or "adm-pw" in a for a in argv)
    # psycopg2 spelled out: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3.
    assert env["MLFLOW_BACKEND_STORE_URI"] == uri.replace("postgresql://", "postgresql+psycopg2://")
    assert "MLM_MLFLOW_DB_URI" not in env
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    config = _mlflow_module("server/auth/config.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
        mp.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        auth = config.read_auth_config()
    assert auth.database_uri == "postgresql+psycopg2://mlflow:p%25w&x@db.example.com:5432/mlflow_auth?sslmode=verify-full"
    assert auth.admin_username == "admin" and auth.admin_password == "adm-pw-1234"
    # The same permissions as the head of cluster.yaml.
    aws = configparser.ConfigParser()
    aws.read(DEPLOY / "aws" / "mlflow-auth.ini")
    rendered = configparser.ConfigParser(interpolation=None)
    rendered.read(ini)
    assert {k: v for k, v in rendered["mlflow"].items() if k != "database_uri"} == dict(aws["mlflow"])
    # An explicit auth store wins.
    (tmp_path / "explicit").mkdir()
    out, seen = _run_mlflow_container(tmp_path / "explicit", {
        "MLM_MLFLOW_DB_URI": uri, "MLM_MLFLOW_AUTH_DB_URI": "postgresql+psycopg2://auth:pw@auth-db:5432/users",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "adm-pw-1234", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 40})
    assert out.returncode == 0, out.stderr
    rendered = configparser.ConfigParser(interpolation=None)
    rendered.read(seen["env"]["MLFLOW_AUTH_CONFIG_PATH"])
    assert rendered["mlflow"]["database_uri"] == "postgresql+psycopg2://auth:pw@auth-db:5432/users"


@pytest.mark.parametrize("uri", ["", "postgres://u:pw@db/mlflow", "http://mlflow:5000"], ids=["missing", "postgres-scheme", "a-server"])
def test_mlflow_server_command_refuses_a_bad_store_uri(tmp_path, uri):
    out, seen = _run_mlflow_container(tmp_path, {"MLM_MLFLOW_DB_URI": uri} if uri else {})
    assert out.returncode != 0 and seen is None
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and MLFLOW_SERVER_SECRET in lines[0] and "pw@" not in out.stderr, out.stderr


def test_mlflow_server_is_reachable_only_from_this_project():
    c = _mlflow_container()
    env = {e["name"]: e.get("value") for e in c["env"]}
    hosts = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    check = _mlflow_module("server/security_utils.py").is_allowed_host_header
    for ok in ("mlflow:5000", "mlflow.ml.svc:5000", "mlflow.ml.svc.cluster.local:5000", "localhost:5000", "127.0.0.1:5000"):
        assert check(hosts, ok), ok
    for bad in ("evil.example.com", "mlflow.evil.example.com:5000", "10.0.0.5:5000"):
        assert not check(hosts, bad), bad
    (svc,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == "mlflow"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = _mlflow_deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (policy,) = [p for p in _of_kind("NetworkPolicy") if p["metadata"]["name"] == "mlflow"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlm"}}}]
    assert [p["port"] for p in rule["ports"]] == [5000]
    # Every Ray pod carries the label the policy admits.
    rc = _raycluster()
    for tmpl in [rc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in rc["spec"]["workerGroupSpecs"]]:
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/name"] == "mlm"


def _mlm_args(argv: List[str], sub: str) -> List[str]:
    """The arguments after `mlm [submit ...] SUB` (`pipeline run` counts as one)."""
    i = argv.index(sub)
    return argv[i + 2:] if sub == "pipeline" else argv[i + 1:]


def _config_of(args: List[str]):
    from mlm.config import load_config

    preset = args[args.index("--preset") + 1] if "--preset" in args else None
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return preset, load_config(preset, sets)


def test_every_retrain_trains_the_pipelines_model():
    """The nightly retrain (RayCronJob, CronJob, crontab) names the pipeline job's preset:
    without it `mlm retrain` took the CLI's default, tiny (CPU-only, registered as
    mlm-tiny), and never updated the production model or started a GPU worker."""
    (pipeline,) = [argv for _, argv in _entrypoints() if "pipeline" in argv]
    preset, production = _config_of(_mlm_args(pipeline, "pipeline"))
    retrains = [argv for _, argv in _entrypoints() if "retrain" in argv]
    retrains.append(shlex.split(_cron_job_line()[1].partition(" >> ")[0].replace("\\%", "%")))
    assert len(retrains) == 3
    for argv in retrains:
        got_preset, cfg = _config_of(_mlm_args(argv, "retrain"))
        assert got_preset == preset, argv
        assert cfg.registry.model_name == production.registry.model_name
        assert cfg.model == production.model and cfg.train.use_gpu == production.train.use_gpu
        assert cfg.paths == production.paths


# --------------------------------------------------------------------------
# the RayService: `mlm serve` on a cluster of its own
# --------------------------------------------------------------------------
# spec fields of KubeRay's RayService CRD (ray.io/v1, KubeRay 1.6)
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}


def _rayservice() -> Dict[str, Any]:
    (svc,) = _of_kind("RayService")
    return svc


def _serve_application() -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the Serve config file, its one application)."""
    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return config, app


def _serve_argv(args: Dict[str, Any]) -> List[str]:
    """The application's args as the `mlm serve` command line they stand for."""
    argv = ["mlm", "serve"]
    for key in ("model", "task", "preset"):
        if key in args:
            argv += [f"--{key}", str(args[key])]
    for item in args.get("set", []):
        argv += ["--set", item]
    return argv


def test_rayservice_cluster_has_token_auth_and_the_secrets():
    svc = _rayservice()
    assert set(svc["spec"]) <= RAYSERVICE_SPEC_FIELDS, set(svc["spec"]) - RAYSERVICE_SPEC_FIELDS
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    for tmpl in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/name"] == "mlm"  # the MLflow NetworkPolicy admits these
    containers = list(_containers(svc))
    assert containers
    for c in containers:
        assert [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e] == ["mlm-mlflow"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["MLM_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mlm-serve", "key": "token"}


def test_rayservice_serves_the_pipelines_model_with_a_token(monkeypatch):
    """The application is `mlm serve` (its builder takes the CLI's options, parsed here by
    the real CLI) on the pipeline job's model; the proxy's host and port are the ones the
    token rule checks, and off loopback the application refuses to start without the token."""
    import importlib

    from mlm.serve.app import BUILD_ARGS, plan_from_args
    from mlm.serve.model import ServeError

    config, app = _serve_application()
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = app["args"]
    assert set(args) <= set(BUILD_ARGS), set(args) - set(BUILD_ARGS)
    _check_mlm_command(_serve_argv(args))
    (pipeline,) = [argv for _, argv in _entrypoints() if "pipeline" in argv]
    preset, production = _config_of(_mlm_args(pipeline, "pipeline"))
    monkeypatch.setenv("MLM_SERVE_TOKEN", "from-the-secret")
    plan = plan_from_args(args)
    assert args["preset"] == preset
    assert plan.ref == f"models:/{production.registry.model_name}@champion"
    assert (plan.cfg.serve.host, plan.cfg.serve.port) == (config["http_options"]["host"], config["http_options"]["port"])
    assert plan.token == "from-the-secret" and not plan.loopback
    monkeypatch.delenv("MLM_SERVE_TOKEN")
    with pytest.raises(ServeError, match="not loopback"):
        plan_from_args(args)
