"""One local Ray cluster and one MLflow store for the whole test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """The session's MLM_HOME: work folder, SQLite MLflow store, model cache."""
    path = tmp_path_factory.mktemp("mlm-home")
    os.environ["MLM_HOME"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["MLM_PROGRESS"] = "0"
    return path


@pytest.fixture(scope="session")
def ray_cluster(work):
    import ray

    from mlm.runtime import LOOPBACK, ensure_ray
    from mlm.serve.ingress import local_env

    ensure_ray(env=local_env("haproxy", LOOPBACK, work / "serve"))  # as `mlm serve` starts one
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    """The session cluster's address, for subprocesses (`mlm ...` as a user runs it with
    RAY_ADDRESS): they join it, token included, instead of starting a Ray of their own."""
    return ray_cluster.get_runtime_context().gcs_address
