"""Output conventions of `mlm pipeline run --json`, in a subprocess as a user runs it:
stdout carries the result only (one JSON document), stderr mlm's progress and notices,
every line of it mlm's. It joins the session's Ray cluster through RAY_ADDRESS, as a
user's would join theirs (the data stage runs there), and trains in its own process
(`train.engine=local`). The default run without --json (the embedded Ray, a short
summary, under 40 lines, none of them Ray's) is checked on test_loopback's pipeline run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import MLM_LINE, nonblank

pytestmark = pytest.mark.integration

SETS = ["--set", "train.max_steps=8", "--set", "train.log_every=2", "--set", "train.checkpoint_every=8",
        "--set", "train.warmup_steps=2", "--set", "train.engine=local"]


def test_pipeline_run_json_output(tmp_path, ray_address):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLM_LOG")}
    env |= {"RAY_ADDRESS": ray_address, "MLM_HOME": str(tmp_path / "home"), "MLM_PROGRESS": "1"}  # progress on
    run = subprocess.run(["mlm", "pipeline", "run", "--json", *SETS], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)  # the whole of stdout is one JSON document
    assert result["registered"]["alias"] == "champion" and result["metrics"]["top1_accuracy"] >= 0
    assert {line.split(":")[0] for line in run.stderr.splitlines()} >= {"prepare", "train", "evaluate", "register"}
    assert all(MLM_LINE.match(line) for line in nonblank(run.stderr)), run.stderr
