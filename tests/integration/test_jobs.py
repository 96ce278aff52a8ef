"""`mlm submit` / `mlm jobs` against a real two-node Ray cluster on loopback with token
authentication on: the pipeline runs as a Ray job and its model lands in the registry;
a submission without the token is refused."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

JOB_ID = "mlm-test-pipeline"


def _mlm(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlm", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(ray_two_nodes, tmp_path_factory):
    from mlm.corpus import materialize_builtin

    root = tmp_path_factory.mktemp("submit")
    job_dir = root / "project"  # the uploaded working directory: the corpus travels with it
    job_dir.mkdir()
    full = materialize_builtin("python-docs", root / "corpus")
    with open(full, encoding="utf-8") as src, open(job_dir / "corpus.jsonl", "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 1500))
    home = root / "home"
    home.mkdir()
    env = {**ray_two_nodes.env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLM_HOME": str(root / "work"),
           "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # the client side needs only the token
    r = _mlm(["submit", "--address", ray_two_nodes.dashboard, "--submission-id", JOB_ID, "--working-dir", str(job_dir),
              "--tracking-uri", env["MLFLOW_TRACKING_URI"], "--env", f"MLM_HOME={env['MLM_HOME']}", "--env", "MLM_DEBUG=1", "--follow", "pipeline", "--input", "corpus.jsonl", "--preset", "tiny", "--set", "train.max_steps=20",
              "--set", "train.warmup_steps=2", "--set", "registry.model_name=submitted"], env)
    return r, env, ray_two_nodes


def test_submitted_pipeline_finishes_and_registers(submitted):
    r, env, cluster = submitted
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert f"job {JOB_ID}: SUCCEEDED" in r.stderr
    assert "registry  submitted v1 -> @champion" in r.stdout  # --follow streamed the job's own output

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("submitted", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["eval.top1_accuracy"]) > 0


def test_jobs_list_and_logs(submitted):
    _, env, cluster = submitted
    listed = _mlm(["jobs", "list", "--address", cluster.dashboard], env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(JOB_ID))
    assert "SUCCEEDED" in line and "python -m mlm pipeline run" in line
    logs = _mlm(["jobs", "logs", JOB_ID, "--address", cluster.dashboard], env, timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert "registry  submitted v1 -> @champion" in logs.stdout
    missing = _mlm(["jobs", "logs", "no-such-job", "--address", cluster.dashboard], env, timeout=120)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_submission_without_the_token_is_refused(submitted):
    _, env, cluster = submitted
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    r = _mlm(["submit", "--address", cluster.dashboard, "--submission-id", "anonymous", "--working-dir", "",
              "prepare", "x", "--out", "y"], anonymous, timeout=120)
    assert r.returncode == 2
    assert "RAY_AUTH_TOKEN" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    wrong = _mlm(["submit", "--address", cluster.dashboard, "--submission-id", "wrong-token", "--working-dir", "",
                  "prepare", "x", "--out", "y"], {**anonymous, "RAY_AUTH_TOKEN": "0" * 64}, timeout=120)
    assert wrong.returncode == 2 and "RAY_AUTH_TOKEN" in wrong.stderr
    ids = [ln.split()[0] for ln in _mlm(["jobs", "list", "--address", cluster.dashboard], env, timeout=120).stdout.splitlines()]
    assert JOB_ID in ids and "anonymous" not in ids and "wrong-token" not in ids
