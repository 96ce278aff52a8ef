"""scripts/gpu_check.sh and mlm/bench/gpu.py without a GPU: the dry run's plan (three
checks, their commands, config keys that validate, command lines the real CLI parses), a
bad step that fails, the refusal without a GPU, and the runner's lines for a step that
passes, fails, times out or lacks its input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import pytest

from mlm.bench import gpu
from mlm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RAY_ADDRESS")}
    env |= {"MLM_HOME": str(tmp_path / "home"), "MLM_GPU_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
            "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def _parses_with_the_cli(argv: list[str]) -> None:
    """`mlm ARGS` through the real click parser (raises on an unknown command or option, a bad value)."""
    from mlm.cli import cli

    cmd, args = cli, list(argv)
    while isinstance(cmd, click.Group):
        assert args and args[0] in cmd.commands, f"mlm {' '.join(argv)}: no such command"
        cmd, args = cmd.commands[args[0]], args[1:]
    cmd.make_context(cmd.name, args)


def test_dry_run_prints_the_plan(tmp_path):
    done = _script("--dry-run", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(s) for s in done.stdout.splitlines()]
    assert all(line["dry_run"] is True for line in lines)
    by = {line["check"]: line for line in lines}
    # install, the datasets, then the figures; one GPU planned (the lent machine has one):
    # the 2-worker NCCL run is skipped with its reason, two workers sharing the GPU over
    # gloo and a 1-worker NCCL run stand in
    assert list(by) == ["install", "dataset", "dataset_seq512", "train_throughput", "train_throughput_seq512",
                        "ddp_nccl_2workers", "ddp_gloo_2workers_1gpu", "ddp_nccl_1worker", "prepare_throughput"]
    assert "Duplicate GPU detected" in by["ddp_nccl_2workers"]["skip"]
    # the datasets: prepared with the base preset, or the ones `--stage` left in .gpu/ read back
    for check in ("dataset", "dataset_seq512"):
        dataset = shlex.split(by[check]["command"])[3:5]
        assert dataset == ["data", "stats"] if (ROOT / ".gpu" / "data-base" / "manifest.json").is_file() else (
            dataset[0] == "prepare" and by[check]["config"]["preset"] == "base")
    for check in ("train_throughput", "train_throughput_seq512", "ddp_nccl_2workers", "ddp_gloo_2workers_1gpu",
                  "ddp_nccl_1worker"):
        assert by[check]["config"]["valid"] is True and by[check]["config"]["preset"] == "base"
        assert by[check]["parsed"] is True
    assert "data.seq_len=512" in by["train_throughput_seq512"]["config"]["overrides"]
    assert "train.num_workers=2" in by["ddp_nccl_2workers"]["config"]["overrides"]
    gloo = by["ddp_gloo_2workers_1gpu"]["config"]["overrides"]
    assert {"train.num_workers=2", "train.backend=gloo", "train.gpus_per_worker=0.5"} <= set(gloo)
    assert "train.use_gpu=true" in by["ddp_nccl_1worker"]["config"]["overrides"]
    assert "--resume-steps" in shlex.split(by["ddp_nccl_1worker"]["command"])
    commands = {c: shlex.split(by[c]["command"]) for c in by if c != "install"}
    assert commands["train_throughput"][:5] == ["python", "-m", "mlm.cli", "bench", "train"]
    assert commands["prepare_throughput"][:5] == ["python", "-m", "mlm.cli", "bench", "data"]
    assert commands["ddp_nccl_1worker"][:4] == ["python", "-m", "mlm.bench.gpu", "ddp"]
    for check, argv in commands.items():
        if argv[2] == "mlm.cli":
            _parses_with_the_cli(argv[3:])
    assert "pip install" in by["install"]["command"]


def test_bad_steps_fail_the_dry_run(tmp_path):
    good = gpu.plan(tmp_path, 1)[2]  # train_throughput
    assert good.check == "train_throughput"
    assert gpu.validate(good)["parsed"] is True
    with pytest.raises(ConfigError, match="train.bogus"):
        gpu.validate(replace(good, overrides=("train.bogus=1",)))
    with pytest.raises(gpu.StepError, match="does not parse"):
        gpu.validate(replace(good, args=("mlm.cli", "bench", "trian")))
    with pytest.raises(gpu.StepError, match="does not parse"):
        gpu.validate(replace(good, args=(*good.args, "--stepz", "3")))
    with pytest.raises(gpu.StepError, match="no reader"):
        gpu.validate(replace(good, read="nothing"))
    ddp = gpu.plan(tmp_path, 2)[4]
    assert ddp.check == "ddp_nccl_2workers" and ddp.skip is None  # two GPUs: it runs
    with pytest.raises(gpu.StepError, match="does not parse"):
        gpu.validate(replace(ddp, args=(gpu.MODULE, "ddp", "--data", "d")))  # no --out


def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    done = _script(tmp_path=tmp_path)
    assert done.returncode != 0
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "error"
    assert "no CUDA GPU" in json.loads(lines[0])["why"]


def _step(check, args, timeout_s=60, read="json", **kw) -> gpu.Step:
    return gpu.Step(check, args, timeout_s, read, **kw)


def test_the_runner_reports_every_outcome(tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"answer": 42}))
    steps = [
        _step("ok", ("json.tool", str(doc))),
        _step("fails", ("json.tool", str(tmp_path / "missing.json"))),
        _step("slow", ("timeit", "-n1", "-r1", "import time; time.sleep(60)"), timeout_s=1),
        _step("after_failure", ("json.tool", str(doc)), needs=("fails",)),
        _step("said_no", ("json.tool", str(doc)), skip="not on this machine"),
    ]
    jsonl = tmp_path / "out.jsonl"
    failed = gpu.check(steps, tmp_path, started_at=time.time(), jsonl=str(jsonl))
    lines = {line["check"]: line for line in map(json.loads, jsonl.read_text().splitlines())}
    assert failed == 2
    assert lines["ok"]["status"] == "ok" and lines["ok"]["answer"] == 42
    assert lines["fails"]["status"] == "error" and lines["fails"]["rc"] != 0 and lines["fails"]["error"]
    assert lines["slow"]["status"] == "timeout" and lines["slow"]["seconds"] < 30
    assert lines["after_failure"] == {"check": "after_failure", "status": "skipped",
                                      "why": "needs fails, which did not pass"}
    assert lines["said_no"]["why"] == "not on this machine"
    late = gpu.check(steps[:1], tmp_path, started_at=time.time() - gpu.BUDGET_S, jsonl=str(jsonl))
    assert late == 0 and "budget is spent" in json.loads(jsonl.read_text().splitlines()[-1])["why"]


def test_the_steps_load_without_mlflow():
    """The lent machine's image has no mlflow (and nothing can be fetched there): the
    modules its steps import, at the top of each, do without it."""
    code = ("import sys; sys.modules['mlflow'] = None; "  # `import mlflow` now raises ImportError
            "import mlm.cli, mlm.bench.gpu, mlm.bench.train, mlm.bench.data, mlm.prepare, mlm.pipeline, "
            "mlm.train, mlm.loader, mlm.model")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


# What `mlm bench train` printed on the lent H200 (2026-12-04), shortened: the HF Trainer's
# own Python dict line comes before the JSON document (the reader took it for the document).
CAPTURED_BENCH = """{'train_runtime': '9.12', 'train_samples_per_second': '491.2', 'train_steps_per_second': '3.837', \
'train_loss': '7.154', 'epoch': '1'}
{'train_runtime': '8.05', 'train_samples_per_second': '556.4', 'train_steps_per_second': '4.347', 'train_loss': '7.15'}
{
  "device": "NVIDIA H200",
  "precision": "bf16 autocast",
  "batch": "128 x 128",
  "timed_steps": 30,
  "mlm_compiled": true,
  "mlm_warmup_s": 41.5,
  "dropped_predictions": 0,
  "sdpa": {
    "flash": 24
  },
  "mlm_tokens_per_s": 289064.1,
  "hf_trainer_tokens_per_s": 288009.5,
  "hf_trainer_compiled_tokens_per_s": 553788.0,
  "speedup": 1.0036,
  "speedup_vs_compiled": 0.522,
  "mlm_mfu": 0.168,
  "hf_trainer_mfu": 0.167,
  "hf_trainer_compiled_mfu": 0.321
}
"""


def test_the_bench_reader_takes_the_last_document():
    line = gpu.READERS["bench_train"](CAPTURED_BENCH)
    assert line["mlm_tokens_per_s"] == 289064.1 and line["hf_trainer_compiled_tokens_per_s"] == 553788.0
    assert line["sdpa"] == {"flash": 24} and line["mlm_mfu"] == 0.168
    with pytest.raises(ValueError, match="no JSON document"):
        gpu.READERS["bench_train"]("{'train_runtime': '9.12'}\nmlm bench train: done\n")
    # text after the document: not a document that ends the output
    with pytest.raises(ValueError):
        gpu.READERS["json"]('{"a": 1}\ntrailing words\n')
