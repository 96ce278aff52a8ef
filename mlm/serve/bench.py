"""`mlm bench serve`: a bounded load run against `mlm serve` and `mlflow models serve` of
the same registered model version, in one run, both on loopback on this machine.

Each concurrency level sends a fixed number of requests (one fill-mask text each, the
same texts in the same order to both servers) from that many client threads with
keep-alive connections, after an untimed warm-up; it records requests/s and the
p50/p95/p99 latency, and errors (non-200 answers), which it counts but never retries.
Our server runs one replica with every CPU of the machine (torch threads alike), as
the MLflow server's one worker uses them, behind the ingress `mlm serve` uses
(serve.ingress: HAProxy and direct ingress by default); the levels alternate between the two servers
so that a change in the machine's load hits both.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection, HTTPException
from typing import Any, Callable, Iterator

from mlm.config import Config
from mlm.serve.ingress import free_port
from mlm.serve.model import ServeError, resolve_source

TEMPLATES = [
    "the {m} statement returns a value from a function.",
    "a list is a mutable {m} of items.",
    "use a for loop to {m} over the items of a dictionary.",
    "the {m} module provides access to the operating system.",
    "exceptions are raised with the {m} statement and handled in a try block.",
    "strings are immutable sequences of unicode {m}.",
    "the interpreter reads the {m} file and executes it line by line.",
    "a class defines the {m} and the methods of its instances.",
]
READY_TIMEOUT_S = 300


def _hardware() -> dict[str, Any]:
    import mlflow
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "mlflow": mlflow.__version__, "date": time.strftime("%Y-%m-%d")}


def _model_info(uri: str) -> tuple[dict[str, Any], str]:
    """The model's shape (from its config) and its mask token."""
    from transformers import AutoConfig, AutoTokenizer

    from mlm.model import resolve_model_dir

    path = resolve_model_dir(uri)
    config = AutoConfig.from_pretrained(path)
    shape = {k: getattr(config, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                    "max_position_embeddings")}
    return shape, AutoTokenizer.from_pretrained(path).mask_token


def load_run(port: int, path: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` POSTs of `bodies` (in turn) from `concurrency` threads, one keep-alive
    connection each: requests/s over the whole run, latency percentiles, errors."""
    import numpy as np

    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=120)
        while (i := next(counter)) < requests:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
                answer = conn.getresponse()
                answer.read()
                problem = None if answer.status == 200 else f"HTTP {answer.status}"
            except (OSError, HTTPException) as e:
                problem = type(e).__name__
                conn.close()
                conn = HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - t0)
                if problem:
                    errors.append(problem)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    p50, p95, p99 = (float(x) * 1000 for x in np.percentile(latencies, [50, 95, 99]))
    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "error_kinds": sorted(set(errors)),
            "seconds": round(seconds, 3), "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2)}


@contextlib.contextmanager
def mlflow_server(uri: str, log_path: str) -> Iterator[int]:
    """`mlflow models serve` of `uri` on 127.0.0.1 (its own process group, the local
    environment: no network), until the block ends; yields the port."""
    from mlm.runtime import tracking_uri

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, "/ping", proc, log_path)
        yield port
    finally:
        _stop_group(proc)


def _wait_ready(port: int, path: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = open(log_path, encoding="utf-8", errors="replace").read()[-600:]
            raise RuntimeError(f"mlflow models serve exited ({proc.returncode}): {tail}")
        with contextlib.suppress(OSError, HTTPException):
            conn = HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve was not ready after {READY_TIMEOUT_S} s; see {log_path}")


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _our_config(cfg: Config, cpus: float) -> Config:
    """serve settings for the run: loopback, a free port, no token (nothing leaves this
    machine), one replica with `cpus`, the pinned version (nothing to follow)."""
    serve = cfg.serve.model_copy(update={"host": "127.0.0.1", "port": free_port(), "token": None, "replicas": 1,
                                         "cpus_per_replica": cpus, "poll_s": 0.0})
    return cfg.model_copy(update={"serve": serve})


def bench_serve(model_ref: str | None, cfg: Config, requests: int, levels: list[int], with_mlflow: bool = True,
                echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Both servers up, then each concurrency level against ours and MLflow's in turn."""
    import ray

    from mlm.runtime import work_dir
    from mlm.serve import app

    if os.environ.get("RAY_ADDRESS"):
        raise ServeError("mlm bench serve runs on this machine only (loopback): unset RAY_ADDRESS")
    source = resolve_source(model_ref or f"models:/{cfg.registry.model_name}@champion")
    if source.version is None:
        raise ServeError(f"mlm bench serve compares servers of a registered model; {source.ref} is not one")
    shape, mask = _model_info(source.uri)
    texts = [t.format(m=mask) for t in TEMPLATES]
    app.start_ray(cfg)
    cpus = float(max(1, min(os.cpu_count() or 1, int(ray.available_resources().get("CPU", 1)))))
    ours = _our_config(cfg, cpus)
    result = {"model": {"name": source.name, "version": source.version, "uri": source.uri, **shape},
              "hardware": _hardware(), "requests": requests, "concurrency": levels, "top_k": 1,
              "mlm": {"replicas": 1, "cpus": cpus, "max_batch_size": ours.serve.max_batch_size,
                      "batch_wait_s": ours.serve.batch_wait_s},
              "mlflow": {"workers": 1, "env_manager": "local"} if with_mlflow else None, "results": []}
    echo(f"bench serve: {source.name} v{source.version}, {requests} requests per level, concurrency {levels}")
    info = app.start(source.uri, "fill-mask", ours)
    try:
        with mlflow_server(source.uri, str(work_dir() / "bench-serve-mlflow.log")) if with_mlflow \
                else contextlib.nullcontext() as mlflow_port:
            targets = {"mlm": (ours.serve.port, "/v1/fill-mask", [json.dumps({"text": t, "top_k": 1}).encode()
                                                                   for t in texts])}
            if with_mlflow:
                targets["mlflow"] = (mlflow_port, "/invocations", [json.dumps({"inputs": [t]}).encode() for t in texts])
            result["listening"] = info["listening"]
            result["mlm"]["ingress"] = info["ingress"]
            result["results"] = _sweep(targets, requests, levels, echo)
    finally:
        app.stop()  # Serve itself ends with this process's Ray instance
    result["speedup"] = _speedups(result["results"])
    return result


def _sweep(targets: dict[str, tuple], requests: int, levels: list[int], echo) -> list[dict[str, Any]]:
    for port, path, bodies in targets.values():  # warm-up, untimed
        load_run(port, path, bodies, min(requests, 2 * max(levels)), max(levels))
    rows = []
    for level in levels:
        for server, (port, path, bodies) in targets.items():
            row = {"server": server, **load_run(port, path, bodies, requests, level)}
            echo(f"  {server:<6} concurrency {level:>3}: {row['requests_per_s']:>8.1f} requests/s, p50 "
                 f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['errors']} errors")
            rows.append(row)
    return rows


def _speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """ours / MLflow's requests/s per concurrency level."""
    by = {(r["server"], r["concurrency"]): r["requests_per_s"] for r in rows}
    return {str(c): round(by[("mlm", c)] / by[("mlflow", c)], 2) for (s, c) in by if s == "mlflow" and by[(s, c)]}


def format_report(r: dict[str, Any]) -> str:
    hw, m = r["hardware"], r["model"]
    lines = [f"mlm bench serve: {m['name']} v{m['version']} (hidden {m['hidden_size']}, {m['num_hidden_layers']} "
             f"layers, vocab {m['vocab_size']}), {r['requests']} fill-mask requests per level; {hw['cpu']}, "
             f"{hw['cpus']} CPUs, {hw['gpu'] or 'no GPU'}; {hw['date']}",
             f"{'server':<8}{'concurrency':>12}{'requests/s':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    for row in r["results"]:
        lines.append(f"{row['server']:<8}{row['concurrency']:>12}{row['requests_per_s']:>12.1f}{row['p50_ms']:>9.1f}"
                     f"{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8}")
    for level, x in r["speedup"].items():
        lines.append(f"concurrency {level}: mlm serve {x:.2f}x the requests/s of mlflow models serve")
    return "\n".join(lines)
