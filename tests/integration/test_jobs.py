"""`mlm submit` / `mlm jobs` against a real two-node Ray cluster on loopback with token
authentication on and no shared disk: the pipeline runs as a Ray job with its dataset
and run on S3 (prepare -> train on both nodes -> evaluate -> register through the
MLflow server), and the registered champion loads in a fresh process; a submission
without the token is refused."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

JOB_ID = "mlm-test-pipeline"


def _mlm(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlm", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(ray_two_nodes, s3_server, tmp_path_factory):
    from mlm.corpus import materialize_builtin

    root = tmp_path_factory.mktemp("submit")
    job_dir = root / "project"  # the uploaded working directory: the corpus travels with it
    job_dir.mkdir()
    full = materialize_builtin("python-docs", root / "corpus")
    with open(full, encoding="utf-8") as src, open(job_dir / "corpus.jsonl", "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 1500))
    home = root / "home"
    home.mkdir()
    env = {**ray_two_nodes.env, "MLM_HOME": str(root / "work"), "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # the client side needs only the token
    # The corpus travels in the working dir (on the head only: prepare copies it for the
    # other node); dataset and run go to S3; metrics and the model to the MLflow server.
    r = _mlm(["submit", "--address", ray_two_nodes.dashboard, "--submission-id", JOB_ID, "--working-dir", str(job_dir),
              "--tracking-uri", ray_two_nodes.mlflow, "--env", "MLM_DEBUG=1", "--follow",
              "pipeline", "--input", "corpus.jsonl", "--preset", "tiny", "--set", "train.max_steps=20",
              "--set", "train.warmup_steps=2", "--set", "registry.model_name=submitted",
              "--set", f"paths.data={s3_server.uri('job/data')}", "--set", f"paths.runs={s3_server.uri('job/runs')}"], env)
    return r, env, ray_two_nodes


def test_submitted_pipeline_finishes_and_registers(submitted, s3_server):
    r, env, cluster = submitted
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert f"job {JOB_ID}: SUCCEEDED" in r.stderr
    assert "registry  submitted v1 -> @champion" in r.stdout  # --follow streamed the job's own output

    from mlflow import MlflowClient

    from mlm import storage

    client = MlflowClient(tracking_uri=cluster.mlflow, registry_uri=cluster.mlflow)
    champion = client.get_model_version_by_alias("submitted", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["eval.top1_accuracy"]) > 0
    # Everything a stage wrote is on the object store, nothing on a node's disk.
    data = [d for d in storage.list_names(s3_server.uri("job/data"))]
    assert len(data) == 1 and storage.is_file(s3_server.uri(f"job/data/{data[0]}/manifest.json"))
    runs = storage.list_names(s3_server.uri("job/runs"))
    assert len(runs) == 1
    for part in ("model/config.json", "model/model.safetensors", "model/eval_results.json", "ray/train"):
        assert storage.exists(s3_server.uri(f"job/runs/{runs[0]}/{part}")), part
    assert not [n for n in storage.list_names(s3_server.uri(f"job/data/{data[0]}")) if n == ".inputs"]

    # A fresh process that knows only the tracking server (no S3 credentials: the
    # server proxies the artifacts) loads the champion and fills a mask.
    fresh = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    code = ("import json, mlflow; mlflow.set_tracking_uri({!r}); m = mlflow.pyfunc.load_model('models:/submitted@champion');"
            " print(json.dumps(list(m.predict(['the [MASK] statement returns a value.', 'a [MASK] loop.']))))"
            ).format(cluster.mlflow)
    out = subprocess.run([sys.executable, "-c", code], env=fresh, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])  # one predicted token per text
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers), answers


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
