"""Where a training loop runs: Ray Train's workers, or this process.

A loop (pretraining's `mlm.train.train_loop_per_worker`, fine-tuning's
`mlm.finetune.train.finetune_loop`) asks its `session(loop_config)` for what depends on
where it runs: rank, world size, device, the last checkpoint, the model wrapped for
gradient sync, `report` (metrics + a checkpoint folder), the driver's progress line.
`fit` launches it:

* `train.engine: ray` (default): Ray Train's TorchTrainer on `train.num_workers`
  workers (DDP over gloo, or NCCL on GPUs, the process group on the node's address:
  `mlm.process_group`), checkpoints in `OUT/ray/NAME/`, restarts after a failure
  (`train.max_failures`), a rerun with the same `OUT` resumes.
* `train.engine: local`: one worker in this process, no Ray (no cluster start, no
  worker processes): the same loop, logging, validation and checkpoints, committed to
  `OUT/checkpoints/NAME/checkpoint_<step>/` (local or URI, the state file last); a rerun
  with the same `OUT` resumes from the last one. `train.num_workers` is not used (the
  global batch is kept by accumulation), nor are restarts. For a laptop, a notebook,
  and the tests that do not test Ray Train itself.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mlm import storage
from mlm.config import Config, ConfigError

CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"
LOCAL_CHECKPOINTS = "checkpoints"


class Session:
    """The loop's view of where it runs (one per worker)."""

    rank: int
    world_size: int
    device: Any
    in_driver: bool  # this process is the driver (the local engine): its MLflow run is already open

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder with the run's last checkpoint, or None when it starts afresh."""
        raise NotImplementedError

    def prepare_model(self, model):
        """The model as the loop steps it (DDP-wrapped on Ray Train)."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Metrics and (rank 0) a checkpoint folder; every rank calls it equally often."""
        raise NotImplementedError

    def progress(self, state: dict[str, Any]) -> None:
        """The driver's progress line: {"step", "info"} (rank 0's only)."""
        raise NotImplementedError


class _RaySession(Session):
    in_driver = False

    def __init__(self, sink):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
        self.sink = sink  # the driver's _ProgressSink actor, or None

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        if not found:
            yield None
            return
        with found.as_directory() as d:
            yield d

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def progress(self, state: dict[str, Any]) -> None:
        if self.is_rank0 and self.sink is not None:
            self.sink.put.remote(state)  # fire and forget: the driver draws the line


class _LocalCheckpoint:
    """A committed checkpoint folder of the local engine (local path or URI)."""

    def __init__(self, path: str):
        self.path = path

    def as_directory(self) -> contextlib.AbstractContextManager[str]:
        return storage.local_dir(self.path)


@dataclass
class LocalSession(Session):
    """The one worker of the local engine: checkpoints under `folder`, the newest
    `keep` kept; `line` the progress line (or None)."""

    folder: str
    keep: int
    device: Any
    line: Any = None
    rank: int = 0
    world_size: int = 1
    in_driver: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    last: _LocalCheckpoint | None = None

    def _committed(self) -> list[str]:
        names = sorted(n for n in storage.list_names(self.folder) if n.startswith("checkpoint_"))
        return [n for n in names if storage.exists(storage.join(self.folder, n, CHECKPOINT_STATE))]

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        names = self._committed()
        if not names:
            yield None
            return
        with storage.local_dir(storage.join(self.folder, names[-1])) as d:
            yield d

    def prepare_model(self, model):
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.metrics = dict(metrics)
        if not checkpoint_dir:
            return
        dest = storage.join(self.folder, f"checkpoint_{int(metrics['step']):09d}")
        self.last = _LocalCheckpoint(storage.put_dir(checkpoint_dir, dest, marker=CHECKPOINT_STATE))
        for old in self._committed()[: -self.keep]:
            storage.delete(storage.join(self.folder, old))

    def progress(self, state: dict[str, Any]) -> None:
        if self.line is not None:
            self.line.set(state["step"], state["info"])


_local: LocalSession | None = None  # the local engine's session while `fit` runs its loop here


def session(loop_config: dict[str, Any]) -> Session:
    """The calling loop's session: the local engine's, else this Ray Train worker's."""
    return _local if _local is not None else _RaySession(loop_config.get("progress"))


def restore_checkpoint(s: Session, auto_class):
    """(model, step, train state) of the run's last checkpoint (the model read with
    `auto_class`, the state with `weights_only=True`), or None when the run starts
    afresh. Pretraining and fine-tuning resume alike, on either engine."""
    import torch

    with s.checkpoint() as d:
        if d is None:
            return None
        model = auto_class.from_pretrained(os.path.join(d, CHECKPOINT_MODEL))
        state = torch.load(os.path.join(d, CHECKPOINT_STATE), weights_only=True, map_location="cpu")
    return model, state["step"], state


@contextlib.contextmanager
def checkpoint_folder(s: Session, model, state: dict[str, Any]) -> Iterator[str | None]:
    """Rank 0: a temporary folder with the weights (safetensors) and the train state;
    other ranks: None. Either way the caller reports it, then it is removed."""
    import torch

    with tempfile.TemporaryDirectory(prefix="mlm-ckpt-") as tmp:
        if s.is_rank0:
            model.save_pretrained(os.path.join(tmp, CHECKPOINT_MODEL))  # safetensors (transformers 5's only format)
            torch.save(state, os.path.join(tmp, CHECKPOINT_STATE))
        yield tmp if s.is_rank0 else None


@dataclass
class Fitted:
    """What a finished run leaves: its last checkpoint (`as_directory()`), where it is,
    and the last metrics reported."""

    checkpoint: Any
    checkpoint_uri: str | None
    metrics: dict[str, Any]


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], out_dir: str, cfg: Config,
        name: str, total_steps: int) -> Fitted:
    """Run `loop` on the configured engine (`train.engine`); the progress line counts
    to `total_steps`."""
    if cfg.train.engine == "local":
        return _fit_local(loop, loop_config, out_dir, cfg, name, total_steps)
    with train_progress(total_steps) as sink, worker_errors_as_ours():
        result = torch_trainer(loop, loop_config | {"progress": sink}, out_dir, cfg, name).fit()
    ckpt = result.checkpoint
    scheme = out_dir.split("://", 1)[0] + "://" if storage.is_uri(out_dir) else ""
    return Fitted(ckpt, scheme + ckpt.path if ckpt else None, dict(result.metrics or {}))


def local_device(cfg: Config):
    """The local engine's device: the first GPU with `train.use_gpu`, else the CPU."""
    import torch

    if not cfg.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.use_gpu=true with train.engine=local needs a GPU on this machine; torch sees none")
    return torch.device("cuda", 0)


def _fit_local(loop, loop_config: dict[str, Any], out_dir: str, cfg: Config, name: str, total_steps: int) -> Fitted:
    global _local
    from mlm.progress import Progress, enabled

    folder = storage.join(out_dir, LOCAL_CHECKPOINTS, name)
    line = Progress("train", total=total_steps, unit="steps") if enabled() else None
    _local = LocalSession(folder=folder, keep=cfg.train.keep_checkpoints, device=local_device(cfg), line=line)
    failed = True
    try:
        loop(loop_config)
        failed = False
    finally:
        done, _local = _local, None
        if line is not None:
            line.close(failed=failed)
    return Fitted(done.last, done.last.path if done.last else None, done.metrics)


# ---------------------------------------------------------------- Ray Train


def cpus_per_worker(cfg: Config) -> float:
    """One CPU per worker, or an equal share when workers outnumber CPUs (each worker
    reads its own batches in a background thread: no separate data tasks to leave room for)."""
    import ray

    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    if cfg.train.use_gpu:
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1))
    return max(0.1, min(1.0, total / cfg.train.num_workers))


def backend(tc) -> str:
    """`train.backend`, auto: NCCL with GPUs, gloo on CPUs."""
    if tc.backend != "auto":
        return tc.backend
    return "nccl" if tc.use_gpu else "gloo"


@contextlib.contextmanager
def worker_errors_as_ours():
    """A worker that failed on bad input (a corrupt shard page: `shards.DatasetError`)
    fails the run with that error, not Ray Train's WorkerGroupError around it: the CLI
    then prints its one line, naming the shard, and exits 2."""
    from ray.train import TrainingFailedError

    from mlm import shards

    try:
        yield
    except TrainingFailedError as e:
        for failure in (getattr(e, "worker_failures", None) or {}).values():
            cause = getattr(failure, "cause", None) or failure  # Ray's RayTaskError keeps the worker's exception
            if isinstance(cause, shards.DatasetError):
                raise shards.DatasetError(str(cause).strip().splitlines()[-1]) from e
        raise


def torch_trainer(loop, loop_config: dict[str, Any], out_dir: str, cfg: Config, name: str):
    """Ray Train's TorchTrainer running `loop` on `train.num_workers` workers: the DDP
    backend, checkpoints (kept in `out_dir/ray/NAME`) and restarts after a failure. The
    process group's store and gloo listen on the node's own address, loopback on the
    embedded Ray (`mlm.process_group`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlm.process_group import BoundTorchConfig
    from mlm.runtime import ensure_ray

    ensure_ray()
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker(cfg)} | ({"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {}),
        ),
        torch_config=BoundTorchConfig(backend=backend(cfg.train)),
        run_config=RunConfig(
            storage_path=storage.join(out_dir, "ray"),
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


class _ProgressSink:
    """Ray actor (no CPU): rank 0 puts its latest step there, the driver reads it."""

    def __init__(self):
        self.latest = None

    def put(self, state: dict) -> None:
        self.latest = state

    def get(self) -> dict | None:
        return self.latest


@contextlib.contextmanager
def train_progress(max_steps: int):
    """The train stage's progress line, drawn here from rank 0's steps (workers' output
    reaches the driver only when verbose); yields the sink to hand to the workers (None
    when progress is off)."""
    import threading

    import ray

    from mlm.progress import Progress, enabled
    from mlm.runtime import ensure_ray

    if not enabled():
        yield None
        return
    ensure_ray()
    sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
    line = Progress("train", total=max_steps, unit="steps")
    stop = threading.Event()

    def draw() -> None:
        state = ray.get(sink.get.remote(), timeout=30)
        if state:
            line.set(state["step"], state["info"])

    def poll() -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(Exception):  # a slow or restarting cluster: try again
                draw()

    thread = threading.Thread(target=poll, daemon=True, name="mlm-train-progress")
    thread.start()
    failed = True
    try:
        yield sink
        failed = False
    finally:
        stop.set()
        thread.join(timeout=60)
        with contextlib.suppress(Exception):
            draw()
        line.close(failed=failed)
        ray.kill(sink)
