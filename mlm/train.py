"""The per-worker training loop and the train stage.

Read `train_loop_per_worker` top to bottom: build or resume the model -> choose the
micro-batch (`train.micro_batch_size: auto`) -> compile the objective and wrap it for DDP
-> stream the worker's micro-batches -> `mlm.step.train_step` (gradient accumulation,
clipping, AdamW; what `mlm bench train` times too) -> log, validate, checkpoint.
Rank-0-only side effects (MLflow metrics and system metrics, the progress the driver
draws, checkpoint files) are marked with `is_rank0`. `train` checks the inputs and
launches the loop through `mlm.engine.fit`: on Ray Train's workers, or in this process
(`train.engine: local`); the loop asks its session (`mlm.engine`) for what differs.
"""

from __future__ import annotations

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

from mlm import engine, shards, storage
from mlm.compute import HostToDevice, batch_to_tensors, device_peak_flops, mfu, model_flops, prediction_slots, score
from mlm.config import Config, config_from_dict
from mlm.engine import CHECKPOINT_MODEL, Session
from mlm.step import StepResult, autocast_for, build_optimizer, dropout_seed, get_lr, objective, train_step

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
    """Where this training worker stands: its session (rank, world size, device, where
    checkpoints go: `mlm.engine`), and its run."""

    loop_config: dict[str, Any]
    cfg: Config
    session: Session
    micro_batch: int = 0  # train.micro_batch_size, or what `auto` chose (`_micro_batch`)

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world_size(self) -> int:
        return self.session.world_size

    @property
    def device(self):
        return self.session.device

    @property
    def is_rank0(self) -> bool:
        return self.session.is_rank0

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
    -> step, log, validate, checkpoint until max_steps (or early stopping). Runs on a Ray
    Train worker or, with `train.engine: local`, in the driver (`mlm.engine`)."""
    import torch

    w = _Worker(loop_config, config_from_dict(loop_config["config"]), engine.session(loop_config))
    torch.manual_seed(w.cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    raw_model, start_step, state = _model_and_position(w)
    raw_model.to(w.device)
    w.micro_batch = _micro_batch(w, raw_model, state)
    model = w.session.prepare_model(objective(raw_model, w.cfg.train, w.device))  # DDP on Ray Train
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
    checkpoint's when Ray Train restarts the run after a failure or a run is rerun with
    the same folder, else a new model (or the warm start's)."""
    from transformers import AutoModelForMaskedLM

    from mlm.model import build_model

    restored = engine.restore_checkpoint(w.session, AutoModelForMaskedLM)
    if restored:
        return restored
    c = w.loop_config
    return build_model(w.cfg.model, c["vocab_size"], c["pad_token_id"], c["cls_token_id"], c["sep_token_id"]), 0, None


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
    w.session.progress({"step": 0, "info": f"micro-batch auto: {size} (tried {fit.tried})"})
    return size


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
    w = _Worker(loop_config, cfg, engine.LocalSession(folder="", keep=1, device=torch.device(device)))
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
    writes files: weights (safetensors), optimizer state and position. The learning rate
    is a function of the step, dropout draws are seeded per step, and the data position
    is `micro_batches` of `micro_batch_size` per worker: nothing else is needed to
    continue exactly (a resumed `auto` micro-batch keeps the size it chose). Either
    engine commits the folder only once it is complete, so a checkpoint cut off while
    writing is never loaded."""
    state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
             "micro_batches": step * w.accumulation, "micro_batch_size": w.micro_batch}
    with engine.checkpoint_folder(w.session, raw_model, state) as folder:
        w.session.report({"step": step, "train_loss": loss, "epoch": epoch, "early_stopped": stop}, folder)


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
        self.resumed = False  # this process resumed the stage's MLflow run (a Ray Train worker)
        self.client = self._start_mlflow() if w.is_rank0 and w.loop_config.get("mlflow_run_id") else None
        if _compiled(w):
            w.session.progress({"step": 0, "info": "compiling the training step (torch.compile)"})

    def _reset(self) -> None:
        self.loss_sum, self.loss_count, self.dropped = 0.0, 0, 0
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.tokens, self.predictions, self.started = 0, 0, time.time()
        self.wait_mark = self.stream.wait_s

    def _start_mlflow(self):
        """The stage's run, resumed in this worker process with MLflow's system metrics
        (CPU, memory, GPU with pynvml) of rank 0's node, logged as system/... every 10 s.
        In the driver (the local engine) the run is open already: metrics only."""
        import mlflow

        if self.w.session.in_driver:
            return mlflow.MlflowClient(tracking_uri=self.w.loop_config["tracking_uri"])
        self.resumed = True

        mlflow.set_tracking_uri(self.w.loop_config["tracking_uri"])
        mlflow.set_system_metrics_sampling_interval(10)
        mlflow.set_system_metrics_node_id("rank0")
        with_psutil = importlib.util.find_spec("psutil") is not None  # MLflow's sampler needs it
        mlflow.start_run(run_id=self.w.loop_config["mlflow_run_id"], log_system_metrics=with_psutil)
        return mlflow.MlflowClient(tracking_uri=self.w.loop_config["tracking_uri"])

    def close(self) -> None:
        if self.client and self.resumed:
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
            if _compiled(self.w):
                self.w.session.progress({"step": 1, "info": f"compiled in {self.first_step_s:.0f} s"})
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
            self.w.session.progress({"step": step, "info": f"loss {metrics['train_loss']:.3f}, "
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
    """Train on a prepared dataset on Ray Train (or in this process: `train.engine:
    local`); returns a summary with the model directory (`out_dir/model`, HF layout with
    the tokenizer). `data_dir` and `out_dir` may be local folders or object-store URIs;
    the checkpoints go to `out_dir/ray` (local engine: `out_dir/checkpoints`; on a
    cluster: a URI every node reaches)."""
    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    manifest, tokenizer, cfg = _check_inputs(data_dir, cfg)
    storage.makedirs(out_dir)
    loop_config = _loop_config(data_dir, out_dir, manifest, tokenizer, cfg, mlflow_run_id)
    started = time.time()
    result = engine.fit(train_loop_per_worker, loop_config, out_dir, cfg, "train", cfg.train.max_steps)
    seconds = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = export_model(result.checkpoint, tokenizer, storage.join(out_dir, "model"))
    metrics = result.metrics
    steps = int(metrics.get("step", cfg.train.max_steps))
    tokens_seen = steps * cfg.train.global_batch_size * manifest.seq_len
    return {
        "model_dir": model_dir,
        "steps": steps,
        "final_train_loss": metrics.get("train_loss", math.nan),
        "seconds": round(seconds, 1),
        "approx_tokens_per_s": round(tokens_seen / max(seconds, 1e-9)),
        "checkpoint": result.checkpoint_uri,
    }


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
