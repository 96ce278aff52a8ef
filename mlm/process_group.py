"""The training workers' torch.distributed process group, on the node's own address.

Ray Train's own set-up (`TorchConfig`) has rank 0 name a free port and every worker
call `init_process_group` with it. PyTorch's TCPStore, the rendezvous store rank 0 then
serves for the whole run, listens on the wildcard address whatever host it is given,
and gloo listens on the address the machine's hostname resolves to: on the embedded
default (local Ray on loopback, `mlm.runtime`) both were reachable from the network.
`BoundTorchConfig` sets the group up with PyTorch's public API instead:

* rank 0 binds a socket to its node IP (127.0.0.1 on the embedded instance), listens,
  and hands it to its TCPStore (`master_listen_fd`); every rank joins with
  `init_process_group(store=...)`. On a cluster the store listens on rank 0's node IP,
  where the other ranks reach it anyway.
* on a node whose IP is loopback (one machine), gloo and NCCL are pinned to the
  loopback interface (`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`, unless set); on other
  nodes they choose as PyTorch and NCCL do (an interface's address, not the wildcard).

The rest is Ray's: worker start-up and shutdown (process group destroyed, CUDA caches
emptied), restarts after a failure, CUDA_VISIBLE_DEVICES sharing, DDP through
`ray.train.torch.prepare_model`. Ray Train V2 (Ray's default) only: the environment
variables below come from the train context, which V2 sets up before `on_start`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray.train.torch.config
from ray.train.torch import TorchConfig

# Ray's torch backend (ray/train/torch/config.py), subclassed for its shutdown, CUDA
# device sharing and hooks; only its `on_start` is replaced. The one private Ray name
# the process group relies on (pyproject pins Ray's minor series for such names).
_RayTorchBackend = ray.train.torch.config._TorchBackend

_STORE = None  # rank 0's TCPStore: its server listens as long as this worker holds it


@dataclass
class BoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig (`backend`, `timeout_s`) whose process group listens on
    the node's own address (see the module's docstring)."""

    @property
    def backend_cls(self):
        return _BoundBackend


class _BoundBackend(_RayTorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        """Rank 0 serves the store on its node IP, then every rank joins through it."""
        import ray

        backend = backend_config.backend
        if backend is None:  # Ray's choice (TorchTrainer V2 has made it already)
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world_size, timeout_s = len(worker_group), backend_config.timeout_s
        address, port = worker_group.execute_single(0, serve_store, world_size, timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_group, backend, address, port, rank, world_size, timeout_s)
                 for rank in range(world_size)])


def serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: a TCPStore server listening on this node's IP only; its (address, port)."""
    global _STORE
    import ray
    from torch.distributed import TCPStore

    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.create_server((address, 0), family=family, backlog=socket.SOMAXCONN)
    port = sock.getsockname()[1]
    # detach: the store owns the socket from here on and closes it itself
    _STORE = TCPStore(address, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                      wait_for_workers=False, master_listen_fd=sock.detach())
    return address, port


def join_group(backend: str, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
    """On every rank: the default process group through rank 0's store (rank 0 uses the
    server it holds, the others connect to it)."""
    import torch.distributed as dist
    from torch.distributed import TCPStore

    _set_environment(backend, address, port, rank, world_size)
    timeout = timedelta(seconds=timeout_s)
    store = _STORE if rank == 0 else TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _set_environment(backend: str, address: str, port: int, rank: int, world_size: int) -> None:
    """The variables Ray's own set-up gives a worker (torch.distributed's, Accelerate's
    device), NCCL's error handling as Ray sets it, and the loopback interface for gloo
    and NCCL on a loopback node."""
    import ray
    import ray.train
    from ray.train.torch import get_device

    node_ip = ray.util.get_node_ip_address()
    if ipaddress.ip_address(node_ip).is_loopback:
        interface = _interface_of(node_ip)
        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "=" + interface)  # "=": this interface exactly
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # a timed-out collective fails the worker, not hangs
    ctx = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": address, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()), "ACCELERATE_TORCH_DEVICE": str(get_device()),
    })


def _interface_of(ip: str) -> str | None:
    """The network interface whose network holds `ip` (lo for any 127.x address), or
    None. psutil: Ray ships it (ray/thirdparty_files) and puts it on the path."""
    import psutil

    wanted = ipaddress.ip_address(ip)
    for name, addresses in psutil.net_if_addrs().items():
        for a in addresses:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                here = ipaddress.ip_interface(f"{a.address.split('%', 1)[0]}/{a.netmask}") if a.netmask else None
            except ValueError:  # an IPv6 netmask psutil writes as an address
                here = None
            if wanted == ipaddress.ip_address(a.address.split('%', 1)[0]) or (here and wanted in here.network):
                return name
    return None
