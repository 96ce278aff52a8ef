"""The embedded Ray instance (no RAY_ADDRESS) listens on loopback only.

A fresh driver process does what the CLI does before a Ray stage: `mlm.cli` and `ray`
already imported (so Ray has read its environment), then `ensure_ray()` with the
dashboard, as `mlm train` / `mlm pipeline run` start it. With tasks and an actor
running it lists every listening TCP socket of itself and of all its descendants (GCS,
raylet, dashboard, dashboard agent, runtime-env agent, monitor, every worker) and the
test fails on any local address outside 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

DRIVER = r"""
import json, os, sys, time

import mlm.cli  # noqa: F401  (the CLI's imports come first)
import ray      # imported before ensure_ray: Ray has read its environment by now
import psutil

from mlm.runtime import ensure_ray

ensure_ray()  # dashboard on, as for train / pipeline run


@ray.remote
def task():
    return os.getpid()


@ray.remote
class Actor:
    def pid(self):
        return os.getpid()


actor = Actor.remote()
ray.get([task.remote() for _ in range(2)] + [actor.pid.remote()])

me = psutil.Process()
expected = ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "dashboard.py", "ray::")


def listeners():
    procs = {me.pid: me}
    for child in me.children(recursive=True):
        procs[child.pid] = child
    found = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                name = " ".join(procs[conn.pid].cmdline())[:160]
            except psutil.Error:
                name = "?"
            found[(conn.laddr.ip, conn.laddr.port)] = {"pid": conn.pid, "ip": conn.laddr.ip,
                                                     "port": conn.laddr.port, "process": name}
    return found


# Agents and the dashboard may still be binding when ray.init returns: sample until
# every kind of process has a listener (or 20 s), keeping the union.
seen, deadline = {}, time.time() + 20
while True:
    seen.update(listeners())
    names = " ".join(entry["process"] for entry in seen.values())
    if all(kind in names for kind in expected) or time.time() > deadline:
        break
    time.sleep(0.5)

from ray._private import ray_constants

print("RESULT " + json.dumps({
    "listeners": list(seen.values()),
    "node_addresses": [n["NodeManagerAddress"] for n in ray.nodes()],
    "flag_after": ray_constants.ENABLE_RAY_CLUSTER,
    "env_after": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
}))
sys.stdout.flush()
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, how a dual-stack gRPC socket shows
    return addr.is_loopback


def test_is_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "::ffff:0.0.0.0", "192.0.2.2", "fe80::1%eth0")))


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(MLM_HOME=str(tmp_path / "home"), MLM_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=150)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    result = json.loads(lines[-1][len("RESULT "):])
    listeners = result["listeners"]

    # not vacuous: the listeners of every kind of Ray process were seen
    names = " ".join(entry["process"] for entry in listeners)
    for kind in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "dashboard.py", "ray::"):
        assert kind in names, (kind, listeners)

    exposed = [entry for entry in listeners if not _is_loopback(entry["ip"])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"  {e['ip']}:{e['port']}  pid {e['pid']}  {e['process']}" for e in exposed)
    assert all(_is_loopback(ip) for ip in result["node_addresses"]), result["node_addresses"]
    # the switch is not left on in the driver (a later RAY_ADDRESS connection or
    # `ray start` from this process must see Ray's defaults)
    assert result["flag_after"] is True and result["env_after"] is None, result
