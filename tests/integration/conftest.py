"""Integration fixtures: an S3-compatible server on loopback (see tests/s3_server.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex

import pytest

# pytest puts this folder on sys.path (rootdir-relative conftest, no package)
from s3_server import UNSET_ENV, s3_server as _s3_server


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one bucket (``s3_server.bucket``).

    For the rest of the session os.environ points S3 at it (``s3_server.env``), so
    processes started from now on, Ray workers included, reach ``s3://`` URIs there.
    Request it BEFORE ``ray_cluster`` when Ray tasks read s3://: workers of a cluster
    started earlier have no credentials in their environment (the endpoint travels with
    the pickled pyarrow filesystem, the credentials do not), or pass
    ``filesystem=s3_server.filesystem()``.
    """
    with _s3_server() as server:
        saved = {name: os.environ.get(name) for name in (*server.env, *UNSET_ENV)}
        for name in UNSET_ENV:
            os.environ.pop(name, None)
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class TwoNodeCluster:
    """A Ray cluster of two nodes on loopback (`ray start --head` + `ray start`), each
    with one CPU, token authentication on, and no shared disk: each node has its own
    MLM_HOME and temp dir and sees none of the other's files, nor the test session's
    (the worker node runs in a mount namespace where those folders are empty). What
    both share is what a real cluster shares: the loopback S3 server and the MLflow
    tracking server. `env` is what a client process (a driver on the head) needs."""

    def __init__(self, address: str, dashboard: str, env: dict[str, str], homes: dict[str, str], mlflow: str):
        self.address, self.dashboard, self.env, self.homes, self.mlflow = address, dashboard, env, homes, mlflow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc, grace_s: float = 5) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)  # nothing to save: a slow graceful stop only costs the session time
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """An MLflow tracking server as on a cluster's head: PostgreSQL backend store,
    artifacts proxied to the S3 bucket (`--artifacts-destination`), on 127.0.0.1.
    Yields its URL; clients need nothing else (no S3 credentials, no shared file)."""
    import subprocess
    import sys
    import time
    import urllib.request

    postgres.create_database("mlflow_cluster")
    db = postgres.uri("mlflow_cluster", driver="psycopg2")
    port = _free_port()
    logs = tmp_path_factory.mktemp("mlflow-server")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--artifacts-destination",
         s3_server.uri("mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         # One uvicorn worker, in-process: with several, uvicorn's supervisor restarts a
         # worker that misses its ping, and on a loaded 2-core machine none ever settled.
         "--workers", "1"],
        env={**s3_server.subprocess_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=10) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the MLflow server did not come up: {(logs / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _kill_group(proc)


def _isolated(command: list[str], hide: list[str]) -> list[str]:
    """`command` in a mount namespace of its own where each folder in `hide` is an empty
    tmpfs: the process and its children (a Ray node) cannot see those files."""
    mounts = " && ".join(f"mount -t tmpfs -o size=64m mlm-hidden {shlex.quote(h)}" for h in hide)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"{mounts} && exec {' '.join(shlex.quote(c) for c in command)}"]


@pytest.fixture(scope="session")
def ray_two_nodes(tmp_path_factory, s3_server, mlflow_server):
    """Started once per session on demand; separate from the in-process `ray_cluster`.
    Processes run in their own session and are killed as a group at the end (never
    `ray stop`, which would stop every Ray instance on the machine)."""
    import secrets
    import shutil
    import subprocess
    import tempfile
    import time

    port, dash = _free_port(), _free_port()
    env = {**s3_server.subprocess_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "MLFLOW_TRACKING_URI": mlflow_server, "MLM_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # =0 forbids a second node
    logs = tmp_path_factory.mktemp("ray-two-nodes")
    # Each node its own temp dir and MLM_HOME, as on two machines (nodes sharing a temp
    # dir would share the runtime-env package folders, and one node's cleanup would
    # delete the other's). Ray's socket paths must stay under 107 bytes: short names.
    head_tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="r2w", dir="/tmp")
    homes = {"head": os.path.join(head_tmp, "home"), "worker": os.path.join(worker_tmp, "home")}
    for h in homes.values():
        os.makedirs(h)
    # The worker node sees neither the head's folders nor the test session's (corpora,
    # datasets and runs the tests make locally): all it reads comes over the network.
    hidden_from_worker = [head_tmp, str(tmp_path_factory.getbasetemp())]
    check = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    assert check.returncode == 0, f"no mount namespaces here, so no no-shared-disk cluster: {check.stderr}"
    # Loopback addresses other than 127.0.0.1: Ray rewrites "127.0.0.1" to the machine's
    # routable IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which forbids a second node.
    common = ["--num-cpus", "1", "--block"]

    def agent_ports() -> list[str]:
        # Ray's fixed default (52365) clashes with any other Ray instance on the machine
        # (one the test session started, say): the job agent then never starts and every
        # job submission is refused with "No available agent".
        return ["--dashboard-agent-listen-port", str(_free_port())]

    procs = [subprocess.Popen(
        _isolated(["ray", "start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--dashboard-host",
                   "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", head_tmp, *agent_ports(), *common],
                  hide=[worker_tmp]),
        env={**env, "MLM_HOME": homes["head"]}, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)]
    address = f"127.0.0.2:{port}"
    try:
        nodes = "import ray; ray.init(address={!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.time() + 300  # generous: a loaded 2-core machine
        while time.time() < deadline:
            out = subprocess.run(["python", "-c", nodes.format(address)], env=env, capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                break
            time.sleep(1)
        procs.append(subprocess.Popen(
            _isolated(["ray", "start", "--address", address, "--node-ip-address", "127.0.0.3", "--temp-dir", worker_tmp,
                       *agent_ports(), *common], hide=hidden_from_worker),
            env={**env, "MLM_HOME": homes["worker"]}, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True))
        while time.time() < deadline:
            out = subprocess.run(["python", "-c", nodes.format(address)], env=env, capture_output=True, text=True, timeout=60)
            if out.stdout.strip().endswith("2"):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the two-node cluster did not come up; see {logs}")
        yield TwoNodeCluster(address, f"http://127.0.0.1:{dash}", env, homes, mlflow_server)
    finally:
        for p in reversed(procs):
            _kill_group(p)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


# 300 steps with a 30-step warmup (the preset's 60 is for 600 steps): top-1 well past twice the
# baseline, and enough pretraining for the probe task to show it (at 100 steps the encoder was
# still worse than a random one there: probe macro-F1 0.12 vs 0.31, measured 2026-12-04)
STEPS = 300
# A line of mlm's own output (stage progress, summary, notices): what a default run may print.
MLM_LINE = re.compile(r"^(mlm|prepare|train|evaluate|register|data|model|mlflow|metrics|registry|try|ui|took)(:| )")


def nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


PROBE_MARGIN = 0.05  # measured at 300 steps: pretrained 0.428 vs random-init 0.311 (600 steps: 0.646 vs 0.311)


@pytest.fixture(scope="session")
def pipeline_result(ray_cluster, work):
    """The pipeline with the probe in its evaluate stage (registry.probe=true): one run
    for the session, read by test_pipeline and test_serve (which registers its model
    under a name of its own). It trains in this process (the local engine: the stages'
    outputs are under test here; Ray Train's DDP, restarts and nodes in test_loopback,
    test_train_resume and test_jobs); the global batches are those of two Ray Train
    workers, so the model is theirs (measured: the same metrics to 1e-6)."""
    from mlm.config import load_config
    from mlm.pipeline import pretrain

    cfg = load_config("tiny", [f"train.max_steps={STEPS}", "train.warmup_steps=30", "train.checkpoint_every=150",
                               "train.engine=local", "registry.probe=true"])
    return pretrain(["builtin:python-docs"], cfg)


from pg_server import postgres  # noqa: E402,F401  (the session fixture `postgres`)
