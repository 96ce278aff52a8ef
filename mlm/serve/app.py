"""The Ray Serve application of `mlm serve`, how it starts, and how it stops.

One deployment (`Server`), the HTTP ingress itself: each replica loads the model once,
answers /v1/fill-mask, /v1/embed, /v1/classify, /v1/model, /healthz and /readyz
(`mlm.serve.api`), and batches the texts of concurrent requests into one forward
(`@serve.batch`: up to serve.max_batch_size texts, waiting at most serve.batch_wait_s).
The forward runs on one thread per replica (`model.ForwardThread`), so the event loop
keeps reading requests meanwhile; the batches that wait for it run together next (up to
serve.max_batch_size texts), so a busy replica computes large batches, not a queue of
small ones.

Following an alias: for models:/NAME@ALIAS each replica checks the registry every
serve.poll_s seconds; when the alias points elsewhere it loads that version beside the
current one (requests go on meanwhile), then switches with one assignment. A request
reads the current version once and keeps it to the end, so none fails or mixes versions
during a switch, and every answer names the version that computed it (`version`, and
the `X-Model-Version` header). The replicas need no driver for this: a RayService
follows the champion as `mlm serve` does.

Safe by default: the proxy binds serve.host (127.0.0.1); another address needs a token
(serve.token or $MLM_SERVE_TOKEN), which every endpoint but the health checks then
requires. What listens is checked after start with the machine's listening sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray import serve

from mlm.config import Config, load_config
from mlm.serve.api import HEALTH, ROUTES, Limits, check_token, error_body, parse, read_body, token_digest
from mlm.serve.model import TASKS, ForwardThread, Loaded, RequestError, ServeError, load, resolve_source

APP_NAME = "mlm"
DEPLOYMENT = "mlm-model"
TOKEN_ENV = "MLM_SERVE_TOKEN"
MAX_WAITING_BATCHES = 256
log = logging.getLogger("mlm.serve")


class Server:
    """One replica: the current model version, the alias follower, the batched compute."""

    def __init__(self, options: dict[str, Any]):
        import torch

        bind_replica_grpc_to_node_ip()
        torch.set_num_threads(options["threads"])
        self.options = options
        self.limits = Limits(**options["limits"])
        self.device = "cuda" if options["gpu"] else "cpu"  # a GPU replica sees the one Ray gave it
        self.current: Loaded = self._load(resolve_source(options["ref"]))
        self.forward = ForwardThread(options["max_batch_size"])
        self.batch.set_max_batch_size(options["max_batch_size"])
        self.batch.set_batch_wait_timeout_s(options["batch_wait_s"])
        self.stopped = threading.Event()
        self.follower = None
        if self.current.source.follows and options["poll_s"] > 0:
            self.follower = threading.Thread(target=self._follow, name="mlm-follow-alias", daemon=True)
            self.follower.start()

    def _load(self, source) -> Loaded:
        loaded = load(source, self.device)
        if self.options["task"] not in loaded.tasks:
            raise ServeError(f"{source.ref} is a {loaded.kind}; it answers {' and '.join(loaded.tasks)}, "
                             f"not {self.options['task']}")
        return loaded

    def _follow(self) -> None:
        """Check the alias every poll_s; load a new version beside the current one, then
        switch (one assignment: requests already running keep the version they read)."""
        ref = self.options["ref"]
        while not self.stopped.wait(self.options["poll_s"]):
            try:
                source = resolve_source(ref)
                if source.version != self.current.source.version:
                    old = self.current.source.version
                    self.current = self._load(source)
                    log.warning("%s moved: now serving v%s (was v%s)", ref, source.version, old)
            except Exception as e:  # noqa: BLE001 - the registry or a download failed: keep serving, retry
                log.warning("checking %s failed (still serving v%s): %s", ref, self.current.source.version, e)

    def __del__(self):
        stopped = getattr(self, "stopped", None)
        if stopped is not None:
            stopped.set()

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            status, body = await self._answer(request)
        except RequestError as e:
            status, body = e.status, error_body(e)
        except Exception as e:  # noqa: BLE001 - a bug answers 500; the replica lives on
            log.exception("request to %s failed", request.url.path)
            status, body = 500, {"error": {"status": 500, "message": f"internal error ({type(e).__name__})"}}
        headers = {"X-Model-Version": str(body["version"])} if body.get("version") else {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="mlm"'
        return JSONResponse(body, status_code=status, headers=headers)

    async def _answer(self, request) -> tuple[int, dict[str, Any]]:
        path = request.url.path.rstrip("/") or "/"
        method = request.method
        if path in HEALTH:
            _allow(method, "GET")
            loaded = self.current
            return 200, {"status": "ok" if path == "/healthz" else "ready", "version": loaded.source.version}
        check_token(request.headers.get("authorization"), self.options["token_sha256"])
        if path == "/v1/model":
            _allow(method, "GET")
            return 200, self.describe()
        task = ROUTES.get(path)
        if task is None:
            raise RequestError(404, f"no endpoint {path}; try {', '.join([*ROUTES, '/v1/model', *HEALTH])}")
        _allow(method, "POST")
        loaded = self.current  # this version answers the whole request
        if task not in loaded.tasks:
            raise RequestError(404, f"{path}: the served model is a {loaded.kind}; it answers "
                                    f"{', '.join('/v1/' + t for t in loaded.tasks)}")
        work = parse(task, await read_body(request, self.limits.max_body_bytes), self.limits)
        rows = []
        for i, text in enumerate(work.texts):
            try:
                rows.append(loaded.encode(text, task, self.limits.max_text_tokens))
            except RequestError as e:
                raise RequestError(e.status, f"texts[{i}]: {e.message}") from None
        answers = await asyncio.gather(*(self.batch((loaded, task, row, work.top_k)) for row in rows))
        failed = next((a for a in answers if isinstance(a, Exception)), None)
        if failed is not None:
            raise failed
        key = {"fill-mask": "results", "embed": "embeddings", "classify": "results"}[task]
        return 200, {"model": loaded.source.name, "version": loaded.source.version, key: answers}

    # Serve hands each batch over at once (up to MAX_WAITING_BATCHES of them wait at the
    # forward thread, which merges them): a batch does not wait for the one before. The
    # size and wait here are the config's defaults; __init__ sets the replica's own.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_WAITING_BATCHES)
    async def batch(self, items: list[tuple]) -> list[Any]:
        """Texts of concurrent requests -> one forward per (version, task), on the forward thread."""
        return await asyncio.wrap_future(self.forward.submit(items))

    def describe(self) -> dict[str, Any]:
        """/v1/model: what is served, which version, and whether it follows an alias."""
        loaded = self.current
        s = loaded.source
        return {"name": s.name, "version": s.version, "alias": s.alias, "data_fingerprint": s.data_fingerprint,
                "ref": s.ref, "uri": s.uri, "kind": loaded.kind, "task": self.options["task"],
                "endpoints": ["/v1/" + t for t in loaded.tasks], "labels": loaded.labels,
                "max_model_tokens": loaded.max_len, "following": self.follower is not None,
                "poll_s": self.options["poll_s"] if self.follower is not None else None,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded.loaded_at)),
                "replica": serve.get_replica_context().replica_id.unique_id,
                "limits": vars(self.limits), "token_required": self.options["token_sha256"] is not None}


def bind_replica_grpc_to_node_ip() -> None:
    """Ray Serve 2.60 starts a gRPC server in every replica (for calls between
    deployments) on [::]:0, every interface, whatever the proxy's host (added in
    ray-project/ray#59908; the same bind is discussed in ray-project/ray#64544). Its
    callers reach it at the replica's node IP, so bind it there: loopback on a local
    instance. Runs in the replica before Serve starts that server (after the user
    class is built)."""
    import ray
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "mlm_node_ip", None):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def on_node_ip(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    on_node_ip.mlm_node_ip = ip  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_node_ip


def _allow(method: str, expected: str) -> None:
    if method != expected:
        raise RequestError(405, f"use {expected}")


# ---------------------------------------------------------------- what to serve, how


@dataclass(frozen=True)
class Plan:
    """What `mlm serve` (or a Serve config) asks for, checked before anything starts."""

    ref: str
    task: str
    cfg: Config
    token: str | None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.cfg.serve.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def make_plan(ref: str | None, task: str, cfg: Config) -> Plan:
    """Default model: the champion of registry.model_name (classify: of the fine-tuned
    `<name>-classification`). The token: serve.token, else $MLM_SERVE_TOKEN; an address
    other than loopback without one is refused."""
    if task not in TASKS:
        raise ServeError(f"unknown task {task!r}; expected {', '.join(TASKS)}")
    if not ref:
        ref = f"models:/{cfg.registry.model_name}@champion"
        if task == "classify":
            from mlm.finetune.register import default_name

            ref = f"models:/{default_name(ref, cfg)}@champion"
    token = cfg.serve.token.get_secret_value() if cfg.serve.token else (os.environ.get(TOKEN_ENV) or None)
    plan = Plan(ref, task, cfg, token)
    if not plan.loopback and not token:
        raise ServeError(f"serve.host {cfg.serve.host} is not loopback: anyone on the network could call the "
                         f"model; set a token (${TOKEN_ENV} or serve.token), or keep serve.host=127.0.0.1")
    return plan


def gpu_replicas(cfg: Config) -> bool:
    """Replicas on GPUs: serve.use_gpu true, or auto and the Ray cluster has one."""
    import ray

    from mlm.compute import gpu_actors

    try:
        return gpu_actors(cfg.serve.use_gpu, ray.cluster_resources().get("GPU", 0), 1) > 0
    except RuntimeError as e:
        raise ServeError(str(e).replace("use_gpu", "serve.use_gpu")) from None


def replica_options(plan: Plan, gpu: bool) -> dict[str, Any]:
    """What each replica is built with: plain values (the token only as its digest)."""
    s = plan.cfg.serve
    return {"ref": plan.ref, "task": plan.task, "token_sha256": token_digest(plan.token), "gpu": gpu,
            "threads": max(1, int(s.cpus_per_replica)), "max_batch_size": s.max_batch_size,
            "batch_wait_s": s.batch_wait_s, "poll_s": s.poll_s,
            "limits": {"max_body_bytes": s.max_body_bytes, "max_texts": s.max_texts,
                       "max_text_tokens": s.max_text_tokens}}


def deployment_options(cfg: Config, gpu: bool) -> dict[str, Any]:
    s = cfg.serve
    scale = {"num_replicas": s.replicas} if s.replicas != "auto" else {"autoscaling_config": {
        "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests}}
    return {**scale, "max_ongoing_requests": s.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if gpu else 0}}


def serve_logging() -> dict[str, Any]:
    """Serve's own logs (controller, proxy, replicas) go to Ray's session folder; the
    per-request access log and INFO lines only with `mlm --verbose`."""
    from mlm.runtime import verbose

    loud = verbose()
    return {"log_level": "INFO" if loud else "WARNING", "enable_access_log": loud}


def application(plan: Plan, gpu: bool):
    return serve.deployment(Server, name=DEPLOYMENT).options(
        **deployment_options(plan.cfg, gpu), logging_config=serve_logging()).bind(replica_options(plan, gpu))


BUILD_ARGS = ("model", "task", "preset", "set")


def plan_from_args(args: dict[str, Any]) -> Plan:
    """A Serve config's `args` for `mlm.serve.app:build`: the options of `mlm serve`
    (`model`, `task`, `preset`, `set`: a list of KEY=VALUE)."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ServeError(f"unknown argument(s) {', '.join(unknown)}; expected {', '.join(BUILD_ARGS)}")
    sets = args.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ServeError("`set` must be a list of KEY=VALUE strings")
    return make_plan(args.get("model"), args.get("task", "fill-mask"), load_config(args.get("preset"), sets))


def build(args: dict[str, Any]):
    """The application builder of a Serve config file (KubeRay's RayService:
    `import_path: mlm.serve.app:build`, `args: {model, task, preset, set}`). The proxy's
    host and port are that file's `http_options`; serve.host must name the same host, so
    the token rule sees the real bind."""
    plan = plan_from_args(args)
    return application(plan, gpu_replicas(plan.cfg))


# ---------------------------------------------------------------- start, check, stop


SERVE_PROCESSES = ("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica", "ray::HAProxyManager")


def listeners(port: int | None = None) -> list[str]:
    """Listening TCP sockets of this machine, `ip:port`, sorted: every one on `port`, or
    (None) every one of the Serve processes (controller, proxies, replicas) of the Ray
    instance this process started."""
    import psutil

    found = set()
    serving = _serve_pids() if port is None else set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and (c.laddr.port == port if port is not None else c.pid in serving):
            found.add(f"{c.laddr.ip}:{c.laddr.port}")
    return sorted(found)


def serve_process(proc) -> str | None:
    """What a psutil process is to Serve: `ServeController`, `ProxyActor`,
    `ServeReplica...`, `HAProxyManager` or `haproxy` (the ingress); None: not Serve's
    (or gone)."""
    import psutil

    try:
        first = (proc.cmdline()[:1] or [""])[0]
    except psutil.Error:
        return None
    if first.startswith(SERVE_PROCESSES):
        return first.split(":")[2].strip()
    return "haproxy" if os.path.basename(first) == "haproxy" else None


def _serve_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if serve_process(p)}


def _open(addresses: list[str]) -> list[str]:
    return [a for a in addresses if not is_loopback(a.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:"))]


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another serve.port") from None


def _check_model(plan: Plan) -> dict[str, Any]:
    """Before Ray starts: the model exists and answers the task (its config only)."""
    from transformers import AutoConfig

    from mlm.model import resolve_model_dir
    from mlm.serve.model import model_kind, tasks_of

    source = resolve_source(plan.ref)
    kind = model_kind(AutoConfig.from_pretrained(resolve_model_dir(source.uri)))
    if plan.task not in tasks_of(kind):
        raise ServeError(f"{plan.ref} is a {kind}; it answers {' and '.join(tasks_of(kind))}, not {plan.task}")
    return {"name": source.name, "version": source.version, "alias": source.alias, "uri": source.uri,
            "data_fingerprint": source.data_fingerprint, "kind": kind}


def start(ref: str | None, task: str, cfg: Config) -> dict[str, Any]:
    """Deploy the application on the Ray cluster (RAY_ADDRESS, else a local instance on
    loopback) and check what listens; returns what is served where. Serve's proxy
    binds serve.host:serve.port; on a local instance a listener anywhere but the
    configured host (seen with psutil) stops it again."""
    from mlm.serve.ingress import running

    plan = make_plan(ref, task, cfg)
    model = _check_model(plan)
    host, port = cfg.serve.host, cfg.serve.port
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        _check_port(host, port)
    start_ray(cfg)
    quiet_serve()
    gpu = gpu_replicas(cfg)
    serve.start(http_options={"host": host, "port": port}, logging_config=serve_logging())
    serve.run(application(plan, gpu), name=APP_NAME, route_prefix="/", blocking=False, logging_config=serve_logging())
    bound = _wait_listeners(port, 60 if local else 0)
    open_ = _open(bound + listeners()) if plan.loopback else []
    if local and (not bound or open_):
        stop(shutdown=True)
        raise RuntimeError(f"Serve listens on {', '.join(open_ or bound) or 'nothing'} (port {port}), not on "
                           f"{host} only; stopped")
    return {"url": f"http://{host}:{port}", "task": task, "model": model, "endpoints": _endpoints(model["kind"]),
            "token_required": plan.token is not None, "listening": bound, "ingress": running(), "gpu": gpu,
            "replicas": cfg.serve.replicas, "max_batch_size": cfg.serve.max_batch_size,
            "batch_wait_s": cfg.serve.batch_wait_s, "follows_alias": model["alias"] is not None and cfg.serve.poll_s > 0}


def start_ray(cfg: Config) -> None:
    """Connect to RAY_ADDRESS, or start a local instance with serve.ingress's settings."""
    import ray

    from mlm.runtime import LOOPBACK, ensure_ray, work_dir
    from mlm.serve.ingress import local_env

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        ensure_ray()
    else:
        ensure_ray(env=local_env(cfg.serve.ingress, LOOPBACK, work_dir() / "serve"))


def _endpoints(kind: str) -> list[str]:
    from mlm.serve.model import tasks_of

    return [*("/v1/" + t for t in tasks_of(kind)), "/v1/model", *HEALTH]


def _wait_listeners(port: int, timeout_s: float) -> list[str]:
    deadline = time.time() + timeout_s
    while True:
        bound = listeners(port)
        if bound or time.time() >= deadline:
            return bound
        time.sleep(0.25)


def stop(shutdown: bool = False) -> None:
    """Delete the application (its replicas finish the requests they hold). `shutdown`:
    Serve too (controller, proxies), leaving a long-lived Ray cluster as it was (the
    tests' shared one); Ray then prints a notice of the controller's end on stdout, so
    `mlm serve` and `mlm bench serve` leave that to the end of their Ray instance."""
    serve.delete(APP_NAME)
    if shutdown:
        serve.shutdown()


def quiet_serve() -> None:
    """The driver's Serve messages (started, deploying, ready) only when verbose."""
    from mlm.runtime import verbose

    if not verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def run_until_stopped(ref: str | None, task: str, cfg: Config, ready: Callable[[dict[str, Any]], None]) -> None:
    """`mlm serve`: start, report (`ready`), serve until Ctrl-C or SIGTERM (`mlm jobs
    stop`, Kubernetes), then delete the application; a local Ray instance ends with
    this process, Serve with it."""
    import signal

    info = start(ref, task, cfg)

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        ready(info)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop()
