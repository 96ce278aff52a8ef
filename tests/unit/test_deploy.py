"""Offline checks for deploy/: the KubeRay manifests, the Dockerfile, the retrain crontab,
and the MLflow service-account script that cluster.yaml runs on the head.

No Kubernetes API server or CRD schema is available offline, so the manifests are checked
structurally against the fields of KubeRay's CRDs (ray.io/v1, KubeRay 1.6) and against this
project: Ray versions equal the installed ray, token auth on the cluster every job runs on,
no secret in any file, and every command line is parsed by the real `mlm` CLI (click) for
the subcommands that exist, so a renamed option fails here rather than at 02:17.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shlex
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
KNOWN_SUBCOMMANDS = {"pipeline", "prepare", "train", "retrain", "submit", "evaluate"}
ALLOWED_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
    ("batch/v1", "CronJob"),
    ("v1", "PersistentVolumeClaim"),
}
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
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


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
    assert {"raycluster.yaml", "rayjob-pipeline.yaml", "raycronjob-retrain.yaml"} <= names


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
        assert isinstance(d.get("spec"), dict)


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
            assert pod.get("automountServiceAccountToken") is False
        for c in _containers(d):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


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
    assert re.search(r'pip install[^\n]*\\\n[^\n]*"ray\[default,data,train\]==\$\{RAY_VERSION\}"[^\n]* \.', text)
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
