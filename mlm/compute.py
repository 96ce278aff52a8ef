"""Tensor helpers shared by training, evaluation and the benchmarks: shard rows to
tensors (the fixed prediction slots of the training step, the host-to-device copy), the
masked-position logits and loss, the FLOPs a step needs and the one table of
accelerator peak FLOP/s (for MFU).

Imports the shard layout (`mlm.shards`) and `mlm.masking`'s IGNORE_INDEX only; torch is imported inside the functions.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

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


def inference_device(use_gpu="auto"):
    """Where evaluation and prediction run in this process: CUDA when asked (`True`) or
    when there is one (`"auto"`), else the CPU. True without a GPU is a RuntimeError."""
    import torch

    if use_gpu is True and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true but torch sees no CUDA GPU here")
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def gpu_actors(use_gpu, cluster_gpus: float, wanted: int) -> int:
    """How many one-GPU Ray Data actors an inference stage asks for: up to the cluster's
    GPUs when `use_gpu` is True or "auto" and it has any, else 0 (CPU actors)."""
    if not use_gpu or cluster_gpus < 1:
        if use_gpu is True:
            raise RuntimeError("use_gpu is true but the Ray cluster has no GPU")
        return 0
    return max(1, min(wanted, int(cluster_gpus)))


def device_peak_flops(device) -> float | None:
    """Peak FLOP/s of a torch device (None on CPU or an unknown GPU)."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


class Flops(NamedTuple):
    """Training FLOPs (forward + backward) of a masked-LM model, split where the work is:
    the encoder on every real token, the vocabulary head on every prediction made."""

    per_token: float
    per_prediction: float

    def of(self, tokens: float, predictions: float) -> float:
        return tokens * self.per_token + predictions * self.per_prediction


def _head_modules(mlm) -> list:
    """The prediction head's modules (BERT's `cls`, ModernBERT's `head` + `decoder`)."""
    if hasattr(mlm, "cls"):
        return [mlm.cls]
    return [m for m in (getattr(mlm, "head", None), getattr(mlm, "decoder", None)) if m is not None]


def _linear_weights(modules) -> int:
    import torch

    seen, total = set(), 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, torch.nn.Linear) and id(m) not in seen:
                seen.add(id(m))
                total += m.in_features * m.out_features
    return total


def model_flops(model, seq_len: int) -> Flops:
    """Counted from the model's own layers as nanochat's `estimate_flops` does: 6 per
    weight of every nn.Linear (so ModernBERT's GeGLU Wi, hidden -> 2 x intermediate,
    counts what it costs; embeddings are lookups, not matmuls) plus the attention scores,
    12 * hidden * the keys each query sees (QK^T and AV, forward and backward): the
    sequence in a full attention layer, at most `local_attention` tokens in a ModernBERT
    sliding one. The prediction head's linears are counted per prediction, not per token:
    the work a masked-LM step needs, as the published BERT MFU figures count it, whether
    a trainer computes the head on every token (the HF Trainer) or only where a
    prediction is made (mlm)."""
    head = _linear_weights(_head_modules(model))
    encoder = _linear_weights([model]) - head
    config = model.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "local_attention", None)
    keys = sum(min(seq_len, window) if kind == "sliding_attention" and window else seq_len for kind in kinds)
    return Flops(6 * encoder + 12 * config.hidden_size * keys, 6 * head)


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization of one device: achieved FLOP/s (`Flops.of` over a time) of the peak."""
    return flops_per_s / peak if flops_per_s and peak else None


# ---------------------------------------------------------------- batches as tensors

SLOT_SIGMAS = 6.0  # prediction slots cover the expected masked count plus this many standard deviations
SLOT_MULTIPLE = 8  # and are a multiple of 8 (tensor-core friendly)


def prediction_slots(rows: int, seq_len: int, rate: float) -> int:
    """The fixed number of prediction slots of a [rows, seq_len] micro-batch masked at
    `rate` (NVIDIA's max_predictions_per_seq, per batch): the masked count of a batch is
    a sum of rows * seq_len draws at `rate` at most, so the mean + 6 standard deviations,
    rounded up to a multiple of 8, holds it except with a probability under 1e-9 (the
    word and span strategies aim each row at its budget, so they vary less). The shape of
    the sparse head then never depends on the data: one compiled graph, CUDA-graph safe."""
    n = rows * seq_len
    bound = rate * n + SLOT_SIGMAS * math.sqrt(n * rate * (1.0 - rate)) + 1
    return min(n, SLOT_MULTIPLE * math.ceil(bound / SLOT_MULTIPLE))


def slot_targets(labels: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions [slots], targets [slots], dropped) of a [B, L] label array: the flat
    positions of the masked tokens and their labels, padded to `slots` with position 0
    and target -100 (ignored by the loss). A batch with more masked tokens than slots
    keeps `slots` of them spread evenly over the batch (deterministic: the same batch
    keeps the same ones) and counts the rest in `dropped`. `slots=0`: exactly the
    batch's masked tokens (an eager step: no padded slot costs anything there)."""
    flat = labels.reshape(-1)
    where = np.flatnonzero(flat != IGNORE_INDEX)
    slots = slots or len(where)
    dropped = max(0, len(where) - slots)
    if dropped:
        where = where[np.linspace(0, len(where) - 1, slots).round().astype(np.int64)]
    positions = np.zeros(slots, np.int64)
    targets = np.full(slots, IGNORE_INDEX, np.int64)
    positions[: len(where)] = where
    targets[: len(where)] = flat[where]
    return positions, targets, dropped


def batch_arrays(batch, masker=None, seed: int = 0, epoch: int = 0, cut: bool = True) -> dict[str, np.ndarray]:
    """A pyarrow batch of shard rows -> numpy input_ids, labels, num_tokens.

    With a `masker` (dynamic masking) the stored ids are unmasked and are masked here,
    per row, from (seed, epoch, row). With `cut`, columns past the longest row (rounded up
    to a multiple of 8) are cut off: padded (length-binned) data then costs only what its
    rows hold; packed rows are full, nothing is cut."""
    ids = shards.column_2d(batch, "input_ids")
    num_tokens = np.asarray(batch.column("num_tokens"))
    if masker is not None:
        ids, labels = masker.dynamic(ids, num_tokens, seed, epoch)
    else:
        labels = shards.column_2d(batch, "labels")
    if cut and len(num_tokens):
        width = min(ids.shape[1], SLOT_MULTIPLE * math.ceil(int(num_tokens.max()) / SLOT_MULTIPLE))
        ids, labels = ids[:, :width], labels[:, :width]
    return {"input_ids": ids, "labels": labels, "num_tokens": num_tokens}


class HostToDevice:
    """Copies a batch's arrays to `device`. On CUDA from pinned memory, `non_blocking`, on
    a side stream (the prefetch thread's), so the copy overlaps the step before it; the
    batch carries the copy's event and `ready` makes the consuming stream wait for it.
    On CPU, or with `overlap=False`, a plain conversion."""

    def __init__(self, device, overlap: bool = True):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if overlap and self.device.type == "cuda" else None

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], Any]:
        import torch

        if self.stream is None:  # CPU, or a plain synchronous copy
            return {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}, None
        with torch.cuda.stream(self.stream):
            out = {k: torch.from_numpy(v).pin_memory().to(self.device, non_blocking=True) for k, v in arrays.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event


def ready(inputs: dict[str, Any]) -> dict[str, Any]:
    """A batch made by `HostToDevice` on a side stream, safe to use on the current stream."""
    event = inputs.get("copied")
    if event is not None:
        import torch

        stream = torch.cuda.current_stream()
        stream.wait_event(event)
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(stream)  # the allocator keeps its memory until this stream is done
    return inputs


def arrays_to_tensors(a: dict[str, np.ndarray], device, *, slots: int | None = None,
                      copy: HostToDevice | None = None) -> dict[str, Any]:
    """`batch_arrays`'s arrays -> tensors on `device`.

    input_ids [B, L]; attention_mask [B, L], or None when every row is full (packed data:
    SDPA then picks its fastest kernel, and no host-side check of the mask runs); `tokens`
    (real tokens, an int). Without `slots` (evaluation): labels [B, L]. With `slots`
    (training; 0: as many as the batch's masked tokens): positions and targets [slots]
    for the sparse head (`slot_targets`), and
    the ints `predictions` (kept) and `dropped`. `copy`: the `HostToDevice` to use (the
    prefetch thread's; default a plain copy); `copied`: its event (None: ready)."""
    ids, labels, num_tokens = a["input_ids"], a["labels"], a["num_tokens"]
    arrays = {"input_ids": ids.astype(np.int64)}
    if int(num_tokens.min(initial=ids.shape[1])) < ids.shape[1]:
        arrays["attention_mask"] = (np.arange(ids.shape[1])[None, :] < num_tokens[:, None]).astype(np.int64)
    extra: dict[str, Any] = {"tokens": int(num_tokens.sum()), "attention_mask": None}
    if slots is None:
        arrays["labels"] = labels.astype(np.int64)
    else:
        arrays["positions"], arrays["targets"], dropped = slot_targets(labels, slots)
        extra |= {"predictions": int((arrays["targets"] != IGNORE_INDEX).sum()), "dropped": dropped}
    tensors, event = (copy or HostToDevice(device, overlap=False))(arrays)
    return extra | tensors | {"copied": event}


def batch_to_tensors(batch, device, masker=None, seed: int = 0, epoch: int = 0, *, slots: int | None = None,
                     copy: HostToDevice | None = None) -> dict[str, Any]:
    """A pyarrow batch of shard rows -> tensors on `device` (`batch_arrays`, then `arrays_to_tensors`)."""
    return arrays_to_tensors(batch_arrays(batch, masker, seed, epoch), device, slots=slots, copy=copy)


def prediction_head(mlm):
    """hidden [n, H] -> vocabulary logits [n, V] of a masked-LM model (BERT's `cls`,
    ModernBERT's `head` + `decoder`)."""
    if hasattr(mlm, "cls"):
        return mlm.cls
    return lambda hidden: mlm.decoder(mlm.head(hidden))


def masked_logits(mlm, input_ids, attention_mask, labels):
    """(logits [n, V], labels [n]) at the n positions whose label is set (evaluation: a
    data-dependent shape, eager only; training uses `masked_lm_loss`'s fixed slots)."""
    hidden = mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    selected = labels != IGNORE_INDEX  # [B, L] -> gather [n, H]
    return prediction_head(mlm)(hidden[selected]), labels[selected]


def masked_lm_loss(mlm, input_ids, attention_mask, positions, targets):
    """Mean cross entropy (float32) over the predictions of a batch: the encoder runs on
    the whole batch, the prediction head only at the fixed `positions` slots (Cramming /
    MosaicBERT's sparse head: at 15-30% masking the vocabulary projection, the costliest
    matmul of a small model, shrinks 3-7x), slots whose target is -100 ignored. Every
    shape is fixed by the batch shape, never by the data: one graph under torch.compile
    (`fullgraph=True`), capturable by CUDA graphs. The same loss as
    `mlm(..., labels=labels).loss`; a batch without predictions gives 0 while keeping
    every parameter in the graph (DDP needs them all)."""
    import torch

    hidden = mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    chosen = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [slots, H]
    logits = prediction_head(mlm)(chosen).float()
    total = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def classification_loss(logits, labels):
    """Mean cross entropy (float32) of a classifier's logits [B, classes] against labels [B]."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), labels)


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
