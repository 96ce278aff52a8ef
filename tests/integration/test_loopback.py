"""The embedded Ray instance (no RAY_ADDRESS) listens on loopback only, and so does
everything a pipeline run starts on it.

The test runs a short `mlm pipeline run` (prepare -> train with 2 workers ->
evaluate -> register; the CLI's own `main` in such a driver, on the embedded default
Ray, progress on as for a user) while a thread samples the listeners of its process
tree the whole time (GCS, raylet, dashboard, dashboard agent, runtime-env agent,
every worker and actor) and fails on any local address outside 127.0.0.0/8 and ::1:
training adds the workers' torch.distributed process group (rank 0's rendezvous store,
each worker's gloo listener), which must stay on loopback too.
The same run's output is the default run's as a user sees it: a short summary on
stdout, under 40 lines in all, every one of them mlm's (none of Ray's).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest
from conftest import MLM_LINE, nonblank

pytestmark = pytest.mark.integration

def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, how a dual-stack gRPC socket shows
    return addr.is_loopback


def test_is_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "::ffff:0.0.0.0", "192.0.2.2", "fe80::1%eth0")))


def test_loopback_interface_of_any_loopback_address():
    """gloo and NCCL are pinned to the interface that holds the node IP's network: the
    loopback one for every 127.x node IP (the two-node test cluster's 127.0.0.2/.3)."""
    import psutil

    from mlm.process_group import _interface_of

    lo = _interface_of("127.0.0.1")
    assert lo and any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[lo])
    assert _interface_of("127.0.0.3") == lo and _interface_of("::1") == lo
    assert _interface_of("203.0.113.7") is None  # TEST-NET-3: on no interface


PIPELINE_DRIVER = r"""
import json, os, socket, sys, threading, time

if os.environ.get("MLM_TEST_HOSTNAME"):  # in a UTS namespace of its own (see _lan_hostname)
    socket.sethostname(os.environ["MLM_TEST_HOSTNAME"])

import mlm.cli  # (the CLI's imports come first)
import ray      # imported before the run: Ray has read its environment by now
import psutil
from ray._private import ray_constants

me = psutil.Process()
seen, workers, samples = {}, set(), [0]


def name(proc):
    try:  # read anew each time: a prestarted worker takes its actor's name later
        return " ".join(proc.cmdline()).strip()[:160]
    except psutil.Error:
        return "?"


def sample():
    procs = {me.pid: me}
    for child in me.children(recursive=True):
        procs[child.pid] = child
    names = {pid: name(proc) for pid, proc in procs.items()}
    conns = [c for c in psutil.net_connections(kind="inet") if c.pid in procs]
    train = {pid for pid in procs if "RayTrainWorker" in names[pid]}
    workers.update(train)
    # the process group's sockets: a training worker's listener that another one is connected to
    peer_ports = {c.raddr.port for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.pid in train}
    for c in conns:
        if c.status != psutil.CONN_LISTEN:
            continue
        key = (c.pid, c.laddr.ip, c.laddr.port)
        entry = seen.setdefault(key, {"pid": c.pid, "ip": c.laddr.ip, "port": c.laddr.port, "process": "?",
                                      "process_group": False})
        if names[c.pid] != "?":
            entry["process"] = names[c.pid]
        if c.pid in train and c.laddr.port in peer_ports and any(
                p.pid in train and p.pid != c.pid and p.raddr and p.raddr.port == c.laddr.port
                for p in conns if p.status == psutil.CONN_ESTABLISHED):
            entry["process_group"] = True
    samples[0] += 1


stop = threading.Event()


def watch():
    while not stop.is_set():
        try:
            sample()
        except psutil.Error:
            pass  # a process ended mid-sample: the next sample sees the rest
        stop.wait(0.2)


thread = threading.Thread(target=watch, daemon=True)
thread.start()
corpus, sets, result_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.argv = ["mlm", "pipeline", "run", "--input", corpus, *[a for s in sets for a in ("--set", s)]]
mlm.cli.main()  # `mlm pipeline run ...`, its output the test reads
stop.set()
thread.join()
sample()  # after the run: what is still up

with open(result_file, "w") as f:
    json.dump({
        "listeners": list(seen.values()),
        "node_addresses": [n["NodeManagerAddress"] for n in ray.nodes()],  # the CLI leaves its Ray up
        "flag_after": ray_constants.ENABLE_RAY_CLUSTER,
        "env_after": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
        "train_workers": len(workers),
        "samples": samples[0],
        "hostname_address": socket.gethostbyname(socket.gethostname()),
    }, f)
ray.shutdown()
"""

PIPELINE_SETS = ["tokenizer.vocab_size=1000", "data.rows_per_shard=200", "train.num_workers=2",
                 "train.micro_batch_size=8", "train.global_batch_size=16", "train.max_steps=24",
                 "train.warmup_steps=2", "train.log_every=6", "train.checkpoint_every=12",
                 "train.validate_every=12", "train.validate_batches=1"]


def _assert_default_output(stdout: str, stderr: str) -> None:
    """The default `mlm pipeline run` as a user sees it: under 40 lines in all (blank
    ones count), a summary naming the registered version, no JSON (that is --json's), no
    traceback, and only mlm's lines: not Ray's token notice, not its core worker's actor
    warning."""
    printed = stdout.splitlines() + stderr.splitlines()
    assert len(printed) < 40, "\n".join(printed)
    assert any(line.startswith("registry  mlm-tiny v1 -> @") for line in nonblank(stdout)), stdout
    assert not any(line.lstrip().startswith("{") for line in nonblank(stdout))
    assert "Traceback" not in stderr
    assert all(MLM_LINE.match(line) for line in nonblank(stdout) + nonblank(stderr)), printed


def _lan_hostname(tmp_path) -> tuple[list[str], str | None]:
    """A command prefix that runs the driver in a mount and UTS namespace of its own where
    the machine's hostname resolves to a non-loopback address of this machine, as on most
    hosts (here it may resolve to 127.0.0.1, which would hide where gloo listens by
    default: the hostname's address). ([], None) where that cannot be set up."""
    import shlex
    import shutil
    import socket

    import psutil

    address = next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback), None)
    if address is None or shutil.which("unshare") is None:
        return [], None
    hosts = tmp_path / "hosts"
    with open("/etc/hosts") as f:
        hosts.write_text(f.read() + f"\n{address} mlm-lan-host\n")
    prefix = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
              f'mount --bind {shlex.quote(str(hosts))} /etc/hosts && exec "$@"', "sh"]
    check = subprocess.run([*prefix, "true"], capture_output=True)
    return (prefix, address) if check.returncode == 0 else ([], None)


def test_pipeline_run_listens_on_loopback_only(tmp_path):
    """prepare -> train (2 workers: DDP over gloo) -> evaluate -> register on the embedded
    Ray, every listener of every process sampled all along."""
    import random

    import pydoc_data.topics as topics

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[s : s + rng.randrange(30, 200)])
                                  for s in (rng.randrange(len(words) - 200) for _ in range(600))))
    prefix, address = _lan_hostname(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                        "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env.pop("MLM_LOG", None)
    env.update(MLM_HOME=str(tmp_path / "home"), MLM_PROGRESS="1")  # progress on, as for a user
    if address:
        env["MLM_TEST_HOSTNAME"] = "mlm-lan-host"
    result_file = tmp_path / "result.json"
    out = subprocess.run([*prefix, sys.executable, "-c", PIPELINE_DRIVER, str(corpus), json.dumps(PIPELINE_SETS),
                          str(result_file)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0 and result_file.exists(), (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    _assert_default_output(out.stdout, out.stderr)
    result = json.loads(result_file.read_text())
    listeners = result["listeners"]

    # not vacuous: the run trained with two workers (more when Ray Train started the group
    # anew: a placement group slow to come up on a loaded machine), and their process
    # group (rank 0's store, gloo's pairs) was seen listening; the hostname pointed away
    # from loopback, where gloo listens unless told otherwise
    assert result["train_workers"] >= 2, result
    names = " ".join(entry["process"] for entry in listeners)
    for kind in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "dashboard.py", "ray::"):
        assert kind in names, (kind, listeners)
    group = [e for e in listeners if e["process_group"]]
    assert len(group) >= 2, listeners
    if address:
        assert result["hostname_address"] == address, result

    exposed = [entry for entry in listeners if not _is_loopback(entry["ip"])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"  {e['ip']}:{e['port']}  pid {e['pid']}  {e['process']}" + ("  (process group)" if e["process_group"] else "")
        for e in exposed)
    assert all(_is_loopback(ip) for ip in result["node_addresses"]), result["node_addresses"]
    # the switch is not left on in the driver (a later RAY_ADDRESS connection or
    # `ray start` from this process must see Ray's defaults)
    assert result["flag_after"] is True and result["env_after"] is None, result
