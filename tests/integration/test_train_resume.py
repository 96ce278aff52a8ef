"""Training survives losing a worker: SIGKILL one of two Ray Train workers mid-run; the
run restarts from its last checkpoint (not step 0) and from then on computes exactly
the losses of an uninterrupted run (float32 on CPU), so no batch was read twice or
skipped. The same run on two Ray nodes gives the same loss curve."""

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

pytestmark = pytest.mark.integration

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


def _train_workers() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "RayTrainWorker" in " ".join(p.info["cmdline"])]


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


def test_two_nodes_give_the_same_loss_curve(data_dir, uninterrupted, ray_two_nodes, tmp_path, work):
    """The same training, submitted from a separate driver to the two-node cluster
    (one CPU each, so the two workers land on different nodes)."""
    expected, _ = uninterrupted
    run = tmp_path / "run-2n"
    env = {**ray_two_nodes.env, "RAY_ADDRESS": ray_two_nodes.address, "MLM_HOME": str(work), "MLM_PROGRESS": "0"}
    args = [a for s in SETS for a in ("--set", s)]
    out = subprocess.run(["mlm", "train", "--data", str(data_dir), "--out", str(run), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = _losses(_log(run))
    assert sorted(got) == list(range(1, 37))
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-4
