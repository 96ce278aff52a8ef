"""Embedded defaults: where work goes, which Ray cluster and which MLflow store.

Without configuration: a work folder `./mlm-work` (or $MLM_HOME), a local Ray instance
on loopback, and a SQLite MLflow store in the work folder (a file: no listener).
`RAY_ADDRESS` and `MLFLOW_TRACKING_URI` override the last two.

The local Ray instance (Ray 2.60, Linux) listens on 127.0.0.1 only, every listener:
GCS, raylet (node manager and object manager), the gRPC server of every core worker
(driver, task and actor workers, the agents), dashboard (HTTP and its metrics),
dashboard agent (HTTP, gRPC and the Prometheus metrics export), runtime-env agent and
the autoscaler monitor's metrics. Ray has no bind-address setting for these (only
the dashboard's `dashboard_host`): each binds loopback when the node's IP is a loopback
address and otherwise every interface (the C++ gRPC servers, the agents' gRPC and
metrics servers, the monitor's and dashboard's metrics) or the node's IP (the agents'
HTTP servers). So the node IP is made 127.0.0.1, which Ray keeps (instead of rewriting
it to the machine's routable IP) only while ray_constants.ENABLE_RAY_CLUSTER is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is first imported; see
`ensure_ray`). Such an instance is reachable from this machine only and takes no second
node: clusters are for RAY_ADDRESS, where nothing of this applies.
tests/integration/test_loopback.py lists the listening sockets to check all of this.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray's switch (despite its name, honoured on Linux too): "0" lets a local instance keep
# the loopback address as its node IP, and Ray's servers listen on loopback only then.
_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def work_dir() -> Path:
    path = Path(os.environ.get("MLM_HOME", "mlm-work")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir() / 'mlflow.db'}"


def artifact_root() -> str:
    """Artifact location for new experiments on the embedded store."""
    return (work_dir() / "mlartifacts").as_uri()


def ensure_ray(dashboard: bool = True) -> None:
    """Connect to RAY_ADDRESS, or start a local instance bound to loopback. `dashboard`:
    whether a local instance runs the dashboard (its State API is what Ray Train relies
    on; `mlm prepare` alone does without, ~2 s of start-up and a busy process less)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return
    from ray._private import ray_constants

    # Loopback (see the module's docstring). Ray reads the switch once, when ray is
    # imported (`mlm`, a caller or a test may have imported it long before), into
    # ray_constants.ENABLE_RAY_CLUSTER: so the module flag is turned off in this process
    # (the node IP that ray.init hands to GCS, raylet and this driver) and the variable
    # set for every process ray.init starts (each imports ray anew), for the duration of
    # ray.init only: later connections from this process to a RAY_ADDRESS cluster, and
    # `ray start` processes it launches, see Ray's defaults. `_node_ip_address` on its
    # own would not do: ray.init rewrites 127.0.0.1 to the routable IP unless the flag
    # is off.
    # Workers inherit the environment of the raylet that ray.init starts, so they find the
    # same stores. (A runtime_env with env_vars would do the same but keeps every
    # prestarted worker from being used: ~1.5 s more before the first task runs.) This
    # process keeps its own environment.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLM_HOME", _LOCAL_ONLY)}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri(), "MLM_HOME": str(work_dir()), _LOCAL_ONLY: "0"})
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:  # a Ray that moved the switch
        logging.getLogger(__name__).warning(
            "the local Ray instance runs on %s, not loopback: its services are reachable from the network", node_ip)


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output order
    ctx.enable_progress_bars = os.environ.get("MLM_PROGRESS", "1") != "0"
