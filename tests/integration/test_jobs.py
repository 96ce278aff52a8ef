"""`mlm submit` / `mlm jobs` against a real two-node Ray cluster on loopback with token
authentication on and no shared disk: the pipeline runs as a Ray job with its dataset
and run on S3 (prepare on both nodes -> train in the job's driver, `train.engine=local`
-> evaluate -> register through the MLflow server), and the registered champion loads
in a fresh process; a submission without the token is refused. Ray Train across the
two nodes (DDP, checkpoints on S3, a worker lost and resumed) is test_train_resume's."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]  # one worker: its session fixtures once

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
              "--set", "train.warmup_steps=2", "--set", "registry.model_name=submitted", "--set", "train.engine=local",
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
    for part in ("model/config.json", "model/model.safetensors", "model/eval_results.json", "checkpoints/train"):
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


def _rest(base: str, path: str, body: dict | None = None, raw: bool = False):
    """One call to the tracking server's HTTP API, as the MLflow UI makes it."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                     headers={} if body is None else {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        content = response.read()
    return content if raw else json.loads(content)


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _table(content: bytes) -> list[dict]:
    """An `mlflow.log_table` artifact (pandas' split layout) as rows."""
    table = json.loads(content)
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _stage_runs(base: str, register_run_id: str) -> dict[str, dict]:
    """The pipeline run and its stage runs, by `mlm.stage`, found from the register run."""
    register = _rest(base, f"/api/2.0/mlflow/runs/get?run_id={register_run_id}")["run"]
    pid = _tags(register)["mlflow.parentRunId"]
    children = _rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [register["info"]["experiment_id"]],
                                                           "filter": f"tags.mlflow.parentRunId = '{pid}'"})["runs"]
    ids = [run["info"]["run_id"] for run in children] + [pid]
    runs = [_rest(base, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"] for run_id in ids]
    return {_tags(run)["mlm.stage"]: run for run in runs}


def test_mlflow_ui_shows_curves_tables_dataset_and_model_card(submitted, s3_server):
    """What a person browsing MLflow expects, read over HTTP from the tracking server: the
    pipeline run's training-curve figure, the evaluate run's per-strategy accuracy and
    sample fill-mask tables, the dataset (digest: the manifest's fingerprint, source: its
    S3 folder) as input of the pipeline, train and evaluate runs, the evaluation metrics
    linked to the logged model, and the model card on the logged model and as README.md
    in the model directory."""
    from mlm import shards, storage

    r, _, cluster = submitted
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    version = _rest(cluster.mlflow, "/api/2.0/mlflow/model-versions/get?name=submitted&version=1")["model_version"]
    runs = _stage_runs(cluster.mlflow, version["run_id"])
    assert set(runs) == {"pipeline", "prepare", "train", "evaluate", "register"}

    def artifact(stage: str, path: str) -> bytes:
        return _rest(cluster.mlflow, f"/get-artifact?path={path}&run_uuid={runs[stage]['info']['run_id']}", raw=True)

    # The figure, on the pipeline run.
    listed = _rest(cluster.mlflow, f"/api/2.0/mlflow/artifacts/list?run_id={runs['pipeline']['info']['run_id']}")["files"]
    assert "training_curves.png" in {f["path"] for f in listed}
    png = artifact("pipeline", "training_curves.png")
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # The tables, on the evaluate run, agreeing with its metrics.
    evaluated = _metrics(runs["evaluate"])
    strategies = {row["strategy"]: row for row in _table(artifact("evaluate", "eval/strategy_accuracy.json"))}
    assert list(strategies) == ["random", "whole_word", "span"]
    assert strategies["random"]["top1_accuracy"] == pytest.approx(evaluated["top1_accuracy"])
    assert strategies["span"]["top5_accuracy"] == pytest.approx(evaluated["span_top5_accuracy"])
    samples = _table(artifact("evaluate", "eval/fill_mask_samples.json"))
    (data_key,) = storage.list_names(s3_server.uri("job/data"))
    data_dir = s3_server.uri(f"job/data/{data_key}")
    manifest = shards.Manifest.read(data_dir)
    assert len(samples) == min(8, manifest.splits["validation"].rows), samples
    assert all(s["masked_text"].count("[MASK]") == 1 and s["true_token"] and s["predictions"].count(" | ") == 4
               for s in samples), samples

    # The dataset: the manifest's fingerprint, from its folder on S3.
    fingerprint = manifest.fingerprint
    for stage, context in (("pipeline", "training"), ("train", "training"), ("evaluate", "evaluation"),
                           ("register", "evaluation")):
        (given,) = runs[stage]["inputs"]["dataset_inputs"]
        assert given["dataset"]["digest"] == fingerprint and given["dataset"]["source_type"] == "s3", given
        assert json.loads(given["dataset"]["source"])["uri"] == data_dir
        assert {"key": "mlflow.data.context", "value": context} in given["tags"]
        assert json.loads(given["dataset"]["profile"])["validation_rows"] > 0

    # The evaluation metrics on the logged model (the register run's output, the version's
    # source), measured on that dataset.
    (output,) = runs["register"]["outputs"]["model_outputs"]
    model_id = output["model_id"]
    assert version["source"] == f"models:/{model_id}"
    model = _rest(cluster.mlflow, f"/api/2.0/mlflow/logged-models/{model_id}")["model"]
    linked = {m["key"]: m for m in model["data"]["metrics"]}
    assert linked["top1_accuracy"]["value"] == pytest.approx(evaluated["top1_accuracy"])
    assert linked["top1_accuracy"]["dataset_digest"] == fingerprint
    assert linked["top1_accuracy"]["run_id"] == version["run_id"] == model["info"]["source_run_id"]

    # The model card: given to MLflow (no hub lookup), and README.md in the model folder.
    files = f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files?artifact_file_path="
    card = _rest(cluster.mlflow, files + "model_card.md", raw=True).decode()
    assert card.startswith("# submitted\n") and "## Evaluation" in card and fingerprint in card
    assert "license: unknown" in _rest(cluster.mlflow, files + "model_card_data.yaml", raw=True).decode()
    printed = r.stdout + r.stderr  # the job's own output, streamed by --follow
    assert "registry  submitted v1" in printed and "could not be retrieved from the hub" not in printed
    assert "Unable to find license information" not in printed
    (run_key,) = storage.list_names(s3_server.uri("job/runs"))
    readme = storage.read_text(s3_server.uri(f"job/runs/{run_key}/model/README.md"))
    assert readme.startswith("---\n") and "pipeline_tag: fill-mask" in readme
    assert readme.endswith(version["description"]) and version["description"].startswith("# submitted v1 (`@champion`)")


def test_jobs_list_and_logs(submitted):
    _, env, cluster = submitted
    listed = _mlm(["jobs", "list", "--address", cluster.dashboard], env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(JOB_ID))
    assert "SUCCEEDED" in line and "python -m mlm pipeline run" in line
    logs = _mlm(["jobs", "logs", JOB_ID, "--address", cluster.dashboard], env, timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert "registry  submitted v1 -> @champion" in logs.stdout
    rows = json.loads(_mlm(["jobs", "list", "--address", cluster.dashboard, "--json"], env, timeout=120).stdout)
    assert any(r["submission_id"] == JOB_ID and r["status"] == "SUCCEEDED" for r in rows)
    missing = _mlm(["jobs", "logs", "no-such-job", "--address", cluster.dashboard], env, timeout=120)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_the_address_given_is_the_one_contacted(submitted):
    """Ray's job client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS to the address it is
    given: with both pointing at a port nobody listens on, --address still reaches the
    cluster (on main it contacted the dead port while mlm reported --address)."""
    _, env, cluster = submitted
    elsewhere = {**env, "RAY_ADDRESS": "http://127.0.0.1:9", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}
    listed = _mlm(["jobs", "list", "--address", cluster.dashboard], elsewhere, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert any(ln.startswith(JOB_ID) for ln in listed.stdout.splitlines())


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
