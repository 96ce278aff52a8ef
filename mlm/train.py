"""The per-worker training loop and the TorchTrainer launch.

Read `train_loop_per_worker` top to bottom: build model -> maybe resume -> loop over
the worker's data shard with gradient accumulation -> report checkpoints.
Rank-0-only side effects (MLflow metrics, the progress line, checkpoint files) are
marked with `is_rank0`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlm import shards, storage
from mlm.config import Config, config_from_dict

CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"


def get_lr(step: int, cfg) -> float:
    """Linear warmup to the peak, then `cfg.schedule`: linear or cosine decay to zero at
    max_steps, or warmup-stable-decay (flat, then linear to zero over the last
    `cfg.decay_fraction` of the steps)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        return cfg.learning_rate * (1.0 if progress < decay_start else (1.0 - progress) / max(cfg.decay_fraction, 1e-9))
    return cfg.learning_rate * (1.0 - progress)


# Dense bf16 peak FLOP/s per device, for model FLOPs utilization (no entry: no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def batch_to_tensors(batch, device, masker=None, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
    """A pyarrow batch of shard rows -> input_ids, attention_mask, labels tensors [B, L].

    With a `masker` (dynamic masking) the stored ids are unmasked and are masked here,
    per row, from (seed, epoch, row). Columns past the longest row are cut off: padded
    (length-binned) data then costs only what its rows hold."""
    import torch

    ids = shards.column_2d(batch, "input_ids")
    num_tokens = np.asarray(batch.column("num_tokens"))
    if masker is not None:
        ids, labels = masker.dynamic(ids, num_tokens, seed, epoch)
    else:
        labels = shards.column_2d(batch, "labels")
    longest = int(num_tokens.max()) if len(num_tokens) else ids.shape[1]
    ids, labels = ids[:, :longest], labels[:, :longest]
    attention = (np.arange(ids.shape[1])[None, :] < num_tokens[:, None]).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64)).to(device),
        "attention_mask": torch.from_numpy(attention).to(device),
        "labels": torch.from_numpy(labels.astype(np.int64)).to(device),
        "tokens": int(num_tokens.sum()),
    }


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(dir_: Path, model, optimizer, step: int, epoch: int, micro_batches: int) -> None:
    """Weights (safetensors) + optimizer state + position. The learning rate is a
    function of the step, dropout draws are seeded per step, and the data position is
    `micro_batches` per worker: nothing else is needed to continue exactly. Ray Train
    moves the folder into storage only once it is complete, so a checkpoint cut off
    while writing is never reported, hence never loaded."""
    import torch

    model.save_pretrained(str(dir_ / CHECKPOINT_MODEL))  # safetensors (the only format in transformers 5)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "micro_batches": micro_batches},
               dir_ / CHECKPOINT_STATE)


def validate(model, loop_config: dict[str, Any], device, autocast) -> dict[str, float]:
    """Masked loss, accuracy and perplexity on the first validation batches (rank 0)."""
    from mlm.evaluate import _read_batches, plan_batches, score

    cfg = config_from_dict(loop_config["config"])
    plan = plan_batches(loop_config["validation_files"], cfg.eval.batch_size)[: cfg.train.validate_batches]
    c = score(model, _read_batches(plan), device=device, autocast=autocast)
    loss = c["loss_sum"] / max(1, c["n"])
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_top1_accuracy": c["top1"] / max(1, c["n"])}


def _agree(flag: bool, world_size: int) -> bool:
    """Rank 0's decision, on every rank."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item())


def _record(loop_config: dict[str, Any], client, metrics: dict[str, float], step: int) -> None:
    """Rank 0's metrics: to MLflow, and as JSON lines in the run folder when this node
    can write there (always on one machine; on a cluster when it is shared storage)."""
    import json

    if client:
        _log_metrics(client, loop_config["mlflow_run_id"], metrics, step)
    path = loop_config.get("log_file")
    if path and os.path.isdir(os.path.dirname(path)):
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForMaskedLM

    from mlm.loader import EpochPlan, Prefetcher, RowGroup, worker_batches
    from mlm.masking import Masker
    from mlm.model import build_model, masked_lm_objective

    cfg: Config = config_from_dict(loop_config["config"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    # ---- model, optimizer, resume
    start_step, opt_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = AutoModelForMaskedLM.from_pretrained(os.path.join(d, CHECKPOINT_MODEL))
            state = torch.load(os.path.join(d, CHECKPOINT_STATE), weights_only=True, map_location="cpu")
        start_step, opt_state = state["step"], state["optimizer"]
    else:
        model = build_model(cfg.model, loop_config["vocab_size"], loop_config["pad_token_id"],
                            loop_config["cls_token_id"], loop_config["sep_token_id"])
    raw_model = model
    # DDP wraps the objective (encoder + sparse head), so gradients sync through it.
    objective = masked_lm_objective(raw_model)
    if tc.compile:  # fused kernels; the first steps pay for compilation
        objective = torch.compile(objective)
    model = ray.train.torch.prepare_model(objective)  # gloo on CPU, NCCL on GPU
    optimizer = torch.optim.AdamW(
        _param_groups(raw_model, tc.weight_decay), lr=tc.learning_rate, betas=(0.9, 0.98), eps=1e-6,
        fused=device.type == "cuda",
    )
    if opt_state:
        optimizer.load_state_dict(opt_state)

    # ---- metrics sink (rank 0 only)
    mlflow_client = None
    if is_rank0 and loop_config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=loop_config["tracking_uri"])
    system_metrics = None
    if mlflow_client and loop_config.get("system_metrics", True):
        # MLflow system metrics (CPU, memory, GPU with pynvml) of the node that runs rank 0,
        # logged to the train run as system/... every 10 s.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        system_metrics = SystemMetricsMonitor(loop_config["mlflow_run_id"], sampling_interval=10,
                                              resume_logging=start_step > 0, node_id="rank0",
                                              tracking_uri=loop_config["tracking_uri"])
        system_metrics.start()

    accumulation = tc.global_batch_size // (tc.micro_batch_size * world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    masker = Masker(loop_config["dynamic_masking"]) if loop_config.get("dynamic_masking") else None
    groups = [RowGroup(**g) for g in loop_config["row_groups"]]
    # Length-binned (padded) data keeps its bins: groups and rows are not shuffled.
    shuffle = loop_config.get("packing", "pack") == "pack"
    per_epoch = EpochPlan(groups, tc.seed, 0, tc.micro_batch_size, world_size).micro_batches_per_worker
    if per_epoch == 0:
        raise RuntimeError("the training split is smaller than train.micro_batch_size x train.num_workers")

    def micro_batches(first: int):
        """This worker's micro-batches from global number `first` on, epoch after epoch,
        as (epoch, pyarrow table); the position alone decides what comes next."""
        epoch, offset = divmod(first, per_epoch)
        while True:
            plan = EpochPlan(groups, tc.seed, epoch, tc.micro_batch_size, world_size, shuffle)
            for table in worker_batches(plan, rank, offset):
                yield epoch, table
            epoch, offset = epoch + 1, 0

    def to_inputs(item):
        epoch, table = item
        return epoch, batch_to_tensors(table, device, masker, masker.spec["seed"] if masker else 0, epoch)

    step = start_step
    stream = Prefetcher(micro_batches(step * accumulation), to_inputs, depth=tc.prefetch_batches)
    window_tokens, window_start, loss_sum, loss_count = 0, time.time(), 0.0, 0
    wait_mark, run_start = 0.0, time.time()
    flops_per_token, peak = loop_config.get("flops_per_token"), peak_flops(device)
    best_val, evals_without_gain = math.inf, 0
    model.train()
    micro = 0
    for epoch, inputs in stream:
        # Dropout draws from (seed, step, micro-batch, rank): no RNG state to checkpoint,
        # and a resumed run draws exactly what an uninterrupted one would have.
        torch.manual_seed(hash((tc.seed, step, micro, rank)) & 0x7FFFFFFF)
        micro += 1
        sync = micro % accumulation == 0
        # Gradients are all-reduced only on the last micro-batch of a step.
        with (model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()):
            with autocast:  # bf16 matmuls on GPU; the loss itself is computed in float32
                loss = model(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            (loss / accumulation).backward()
        loss_sum += float(loss.detach())
        loss_count += 1
        window_tokens += inputs["tokens"]
        if not sync:
            continue
        micro = 0
        lr = get_lr(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % tc.log_every == 0 or step == tc.max_steps:
            elapsed = time.time() - window_start
            tokens_per_s = window_tokens * world_size / max(elapsed, 1e-9)  # equal batches on every rank
            metrics = {
                "train_loss": loss_sum / max(1, loss_count),
                "learning_rate": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "data_wait_fraction": (stream.wait_s - wait_mark) / max(elapsed, 1e-9),
                "epoch": epoch,
            }
            if flops_per_token and peak:
                metrics["mfu"] = tokens_per_s / world_size * flops_per_token / peak
            if is_rank0:
                eta = (time.time() - run_start) / max(1, step - start_step) * (tc.max_steps - step)
                print(
                    f"step {step}/{tc.max_steps} loss {metrics['train_loss']:.4f} lr {lr:.2e} "
                    f"tok/s {tokens_per_s:,.0f} data-wait {metrics['data_wait_fraction']:.0%} eta {eta:,.0f}s",
                    flush=True,
                )
                _record(loop_config, mlflow_client, metrics, step)
            window_tokens, window_start, loss_sum, loss_count = 0, time.time(), 0.0, 0
            wait_mark = stream.wait_s

        stop = False
        if tc.validate_every and (step % tc.validate_every == 0 or step == tc.max_steps):
            val = validate(raw_model, loop_config, device, autocast) if is_rank0 else {}
            if is_rank0:
                _record(loop_config, mlflow_client, val, step)
                improved = val["val_loss"] < best_val - 1e-6
                best_val, evals_without_gain = (val["val_loss"], 0) if improved else (best_val, evals_without_gain + 1)
                stop = bool(tc.early_stopping_patience) and evals_without_gain >= tc.early_stopping_patience
            stop = _agree(stop, world_size)  # every rank stops at the same step
            model.train()

        if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop:
            # Every rank reports (Ray Train V2 needs equal calls); only rank 0 writes files.
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if is_rank0:
                    _save_checkpoint(Path(tmp), raw_model, optimizer, step, epoch, step * accumulation)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": step, "train_loss": float(loss.detach()), "epoch": epoch,
                                  "early_stopped": stop}, checkpoint=ckpt)
        if step >= tc.max_steps or stop:
            break
    stream.close()
    if system_metrics:
        system_metrics.finish()


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _dynamic_masker_spec(manifest: dict[str, Any], tokenizer) -> dict[str, Any] | None:
    """The masker a dynamic-masking dataset asks for: its settings, the tokenizer's tables."""
    from mlm.prepare import masker_spec

    settings = manifest["masking"]["train"]
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mlm.runtime import ensure_ray

    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    manifest, tokenizer, cfg = _check_inputs(data_dir, cfg)
    storage.makedirs(out_dir)
    ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(data_dir, out_dir, manifest, tokenizer, cfg, mlflow_run_id),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker(cfg)},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=storage.join(out_dir, "ray"),
            name="train",
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    started = time.time()
    result = trainer.fit()
    seconds = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = _export_model(result.checkpoint, tokenizer, storage.join(out_dir, "model"))
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", cfg.train.max_steps))
    tokens_seen = steps * cfg.train.global_batch_size * manifest["seq_len"]
    scheme = out_dir.split("://", 1)[0] + "://" if storage.is_uri(out_dir) else ""
    return {
        "model_dir": model_dir,
        "steps": steps,
        "final_train_loss": metrics.get("train_loss", math.nan),
        "seconds": round(seconds, 1),
        "approx_tokens_per_s": round(tokens_seen / max(seconds, 1e-9)),
        "checkpoint": scheme + result.checkpoint.path,
    }


def _check_inputs(data_dir: str, cfg: Config):
    """The manifest and tokenizer of a sound dataset that fits the model; a warm start's
    tokenizer checked against the data's. Returns (manifest, tokenizer, cfg)."""
    from mlm.tokenizer import fingerprint, load_tokenizer

    manifest = shards.read_manifest(data_dir)
    shards.shard_paths(data_dir, "train", verify=True)  # refuses a corrupt shard by name
    if manifest["seq_len"] > cfg.model.max_position_embeddings:
        raise shards.DatasetError(
            f"the data's seq_len {manifest['seq_len']} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}"
        )
    with storage.local_dir(storage.join(data_dir, manifest["tokenizer"]["dir"])) as tok_dir:
        tokenizer = load_tokenizer(tok_dir)
    if cfg.model.init_from:
        from mlm.model import ModelError, resolve_model_dir

        init_dir = resolve_model_dir(cfg.model.init_from)  # fails here on an unknown model
        if fingerprint(load_tokenizer(init_dir)) != manifest["tokenizer"]["fingerprint"]:
            raise ModelError(f"model.init_from {cfg.model.init_from} has another tokenizer than the data; "
                             "prepare the data with its tokenizer (tokenizer.path)")
        if not (storage.is_uri(cfg.model.init_from) or cfg.model.init_from.startswith(("models:/", "runs:/"))):
            # A local folder exists on this node only; a URI each worker resolves on its own node.
            cfg = config_from_dict(cfg.to_dict() | {"model": cfg.to_dict()["model"] | {"init_from": init_dir}})
    return manifest, tokenizer, cfg


def _loop_config(data_dir: str, out_dir: str, manifest, tokenizer, cfg: Config, mlflow_run_id) -> dict[str, Any]:
    """What every worker needs: plain data and paths (local or URIs), no open files."""
    from mlm.bench import flops_per_token
    from mlm.loader import row_groups
    from mlm.runtime import tracking_uri

    return {
        "row_groups": [vars(g) for g in row_groups(shards.shard_paths(data_dir, "train", verify=False))],
        "validation_files": shards.shard_paths(data_dir, "validation", verify=True),
        "flops_per_token": flops_per_token(cfg, len(tokenizer), manifest["seq_len"]),
        # JSON lines of rank 0's metrics, when the run folder is local (MLflow has them too)
        "log_file": None if storage.is_uri(out_dir) else storage.join(out_dir, "train_log.jsonl"),
        "config": cfg.to_dict(),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri(),
        "packing": manifest.get("packing", "pack"),
        "dynamic_masking": _dynamic_masker_spec(manifest, tokenizer),
    }


def _export_model(checkpoint, tokenizer, model_dir: str) -> str:
    """The final checkpoint's weights + the tokenizer, committed to `model_dir` (local:
    renamed into place; URI: uploaded with config.json last)."""
    with tempfile.TemporaryDirectory(prefix="mlm-export-") as tmp:
        local = os.path.join(tmp, "model")
        with checkpoint.as_directory() as d:
            shutil.copytree(os.path.join(d, CHECKPOINT_MODEL), local)
        tokenizer.save_pretrained(local)
        return storage.put_dir(local, model_dir, marker="config.json")
