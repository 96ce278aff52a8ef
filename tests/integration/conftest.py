"""Integration fixtures: an S3-compatible server on loopback (see tests/s3_server.py)."""

from __future__ import annotations

import os

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
    with one CPU, token authentication on. `env` is what a client process needs."""

    def __init__(self, address: str, dashboard: str, env: dict[str, str]):
        self.address, self.dashboard, self.env = address, dashboard, env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_two_nodes(tmp_path_factory):
    """Started once per session on demand; separate from the in-process `ray_cluster`.
    Processes run in their own session and are killed as a group at the end (never
    `ray stop`, which would stop every Ray instance on the machine)."""
    import secrets
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # =0 forbids a second node
    logs = tmp_path_factory.mktemp("ray-two-nodes")
    short_tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # Each node its own temp dir, as on two machines: nodes sharing one would share the
    # runtime-env package folders, and one node's cleanup would delete the other's.
    worker_tmp = tempfile.mkdtemp(prefix="r2w", dir="/tmp")
    # Loopback addresses other than 127.0.0.1: Ray rewrites "127.0.0.1" to the machine's
    # routable IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which forbids a second node.
    common = ["--num-cpus", "1", "--block"]

    def agent_ports() -> list[str]:
        # Ray's fixed default (52365) clashes with any other Ray instance on the machine
        # (one the test session started, say): the job agent then never starts and every
        # job submission is refused with "No available agent".
        return ["--dashboard-agent-listen-port", str(_free_port())]

    procs = [subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--temp-dir", short_tmp, *agent_ports(), *common],
        env=env, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"127.0.0.2:{port}"
    try:
        nodes = "import ray; ray.init(address={!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.time() + 120
        while time.time() < deadline:
            out = subprocess.run(["python", "-c", nodes.format(address)], env=env, capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                break
            time.sleep(1)
        procs.append(subprocess.Popen(["ray", "start", "--address", address, "--node-ip-address", "127.0.0.3",
                                      "--temp-dir", worker_tmp, *agent_ports(), *common], env=env,
                                      stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        while time.time() < deadline:
            out = subprocess.run(["python", "-c", nodes.format(address)], env=env, capture_output=True, text=True, timeout=60)
            if out.stdout.strip().endswith("2"):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the two-node cluster did not come up; see {logs}")
        yield TwoNodeCluster(address, f"http://127.0.0.1:{dash}", env)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=5)  # nothing to save: a slow graceful stop only costs the session time
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(short_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
