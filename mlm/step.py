"""The training step, apart from Ray: what one worker computes per optimizer step.

`train_step` (gradient accumulation, clipping, AdamW) runs the masked-LM objective
(`objective`: the encoder + the sparse head on fixed prediction slots, compiled on GPU
by default) and never waits for the device: losses stay on it until they are logged.
`fit_micro_batch` finds the largest micro-batch that fits the device (`train.
micro_batch_size: auto`). The training loop (`mlm.train`), `train_in_process` and
`mlm bench train` all run exactly these.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, NamedTuple

from mlm.compute import prediction_slots, ready


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


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, tc, device):
    """AdamW with the config's betas and epsilon (default as BERT/RoBERTa pretraining:
    (0.9, 0.98), 1e-6), no weight decay on biases and LayerNorms; the fused kernel (CUDA and CPU)."""
    import torch

    return torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.learning_rate,
                             betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon,
                             fused=True)


def autocast_for(device):
    """bf16 autocast on GPU, nothing on CPU (float32)."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compile_enabled(tc, device) -> bool:
    """`train.compile`: true, false, or auto (on CUDA devices, off on CPUs)."""
    if tc.compile == "auto":
        return getattr(device, "type", device) == "cuda"
    return bool(tc.compile)


def objective(model, tc=None, device="cpu"):
    """The masked-LM objective of `model` (`mlm.model.masked_lm_objective`: encoder + sparse
    head on fixed slots), compiled when `compile_enabled`: one graph (`fullgraph=True`),
    in `train.compile_mode`. Wrap it for DDP after this; save `model`, not the result
    (its state_dict has no `_orig_mod.` prefixes)."""
    import torch

    from mlm.model import masked_lm_objective

    net = masked_lm_objective(model)
    if tc is None or not compile_enabled(tc, device):
        return net
    mode = None if tc.compile_mode == "default" else tc.compile_mode
    return torch.compile(net, fullgraph=True, mode=mode)


class StepResult(NamedTuple):
    losses: Any  # [micro-batches] tensor on the device: read it only when it is logged
    tokens: int  # real (non-padding) tokens of the step on this worker
    predictions: int  # predictions made (masked tokens in the slots)
    dropped: int  # masked tokens the slots had no room for (counted, see compute.slot_targets)
    grad_norm: Any  # a 0-d tensor: read it only when it is logged (reading waits for the GPU)


def masked_lm_forward(model, inputs: dict[str, Any]):
    """The pretraining loss of a micro-batch: the objective on its prediction slots."""
    return model(inputs["input_ids"], inputs["attention_mask"], inputs["positions"], inputs["targets"])


def train_step(model, optimizer, micro_batches: list[dict[str, Any]], *, lr: float, grad_clip: float, autocast,
               dropout_seed: Callable[[int], int] | None = None,
               forward: Callable[[Any, dict[str, Any]], Any] = masked_lm_forward) -> StepResult:
    """One optimizer step: forward/backward over the step's micro-batches (gradient
    accumulation; under DDP gradients are all-reduced only on the last one), the learning
    rate set to `lr`, the global gradient norm clipped to `grad_clip` (0: not clipped,
    the norm is still measured), AdamW's update. Nothing here waits for the device: the
    losses and the norm are returned as tensors. The training loop and `mlm bench train`
    both run exactly this; fine-tuning too, with its own `forward(model, inputs) -> loss`.
    `dropout_seed(i)`: the seed set before micro-batch i."""
    import torch

    losses, n = [], len(micro_batches)
    for i, inputs in enumerate(micro_batches):
        inputs = ready(inputs)
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed(i))
        last = i == n - 1
        with (model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()):
            with autocast:  # bf16 matmuls on GPU; the loss itself is computed in float32
                loss = forward(model, inputs)
            (loss / n).backward()
        losses.append(loss.detach())
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(torch.stack(losses), sum(b["tokens"] for b in micro_batches),
                      sum(b.get("predictions", 0) for b in micro_batches), sum(b.get("dropped", 0) for b in micro_batches),
                      grad_norm)


def dropout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """Dropout draws from (seed, step, micro-batch, rank): no RNG state to checkpoint, and
    a resumed run draws exactly what an uninterrupted one would have."""
    return hash((seed, step, micro, rank)) & 0x7FFFFFFF


# ---------------------------------------------------------------- micro-batch: auto


class MemoryMeter:
    """Peak memory of what runs between `reset()` and `peak()`, in bytes: the CUDA
    caching allocator's peak on a GPU; on a CPU the process's peak resident set (Linux:
    VmHWM, reset through /proc/self/clear_refs), an upper bound of what a step needs."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", device) == "cuda"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        with contextlib.suppress(OSError):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def capacity(self) -> int:
        """What the device holds: a GPU's memory; on a CPU, what is in use plus half the available RAM."""
        import torch

        if self.cuda:
            return int(torch.cuda.mem_get_info()[1])
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * page
        return resident + os.sysconf("SC_AVPHYS_PAGES") * page // 2


class MicroBatchFit(NamedTuple):
    size: int
    limit_bytes: int
    tried: dict[int, int | None]  # size -> peak bytes of its probe step (None: out of memory)


def candidate_sizes(per_worker: int) -> list[int]:
    """Powers of two that divide the per-worker batch (so accumulation keeps the global batch), ascending."""
    sizes, s = [], 1
    while s <= per_worker:
        if per_worker % s == 0:
            sizes.append(s)
        s *= 2
    return sizes


def fit_micro_batch(model, device, seq_len: int, rate: float, per_worker: int, *, limit_gb: float | None = None,
                    state_bytes: int | None = None, meter: MemoryMeter | None = None,
                    probe: Callable[[int], int | None] | None = None) -> MicroBatchFit:
    """The largest micro-batch (a power of two dividing `per_worker`, the global batch's
    share of one worker) whose forward + backward at full sequence length fits: the peak of
    a probe step, plus AdamW's state (two float32 copies of the weights, `state_bytes`),
    under `limit_gb` (default 90% of the device's memory; on a CPU, in-use + half the free
    RAM). Sizes are tried ascending, eager (a compiled step needs no more), and the probe
    stops at the first that does not fit, or before a size whose peak, extrapolated
    linearly from the last two, would not; a CUDA out-of-memory error counts as not
    fitting (Composer's auto micro-batching, Accelerate's find_executable_batch_size).
    `probe(size)`: the peak bytes of a step (default `_probe_step`'s, on `meter`).
    Raises RuntimeError if not even one sequence fits."""
    meter = meter or MemoryMeter(device)
    probe = probe or (lambda size: _probe_step(model, device, seq_len, rate, size, meter))
    limit = int(limit_gb * 2**30) if limit_gb else int(0.9 * meter.capacity())
    state = state_bytes if state_bytes is not None else 2 * 4 * sum(p.numel() for p in model.parameters())
    tried: dict[int, int | None] = {}
    fits: list[int] = []  # the sizes that fit, ascending
    for size in candidate_sizes(per_worker):
        if len(fits) >= 2 and 3 * tried[fits[-1]] - 2 * tried[fits[-2]] + state > limit:
            break  # linear in the size, this one would not fit: not tried (a CPU has no out-of-memory error to catch)
        peak = probe(size)
        tried[size] = peak
        if peak is None or peak + state > limit:
            break
        fits.append(size)
    best = fits[-1] if fits else None
    if best is None:
        raise RuntimeError(f"train.micro_batch_size=auto: not even 1 sequence of {seq_len} tokens fits in "
                           f"{limit / 2**30:.2f} GiB (train.memory_limit_gb)")
    return MicroBatchFit(best, limit, tried)


def _probe_step(model, device, seq_len: int, rate: float, size: int, meter: MemoryMeter) -> int | None:
    """Peak bytes of one eager forward + backward of a full [size, seq_len] batch, or None
    when the GPU runs out of memory. The gradients are dropped afterwards."""
    import torch

    vocab = model.config.vocab_size
    slots = prediction_slots(size, seq_len, rate)
    g = torch.Generator().manual_seed(size)
    inputs = {"input_ids": torch.randint(0, vocab, (size, seq_len), generator=g),
              "positions": torch.randperm(size * seq_len, generator=g)[:slots],
              "targets": torch.randint(0, vocab, (slots,), generator=g)}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    net = objective(model)
    was_training = model.training
    model.train()
    meter.reset()
    try:
        with autocast_for(torch.device(device)):
            loss = net(inputs["input_ids"], None, inputs["positions"], inputs["targets"])
        loss.backward()
        return meter.peak()
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del inputs
        if meter.cuda:
            torch.cuda.empty_cache()
