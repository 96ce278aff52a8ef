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

from mlm import shards
from mlm.config import Config, config_from_dict

CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"


def get_lr(step: int, cfg) -> float:
    """Linear warmup to the peak, then linear decay to zero at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = max(0, cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.learning_rate * remaining


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


def _save_checkpoint(dir_: Path, model, optimizer, step: int, epoch: int) -> None:
    import torch

    model.save_pretrained(str(dir_ / CHECKPOINT_MODEL), safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch}, dir_ / CHECKPOINT_STATE)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import BertForMaskedLM

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
    start_step, start_epoch, opt_state = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = BertForMaskedLM.from_pretrained(os.path.join(d, CHECKPOINT_MODEL))
            state = torch.load(os.path.join(d, CHECKPOINT_STATE), weights_only=True, map_location="cpu")
        start_step, start_epoch, opt_state = state["step"], state["epoch"] + 1, state["optimizer"]
    else:
        model = build_model(cfg.model, loop_config["vocab_size"], loop_config["pad_token_id"])
    raw_model = model
    # DDP wraps the objective (encoder + sparse head), so gradients sync through it.
    model = ray.train.torch.prepare_model(masked_lm_objective(raw_model))  # gloo on CPU, NCCL on GPU
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

    accumulation = tc.global_batch_size // (tc.micro_batch_size * world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    masker = Masker(loop_config["dynamic_masking"]) if loop_config.get("dynamic_masking") else None
    # Length-binned (padded) data keeps its bins: rows are not shuffled across batches.
    shuffle_rows = tc.micro_batch_size * 16 if loop_config.get("packing", "pack") == "pack" else None
    shard = ray.train.get_dataset_shard("train")
    step, epoch, micro = start_step, start_epoch, 0
    window_tokens, window_start, loss_sum, loss_count = 0, time.time(), 0.0, 0
    run_start = time.time()
    model.train()
    while step < tc.max_steps:
        batches = shard.iter_batches(
            batch_size=tc.micro_batch_size, batch_format="pyarrow", drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_rows, local_shuffle_seed=tc.seed * 1000 + epoch * 10 + rank,
        )
        seen_in_epoch = 0
        for batch in batches:
            seen_in_epoch += 1
            inputs = batch_to_tensors(batch, device, masker, masker.spec["seed"] if masker else 0, epoch)
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
            lr = get_lr(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.time() - window_start
                metrics = {
                    "train_loss": loss_sum / max(1, loss_count),
                    "learning_rate": lr,
                    "grad_norm": float(grad_norm),
                    # every rank sees the same number of sequences; their lengths differ only slightly
                    "tokens_per_s": window_tokens * world_size / max(elapsed, 1e-9),
                    "epoch": epoch,
                }
                if is_rank0:
                    eta = (time.time() - run_start) / max(1, step - start_step) * (tc.max_steps - step)
                    print(
                        f"step {step}/{tc.max_steps} loss {metrics['train_loss']:.4f} lr {lr:.2e} "
                        f"tok/s {metrics['tokens_per_s']:,.0f} eta {eta:,.0f}s",
                        flush=True,
                    )
                    if mlflow_client:
                        _log_metrics(mlflow_client, loop_config["mlflow_run_id"], metrics, step)
                window_tokens, window_start, loss_sum, loss_count = 0, time.time(), 0.0, 0

            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                # Every rank reports (Ray Train V2 needs equal calls); only rank 0 writes files.
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if is_rank0:
                        _save_checkpoint(Path(tmp), raw_model, optimizer, step, epoch)
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report({"step": step, "train_loss": float(loss.detach()), "epoch": epoch}, checkpoint=ckpt)
            if step >= tc.max_steps:
                break
        if seen_in_epoch == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch: the training split is smaller than "
                f"train.micro_batch_size x train.num_workers"
            )
        epoch += 1


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
    """Training workers must not take every CPU: Ray Data's read and split tasks
    need one, or the data stream stalls behind the trainers (backpressure)."""
    import ray

    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    if cfg.train.use_gpu:
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1))
    return max(0.1, min(1.0, (total - 1) / cfg.train.num_workers))


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Train on a prepared dataset with Ray Train; returns a summary with the model
    directory (`out_dir/model`, HF layout with the tokenizer)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mlm.runtime import ensure_ray, quiet_ray_data, tracking_uri
    from mlm.tokenizer import load_tokenizer

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    manifest = shards.read_manifest(data_dir)
    train_files = shards.shard_paths(data_dir, "train", verify=True)  # refuses a corrupt shard by name
    if manifest["seq_len"] > cfg.model.max_position_embeddings:
        raise shards.DatasetError(
            f"the data's seq_len {manifest['seq_len']} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}"
        )
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    ensure_ray()
    quiet_ray_data()
    train_ds = ray.data.read_parquet(train_files)
    loop_config = {
        "config": cfg.to_dict(),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri(),
        "packing": manifest.get("packing", "pack"),
        "dynamic_masking": _dynamic_masker_spec(manifest, tokenizer),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker(cfg)},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(out_dir / "ray"),
            name="train",
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": train_ds},
    )
    started = time.time()
    result = trainer.fit()
    seconds = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    # The final checkpoint holds the weights; the driver assembles the model directory
    # (weights + tokenizer) where the user asked for it.
    model_dir = out_dir / "model"
    tmp = out_dir / f".model.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(os.path.join(d, CHECKPOINT_MODEL), tmp)
    tokenizer.save_pretrained(str(tmp))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", cfg.train.max_steps))
    tokens_seen = steps * cfg.train.global_batch_size * manifest["seq_len"]
    return {
        "model_dir": str(model_dir),
        "steps": steps,
        "final_train_loss": metrics.get("train_loss", math.nan),
        "seconds": round(seconds, 1),
        "approx_tokens_per_s": round(tokens_seen / max(seconds, 1e-9)),
        "checkpoint": result.checkpoint.path,
    }
