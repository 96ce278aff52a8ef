"""The per-worker training loop and the TorchTrainer launch.

Read `train_loop_per_worker` top to bottom: build or resume the model -> choose the
micro-batch (`train.micro_batch_size: auto`) -> compile the objective and wrap it for DDP
-> stream the worker's micro-batches -> `mlm.step.train_step` (gradient accumulation,
clipping, AdamW; what `mlm bench train` times too) -> log, validate, checkpoint.
Rank-0-only side effects (MLflow metrics and system metrics, the progress the driver
draws, checkpoint files) are marked with `is_rank0`; `train` launches the workers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlm import shards, storage
from mlm.compute import HostToDevice, batch_to_tensors, device_peak_flops, mfu, model_flops, prediction_slots, score
from mlm.config import Config, config_from_dict
from mlm.step import StepResult, autocast_for, build_optimizer, dropout_seed, get_lr, objective, train_step

CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"


def save_checkpoint(dir_: Path, model, optimizer, step: int, epoch: int, micro_batches: int, micro_batch_size: int) -> None:
    """Weights (safetensors) + optimizer state + position. The learning rate is a
    function of the step, dropout draws are seeded per step, and the data position is
    `micro_batches` of `micro_batch_size` per worker: nothing else is needed to continue
    exactly (a resumed `auto` micro-batch keeps the size it chose). Ray Train
    moves the folder into storage only once it is complete, so a checkpoint cut off
    while writing is never reported, hence never loaded."""
    import torch

    model.save_pretrained(str(dir_ / CHECKPOINT_MODEL))  # safetensors (the only format in transformers 5)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "micro_batches": micro_batches,
                "micro_batch_size": micro_batch_size}, dir_ / CHECKPOINT_STATE)


def validate(model, loop_config: dict[str, Any], device, autocast) -> dict[str, float]:
    """Masked loss, accuracy and perplexity on the first validation batches (rank 0)."""
    cfg = config_from_dict(loop_config["config"])
    plan = shards.plan_batches(loop_config["validation_files"], cfg.eval.batch_size)[: cfg.train.validate_batches]
    c = score(model, shards.read_batches(plan), device=device, autocast=autocast)
    loss = c["loss_sum"] / max(1, c["n"])
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_top1_accuracy": c["top1"] / max(1, c["n"])}


def _collective(value: int, world_size: int, op: str) -> int:
    """`broadcast` rank 0's value, or the `min` over ranks, on every rank."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    if op == "broadcast":
        dist.broadcast(t, src=0)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _agree(flag: bool, world_size: int) -> bool:
    """Rank 0's decision, on every rank."""
    return bool(_collective(1 if flag else 0, world_size, "broadcast"))


# ---------------------------------------------------------------- the worker's loop


@dataclass
class _Worker:
    """Where this training worker stands: rank, world size, device, and its run."""

    loop_config: dict[str, Any]
    cfg: Config
    rank: int
    world_size: int
    device: Any
    micro_batch: int = 0  # train.micro_batch_size, or what `auto` chose (`_micro_batch`)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def accumulation(self) -> int:
        return self.cfg.train.global_batch_size // (self.micro_batch * self.world_size)

    @property
    def slots(self) -> int:
        """Prediction slots of one micro-batch: a fixed number when the step is compiled
        (`compute.prediction_slots`: one graph), else 0, the batch's own masked count."""
        if not _compiled(self):
            return 0
        return prediction_slots(self.micro_batch, self.loop_config["seq_len"], self.loop_config["slot_rate"])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Build or resume the model -> wrap it for DDP -> stream this worker's micro-batches
    -> step, log, validate, checkpoint until max_steps (or early stopping)."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    w = _Worker(loop_config, config_from_dict(loop_config["config"]), ctx.get_world_rank(), ctx.get_world_size(),
                ray.train.torch.get_device())
    torch.manual_seed(w.cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    raw_model, start_step, state = _model_and_position(w)
    raw_model.to(w.device)
    w.micro_batch = _micro_batch(w, raw_model, state)
    model = _distributed_objective(raw_model, w.cfg.train, w.device)
    optimizer = build_optimizer(raw_model, w.cfg.train, w.device)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    stream = _input_stream(w, start_step * w.accumulation)
    log = _StepLog(w, stream, model_flops(raw_model, loop_config["seq_len"]), device_peak_flops(w.device))
    try:
        _run_steps(w, raw_model, model, optimizer, stream, log, start_step)
    finally:
        stream.close()
        log.close()


def _model_and_position(w: _Worker):
    """(model, step to start from, the checkpoint's train state or None): the last
    checkpoint's when Ray Train restarts the run after a failure, else a new model (or
    the warm start's)."""
    from transformers import AutoModelForMaskedLM

    from mlm.model import build_model

    restored = restore_checkpoint(AutoModelForMaskedLM)
    if restored:
        return restored
    c = w.loop_config
    return build_model(w.cfg.model, c["vocab_size"], c["pad_token_id"], c["cls_token_id"], c["sep_token_id"]), 0, None


def restore_checkpoint(auto_class):
    """(model, step, train state) of the run's last Ray Train checkpoint (the model read
    with `auto_class`, the state with `weights_only=True`), or None when the run starts
    afresh. Pretraining and fine-tuning resume alike."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        model = auto_class.from_pretrained(os.path.join(d, CHECKPOINT_MODEL))
        state = torch.load(os.path.join(d, CHECKPOINT_STATE), weights_only=True, map_location="cpu")
    return model, state["step"], state


def _micro_batch(w: _Worker, raw_model, state) -> int:
    """The micro-batch of this run: the configured size, the checkpoint's (a resumed run
    reads on exactly where it stopped), or `auto`'s choice (`mlm.step.fit_micro_batch`;
    the smallest of the ranks' when they differ), reported to the driver's progress line."""
    tc = w.cfg.train
    if state and state.get("micro_batch_size"):
        return int(state["micro_batch_size"])
    if tc.micro_batch_size != "auto":
        return int(tc.micro_batch_size)
    from mlm.step import fit_micro_batch

    fit = fit_micro_batch(raw_model, w.device, w.loop_config["seq_len"], w.loop_config["slot_rate"],
                          tc.global_batch_size // w.world_size, limit_gb=tc.memory_limit_gb)
    size = _collective(fit.size, w.world_size, "min")
    sink = w.loop_config.get("progress") if w.is_rank0 else None
    if sink is not None:
        sink.put.remote({"step": 0, "info": f"micro-batch auto: {size} (tried {fit.tried})"})
    return size


def _distributed_objective(raw_model, tc, device):
    """The masked-LM objective (encoder + sparse head on fixed slots), compiled when
    `train.compile` says so (auto: on GPUs) before Ray Train wraps it for DDP (gloo on
    CPU, NCCL on GPU, or `train.backend`) so gradients sync through it."""
    import ray.train.torch

    return ray.train.torch.prepare_model(objective(raw_model, tc, device))


def _input_stream(w: _Worker, first: int):
    """This worker's micro-batches as tensors, from global micro-batch number `first` on,
    epoch after epoch, read ahead in a background thread: (epoch, inputs) items."""
    from mlm.loader import EpochPlan, Prefetcher, RowGroup, worker_batches
    from mlm.masking import Masker

    tc, spec = w.cfg.train, w.loop_config.get("dynamic_masking")
    masker = Masker(spec) if spec else None
    groups = [RowGroup(**g) for g in w.loop_config["row_groups"]]
    shuffle = w.loop_config.get("packing", "pack") == "pack"  # length-binned (padded) data keeps its bins
    per_epoch = EpochPlan(groups, tc.seed, 0, w.micro_batch, w.world_size, shuffle,
                          tc.shuffle_window).micro_batches_per_worker
    if per_epoch == 0:
        raise RuntimeError(f"the training split is smaller than the micro-batch ({w.micro_batch}) x train.num_workers")
    copy, slots = HostToDevice(w.device), w.slots  # pinned, non-blocking, on a side stream on GPUs

    def micro_batches():
        # the position alone decides what comes next
        epoch, offset = divmod(first, per_epoch)
        while True:
            plan = EpochPlan(groups, tc.seed, epoch, w.micro_batch, w.world_size, shuffle, tc.shuffle_window)
            for table in worker_batches(plan, w.rank, offset):
                yield epoch, table
            epoch, offset = epoch + 1, 0

    def to_inputs(item):
        epoch, table = item
        return epoch, batch_to_tensors(table, w.device, masker, masker.spec["seed"] if masker else 0, epoch,
                                       slots=slots, copy=copy)

    return Prefetcher(micro_batches(), to_inputs, depth=tc.prefetch_batches)


def _steps(stream, accumulation: int):
    """(epoch of the step's last micro-batch, the step's micro-batches), step by step."""
    batch: list = []
    for epoch, inputs in stream:
        batch.append(inputs)
        if len(batch) == accumulation:
            yield epoch, batch
            batch = []


def _training_steps(w: _Worker, model, optimizer, stream, step: int):
    """The loop's core: the learning rate of the step, `train_step` with the step's
    dropout seeds, up to max_steps; yields (step done, epoch, lr, result)."""
    tc = w.cfg.train
    autocast = autocast_for(w.device)
    model.train()
    for epoch, micro_batches in _steps(stream, w.accumulation):
        lr = get_lr(step, tc)
        result = train_step(model, optimizer, micro_batches, lr=lr, grad_clip=tc.grad_clip, autocast=autocast,
                            dropout_seed=functools.partial(dropout_seed, tc.seed, step, w.rank))
        step += 1
        yield step, epoch, lr, result
        if step >= tc.max_steps:
            return


def _run_steps(w: _Worker, raw_model, model, optimizer, stream, log: "_StepLog", step: int) -> None:
    tc = w.cfg.train
    stopper = _EarlyStopping(tc.early_stopping_patience)
    for step, epoch, lr, result in _training_steps(w, model, optimizer, stream, step):
        log.add(result)
        if step % tc.log_every == 0 or step == tc.max_steps:
            log.emit(step, lr, result.grad_norm, epoch)
        stop = False
        if tc.validate_every and (step % tc.validate_every == 0 or step == tc.max_steps):
            stop = _validate_on_rank0(w, raw_model, log, stopper, step, autocast_for(w.device))
            model.train()
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop:
            _report(w, raw_model, optimizer, step, epoch, float(result.losses[-1]), stop)
        if stop:
            break


def train_in_process(loop_config: dict[str, Any], device="cpu"):
    """One worker's training in this process, without Ray Train (no DDP, logging,
    validation or checkpoints): the loop's own model, data stream, schedule and
    `train_step`, as one worker of `train` runs them. What `mlm bench quality` trains.
    Returns (model, tokens trained on)."""
    import torch

    from mlm.model import build_model
    from mlm.progress import Progress

    cfg = config_from_dict(loop_config["config"])
    w = _Worker(loop_config, cfg, 0, 1, torch.device(device))
    torch.manual_seed(cfg.train.seed)
    c = loop_config
    raw_model = build_model(cfg.model, c["vocab_size"], c["pad_token_id"], c["cls_token_id"], c["sep_token_id"]).to(w.device)
    w.micro_batch = _micro_batch(w, raw_model, None)
    net = objective(raw_model, cfg.train, w.device)
    optimizer = build_optimizer(raw_model, cfg.train, w.device)
    stream, tokens = _input_stream(w, 0), 0
    try:
        with Progress("train", total=cfg.train.max_steps, unit="steps") as line:
            for step, _epoch, _lr, result in _training_steps(w, net, optimizer, stream, 0):
                tokens += result.tokens
                info = f"loss {float(result.losses.mean()):.3f}" if step % cfg.train.log_every == 0 else None
                line.update(1, info)
    finally:
        stream.close()
    return raw_model, tokens


class _EarlyStopping:
    """Stop after `patience` validations without a new best loss (0: never)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.without_gain = patience, math.inf, 0

    def update(self, val_loss: float) -> bool:
        improved = val_loss < self.best - 1e-6
        self.best, self.without_gain = (val_loss, 0) if improved else (self.best, self.without_gain + 1)
        return bool(self.patience) and self.without_gain >= self.patience


def _validate_on_rank0(w: _Worker, raw_model, log: "_StepLog", stopper: _EarlyStopping, step: int, autocast) -> bool:
    """Rank 0 validates and decides on early stopping; every rank returns its decision."""
    stop = False
    if w.is_rank0:
        val = validate(raw_model, w.loop_config, w.device, autocast)
        log.record(val, step)
        stop = stopper.update(val["val_loss"])
    return _agree(stop, w.world_size)  # every rank stops at the same step


def _report(w: _Worker, raw_model, optimizer, step: int, epoch: int, loss: float, stop: bool) -> None:
    """A checkpoint: every rank reports (Ray Train V2 needs equal calls); only rank 0
    writes files."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.is_rank0:
            save_checkpoint(Path(tmp), raw_model, optimizer, step, epoch, step * w.accumulation, w.micro_batch)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, "train_loss": loss, "epoch": epoch, "early_stopped": stop}, checkpoint=ckpt)


class _StepLog:
    """The training metrics of a window of `log_every` steps (loss, learning rate, grad
    norm, tokens/s, data-wait share, MFU, dropped predictions), and rank 0's sinks: the
    MLflow run (with the node's system metrics), a JSON-lines file in the run folder when
    this node can write there, and the progress line on stderr. Losses are summed on the
    device and read only when a window is logged. The first step of a worker (compiling,
    warming up) is timed on its own (`first_step_seconds`) and left out of tokens/s."""

    def __init__(self, w: _Worker, stream, flops, peak: float | None):
        self.w, self.stream, self.flops, self.peak = w, stream, flops, peak
        self.started_at, self.first_step_s = time.time(), None
        self._reset()
        self.client = self._start_mlflow() if w.is_rank0 and w.loop_config.get("mlflow_run_id") else None
        self.sink = w.loop_config.get("progress") if w.is_rank0 else None  # the driver's progress line
        if self.sink is not None and _compiled(w):
            self.sink.put.remote({"step": 0, "info": "compiling the training step (torch.compile)"})

    def _reset(self) -> None:
        self.loss_sum, self.loss_count, self.dropped = 0.0, 0, 0
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.tokens, self.predictions, self.started = 0, 0, time.time()
        self.wait_mark = self.stream.wait_s

    def _start_mlflow(self):
        """The stage's run, resumed in this process with MLflow's system metrics (CPU,
        memory, GPU with pynvml) of rank 0's node, logged as system/... every 10 s."""
        import mlflow

        mlflow.set_tracking_uri(self.w.loop_config["tracking_uri"])
        mlflow.set_system_metrics_sampling_interval(10)
        mlflow.set_system_metrics_node_id("rank0")
        with_psutil = importlib.util.find_spec("psutil") is not None  # MLflow's sampler needs it
        mlflow.start_run(run_id=self.w.loop_config["mlflow_run_id"], log_system_metrics=with_psutil)
        return mlflow.MlflowClient(tracking_uri=self.w.loop_config["tracking_uri"])

    def close(self) -> None:
        if self.client:
            import mlflow

            mlflow.end_run()  # stops the system-metrics thread; the driver ends the run again, as finished

    def add(self, result: StepResult) -> None:
        self.loss_sum = result.losses.sum() + self.loss_sum  # on the device: no wait here
        self.loss_count += len(result.losses)
        self.tokens += result.tokens
        self.predictions += result.predictions
        self.dropped += result.dropped
        if self.first_step_s is None:
            float(result.losses[-1])  # waits for the first step: its time is compile + warm-up
            self.first_step_s = time.time() - self.started_at
            if self.sink is not None and _compiled(self.w):
                self.sink.put.remote({"step": 1, "info": f"compiled in {self.first_step_s:.0f} s"})
            if self.w.cfg.train.log_every > 1:
                self._restart_clock()

    def emit(self, step: int, lr: float, grad_norm, epoch: int) -> None:
        world = self.w.world_size
        elapsed = max(time.time() - self.started, 1e-9)
        tokens_per_s = self.tokens * world / elapsed  # equal batches on every rank
        metrics = {
            "train_loss": float(self.loss_sum) / max(1, self.loss_count),
            "learning_rate": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "data_wait_fraction": (self.stream.wait_s - self.wait_mark) / elapsed,
            "epoch": epoch,
            "dropped_predictions": self.dropped,
            "micro_batch_size": self.w.micro_batch,
            "first_step_seconds": self.first_step_s,
        }
        utilization = mfu(self.flops.of(self.tokens, self.predictions) / elapsed, self.peak)
        if utilization is not None:
            metrics["mfu"] = utilization
        if self.w.is_rank0:
            if self.sink is not None:  # fire and forget: the driver draws the line
                self.sink.put.remote({"step": step, "info": f"loss {metrics['train_loss']:.3f}, "
                                      f"{tokens_per_s:,.0f} tok/s, data-wait {metrics['data_wait_fraction']:.0%}"})
            self.record(metrics, step)
        self._reset()

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0's metrics: to MLflow, and as JSON lines in the run folder when this
        node can write there (always on one machine; on a cluster when it is shared)."""
        import json

        if self.client:
            _log_metrics(self.client, self.w.loop_config["mlflow_run_id"], metrics, step)
        path = self.w.loop_config.get("log_file")
        if path and os.path.isdir(os.path.dirname(path)):
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def _compiled(w: _Worker) -> bool:
    from mlm.step import compile_enabled

    return compile_enabled(w.cfg.train, w.device)


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def dynamic_masker_spec(manifest: shards.Manifest, tokenizer) -> dict[str, Any] | None:
    """The masker a dynamic-masking dataset asks for: its settings, the tokenizer's tables."""
    from mlm.prepare import masker_spec

    settings = manifest.masking["train"]
    if settings.get("mode") != "dynamic":
        return None
    return masker_spec(tokenizer, settings, []) | {"term_ids": settings.get("term_ids", [])}


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


def slot_rate(masking: dict[str, Any]) -> float:
    """The masked share the prediction slots are sized for: the training masking rate
    (terms masking may go past it on rows dense in terms: twice the rate)."""
    rate = float(masking.get("rate", 0.15))
    return min(1.0, 2 * rate) if masking.get("strategy") == "terms" else rate


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Train on a prepared dataset with Ray Train; returns a summary with the model
    directory (`out_dir/model`, HF layout with the tokenizer). `data_dir` and `out_dir`
    may be local folders or object-store URIs; Ray Train's checkpoints go to
    `out_dir/ray` (on a cluster: a URI every node reaches)."""
    from mlm.runtime import ensure_ray

    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    manifest, tokenizer, cfg = _check_inputs(data_dir, cfg)
    storage.makedirs(out_dir)
    ensure_ray()
    loop_config = _loop_config(data_dir, out_dir, manifest, tokenizer, cfg, mlflow_run_id)
    started = time.time()
    with train_progress(cfg.train.max_steps) as sink, worker_errors_as_ours():
        result = torch_trainer(loop_config | {"progress": sink}, out_dir, cfg).fit()
    seconds = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = export_model(result.checkpoint, tokenizer, storage.join(out_dir, "model"))
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", cfg.train.max_steps))
    tokens_seen = steps * cfg.train.global_batch_size * manifest.seq_len
    scheme = out_dir.split("://", 1)[0] + "://" if storage.is_uri(out_dir) else ""
    return {
        "model_dir": model_dir,
        "steps": steps,
        "final_train_loss": metrics.get("train_loss", math.nan),
        "seconds": round(seconds, 1),
        "approx_tokens_per_s": round(tokens_seen / max(seconds, 1e-9)),
        "checkpoint": scheme + result.checkpoint.path,
    }


@contextlib.contextmanager
def worker_errors_as_ours():
    """A worker that failed on bad input (a corrupt shard page: `shards.DatasetError`)
    fails `train` with that error, not Ray Train's WorkerGroupError around it: the CLI
    then prints its one line, naming the shard, and exits 2."""
    from ray.train import TrainingFailedError

    try:
        yield
    except TrainingFailedError as e:
        for failure in (getattr(e, "worker_failures", None) or {}).values():
            cause = getattr(failure, "cause", None) or failure  # Ray's RayTaskError keeps the worker's exception
            if isinstance(cause, shards.DatasetError):
                raise shards.DatasetError(str(cause).strip().splitlines()[-1]) from e
        raise


def torch_trainer(loop_config: dict[str, Any], out_dir: str, cfg: Config, loop=None, name: str = "train"):
    """Ray Train's TorchTrainer running `loop` (default: pretraining's
    `train_loop_per_worker`; fine-tuning passes its own) on `train.num_workers` workers:
    the DDP backend, checkpoints (kept in `out_dir/ray/NAME`) and restarts after a
    failure. The process group's store and gloo listen on the node's own address,
    loopback on the embedded Ray (`mlm.process_group`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlm.process_group import BoundTorchConfig

    return TorchTrainer(
        loop or train_loop_per_worker,
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

    if not enabled():
        yield None
        return
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


def _check_inputs(data_dir: str, cfg: Config):
    """The manifest and tokenizer of a sound dataset that fits the model; a warm start's
    tokenizer checked against the data's. Returns (manifest, tokenizer, cfg)."""
    from mlm.tokenizer import fingerprint, load_tokenizer

    manifest = shards.Manifest.read(data_dir)
    # refuses a missing, truncated or swapped shard by name without reading its data (the
    # pages are checked as the workers read them; the full sha256 pass is `mlm data verify`)
    shards.checked_shards(data_dir, "train", manifest)
    if manifest.seq_len > cfg.model.max_position_embeddings:
        raise shards.DatasetError(
            f"the data's seq_len {manifest.seq_len} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}"
        )
    with storage.local_dir(storage.join(data_dir, manifest.tokenizer.dir)) as tok_dir:
        tokenizer = load_tokenizer(tok_dir)
    if cfg.model.init_from:
        from mlm.model import ModelError, resolve_model_dir

        init_dir = resolve_model_dir(cfg.model.init_from)  # fails here on an unknown model
        if fingerprint(load_tokenizer(init_dir)) != manifest.tokenizer.fingerprint:
            raise ModelError(f"model.init_from {cfg.model.init_from} has another tokenizer than the data; "
                             "prepare the data with its tokenizer (tokenizer.path)")
        if not (storage.is_uri(cfg.model.init_from) or cfg.model.init_from.startswith(("models:/", "runs:/"))):
            # A local folder exists on this node only; a URI each worker resolves on its own node.
            cfg = config_from_dict(cfg.to_dict() | {"model": cfg.to_dict()["model"] | {"init_from": init_dir}})
    return manifest, tokenizer, cfg


def _loop_config(data_dir: str, out_dir: str, manifest, tokenizer, cfg: Config, mlflow_run_id) -> dict[str, Any]:
    """What every worker needs: plain data and paths (local or URIs), no open files."""
    from mlm.loader import row_groups
    from mlm.runtime import tracking_uri

    return {
        "row_groups": [vars(g) for g in row_groups(shards.shard_paths(data_dir, "train", verify=False))],
        "validation_files": shards.checked_shards(data_dir, "validation", manifest),
        "seq_len": manifest.seq_len,
        # JSON lines of rank 0's metrics, when the run folder is local (MLflow has them too)
        "log_file": None if storage.is_uri(out_dir) else storage.join(out_dir, "train_log.jsonl"),
        "config": cfg.to_dict(),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri(),
        "packing": manifest.packing,
        "dynamic_masking": dynamic_masker_spec(manifest, tokenizer),
        "slot_rate": slot_rate(manifest.masking["train"]),
    }


def export_model(checkpoint, tokenizer, model_dir: str) -> str:
    """The final checkpoint's weights + the tokenizer (its `model_max_length` the
    model's positions: `mlm.model.fit_tokenizer`), committed to `model_dir` (local:
    renamed into place; URI: uploaded with config.json last)."""
    from transformers import AutoConfig

    from mlm.model import fit_tokenizer

    with tempfile.TemporaryDirectory(prefix="mlm-export-") as tmp:
        local = os.path.join(tmp, "model")
        with checkpoint.as_directory() as d:
            shutil.copytree(os.path.join(d, CHECKPOINT_MODEL), local)
        fit_tokenizer(tokenizer, AutoConfig.from_pretrained(local)).save_pretrained(local)
        return storage.put_dir(local, model_dir, marker="config.json")
