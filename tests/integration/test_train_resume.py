"""Training survives losing a worker: SIGKILL one of two Ray Train workers mid-run; the
run restarts from its last checkpoint (not step 0) and from then on computes exactly
the losses of an uninterrupted run (float32 on CPU), so no batch was read twice or
skipped. On two Ray nodes with no shared disk (data, checkpoints and model on the
loopback S3, metrics through the MLflow server), killing the worker on the second
node resumes from the checkpoint on S3 with the same per-step losses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from mlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]  # one worker: its session fixtures once

SETS = ["tokenizer.vocab_size=1000", "train.num_workers=2", "train.micro_batch_size=8", "train.global_batch_size=32",
        "train.max_steps=36", "train.checkpoint_every=12", "train.log_every=1", "train.warmup_steps=4",
        "train.max_failures=2", "masking.mode=dynamic", "train.validate_every=12", "train.validate_batches=2"]


@pytest.fixture(scope="module")
def data_dir(ray_cluster, tmp_path_factory):
    import pydoc_data.topics as topics

    from mlm.prepare import prepare

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(7)
    src = tmp_path_factory.mktemp("resume") / "c.txt"
    src.write_text("\n\n".join(" ".join(words[s : s + rng.randrange(30, 300)])
                               for s in (rng.randrange(len(words) - 300) for _ in range(1200))))
    out = src.parent / "data"
    prepare([str(src)], out, load_config("tiny", SETS + ["data.rows_per_shard=200"]))
    return out


def _log(run_dir) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(records) -> dict[int, float]:
    """The last record of each step (a restarted run logs the redone steps again)."""
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    from mlm.train import train

    run = tmp_path_factory.mktemp("run-a")
    summary = train(data_dir, run, load_config("tiny", SETS))
    assert summary["steps"] == 36
    return _losses(_log(run)), _log(run)


def _is_train_worker(proc) -> bool:
    import psutil

    try:
        return "RayTrainWorker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _train_workers() -> list[int]:
    """The Ray Train workers of this session's own Ray instance: descendants of this
    process (it started the instance), never another run's on the same machine."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]


def test_sigkilled_worker_resumes_from_checkpoint_exactly(data_dir, uninterrupted, tmp_path):
    from mlm.train import train

    expected, records_a = uninterrupted
    assert sorted(expected) == list(range(1, 37))
    assert any("val_loss" in r for r in records_a)  # validation ran during training

    run = tmp_path / "run-b"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train(data_dir, run, load_config("tiny", SETS))))
    thread.start()
    killed = None
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline and killed is None:
        done = _losses(_log(run))
        # Past step 12 and its checkpoint registered by the controller (it polls the
        # workers' reports; a report still queued in a worker that dies is lost with it).
        if done and max(done) >= 14 and (run / "ray" / "train" / "checkpoint_manager_snapshot.json").exists():
            workers = _train_workers()
            assert len(workers) == 2, workers
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    assert result.get("steps") == 36

    steps = [r["step"] for r in _log(run) if "train_loss" in r]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 13  # resumed after the checkpoint at 12, not from step 1
    got = _losses(_log(run))
    assert sorted(got) == list(range(1, 37))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst < 1e-4, f"largest loss difference {worst}"


def _mlflow_losses(tracking_uri: str, experiment: str) -> list[tuple[int, int, float]]:
    """(timestamp, step, train_loss) of the one train run in `experiment`, in log order."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return []
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    return sorted((m.timestamp, m.step, m.value) for m in history)


def _worker_on(home: str) -> list[int]:
    """Ray Train workers of the node whose MLM_HOME is `home` (workers inherit it; the
    folder is this session's own, so no other run's worker matches)."""
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if _is_train_worker(proc) and proc.environ().get("MLM_HOME") == home:
                out.append(proc.pid)
        except psutil.Error:
            pass
    return out


def test_killed_worker_on_second_node_resumes_from_s3(data_dir, uninterrupted, ray_two_nodes, s3_server, work):
    """The same training, submitted from a separate driver to the two-node cluster (one
    CPU each, so the two workers land on different nodes), with data and run on S3:
    SIGKILL the worker on the second node after the step-12 checkpoint; the run resumes
    from that checkpoint on S3 and gives the uninterrupted run's loss at every step."""
    from mlm import storage

    expected, _ = uninterrupted
    data = storage.put_dir(data_dir, s3_server.uri("resume/data"))  # a dataset is its folder: copy it
    run = s3_server.uri("resume/run")
    experiment = "resume-two-nodes"
    env = {**ray_two_nodes.env, "RAY_ADDRESS": ray_two_nodes.address, "MLM_HOME": str(work)}
    args = [a for s in SETS + [f"registry.experiment={experiment}"] for a in ("--set", s)]
    proc = subprocess.Popen(["mlm", "train", "--data", data, "--out", run, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 600
    snapshot = f"{run}/ray/train/checkpoint_manager_snapshot.json"
    while proc.poll() is None and time.time() < deadline and killed is None:
        done = [step for _, step, _ in _mlflow_losses(ray_two_nodes.mlflow, experiment)]
        # Past step 12 and its checkpoint registered by the controller, on S3.
        if done and max(done) >= 14 and storage.is_file(snapshot):
            victims = _worker_on(ray_two_nodes.homes["worker"])
            assert len(victims) == 1, victims
            killed = victims[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=900)
    assert killed is not None, "the run ended before the second node's worker could be killed: " + err[-2000:]
    assert proc.returncode == 0, err[-3000:]
    assert '"steps": 36' in out  # the summary (Ray may interleave worker lines on stdout)
    assert storage.is_file(f"{run}/model/config.json") and storage.is_file(f"{run}/model/model.safetensors")

    logged = _mlflow_losses(ray_two_nodes.mlflow, experiment)
    steps = [step for _, step, _ in logged]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 13  # resumed after the checkpoint at 12 (on S3), not from step 1
    got = {step: loss for _, step, loss in logged}  # the last value of each step
    assert sorted(got) == list(range(1, 37))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst < 1e-4, f"largest loss difference {worst}"


def test_local_engine_resumes_from_its_last_checkpoint_on_s3(data_dir, s3_server, tmp_path, work):
    """`train.engine: local` (one worker in this process, no Ray Train) commits its
    checkpoints to the run folder, here on S3; a rerun with the same folder resumes from
    the last one (the final one removed, as if the run died after step 8) and ends with
    the weights of an uninterrupted run, having logged only steps 9-12 again."""
    import torch
    from safetensors.torch import load_file

    from mlm import storage
    from mlm.registry import _client, setup
    from mlm.train import train

    cfg = load_config("tiny", SETS + ["train.engine=local", "train.max_steps=12", "train.checkpoint_every=4",
                                      "train.validate_every=4"])
    straight = train(data_dir, tmp_path / "straight", cfg)
    assert straight["steps"] == 12 and straight["checkpoint"].endswith("checkpoint_000000012")

    run = s3_server.uri("local-engine/run")
    client = _client()
    run_id = client.create_run(setup("resume-local-engine")).info.run_id
    first = train(data_dir, run, cfg, mlflow_run_id=run_id)
    folder = f"{run}/checkpoints/train"
    assert first["checkpoint"] == f"{folder}/checkpoint_000000012"
    assert storage.list_names(folder) == ["checkpoint_000000008", "checkpoint_000000012"]  # keep_checkpoints=2
    storage.delete(first["checkpoint"])
    storage.delete(f"{run}/model")
    again = train(data_dir, run, cfg, mlflow_run_id=run_id)
    assert again["steps"] == 12

    steps = [m.step for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.timestamp)]
    assert steps == list(range(1, 13)) + list(range(9, 13)), steps
    with storage.local_dir(f"{run}/model") as resumed:
        got = load_file(f"{resumed}/model.safetensors")
    want = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-5 and all(torch.isfinite(v).all() for v in got.values()), worst
