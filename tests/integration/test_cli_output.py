"""Output conventions of `mlm pipeline run`, in a subprocess as a user runs it: stdout
carries the result only (one JSON document with --json, a short summary without), and
the whole run, progress and logs included, prints under 40 lines, every one of them
mlm's (none of Ray's). The first run joins the session's Ray cluster through
RAY_ADDRESS, as a user's would join theirs; the second starts its own, the embedded
default."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.integration

SETS = ["--set", "train.max_steps=8", "--set", "train.log_every=2", "--set", "train.checkpoint_every=8",
        "--set", "train.warmup_steps=2", "--set", "train.num_workers=1"]


def _env(home, ray_address=None):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLM_LOG")}
    env |= {"RAY_ADDRESS": ray_address} if ray_address else {}
    return env | {"MLM_HOME": str(home), "MLM_PROGRESS": "1"}  # progress on, as for a user (the suite turns it off)


MLM_LINE = re.compile(r"^(mlm|prepare|train|evaluate|register|data|model|mlflow|metrics|registry|try|ui|took)(:| )")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_pipeline_run_json_and_default_output(tmp_path, ray_address):
    home = tmp_path / "home"
    first = subprocess.run(["mlm", "pipeline", "run", "--json", *SETS], capture_output=True, text=True,
                           env=_env(home, ray_address), cwd=tmp_path, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)  # the whole of stdout is one JSON document
    assert result["registered"]["alias"] == "champion" and result["metrics"]["top1_accuracy"] >= 0
    assert {line.split(":")[0] for line in first.stderr.splitlines()} >= {"prepare", "train", "evaluate", "register"}
    assert all(MLM_LINE.match(line) for line in _lines(first.stderr)), first.stderr

    second = subprocess.run(["mlm", "pipeline", "run", *SETS], capture_output=True, text=True,
                            env=_env(home), cwd=tmp_path, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    printed = second.stdout.splitlines() + second.stderr.splitlines()  # blank lines count too
    assert len(printed) < 40, "\n".join(printed)
    assert any(line.startswith("registry  mlm-tiny v2 -> @") for line in _lines(second.stdout)), second.stdout
    assert not any(line.lstrip().startswith("{") for line in _lines(second.stdout))  # no JSON without --json
    assert "Traceback" not in second.stderr
    # nothing but mlm's lines: not Ray's token notice, not its core worker's actor warning
    assert all(MLM_LINE.match(line) for line in _lines(second.stdout) + _lines(second.stderr)), printed
