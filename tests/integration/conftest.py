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
