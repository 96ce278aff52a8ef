"""mlm.step and the fixed prediction slots (issue 21): the slot rule never drops a masked
position at the default rates and counts any it drops; the compiled objective is one
graph that never recompiles as the masked count changes, with the eager step's losses;
`train.micro_batch_size: auto` picks its documented size; nothing in the step waits for
the device."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mlm.compute import prediction_slots, slot_targets
from mlm.config import load_config
from mlm.masking import IGNORE_INDEX, apply
from mlm.model import build_model
from mlm.step import (MemoryMeter, StepResult, autocast_for, build_optimizer, candidate_sizes, compile_enabled,
                      fit_micro_batch, objective, train_step)

VOCAB = 500


def _mask(strategy: str, rows: int, seq: int, rate: float, rng: np.random.Generator):
    """A full [rows, seq] batch masked as prepare/the loader mask it ([CLS] ... [SEP] never picked)."""
    ids = rng.integers(5, VOCAB, (rows, seq)).astype(np.int32)
    maskable = np.ones((rows, seq), bool)
    maskable[:, 0] = maskable[:, -1] = False
    opts = {"geometric_p": 0.2, "max_span": 10} if strategy == "span" else {}
    return apply(strategy, ids, maskable, rng, word_start=rng.random((rows, seq)) < 0.7, rate=rate,
                 mask_fraction=0.8, random_fraction=0.1, mask_id=4, random_ids=np.arange(5, VOCAB), **opts)


@pytest.mark.parametrize("strategy", ["random", "whole_word", "span"])
def test_the_slot_rule_never_drops_at_the_default_rates(strategy):
    """Training masks at 30% (masking.rate), evaluation at 15%; from one row to BERT-base's
    batch, 2,000 batches per shape: every masked position gets a slot."""
    rng = np.random.default_rng(0)
    most = 0.0
    for rate in (0.3, 0.15):
        for rows, seq in ((1, 128), (16, 128), (128, 128), (8, 512)):
            slots = prediction_slots(rows, seq, rate)
            n = rows * seq
            assert slots % 8 == 0 or slots == n
            assert rate * n + 6 * math.sqrt(n * rate * (1 - rate)) <= slots <= n
            for _ in range(2000 if rows * seq <= 2048 else 200):
                _, labels = _mask(strategy, rows, seq, rate, rng)
                masked = int((labels != IGNORE_INDEX).sum())
                assert masked <= slots
                most = max(most, masked / slots)
                assert slot_targets(labels, slots)[2] == 0
    assert most > 0.5  # the slots are not vastly oversized either
    # the sparse head's saving at BERT-base's batch: 30% masking uses 34% of the dense head's rows
    assert prediction_slots(128, 128, 0.3) / (128 * 128) < 0.35


def test_overflow_is_deterministic_and_counted():
    labels = np.full((4, 16), IGNORE_INDEX, np.int32)
    labels[:, 1:9] = np.arange(32).reshape(4, 8) + 100  # 32 masked
    positions, targets, dropped = slot_targets(labels, 24)
    assert dropped == 8 and len(positions) == 24 and (targets != IGNORE_INDEX).all()
    assert (labels.reshape(-1)[positions] == targets).all()
    assert len(set(positions.tolist())) == 24
    rows = positions // 16
    assert set(rows.tolist()) == {0, 1, 2, 3}  # spread over the batch, not the first rows only
    again = slot_targets(labels, 24)
    assert (again[0] == positions).all() and (again[1] == targets).all()
    # room to spare: padded with position 0, target -100 (ignored)
    positions, targets, dropped = slot_targets(labels, 40)
    assert dropped == 0 and (targets[32:] == IGNORE_INDEX).all() and (positions[32:] == 0).all()


def _batches(n: int, rows: int, seq: int, slot_rate: float, seed: int = 0):
    """n batches whose masked counts vary (rates 5%..30%), slots sized for `slot_rate`."""
    rng = np.random.default_rng(seed)
    slots = prediction_slots(rows, seq, slot_rate)
    out, counts = [], set()
    for i in range(n):
        ids, labels = _mask("random", rows, seq, 0.05 + 0.25 * (i % 7) / 6, rng)
        positions, targets, dropped = slot_targets(labels, slots)
        assert dropped == 0
        counts.add(int((targets != IGNORE_INDEX).sum()))
        out.append({"input_ids": torch.from_numpy(ids.astype(np.int64)), "attention_mask": None,
                    "positions": torch.from_numpy(positions), "targets": torch.from_numpy(targets),
                    "tokens": rows * seq, "predictions": int((targets != IGNORE_INDEX).sum()), "dropped": 0,
                    "copied": None})
    assert len(counts) > min(10, n - 1)  # masked counts that differ from batch to batch
    return out


@pytest.fixture(scope="module")
def compiled_and_eager():
    """50 steps of the tiny model through the compiled objective (inductor on CPU), and
    the first 20 of them through the eager one, from the same weights, on batches whose
    masked counts all differ."""
    from torch._dynamo.utils import counters

    cfg = load_config("tiny", ["train.compile=true"])
    assert compile_enabled(cfg.train, torch.device("cpu"))
    assert not compile_enabled(load_config("tiny").train, torch.device("cpu"))  # auto: off on CPU
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, 0)
    twin = copy.deepcopy(model)
    batches = _batches(50, 8, 64, 0.3)
    torch._dynamo.reset()
    counters.clear()
    results = {}
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails the run
        results["compiled"] = _run(objective(model, cfg.train, "cpu"), model, cfg, batches)
    graphs = counters["stats"]["unique_graphs"]
    results["eager"] = _run(objective(twin), twin, cfg, batches[:20])
    return results, graphs, model


def _run(net, model, cfg, batches) -> list[StepResult]:
    optimizer = build_optimizer(model, cfg.train, "cpu")
    autocast = autocast_for(torch.device("cpu"))
    return [train_step(net, optimizer, [b], lr=1e-3, grad_clip=1.0, autocast=autocast) for b in batches]


def test_the_compiled_step_is_one_graph_that_never_recompiles(compiled_and_eager):
    results, graphs, model = compiled_and_eager
    assert graphs == 1
    assert len(results["compiled"]) == 50
    assert not any("_orig_mod" in k for k in model.state_dict())  # what checkpoints save


def test_compiled_and_eager_losses_agree(compiled_and_eager):
    results, _, _ = compiled_and_eager
    for compiled, eager in zip(results["compiled"][:20], results["eager"]):
        assert float(compiled.losses[0]) == pytest.approx(float(eager.losses[0]), rel=1e-4)
    # the weights moved between steps (random tokens leave nothing to learn but the step still updates)
    assert len({round(float(r.losses[0]), 6) for r in results["compiled"]}) > 40


def test_the_step_returns_tensors_and_counts():
    """No host sync in the step: losses and the norm come back as tensors (read when
    logged); tokens, predictions and drops are counted from the host's arrays."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, 0)
    batches = _batches(3, 4, 32, 0.3)
    result = train_step(objective(model), build_optimizer(model, cfg.train, "cpu"), batches, lr=1e-3,
                        grad_clip=1.0, autocast=autocast_for(torch.device("cpu")))
    assert isinstance(result.losses, torch.Tensor) and result.losses.shape == (3,)
    assert isinstance(result.grad_norm, torch.Tensor)
    assert result.tokens == 3 * 4 * 32
    assert result.predictions == sum(b["predictions"] for b in batches) and result.dropped == 0


def test_candidate_sizes_keep_the_global_batch():
    assert candidate_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert candidate_sizes(96) == [1, 2, 4, 8, 16, 32]  # 64 does not divide 96
    assert candidate_sizes(1) == [1]


def test_auto_micro_batch_on_a_cpu():
    """The real probe on this CPU: without a cap worth the name it takes the worker's
    whole share of the global batch; under a cap below what the model alone holds it says
    so in one line; every size it tried was measured."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, 0)
    fit = fit_micro_batch(model, "cpu", 64, 0.3, 16, limit_gb=1000)
    assert fit.size == 16 and list(fit.tried) == [1, 2, 4, 8, 16]
    assert all(peak and peak > 0 for peak in fit.tried.values())
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    with pytest.raises(RuntimeError, match="not even 1 sequence"):
        fit_micro_batch(model, "cpu", 64, 0.3, 16, limit_gb=0.01)


def test_auto_micro_batch_picks_the_largest_that_fits():
    """The documented rule, on a device whose step needs 1 GB + 0.2 GB per sequence and
    runs out of memory from 128 sequences (what a GPU's allocator reports; none is here):
    under a 10 GiB cap the largest fitting power of two is 32, and 64 is not even tried
    (extrapolated from 16 and 32 it would not fit); without a cap the out-of-memory
    error at 128 stops the probe at 64."""
    model = build_model(load_config("tiny").model, VOCAB, 0)
    tried = []

    def probe(size):
        tried.append(size)
        return None if size >= 128 else int(1e9 + 0.2e9 * size)

    fit = fit_micro_batch(model, "cpu", 128, 0.3, 256, limit_gb=10, state_bytes=0, probe=probe)
    assert fit.size == 32 and tried == [1, 2, 4, 8, 16, 32]
    tried.clear()
    fit = fit_micro_batch(model, "cpu", 128, 0.3, 256, limit_gb=1000, state_bytes=0, probe=probe)
    assert fit.size == 64 and fit.tried[128] is None and tried[-1] == 128
    # AdamW's state counts against the cap: 8 GiB of it leaves 2 GiB, room for 4 sequences (1.8 GB)
    fit = fit_micro_batch(model, "cpu", 128, 0.3, 256, limit_gb=10, state_bytes=8 * 2**30, probe=probe)
    assert fit.size == 4


def test_the_memory_meter_sees_a_cpu_allocation():
    meter = MemoryMeter("cpu")
    meter.reset()
    before = meter.peak()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert meter.peak() - before > 48 * 2**20
    del block
