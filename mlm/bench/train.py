"""Benchmarks as commands: ratios against a reference measured in the same run.

`mlm bench train`: our training step (`mlm.train.train_step`: sparse masked-LM head,
fused AdamW and bf16 on GPU, exactly what the training loop runs) against the Hugging
Face Trainer on BertForMaskedLM, same config, optimizer settings, batch, sequence length,
precision, data and device, one after the other in this process. MFU uses the one peak
table, `mlm.compute.PEAK_FLOPS`, and FLOPs counted from the model's layers.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from mlm import shards, storage
from mlm.compute import peak_flops
from mlm.config import Config


def _batches(data_dir: Path, micro: int, count: int, masker=None) -> list[dict[str, Any]]:
    """`count` full micro-batches of the training split as tensors; a dynamic-masking
    dataset masked as the training loop masks it (`masker`)."""
    from mlm.compute import batch_to_tensors

    out: list[dict[str, Any]] = []
    seed = masker.spec["seed"] if masker else 0
    while len(out) < count:
        for path in shards.shard_paths(data_dir, "train"):
            for batch in storage.parquet_file(path).iter_batches(batch_size=micro):
                if batch.num_rows == micro:
                    out.append(batch_to_tensors(batch, "cpu", masker, seed))
                if len(out) == count:
                    return out
    return out


def _our_steps(cfg: Config, vocab: int, pad: int, batches, device, warmup: int, seq_len: int) -> tuple[float, float]:
    """(seconds for the timed steps, FLOPs per token) of our training step: the
    training loop's own `train_step`, optimizer and autocast, one micro-batch a step."""
    import torch

    from mlm.compute import flops_per_token
    from mlm.model import build_model, masked_lm_objective
    from mlm.train import autocast_for, build_optimizer, dropout_seed, get_lr, train_step

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, vocab, pad).to(device)
    objective = masked_lm_objective(model).train()
    optimizer = build_optimizer(model, tc, device)
    autocast = autocast_for(device)
    start = None
    for i, b in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}
        train_step(objective, optimizer, [inputs], lr=get_lr(i, tc), grad_clip=tc.grad_clip, autocast=autocast,
                   dropout_seed=functools.partial(dropout_seed, tc.seed, i, 0))
    _sync(device)
    return time.perf_counter() - start, flops_per_token(model, seq_len)


def _hf_steps(cfg: Config, vocab: int, pad: int, batches, device, warmup: int) -> float:
    """Seconds for the timed steps of the Hugging Face Trainer."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mlm.model import build_model

    rows = [
        {k: b[k][i] for k in ("input_ids", "attention_mask", "labels")}
        for b in batches
        for i in range(b["input_ids"].shape[0])
    ]
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                _sync(device)
                marks["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            marks["end"] = time.perf_counter()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab, pad)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batches[0]["input_ids"].shape[0], max_steps=len(batches),
            learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip,
            adam_beta1=cfg.train.adam_beta1, adam_beta2=cfg.train.adam_beta2, adam_epsilon=cfg.train.adam_epsilon,
            logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=device.type != "cuda", bf16=device.type == "cuda", seed=cfg.train.seed,
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    return marks["end"] - marks["start"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(cfg: Config, data_dir: str | Path, steps: int = 30, warmup: int = 5) -> dict[str, Any]:
    import torch

    from mlm.tokenizer import load_tokenizer

    data_dir = Path(data_dir)
    manifest = shards.Manifest.read(data_dir)
    tok = load_tokenizer(data_dir / manifest.tokenizer.dir)
    micro = cfg.train.micro_batch_size
    from mlm.masking import Masker
    from mlm.train import dynamic_masker_spec

    spec = dynamic_masker_spec(manifest, tok)
    batches = _batches(data_dir, micro, warmup + steps, Masker(spec) if spec else None)
    if len(batches) < warmup + steps:
        raise shards.DatasetError(f"{data_dir} holds fewer than {warmup + steps} batches of {micro}")
    use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    name = torch.cuda.get_device_name() if use_cuda else f"cpu ({torch.get_num_threads()} threads)"
    tokens = sum(b["tokens"] for b in batches[warmup:])
    ours, fpt = _our_steps(cfg, len(tok), tok.pad_token_id, batches, device, warmup, manifest.seq_len)
    hf = _hf_steps(cfg, len(tok), tok.pad_token_id, batches, device, warmup)
    peak = peak_flops(name) if use_cuda else None
    result = {
        "device": name,
        "precision": "bf16 autocast" if use_cuda else "float32",
        "batch": f"{micro} x {manifest.seq_len}",
        "timed_steps": steps,
        "mlm_tokens_per_s": tokens / ours,
        "hf_trainer_tokens_per_s": tokens / hf,
        "speedup": hf / ours,
    }
    if peak:
        result["mlm_mfu"] = fpt * tokens / ours / peak
        result["hf_trainer_mfu"] = fpt * tokens / hf / peak
    return result
