"""Embedded defaults: where work goes, which Ray cluster and which MLflow store.

Without configuration: a work folder `./mlm-work` (or $MLM_HOME), a local Ray
instance bound to loopback, and a SQLite MLflow store in the work folder.
`RAY_ADDRESS` and `MLFLOW_TRACKING_URI` override the last two.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


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
    # On Linux Ray advertises the machine's routable IP even for a local instance;
    # this switch makes a local instance use 127.0.0.1 for every service.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Workers inherit the environment of the raylet that ray.init starts, so they find the
    # same stores. (A runtime_env with env_vars would do the same but keeps every
    # prestarted worker from being used: ~1.5 s more before the first task runs.) This
    # process keeps its own environment.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLM_HOME")}
    os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri(), "MLM_HOME": str(work_dir())})
    try:
        ray.init(
            address="local",
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output order
    ctx.enable_progress_bars = os.environ.get("MLM_PROGRESS", "1") != "0"
