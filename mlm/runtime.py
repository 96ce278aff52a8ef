"""Embedded defaults: where work goes, which Ray cluster and which MLflow store.

Without configuration: a work folder `./mlm-work` (or $MLM_HOME), a local Ray instance
on loopback, and a SQLite MLflow store in the work folder (a file: no listener).
`RAY_ADDRESS` and `MLFLOW_TRACKING_URI` override the last two.

The local Ray instance (Ray 2.60, Linux) listens on 127.0.0.1 only, every listener:
GCS, raylet (node manager and object manager), the gRPC server of every core worker
(driver, task and actor workers, the agents), dashboard (HTTP and its metrics),
dashboard agent (HTTP, gRPC and the Prometheus metrics export), runtime-env agent and
the autoscaler monitor's metrics. Ray has no bind-address setting for these (only
the dashboard's `dashboard_host`): each binds loopback when the node's IP is a loopback
address and otherwise every interface (the C++ gRPC servers, the agents' gRPC and
metrics servers, the monitor's and dashboard's metrics) or the node's IP (the agents'
HTTP servers). So the node IP is made 127.0.0.1, which Ray keeps (instead of rewriting
it to the machine's routable IP) only while ray_constants.ENABLE_RAY_CLUSTER is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is first imported; see
`ensure_ray`). Such an instance is reachable from this machine only and takes no second
node: clusters are for RAY_ADDRESS, where nothing of this applies.
tests/integration/test_loopback.py lists the listening sockets to check all of this.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray's switch (despite its name, honoured on Linux too): "0" lets a local instance keep
# the loopback address as its node IP, and Ray's servers listen on loopback only then.
_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def work_dir() -> Path:
    path = Path(os.environ.get("MLM_HOME", "mlm-work")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir() / 'mlflow.db'}"


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_database_store(uri: str) -> bool:
    """A SQLAlchemy tracking store (`postgresql+psycopg2://...` included), not a server."""
    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


def redact_uri(uri: str) -> str:
    """The URI as it may be printed or logged: a password in it replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def artifact_root() -> str:
    """Artifact location for new experiments on the embedded store."""
    return (work_dir() / "mlartifacts").as_uri()


def verbose() -> bool:
    """`MLM_LOG=debug` (what `mlm --verbose` sets): Ray Data's per-operator progress and
    INFO logs, the workers' output and the libraries' progress bars are shown."""
    return os.environ.get("MLM_LOG", "").lower() == "debug"


def quiet_libraries() -> None:
    """Progress bars of transformers / huggingface_hub / MLflow downloads off, in this
    process and in the Ray workers it starts (they inherit the environment), unless
    verbose. Call before those libraries are imported."""
    if verbose():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level from it at import
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


LOCAL_ENV: dict[str, str] = {}  # what the local instance this process started was given
_ONE_MACHINE = False  # the Ray instance in use is on this machine's loopback (started here or joined)
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on (it is what mlm wants); its
    warning that authentication is off still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _quiet_token_notice() -> None:
    """Ray's "Token authentication is enabled for this Ray cluster" on every start, at
    its source (the logger that emits it), unless verbose."""
    token_logger = logging.getLogger(_TOKEN_LOGGER)
    ours = [f for f in token_logger.filters if isinstance(f, _TokenNotice)]
    if verbose():
        for f in ours:
            token_logger.removeFilter(f)
    elif not ours:
        token_logger.addFilter(_TokenNotice())


def map_on_actors(ds, fn, **kwargs):
    """`ds.map_batches(fn, compute=ActorPoolStrategy(...), **kwargs)` as the stages run
    their actor pools. On a Ray instance on this machine's loopback (started here, or a
    local cluster joined by RAY_ADDRESS), actors are not restarted (`max_restarts=0`,
    the switch Ray Data documents): a dead actor there means the machine is in trouble,
    and restartable actors whose constructor arguments sit in the object store make
    Ray's core worker print a warning on every run (ray-project/ray#53727). On a
    cluster, and when verbose, Ray Data's default (restart for ever) stays. Ray Data
    2.60 takes max_restarts only as a free remote argument, which it calls deprecated
    (removal announced for 2.64; ray is pinned to 2.60.x, test_conventions): that one
    warning is ignored here, for this call."""
    import warnings

    if not (_ONE_MACHINE and not verbose()):
        return ds.map_batches(fn, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, max_restarts=0)


def ensure_ray(dashboard: bool = True, env: dict[str, str] | None = None) -> None:
    """Connect to RAY_ADDRESS, or start a local instance bound to loopback. `dashboard`:
    whether a local instance runs the dashboard (its State API is what Ray Train relies
    on; `mlm prepare` alone does without). `env`: settings for a local instance's
    processes (`mlm serve`'s ingress), kept in `LOCAL_ENV`. Workers' output reaches this
    process only when verbose (`MLM_LOG=debug`); their logs stay in the session folder."""
    import ray

    if ray.is_initialized():
        return
    _quiet_token_notice()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _connect(address)
        return
    # Loopback (see the module's docstring). Ray reads the switch once, when ray is
    # imported (`mlm`, a caller or a test may have imported it long before), into
    # ray_constants.ENABLE_RAY_CLUSTER: so the module flag is turned off in this process
    # (the node IP that ray.init hands to GCS, raylet and this driver) and the variable
    # set for every process ray.init starts (each imports ray anew), for the duration of
    # ray.init only: later connections from this process to a RAY_ADDRESS cluster, and
    # `ray start` processes it launches, see Ray's defaults. `_node_ip_address` on its
    # own would not do: ray.init rewrites 127.0.0.1 to the routable IP unless the flag
    # is off.
    # Workers inherit the environment of the raylet that ray.init starts, so they find the
    # same stores. (A runtime_env with env_vars would do the same but keeps every
    # prestarted worker from being used: ~1.5 s more before the first task runs.) This
    # process keeps its own environment.
    env = env or {}
    global _ONE_MACHINE
    _ONE_MACHINE = True
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLM_HOME", _LOCAL_ONLY, *env)}
    os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri(), "MLM_HOME": str(work_dir()), _LOCAL_ONLY: "0", **env})
    LOCAL_ENV.clear()
    LOCAL_ENV.update(env)
    try:
        with _loopback_node():
            ray.init(
                address="local",
                _node_ip_address=LOOPBACK,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK,
                logging_level=logging.WARNING,
                log_to_driver=verbose(),
            )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:  # a Ray that moved the switch
        logging.getLogger(__name__).warning(
            "the local Ray instance runs on %s, not loopback: its services are reachable from the network", node_ip)


@contextlib.contextmanager
def _loopback_node():
    """Ray's switch that rewrites 127.0.0.1 to the machine's routable IP, off in this
    process for the block (a ray.init that starts or joins a cluster on 127.0.0.1)."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _is_local_instance_address(address: str) -> bool:
    """Is `host:port` (a GCS address, as RAY_ADDRESS gives it) 127.0.0.1 (or localhost),
    the address a local instance registers its node under? Other loopback addresses
    (127.0.0.2, as a multi-node test cluster uses) are not rewritten by Ray, which finds
    the driver's node by itself there."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address and "://" not in address else ""
    return host in ("localhost", LOOPBACK)


def _connect(address: str) -> None:
    """Join the cluster at RAY_ADDRESS. One bound to loopback (a local cluster, such as
    the one `ensure_ray` starts, whose raylet registered as 127.0.0.1) is joined as a
    loopback driver: with Ray's default this driver would call itself by the machine's
    routable IP, find no raylet there, and wait for ever."""
    import ray

    kwargs = {"address": address, "log_to_driver": verbose(), "logging_level": logging.WARNING}
    if not _is_local_instance_address(address):
        ray.init(**kwargs)
        return
    global _ONE_MACHINE
    with _loopback_node():
        ray.init(**kwargs, _node_ip_address=LOOPBACK)
    _ONE_MACHINE = True


def quiet_ray_data() -> None:
    """Ray Data as the stages use it: deterministic output order; its progress bars and
    its per-operator INFO lines on the console only when verbose (the stages draw their
    own progress line; Ray Data's log file in the session folder keeps everything)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output order
    loud = verbose()
    ctx.enable_progress_bars = loud
    ctx.print_on_execution_start = loud
    ctx.enable_auto_log_stats = loud
    data_logger = logging.getLogger("ray.data")
    consoles = [h for h in data_logger.handlers if h.get_name() == "console"]
    for handler in consoles:
        handler.setLevel(logging.INFO if loud else logging.WARNING)
        if not loud and not any(isinstance(f, _NotAsked) for f in handler.filters):
            handler.addFilter(_NotAsked())
    if not consoles and not loud:  # another logging config: the logger itself
        data_logger.setLevel(logging.WARNING)


class _NotAsked(logging.Filter):
    """Drops Ray Data's notice that its progress bars are off: we turned them off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")
