"""Tensor helpers shared by training, evaluation and the benchmarks: shard rows to
tensors, the masked-position logits and loss, FLOPs per token and the one table of
accelerator peak FLOP/s (for MFU).

Imports the shard layout (`mlm.shards`) and `mlm.masking`'s IGNORE_INDEX only; torch is imported inside the functions.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mlm import shards
from mlm.masking import IGNORE_INDEX

# Dense (no sparsity) bf16 peak FLOP/s per accelerator model, from the vendors' datasheets.
# Keys are model names as CUDA reports them, without the vendor; `peak_flops` matches a
# key only as whole words of the device name (the longest key wins), so "L4" is never
# taken for an "L40S" and "H100 PCIe" wins over "H100".
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
}


def _words(name: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", name.upper())


def peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device by its name (`torch.cuda.get_device_name()`,
    e.g. "NVIDIA L40S", "NVIDIA H100 80GB HBM3"); None for an unknown device."""
    if not device_name:
        return None
    words = _words(device_name)
    best = None
    for key, value in PEAK_FLOPS.items():
        k = _words(key)
        if any(words[i : i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            if best is None or len(k) > best[0]:
                best = (len(k), value)
    return best[1] if best else None


def device_peak_flops(device) -> float | None:
    """Peak FLOP/s of a torch device (None on CPU or an unknown GPU)."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a masked-LM model, counted from its
    own layers as nanochat's `estimate_flops` does: 6 per weight of every nn.Linear (so
    ModernBERT's GeGLU Wi, hidden -> 2 x intermediate, counts what it costs; the dense
    vocabulary head is included, so both contenders of `mlm bench train` are counted
    alike; embeddings are lookups, not matmuls) plus the attention scores, 12 * hidden *
    the keys each query sees (QK^T and AV, forward and backward): the sequence in a full
    attention layer, at most `local_attention` tokens in a ModernBERT sliding one."""
    import torch

    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "local_attention", None)
    keys = sum(min(seq_len, window) if kind == "sliding_attention" and window else seq_len for kind in kinds)
    return 6 * linear + 12 * config.hidden_size * keys


def mfu(tokens_per_s: float, flops: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilization of one device."""
    return tokens_per_s * flops / peak if flops and peak else None


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


def prediction_head(mlm):
    """hidden [n, H] -> vocabulary logits [n, V] of a masked-LM model (BERT's `cls`,
    ModernBERT's `head` + `decoder`)."""
    if hasattr(mlm, "cls"):
        return mlm.cls
    return lambda hidden: mlm.decoder(mlm.head(hidden))


def masked_logits(mlm, input_ids, attention_mask, labels):
    """(logits [n, V], labels [n]) at the n positions whose label is set: the encoder runs
    on the whole batch, the prediction head only where a token is to be predicted
    (Cramming/MosaicBERT: with 15% masking the vocabulary projection, the costliest matmul
    of a small model, shrinks about 7x)."""
    hidden = mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    selected = labels != IGNORE_INDEX  # [B, L] -> gather [n, H]
    return prediction_head(mlm)(hidden[selected]), labels[selected]


def masked_lm_loss(mlm, input_ids, attention_mask, labels):
    """Mean cross entropy (float32) over the masked positions: the same loss as
    `mlm(..., labels=labels).loss`. A batch without masked positions gives 0 while
    keeping every parameter in the graph (DDP needs them all)."""
    import torch

    logits, targets = masked_logits(mlm, input_ids, attention_mask, labels)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def masked_sums(net, input_ids, attention_mask, labels) -> tuple[dict[str, float], Any]:
    """Sums over the masked positions of one batch of tensors (call under inference
    mode): cross-entropy, top-1 and top-5 hits, count; and the targets."""
    import torch

    logits, targets = masked_logits(net, input_ids, attention_mask, labels)
    logits = logits.float()
    best5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return {
        "loss_sum": float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")),
        "top1": int((best5[:, 0] == targets).sum()),
        "top5": int((best5 == targets[:, None]).any(dim=-1).sum()),
        "n": int(targets.numel()),
    }, targets


def score(net, batches, baseline_id: int = -1, device="cpu", max_batches: int | None = None,
          autocast=None) -> dict[str, float]:
    """Sums over masked positions of shard batches: cross-entropy, top-1/top-5 hits, hits
    of always predicting `baseline_id`, count. Shared by evaluation and in-training
    validation."""
    import contextlib

    import torch

    net.eval()
    out = {"loss_sum": 0.0, "top1": 0, "top5": 0, "baseline": 0, "n": 0}
    with torch.inference_mode(), (autocast or contextlib.nullcontext()):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            t = batch_to_tensors(batch, device)
            sums, targets = masked_sums(net, t["input_ids"], t["attention_mask"], t["labels"])
            for key, value in sums.items():
                out[key] += value
            out["baseline"] += int((targets == baseline_id).sum())
    return out
