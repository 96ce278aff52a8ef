"""Submit `mlm` commands to a Ray cluster as Ray jobs, and list, follow and stop them.

A job runs `python -m mlm COMMAND ARGS...` on the cluster with a runtime environment
that carries the working directory (inputs given as relative paths travel with it),
this `mlm` package (so the cluster runs the submitter's code), the MLflow tracking URI
when one is given, and `--env` variables. Nothing is taken from this shell's
environment implicitly (a laptop's MLFLOW_TRACKING_URI, often a tunnel, means nothing
on the cluster): without a tracking URI the job uses the nodes' own (cluster.yaml sets
it, with the nodes' MLflow credentials; secrets never travel in a job's environment).

The Ray job API executes whatever it is sent, so remote clusters run with token
authentication: this process runs in Ray's token mode (`use_token_auth`) and Ray's job
client sends the token Ray finds (RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token). The address given (--address) is the one contacted, whatever
RAY_ADDRESS or RAY_API_SERVER_ADDRESS say.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

COMMANDS = {
    "pipeline": ["pipeline", "run"],
    "prepare": ["prepare"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "retrain": ["retrain"],
    "serve": ["serve"],  # runs until the job is stopped (`mlm jobs stop`): the application goes with it
}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working directory: local state, caches, VCS.
EXCLUDES = [".git", "mlm-work", "mlruns", "mlartifacts", "*.db", "__pycache__", ".venv", "venv", "*.egg-info",
            ".pytest_cache", "node_modules"]
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0


class JobsError(RuntimeError):
    pass


def address_of(address: str | None) -> str:
    """--address, else RAY_ADDRESS when it is an http(s) URL (the job API), else loopback."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's client prefers these to the address given


def use_token_auth() -> None:
    """This process talks to token-protected clusters: RAY_AUTH_MODE=token unless the user
    set a mode. Ray's job client then sends the token Ray itself finds (RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token). Ray reads the mode when it is
    first imported: call this before (the `submit` and `jobs` commands do, first thing)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


@contextlib.contextmanager
def _address_only(url: str) -> Iterator[None]:
    """Ray's JobSubmissionClient contacts RAY_API_SERVER_ADDRESS or RAY_ADDRESS when set,
    whatever address it is given: unset them while it resolves `url`, so the cluster the
    user named is the one contacted (and the one mlm reports)."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_OVERRIDES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None = None):
    import logging

    from ray.job_submission import JobSubmissionClient

    url = address_of(address)
    # without a token Ray warns before the request fails; the refusal below says what to set
    logging.getLogger("ray._private.authentication.http_token_authentication").setLevel(logging.ERROR)
    try:
        with _address_only(url):
            return JobSubmissionClient(url)
    except Exception as e:  # connection refused, 401/403, not a Ray dashboard
        raise JobsError(f"cannot use the Ray job API at {url}: {_short(e)}{_auth_hint(e)}") from None


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _auth_hint(e: Exception) -> str:
    text = str(e)
    if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "authentication")):
        return " (the cluster requires its token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
    return ""


def runtime_env(working_dir: str | None, env: dict[str, str], tracking_uri: str | None = None) -> dict[str, Any]:
    import mlm

    package = Path(mlm.__file__).resolve().parent
    renv: dict[str, Any] = {"env_vars": {}}
    if working_dir:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise JobsError(f"--working-dir {working_dir} is not a directory")
        renv["working_dir"] = str(wd)
        renv["excludes"] = list(EXCLUDES)
        if not (wd / "mlm" / "__init__.py").is_file():
            renv["py_modules"] = [str(package)]
    else:
        renv["py_modules"] = [str(package)]
    if tracking_uri:
        renv["env_vars"]["MLFLOW_TRACKING_URI"] = tracking_uri
    renv["env_vars"] |= env
    renv["env_vars"].setdefault("MLM_PROGRESS", "0")  # a job log is not a terminal
    return renv


def entrypoint(command: str, args: list[str]) -> str:
    import shlex

    if command not in COMMANDS:
        raise JobsError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return shlex.join(["python", "-m", "mlm", *COMMANDS[command], *args])


def submit(command: str, args: list[str], *, address: str | None = None, working_dir: str | None = ".",
           env: dict[str, str] | None = None, submission_id: str | None = None,
           tracking_uri: str | None = None) -> dict[str, Any]:
    c = client(address)
    ep = entrypoint(command, list(args))
    renv = runtime_env(working_dir, env or {}, tracking_uri)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = c.submit_job(entrypoint=ep, submission_id=submission_id, runtime_env=renv,
                                  metadata={"mlm.command": command, "mlm.user": os.environ.get("USER", "")})
            break
        except Exception as e:
            # A node that has just started answers 500 until its job agent is up.
            if "No available agent" in str(e) and time.time() < deadline:
                time.sleep(2.0)
                continue
            raise JobsError(f"the cluster refused the job: {_short(e)}{_auth_hint(e)}") from None
    return {"submission_id": job_id, "entrypoint": ep, "address": address_of(address)}


def follow(job_id: str, address: str | None = None) -> Iterator[str]:
    """Yield the job's log as it is written, until the job ends."""
    import asyncio

    c = client(address)
    # tail_job_logs is an async generator; step it from this synchronous generator.
    loop = asyncio.new_event_loop()
    try:
        agen = c.tail_job_logs(job_id)
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                break
    except Exception as e:
        raise JobsError(f"cannot follow job {job_id}: {_short(e)}") from None
    finally:
        loop.close()


def status(job_id: str, address: str | None = None) -> str:
    return str(_call(lambda c: c.get_job_status(job_id), address, job_id).value)


def wait(job_id: str, address: str | None = None, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        s = status(job_id, address)
        if s in FINAL:
            return s
        if deadline is not None and time.time() > deadline:
            return s
        time.sleep(1.0)


def logs(job_id: str, address: str | None = None) -> str:
    return _call(lambda c: c.get_job_logs(job_id), address, job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(_call(lambda c: c.stop_job(job_id), address, job_id))


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    jobs = _call(lambda c: c.list_jobs(), address)
    rows = []
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        rows.append({
            # drivers connected with ray.init (not submitted) have only a job id
            "submission_id": j.submission_id or f"{j.job_id} (driver)",
            "status": str(j.status.value),
            "entrypoint": j.entrypoint,
            "start": _iso(j.start_time),
            "end": _iso(j.end_time),
            "message": j.message or "",
        })
    return rows


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ms / 1000)) if ms else None


def _call(fn, address: str | None, job_id: str | None = None):
    c = client(address)
    try:
        return fn(c)
    except Exception as e:
        text = str(e)
        if job_id and ("does not exist" in text or "404" in text or "not found" in text.lower()):
            raise JobsError(f"no job {job_id!r} on {address_of(address)}") from None
        raise JobsError(f"Ray job API at {address_of(address)}: {_short(e)}{_auth_hint(e)}") from None
