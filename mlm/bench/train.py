"""Benchmarks as commands: ratios against a reference measured in the same run.

`mlm bench train`: our training step (`mlm.step.train_step`: the sparse masked-LM head on
fixed prediction slots, compiled on GPUs by default, fused AdamW and bf16 on GPU, exactly
what the training loop runs) against the Hugging Face Trainer on BertForMaskedLM with
its defaults and with `torch_compile=True` (the strongest peer a user would pick), same
config, optimizer settings, batch, sequence length, precision, data and device, one
after the other in this process. Tokens/s count real (non-padding) tokens; MFU counts
the FLOPs a masked-LM step needs on them (`mlm.compute.model_flops`: the encoder on every
real token, the vocabulary head on every prediction) for every contender alike, against
the one peak table, `mlm.compute.PEAK_FLOPS`. The first `warmup` steps (compilation
included) are not timed.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlm import shards
from mlm.compute import IGNORE_INDEX, peak_flops
from mlm.config import Config

PEERS = ("hf", "hf_compiled")  # the HF Trainer's defaults; the same with torch_compile=True
SDPA_OPS = {  # aten op -> the SDPA backend it is (what `sdpa_backends` reports)
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_attention_math": "math",
    "_flash_attention_forward": "flash",
    "_efficient_attention_forward": "efficient",
}


def _batches(data_dir: Path, micro: int, count: int, masker=None) -> list[dict[str, np.ndarray]]:
    """`count` full micro-batches of the training split as arrays (`compute.batch_arrays`);
    a dynamic-masking dataset masked as the training loop masks it (`masker`)."""
    from mlm.compute import batch_arrays

    out: list[dict[str, np.ndarray]] = []
    seed = masker.spec["seed"] if masker else 0
    while len(out) < count:
        for path in shards.checked_shards(data_dir, "train"):
            for batch in shards.open_shard(path).iter_batches(batch_size=micro):
                if batch.num_rows == micro:
                    out.append(batch_arrays(batch, masker, seed))
                if len(out) == count:
                    return out
    return out


def _our_steps(cfg: Config, vocab: int, pad: int, batches, device, warmup: int, rate: float) -> dict[str, Any]:
    """Our training step on the batches: the training loop's own objective (compiled per
    `train.compile`), `train_step`, optimizer and autocast, one micro-batch a step; the
    batches copied from pinned memory without blocking, as the loop's prefetcher does.
    Returns the timed seconds, the warm-up's (compilation), the model and one step's
    inputs (for `sdpa_backends`)."""
    import torch

    from mlm.compute import arrays_to_tensors, prediction_slots
    from mlm.model import build_model
    from mlm.step import autocast_for, build_optimizer, compile_enabled, dropout_seed, get_lr, objective, train_step

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, vocab, pad).to(device)
    net = objective(model, tc, device).train()
    optimizer = build_optimizer(model, tc, device)
    autocast = autocast_for(device)
    slots = prediction_slots(*batches[0]["input_ids"].shape, rate) if compile_enabled(tc, device) else 0  # as the loop
    host = [arrays_to_tensors(b, "cpu", slots=slots) for b in batches]
    if device.type == "cuda":
        host = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in host]
    started = time.perf_counter()
    marks = {}
    for i, b in enumerate(host):
        if i == warmup:
            _sync(device)
            marks["warmup_s"] = time.perf_counter() - started
            marks["start"] = time.perf_counter()
        inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        train_step(net, optimizer, [inputs], lr=get_lr(i, tc), grad_clip=tc.grad_clip, autocast=autocast,
                   dropout_seed=functools.partial(dropout_seed, tc.seed, i, 0))
    _sync(device)
    seconds = time.perf_counter() - marks["start"]
    return {"seconds": seconds, "warmup_s": marks["warmup_s"], "model": model, "net": net, "inputs": inputs,
            "autocast": autocast, "dropped": sum(b["dropped"] for b in host[warmup:])}


def _hf_steps(cfg: Config, vocab: int, pad: int, batches, device, warmup: int, compiled: bool = False) -> float:
    """Seconds for the timed steps of the Hugging Face Trainer (`torch_compile=compiled`)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mlm.model import build_model

    rows = [{"input_ids": torch.from_numpy(b["input_ids"][i].astype(np.int64)),
             "attention_mask": torch.from_numpy((np.arange(b["input_ids"].shape[1]) < b["num_tokens"][i]).astype(np.int64)),
             "labels": torch.from_numpy(b["labels"][i].astype(np.int64))}
            for b in batches for i in range(b["input_ids"].shape[0])]
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
            use_cpu=device.type != "cuda", bf16=device.type == "cuda", seed=cfg.train.seed, torch_compile=compiled,
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    return marks["end"] - marks["start"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def sdpa_backends(ours: dict[str, Any]) -> dict[str, int]:
    """Which scaled-dot-product-attention kernels one of our training steps ran (aten op
    names under torch.profiler, named by `SDPA_OPS`): e.g. {"flash": 2} on a GPU with
    full rows, {"efficient": 2} when a padding mask rules flash out."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    net, inputs = ours["net"], ours["inputs"]
    with profile(activities=[ProfilerActivity.CPU]) as prof, ours["autocast"]:
        loss = net(inputs["input_ids"], inputs["attention_mask"], inputs["positions"], inputs["targets"])
    loss.backward()
    ours["model"].zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    found: dict[str, int] = {}
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        if name in SDPA_OPS:
            found[SDPA_OPS[name]] = found.get(SDPA_OPS[name], 0) + event.count
    return found


def _setup(cfg: Config, data_dir: Path, steps: int, warmup: int):
    """(tokenizer, batches, device, device name, masking rate) of a bench run."""
    import torch

    from mlm.masking import Masker
    from mlm.tokenizer import load_tokenizer
    from mlm.train import dynamic_masker_spec, slot_rate

    manifest = shards.Manifest.read(data_dir)
    tok = load_tokenizer(data_dir / manifest.tokenizer.dir)
    use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    micro = _micro_batch(cfg, tok, device, manifest)
    spec = dynamic_masker_spec(manifest, tok)
    batches = _batches(data_dir, micro, warmup + steps, Masker(spec) if spec else None)
    if len(batches) < warmup + steps:
        raise shards.DatasetError(f"{data_dir} holds fewer than {warmup + steps} batches of {micro}")
    name = torch.cuda.get_device_name() if use_cuda else f"cpu ({torch.get_num_threads()} threads)"
    return tok, batches, device, name, slot_rate(manifest.masking["train"])


def _micro_batch(cfg: Config, tok, device, manifest) -> int:
    """The configured micro-batch, or `auto`'s choice for one worker (`mlm.step.fit_micro_batch`)."""
    if cfg.train.micro_batch_size != "auto":
        return int(cfg.train.micro_batch_size)
    import torch

    from mlm.model import build_model
    from mlm.step import fit_micro_batch
    from mlm.train import slot_rate

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(tok), tok.pad_token_id).to(device)
    fit = fit_micro_batch(model, device, manifest.seq_len, slot_rate(manifest.masking["train"]),
                          cfg.train.global_batch_size, limit_gb=cfg.train.memory_limit_gb)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fit.size


def bench_train(cfg: Config, data_dir: str | Path, steps: int = 30, warmup: int = 5,
                peers: tuple[str, ...] = PEERS) -> dict[str, Any]:
    """Our step and the `peers` (`PEERS`) on the same batches; tokens/s, ratios and, on a
    GPU the peak table knows, MFU on one FLOP definition."""
    from mlm.compute import model_flops
    from mlm.step import compile_enabled

    data_dir = Path(data_dir)
    tok, batches, device, name, rate = _setup(cfg, data_dir, steps, warmup)
    timed = batches[warmup:]
    tokens = sum(int(b["num_tokens"].sum()) for b in timed)
    predictions = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in timed)
    ours = _our_steps(cfg, len(tok), tok.pad_token_id, batches, device, warmup, rate)
    seq_len = batches[0]["input_ids"].shape[1]
    flops = model_flops(ours["model"], seq_len).of(tokens, predictions)
    seconds = {"mlm": ours["seconds"]}
    for peer in peers:
        seconds[peer] = _hf_steps(cfg, len(tok), tok.pad_token_id, batches, device, warmup, compiled=peer == "hf_compiled")
    peak = peak_flops(name) if device.type == "cuda" else None
    result = {
        "device": name,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "batch": f"{batches[0]['input_ids'].shape[0]} x {seq_len}",
        "timed_steps": steps,
        "mlm_compiled": compile_enabled(cfg.train, device),
        "mlm_warmup_s": round(ours["warmup_s"], 2),
        "dropped_predictions": ours["dropped"],
        "sdpa": sdpa_backends(ours),
        "tokens": tokens,
        "predictions": predictions,
        "mlm_tokens_per_s": tokens / seconds["mlm"],
    }
    for peer in peers:
        key = "hf_trainer" if peer == "hf" else "hf_trainer_compiled"
        result[f"{key}_tokens_per_s"] = tokens / seconds[peer]
        result["speedup" if peer == "hf" else "speedup_vs_compiled"] = seconds[peer] / seconds["mlm"]
    if peak:
        for who, secs in seconds.items():
            key = {"mlm": "mlm", "hf": "hf_trainer", "hf_compiled": "hf_trainer_compiled"}[who]
            result[f"{key}_mfu"] = flops / secs / peak
    return result
