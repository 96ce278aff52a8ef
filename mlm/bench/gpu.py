"""The GPU check of a lent GPU machine (`scripts/gpu_check.sh` runs it): one JSON line per
figure, each step in its own process with its own timeout, the whole under 8 minutes.

    python -m mlm.bench.gpu check [--dry-run] [--data DIR] [--work DIR] [--gpus N] [--jsonl FILE]
    python -m mlm.bench.gpu stage DEST        (here, with PyPI: what the lent machine lacks)
    python -m mlm.bench.gpu ddp --data DIR --out DIR [--preset P] [--set K=V ...]
    python -m mlm.bench.gpu nccl-probe

The steps (`plan`), in order of what matters most:

* ``dataset``, ``dataset_seq512``: the base preset's datasets of the built-in corpus at
  seq 128 and 512 (``mlm prepare``), or ``mlm data stats`` of the ones staged with it;
* ``train_throughput``: ``mlm bench train --preset base`` with its defaults (bf16
  BERT-base, seq 128, micro-batch auto, compiled): our training step next to the Hugging
  Face Trainer, default and ``torch_compile=True``, tokens/s and MFU (one FLOP definition
  for all), the SDPA kernels that ran, the compile time;
* ``train_throughput_seq512``: the same at seq 512;
* ``ddp_nccl_2workers``: ``mlm.train.train`` over Ray Train with 2 workers on NCCL, a
  few steps, then resumed to more steps. NCCL refuses two ranks on one GPU ("Duplicate
  GPU detected"; ray-project/ray#48012), so on a one-GPU machine
  ``ddp_gloo_2workers_1gpu`` stands in: the same two workers sharing the GPU
  (``train.gpus_per_worker=0.5``, ``train.backend=gloo``): data sharding, accumulation,
  the all-reduce, checkpoints and resume on the GPU path; and ``ddp_nccl_1worker``: one
  worker on NCCL (process group, GPU placement, bf16 loop, checkpoint, model export);
* ``prepare_throughput``: ``mlm bench data --size-mb 100`` on all cores (the README's
  2-core "repeated" corpus, for a like-for-like row).

No MLflow run is made (the lent machine's image has no mlflow and it cannot reach PyPI):
the DDP step calls ``mlm.train.train`` without a run id, as the CLI's ``train`` would
inside one. A step that fails prints its line with the error and the next one runs; a
step whose input failed, or that the budget no longer fits, says ``skipped`` and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from mlm import storage
from mlm.config import ConfigError, load_config

MODULE = "mlm.bench.gpu"  # its steps run it as `python -m` (where __name__ is "__main__")
PRESET = "base"
CORPUS = "builtin:python-docs"
DATASET = "data-base"  # the dataset's folder name, staged (.gpu/data-base) or prepared (WORK/data-base)
LONG = "data.seq_len=512"  # the seq-512 dataset (DATASET + "-512") and its throughput row
BUDGET_S = 520  # the whole check, install included: run it with a device timeout of 570 s
RESERVE_S = 10  # kept for the logs' archive after the last step
MIN_STEP_S = 20  # a step with less time left is skipped, not started
DATA_MB = 100
DDP_OVERRIDES = ("train.use_gpu=true", "train.max_steps=10", "train.micro_batch_size=64", "train.warmup_steps=2",
                 "train.checkpoint_every=10", "train.log_every=5")
RESUME_STEPS = 20  # the DDP runs are rerun to this many steps: resumed from step 10's checkpoint
ONE_GPU = ("one GPU: NCCL refuses two ranks on one device ('Duplicate GPU detected', ray-project/ray#48012); "
           "ddp_gloo_2workers_1gpu (two workers sharing the GPU over gloo) and ddp_nccl_1worker stand in")

# `stage`: the lent machine (Python 3.12, no network) is sent what its image lacks.
DEVICE_PYTHON = "3.12"
CARRY_LIMIT = 60 * 2**20  # a device call carries 64 MiB, the working tree (~1 MB) included
# ray[default]'s dashboard needs (its State API is what Ray Train relies on) less py-spy,
# virtualenv and smart_open (profiling and runtime environments: 10 MB the carry has no room for)
DASHBOARD_DEPS = ("aiohttp_cors", "colorful", "opencensus", "opentelemetry-sdk>=1.30.0",
                  "opentelemetry-exporter-prometheus", "opentelemetry-proto", "prometheus_client>=0.7.1")
# what the requirements resolve to that the lent machine's image already holds (its package
# list of 2026-11-17): not carried; pip there takes the installed ones
ON_DEVICE_IMAGE = frozenset("""
aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click filelock frozenlist fsspec h11
hf-xet huggingface-hub idna msgpack multidict numpy packaging pandas prometheus-client propcache protobuf pyarrow
python-dateutil pyyaml requests six tqdm typing-extensions urllib3 xxhash yarl""".split())
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/llm/")  # Java workers, RLlib, LLM serving: 34 of the wheel's 79 MB


class StepError(ConfigError):
    """A step the check cannot run as written (unknown command or option)."""


@dataclass(frozen=True)
class Step:
    """One check: `python -m MODULE ARGS [--preset P] [--set K=V]...` in its own process."""

    check: str
    args: tuple[str, ...]  # the module, then its arguments
    timeout_s: int
    read: str  # the reader of its stdout, a key of READERS
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # checks that must have passed first
    skip: str | None = None  # why it does not run (its line says so)
    note: str | None = None  # put on its line as it is

    @property
    def argv(self) -> list[str]:
        config = (["--preset", self.preset] if self.preset else []) + [a for o in self.overrides for a in ("--set", o)]
        return [sys.executable, "-m", *self.args, *config]

    @property
    def shown(self) -> str:
        return shlex.join(["python", *self.argv[1:]])


def plan(work: Path, gpus: int, data_dir: str | None = None) -> list[Step]:
    """The checks for a machine with `gpus` GPUs; `data_dir`: a staged dataset (else
    prepared), its seq-512 twin beside it (`data_dir`-512)."""
    data = data_dir or str(work / DATASET)
    long = data + "-512"

    def dataset(check: str, path: str, extra: tuple[str, ...] = ()) -> Step:
        if data_dir:
            return Step(check, ("mlm.cli", "data", "stats", path), 60, "dataset", note="staged by gpu_check.sh --stage")
        return Step(check, ("mlm.cli", "prepare", CORPUS, "--out", path, "--overwrite"), 150, "dataset", PRESET, extra)

    def throughput(check: str, path: str, needs: str, steps: int, extra: tuple[str, ...] = ()) -> Step:
        args = ("mlm.cli", "bench", "train", "--data", path, "--steps", str(steps), "--warmup", "5")
        return Step(check, args, 200, "bench_train", PRESET, ("train.use_gpu=true", *extra), needs=(needs,))

    bench_data = Step("prepare_throughput", ("mlm.cli", "bench", "data", "--size-mb", str(DATA_MB),
                                             "--work", str(work / "bench-data")), 240, "bench_data")
    return [dataset("dataset", data), dataset("dataset_seq512", long, (LONG,)),
            throughput("train_throughput", data, "dataset", 30),
            throughput("train_throughput_seq512", long, "dataset_seq512", 20, (LONG,)),
            *_ddp_steps(data, work, gpus), bench_data]


def _ddp_steps(data: str, work: Path, gpus: int) -> list[Step]:
    def ddp(check: str, workers: int, *extra: str) -> Step:
        overrides = (f"train.num_workers={workers}", f"train.global_batch_size={64 * workers}", *DDP_OVERRIDES, *extra)
        return Step(check, (MODULE, "ddp", "--data", data, "--out", str(work / check), "--resume-steps",
                            str(RESUME_STEPS)), 150, "ddp", PRESET, overrides, needs=("dataset",),
                    note="mlm.train.train over Ray Train, no MLflow run; rerun to resume")

    two = ddp("ddp_nccl_2workers", 2)
    if gpus >= 2:
        return [two]
    return [replace(two, skip=ONE_GPU),
            ddp("ddp_gloo_2workers_1gpu", 2, "train.backend=gloo", "train.gpus_per_worker=0.5"),
            ddp("ddp_nccl_1worker", 1)]


# --------------------------------------------------------------------------- dry run


def validate(step: Step) -> dict[str, Any]:
    """The dry run of one step: its config through the project's validation, its command
    line through the parser that would read it; raises ConfigError (StepError) if either fails."""
    line: dict[str, Any] = {"check": step.check, "dry_run": True, "command": step.shown, "timeout_s": step.timeout_s}
    if step.preset or step.overrides:
        load_config(step.preset, step.overrides)
        line["config"] = {"preset": step.preset, "overrides": list(step.overrides), "valid": True}
    module, *args = step.argv[2:]
    if module == "mlm.cli":
        _cli_accepts(step.argv)
    elif module == MODULE:
        try:
            _parser().parse_args(args)
        except SystemExit:
            raise StepError(f"{step.check}: `{step.shown}` does not parse") from None
    else:
        raise StepError(f"{step.check}: runs {module}, neither mlm.cli nor {MODULE}")
    if step.read not in READERS:
        raise StepError(f"{step.check}: no reader {step.read!r}; one of {sorted(READERS)}")
    return line | {"parsed": True} | ({"skip": step.skip} if step.skip else {}) | ({"needs": list(step.needs)} if step.needs else {})


def _cli_accepts(argv: list[str]) -> None:
    """`mlm ... --help`: the subcommand exists and takes these options (click stops at an
    unknown one before it prints the help)."""
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, env=_env())
    if done.returncode:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise StepError(f"`{' '.join(argv[3:])}` does not parse: {why}")


# --------------------------------------------------------------------------- running


def check(steps: list[Step], work: Path, *, dry_run: bool = False, started_at: float | None = None,
          jsonl: str | None = None) -> int:
    """Run (or, dry, validate) the steps, one JSON line each on stdout and in `jsonl`;
    returns how many failed or timed out."""
    emit = _emitter(jsonl)
    if dry_run:
        for step in steps:
            emit(validate(step))
        return 0
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = (started_at or time.time()) + BUDGET_S
    status: dict[str, str] = {}
    for step in steps:
        line = run_step(step, deadline, logs, status)
        status[step.check] = line["status"]
        emit(line)
    return sum(s in ("error", "timeout") for s in status.values())


def _emitter(jsonl: str | None) -> Callable[[dict[str, Any]], None]:
    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line, default=str)
        print(text, flush=True)
        if jsonl:
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    return emit


def run_step(step: Step, deadline: float, logs: Path, done: dict[str, str]) -> dict[str, Any]:
    """One step in its own process group, killed at its timeout (or the budget's end)."""
    line: dict[str, Any] = {"check": step.check, "status": "ok"}
    line |= ({"preset": step.preset} if step.preset else {}) | ({"note": step.note} if step.note else {})
    unmet = [n for n in step.needs if done.get(n) != "ok"]
    left = deadline - RESERVE_S - time.time()
    why = step.skip or (f"needs {', '.join(unmet)}, which did not pass" if unmet else None) or (
        f"the {BUDGET_S} s budget is spent ({max(0, round(left))} s left)" if left < MIN_STEP_S else None)
    if why:
        return line | {"status": "skipped", "why": why}
    timeout = min(step.timeout_s, left)
    log = logs / f"{step.check}.log"
    started = time.time()
    rc, out = _run(step.argv, timeout, log)
    line["seconds"] = round(time.time() - started, 1)
    _echo_tail(step.check, log)
    if rc is None:
        return line | {"status": "timeout", "timeout_s": round(timeout), "log": str(log)}
    if rc:
        return line | {"status": "error", "rc": rc, "error": _last_line(log), "log": str(log)}
    try:
        return line | READERS[step.read](out)
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        return line | {"status": "error", "error": f"unreadable output: {type(e).__name__}: {e}", "log": str(log)}


def _run(argv: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """(exit code or None at the timeout, stdout); stderr goes to `log`. The process group
    goes at the end either way: a local Ray's services die with the step that started them."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=_env())
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if out is None:
            proc.communicate()
            return None, ""
    return proc.returncode, out.decode("utf-8", "replace")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each step starts its own local Ray
    return env | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLM_PROGRESS_EVERY": "10"}


def _last_line(log: Path) -> str:
    lines = [s for s in log.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    return lines[-1][-500:] if lines else "no output on stderr"


def _echo_tail(check_name: str, log: Path, n: int = 15) -> None:
    for s in log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]:
        print(f"[{check_name}] {s}", file=sys.stderr)


# --------------------------------------------------------------------------- readers


def _json_in(out: str) -> dict[str, Any]:
    """The JSON document a command printed last on stdout: the last line opening a JSON
    object whose document runs to the end of the output (lines before it, such as the HF
    Trainer's Python dict line `{'train_runtime': ...}`, are not it)."""
    lines = out.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].startswith("{"):
            continue
        rest = "\n".join(lines[i:])
        try:
            doc, end = json.JSONDecoder().raw_decode(rest)
        except ValueError:
            continue
        if isinstance(doc, dict) and not rest[end:].strip():
            return doc
    raise ValueError("no JSON document ends the output")


def _read_dataset(out: str) -> dict[str, Any]:
    splits = _json_in(out)["splits"]
    return {f"{s}_{k}": splits[s][k] for s in ("train", "validation") for k in ("rows", "tokens")}


def _read_bench_train(out: str) -> dict[str, Any]:
    r = _json_in(out)
    keys = ("device", "precision", "batch", "timed_steps", "mlm_compiled", "mlm_warmup_s", "sdpa", "mlm_tokens_per_s",
            "hf_trainer_tokens_per_s", "speedup", "dropped_predictions")
    optional = ("hf_trainer_compiled_tokens_per_s", "speedup_vs_compiled", "mlm_mfu", "hf_trainer_mfu",
                "hf_trainer_compiled_mfu")
    return {k: r[k] for k in keys} | {k: r.get(k) for k in optional}


def _read_bench_data(out: str) -> dict[str, Any]:
    r = _json_in(out)
    runs = r["runs"]
    line = {"cores": r["cores"], "corpus_mb": round(r["corpus"]["bytes"] / 1e6, 1), "seq_len": r["seq_len"],
            "content_tokens": runs["prepare"]["content_tokens"]}
    for name, run in runs.items():
        line |= {f"{name}_tokens_per_s": round(run["tokens_per_s"]), f"{name}_wall_s": run["wall_s"],
                 f"{name}_peak_mib": run["peak_mib"]}
    return line | {k: round(v, 3) for k, v in r["ratios"].items() if k.endswith("tokens_per_s")}


def _read_ddp(out: str) -> dict[str, Any]:
    r = _json_in(out)
    if not math.isfinite(r["final_train_loss"]):
        raise ValueError(f"the final training loss is {r['final_train_loss']}")
    return r


READERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "dataset": _read_dataset, "bench_train": _read_bench_train, "bench_data": _read_bench_data, "ddp": _read_ddp,
    "json": _json_in,
}


# --------------------------------------------------------------------------- the steps' own entries


def ddp_smoke(data_dir: str, out_dir: str, preset: str | None, overrides: list[str],
              resume_steps: int | None = None) -> dict[str, Any]:
    """A few DDP steps through `mlm.train.train` (Ray Train; NCCL on GPUs unless
    `train.backend` says gloo); with `resume_steps`, the same run again to that many
    steps, which resumes from the first run's last checkpoint (Ray Train restores a run
    of the same storage path and name): `resumed_at` is the first step it logged."""
    import torch

    from mlm.engine import backend
    from mlm.train import train

    cfg = load_config(preset, overrides)
    r = train(data_dir, out_dir, cfg)
    line = {"workers": cfg.train.num_workers, "backend": backend(cfg.train), "gpus_per_worker": cfg.train.gpus_per_worker,
            "gpus_visible": torch.cuda.device_count(), "steps": r["steps"], "final_train_loss": r["final_train_loss"],
            "train_seconds": r["seconds"], "approx_tokens_per_s": r["approx_tokens_per_s"],
            "model_written": storage.is_file(storage.join(r["model_dir"], "config.json"))}
    if resume_steps:
        log = Path(out_dir) / "train_log.jsonl"
        before = len(log.read_text().splitlines()) if log.is_file() else 0
        again = train(data_dir, out_dir, load_config(preset, [*overrides, f"train.max_steps={resume_steps}"]))
        logged = [json.loads(s)["step"] for s in log.read_text().splitlines()[before:]] if log.is_file() else []
        line |= {"resumed_to": again["steps"], "resumed_at": min(logged, default=None),
                 "final_train_loss": again["final_train_loss"]}
    return line


def nccl_probe(wait_s: float = 45.0) -> dict[str, Any]:
    """Two NCCL ranks on cuda:0 and one all_reduce: does this NCCL take two ranks on one GPU?"""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    answers = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_probe_rank, args=(rank, port, answers), daemon=True) for rank in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(wait_s)
    hung = [i for i, p in enumerate(ranks) if p.is_alive()]
    for i in hung:
        ranks[i].kill()
    said = {}
    while not answers.empty():
        rank, what = answers.get()
        said[f"rank{rank}"] = what
    said |= {f"rank{i}": f"no answer within {wait_s:g} s" for i in hung if f"rank{i}" not in said}
    accepted = all(str(v).startswith("ok") for v in said.values()) and len(said) == 2
    return {"nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "gpus_visible": torch.cuda.device_count(),
            "two_ranks_one_gpu": "accepted" if accepted else "refused", "ranks": said}


def _probe_rank(rank: int, port: int, answers) -> None:
    import socket

    import torch
    import torch.distributed as dist

    try:
        torch.cuda.set_device(0)
        # the store on loopback only (a tcp:// init method would listen on every interface)
        fd = socket.create_server(("127.0.0.1", port)).detach() if rank == 0 else None
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, master_listen_fd=fd)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=2)
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        answers.put((rank, f"ok: all_reduce gave {t.item():g}"))
    except Exception as e:  # noqa: BLE001 - the probe reports whatever NCCL raised
        text = str(e)
        found = re.search(r"Duplicate GPU detected[^\n]*", text)
        answers.put((rank, found.group(0) if found else f"{type(e).__name__}: {text.strip()[:300]}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- staging (here, with PyPI)


def device_requirements() -> list[str]:
    """What the lent machine installs: ray, pydantic and datasets at the versions installed
    here (the ones the test suite runs), and the dashboard's needs."""
    from importlib.metadata import version

    return [f"ray[data,train]=={version('ray')}", f"pydantic=={version('pydantic')}",
            f"datasets=={version('datasets')}", *DASHBOARD_DEPS]


def stage(dest: Path, python_version: str = DEVICE_PYTHON) -> dict[str, Any]:
    """DEST/wheels: the wheels the requirements resolve to for the lent machine (manylinux
    x86_64, CPython `python_version`) less what its image holds, ray without its unused
    parts, and requirements.txt; DEST/data-base and DEST/data-base-512: the base datasets
    at seq 128 and 512. Carry DEST there."""
    dest = Path(dest).resolve()
    wheels = dest / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    specs = device_requirements()
    tag = python_version.replace(".", "")
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                             "manylinux1_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", "--abi", f"cp{tag}", *platforms,
                    *specs], check=True)
    left_out = []
    for whl in sorted(wheels.glob("*.whl")):
        if re.sub(r"[-_.]+", "-", whl.name.split("-")[0].lower()) in ON_DEVICE_IMAGE:
            left_out.append(whl.name)
            whl.unlink()
    for ray_wheel in wheels.glob("ray-*.whl"):
        trim_wheel(ray_wheel, RAY_UNUSED)
    storage.write_text(wheels / "requirements.txt", "\n".join(specs) + "\n")
    for dataset in plan(dest, 1)[:2]:  # seq 128 and 512
        log = dest / f"stage-{dataset.check}.log"
        rc, _ = _run(dataset.argv, 1800, log)
        if rc:
            raise StepError(f"preparing {dataset.check} failed (exit {rc}): {_last_line(log)}")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if size > CARRY_LIMIT:
        raise StepError(f"{dest} holds {size / 2**20:.1f} MiB, over the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries")
    return {"dest": str(dest), "mib": round(size / 2**20, 1), "requirements": specs, "left_out_as_on_the_image": left_out,
            "wheels": sorted(w.name for w in wheels.glob("*.whl")), "datasets": [str(dest / DATASET), str(dest / DATASET) + "-512"]}


def trim_wheel(path: Path, drop: tuple[str, ...]) -> int:
    """Rewrite a wheel without the files under the `drop` prefixes (their RECORD lines go
    too); returns how many files went."""
    dropped = 0
    with storage.output_file(path) as tmp, zipfile.ZipFile(path) as src, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as out:
        for info in src.infolist():
            if info.filename.startswith(drop):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(r for r in data.splitlines(keepends=True) if not r.decode().startswith(drop))
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return dropped


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The GPU check (scripts/gpu_check.sh).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="run (or --dry-run: validate and print) the checks")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--data", default=None, help="a staged base dataset (default: prepare one)")
    c.add_argument("--work", default=None, help="logs and outputs (default: $MLM_HOME/gpu-check)")
    c.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs (default: those torch sees)")
    c.add_argument("--started-at", type=float, default=None, help="unix time the check began (the budget counts from it)")
    c.add_argument("--jsonl", default=None, help="append the JSON lines to this file too")
    s = sub.add_parser("stage", help="here, with PyPI: the wheels and the dataset to carry")
    s.add_argument("dest")
    s.add_argument("--python-version", default=DEVICE_PYTHON)
    d = sub.add_parser("ddp", help="a DDP smoke run (a step of check)")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--preset", default=None)
    d.add_argument("--set", dest="overrides", action="append", default=[])
    d.add_argument("--resume-steps", type=int, default=None, help="then rerun the same run to this many steps")
    sub.add_parser("nccl-probe", help="two NCCL ranks on one GPU (a step of check)")
    return p


def _check_command(a: argparse.Namespace) -> int:
    import torch

    from mlm.runtime import work_dir

    visible = torch.cuda.device_count()
    if not visible and not a.dry_run:
        raise StepError("no CUDA GPU visible to torch: run the check on a GPU machine, or --dry-run to validate it")
    work = Path(a.work) if a.work else work_dir() / "gpu-check"
    steps = plan(work, a.gpus if a.gpus is not None else max(visible, 1), a.data)
    return 1 if check(steps, work, dry_run=a.dry_run, started_at=a.started_at, jsonl=a.jsonl) else 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.command == "check":
            return _check_command(a)
        if a.command == "stage":
            result = stage(Path(a.dest), a.python_version)
        elif a.command == "ddp":
            result = ddp_smoke(a.data, a.out, a.preset, a.overrides, a.resume_steps)
        else:
            result = nccl_probe()
    except ConfigError as e:
        print(f"gpu check: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
