"""One local Ray cluster and one MLflow store for the whole test session."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share the machine's cores: one torch/OpenMP thread per process
    # (and per CLI subprocess, by environment), not one per core each, whose spinning
    # OpenMP threads would take the other worker's cores. Ray's workers get 1 already.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """A module's tests stay together on one pytest worker (module fixtures, and tests
    that build on the one before); integration modules sharing a session fixture name a
    group of their own (`xdist_group`: `pipeline`, `cluster`)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


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
