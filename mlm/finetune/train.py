"""Sequence classification on an encoder, with pretraining's machinery.

`finetune` reads and checks the labelled files, tokenizes them once with the model's
tokenizer (texts cut at `finetune.max_length`, default the model's positions), hands
them to the workers through Ray's object store (no shared disk needed) and runs
`finetune_loop` through `mlm.engine.fit`: on Ray Train (DDP over gloo or NCCL with the
process group on the node's address, `train.num_workers` workers, checkpoints in
`OUT/ray/finetune`, restarts after a failure), or in this process with `train.engine:
local` (checkpoints in `OUT/checkpoints/finetune`): AdamW (`mlm.step.build_optimizer`), the
one `mlm.step.train_step` with a classification `forward`, bf16 on GPU. The data order
is a function of (seed, epoch) and the position is the step, so a run restarted from a
checkpoint continues exactly. `train_classifier` runs the same steps in this process
without Ray Train (what the probe uses: two short runs, no cluster start-up).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np

from mlm import storage
from mlm.config import Config, config_from_dict
from mlm.finetune.data import Labelled, LabelledDataError, label_ids, read_labelled

EVAL_BATCH = 64


def encode(tokenizer, rows: Labelled, labels: dict[str, int], max_length: int) -> dict[str, Any]:
    """Token ids per text (cut at `max_length`, specials included) and label ids."""
    ids = tokenizer(rows.texts, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": [np.asarray(x, np.int32) for x in ids], "labels": np.asarray([labels[y] for y in rows.labels])}


def collate(data: dict[str, Any], rows: np.ndarray, pad_id: int, device) -> dict[str, Any]:
    """The rows as a padded batch on `device`: input_ids, attention_mask, labels, tokens."""
    import torch

    seqs = [data["input_ids"][i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    return {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device),
            "labels": torch.from_numpy(data["labels"][rows].astype(np.int64)).to(device),
            "tokens": int(mask.sum()), "copied": None}


def classify_forward(model, inputs: dict[str, Any]):
    """The fine-tuning loss of a micro-batch (`mlm.step.train_step`'s `forward`)."""
    from mlm.compute import classification_loss

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return classification_loss(logits, inputs["labels"])


def schedule(cfg: Config, rows: int) -> SimpleNamespace:
    """The run's shape and learning-rate schedule (`mlm.step.get_lr` reads it): steps per
    epoch (the last partial batch of an epoch left out), total steps, linear warmup then
    linear decay."""
    fc = cfg.finetune
    per_epoch = max(1, rows // fc.batch_size)
    total = per_epoch * fc.epochs
    return SimpleNamespace(per_epoch=per_epoch, max_steps=total, learning_rate=fc.learning_rate,
                           warmup_steps=int(fc.warmup_fraction * total), schedule="linear", decay_fraction=1.0)


def step_rows(cfg: Config, rows: int, step: int, rank: int, world: int) -> np.ndarray:
    """The training rows of worker `rank` at `step`: the epoch's seeded permutation, the
    step's slice of `finetune.batch_size`, this worker's equal share of it."""
    fc = cfg.finetune
    sched = schedule(cfg, rows)
    epoch, k = divmod(step, sched.per_epoch)
    order = np.random.default_rng([fc.seed & 0xFFFFFFFF, epoch, 0x66696E65]).permutation(rows)
    share = fc.batch_size // world
    start = k * fc.batch_size + rank * share
    return order[start : start + share]


def build(model_ref: str, names: list[str], seed: int):
    """A classifier on the encoder at `model_ref` (resolved on this node), a fresh head of
    len(names) classes with `id2label`/`label2id`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from mlm.model import resolve_model_dir

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_dir(model_ref), num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})


def steps(cfg: Config, model, net, optimizer, data: dict[str, Any], device, rank: int, world: int,
          start: int, pad_id: int) -> Iterator[tuple[int, Any]]:
    """The loop's core, shared by the Ray Train workers and `train_classifier`: from step
    `start` to the end, `train_step` on this worker's rows; yields (steps done, result)."""
    from mlm.step import autocast_for, dropout_seed, get_lr, train_step

    sched = schedule(cfg, len(data["labels"]))
    autocast = autocast_for(device)
    net.train()
    for step in range(start, sched.max_steps):
        batch = collate(data, step_rows(cfg, len(data["labels"]), step, rank, world), pad_id, device)
        result = train_step(net, optimizer, [batch], lr=get_lr(step, sched), grad_clip=cfg.train.grad_clip,
                            autocast=autocast, dropout_seed=functools.partial(dropout_seed, cfg.finetune.seed, step, rank),
                            forward=classify_forward)
        yield step + 1, result


def optimizer_for(model, cfg: Config, device):
    """AdamW as pretraining builds it, with fine-tuning's learning rate and weight decay."""
    from mlm.step import build_optimizer

    tc = cfg.train.model_copy(update={"learning_rate": cfg.finetune.learning_rate,
                                      "weight_decay": cfg.finetune.weight_decay})
    return build_optimizer(model, tc, device)


def predict(model, data: dict[str, Any], pad_id: int, device) -> np.ndarray:
    """Label ids the model predicts for every encoded row."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(data["labels"]), EVAL_BATCH):
            batch = collate(data, np.arange(i, min(i + EVAL_BATCH, len(data["labels"]))), pad_id, device)
            out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


# ---------------------------------------------------------------- in this process (the probe)


def train_classifier(model_ref: str, train: Labelled, validation: Labelled, cfg: Config, device="cpu",
                     init=None) -> dict[str, Any]:
    """Fine-tune in this process, one worker, no Ray Train: the loop's own steps. `init`:
    a callable turning the built classifier into another (the probe's random-init twin).
    Returns {model, tokenizer, metrics, seconds}."""
    import torch

    from mlm.finetune.metrics import classification_metrics
    from mlm.model import resolve_model_dir
    from mlm.tokenizer import load_tokenizer

    device = torch.device(device)
    labels = label_ids(train, validation)
    names = sorted(labels, key=labels.get)
    tokenizer = load_tokenizer(resolve_model_dir(model_ref))
    model = build(model_ref, names, cfg.finetune.seed)
    model = (init(model) if init else model).to(device)
    length = cfg.finetune.max_length or model.config.max_position_embeddings
    data = {s: encode(tokenizer, rows, labels, length) for s, rows in (("train", train), ("validation", validation))}
    optimizer = optimizer_for(model, cfg, device)
    started = time.perf_counter()
    for _ in steps(cfg, model, model, optimizer, data["train"], device, 0, 1, 0, tokenizer.pad_token_id):
        pass
    predicted = predict(model, data["validation"], tokenizer.pad_token_id, device)
    metrics = classification_metrics(data["validation"]["labels"], predicted, names)
    return {"model": model, "tokenizer": tokenizer, "metrics": metrics, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- on Ray Train


def finetune_loop(c: dict[str, Any]) -> None:
    """One worker (of Ray Train, or the local engine's in this process): the classifier
    (a fresh head on the encoder, or the last checkpoint's), DDP, the steps; rank 0
    logs, validates each epoch and writes the checkpoints every rank reports."""
    from mlm import engine

    s = engine.session(c)
    rank, world, device = s.rank, s.world_size, s.device
    cfg = config_from_dict(c["config"])
    model, start, state = _resume_or_build(s, c, cfg)
    model.to(device)
    net = s.prepare_model(model)
    optimizer = optimizer_for(model, cfg, device)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    data = c["data"]
    if not isinstance(data, dict):  # Ray Train: an object reference
        import ray

        data = ray.get(data)
    log = _Log(c, s)
    sched = schedule(cfg, len(data["train"]["labels"]))
    for step, result in steps(cfg, model, net, optimizer, data["train"], device, rank, world, start, c["pad_token_id"]):
        last = step == sched.max_steps
        if step % cfg.finetune.log_every == 0 or last:
            log.metrics({"train_loss": float(result.losses.mean()), "learning_rate": optimizer.param_groups[0]["lr"]}, step)
        if step % sched.per_epoch == 0 or last:
            if rank == 0:
                _validate(model, data["validation"], c, device, log, step)
                net.train()
            _report(s, model, optimizer, step, float(result.losses.mean()))


def _resume_or_build(s, c: dict[str, Any], cfg: Config):
    """(model, step to start from, train state or None)."""
    from transformers import AutoModelForSequenceClassification

    from mlm.engine import restore_checkpoint

    return restore_checkpoint(s, AutoModelForSequenceClassification) or (build(c["model"], c["names"], cfg.finetune.seed), 0, None)


def _validate(model, data, c, device, log, step: int) -> None:
    from mlm.finetune.metrics import classification_metrics

    m = classification_metrics(data["labels"], predict(model, data, c["pad_token_id"], device), c["names"])
    log.metrics({"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]}, step)


def _report(s, model, optimizer, step: int, loss: float) -> None:
    """A checkpoint: every rank reports (Ray Train V2 needs equal calls); rank 0 writes it."""
    from mlm.engine import checkpoint_folder

    with checkpoint_folder(s, model, {"optimizer": optimizer.state_dict(), "step": step}) as folder:
        s.report({"step": step, "train_loss": loss}, folder)


class _Log:
    """Rank 0's metrics: the MLflow run (when there is one) and the driver's progress line."""

    def __init__(self, c: dict[str, Any], s):
        self.on, self.session = s.is_rank0, s
        self.run_id = c.get("mlflow_run_id")
        self.client = None
        if self.on and self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=c["tracking_uri"])

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.on:
            return
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        self.session.progress({"step": step, "info": ", ".join(f"{k} {v:.3g}" for k, v in values.items())})


def finetune(model_ref: str, train_path: str, validation_path: str, out_dir: str | Path, cfg: Config, *,
             mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune the encoder `model_ref` (a folder, a URI, `models:/NAME@ALIAS`) on the
    labelled files on Ray Train (or in this process: `train.engine: local`); the
    classifier lands in `out_dir/model` (Hugging Face layout, `id2label`, the
    tokenizer). Returns the run's summary and what evaluation and registration need."""
    from mlm import engine
    from mlm.resolve import is_remote
    from mlm.runtime import ensure_ray, tracking_uri
    from mlm.train import export_model

    fc = cfg.finetune
    train, validation = (read_labelled(p, fc.text_column, fc.label_column) for p in (train_path, validation_path))
    labels = label_ids(train, validation)
    names = sorted(labels, key=labels.get)
    base_dir, tokenizer, length = _encoder(model_ref, fc.max_length)
    out_dir = storage.normalize(out_dir)
    storage.makedirs(out_dir)
    data = {s: encode(tokenizer, rows, labels, length) for s, rows in (("train", train), ("validation", validation))}
    if cfg.train.engine == "ray":  # to the workers through the object store (no shared disk)
        import ray

        ensure_ray()
        data = ray.put(data)
    loop_config = {"config": cfg.to_dict(), "model": model_ref if is_remote(model_ref) else base_dir, "names": names,
                   "data": data, "pad_token_id": tokenizer.pad_token_id, "mlflow_run_id": mlflow_run_id,
                   "tracking_uri": tracking_uri()}
    total = schedule(cfg, len(train)).max_steps
    started = time.time()
    result = engine.fit(finetune_loop, loop_config, out_dir, cfg, "finetune", total)
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    model_dir = export_model(result.checkpoint, tokenizer, storage.join(out_dir, "model"))
    return {"model_dir": model_dir, "base": model_ref, "labels": names, "train": train, "validation": validation,
            "steps": int(result.metrics.get("step", total)), "seconds": round(time.time() - started, 1),
            "final_train_loss": result.metrics.get("train_loss", math.nan)}


def _encoder(model_ref: str, max_length: int | None):
    """(local model dir, tokenizer, token limit) of the encoder to fine-tune; refuses a
    model that is not an encoder (a decoder, or already a classifier)."""
    from transformers import AutoConfig

    from mlm.model import ModelError, resolve_model_dir
    from mlm.tokenizer import load_tokenizer

    base_dir = resolve_model_dir(model_ref)
    config = AutoConfig.from_pretrained(base_dir)
    kinds = config.architectures or []
    if config.model_type not in ("bert", "modernbert", "roberta", "distilbert", "electra", "deberta-v2") or any(
            k.endswith("ForSequenceClassification") for k in kinds):
        raise ModelError(f"{model_ref} is not an encoder to fine-tune ({config.model_type}: {', '.join(kinds) or '?'}); "
                         "give a masked-LM encoder such as models:/NAME@champion")
    positions = int(config.max_position_embeddings)
    if max_length and max_length > positions:
        raise LabelledDataError(f"finetune.max_length {max_length} exceeds the model's {positions} positions")
    return base_dir, load_tokenizer(base_dir), max_length or positions
