"""mlm.compute: the one peak-FLOPs table, FLOPs counted from the model's layers, the one
masked-position loss, and `mlm bench train` timing the training loop's own step."""

from __future__ import annotations

import pytest
import torch

from mlm.compute import masked_lm_loss, model_flops, peak_flops, prediction_slots, score, slot_targets
from mlm.config import load_config
from mlm.model import build_model, masked_lm_objective


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L40S", 362e12),  # "L4" is a substring of it: an L40S was taken for an L4 (or the reverse)
    ("NVIDIA L4", 121e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla T4", None),
    ("", None),
])
def test_peak_flops_matches_whole_model_names(name, peak):
    assert peak_flops(name) == peak


def _linear_count(arch: str, h: int, i: int, layers: int) -> int:
    attention = 4 * h * h  # q, k, v, output (ModernBERT: Wqkv h -> 3h, Wo h -> h)
    mlp = h * 2 * i + i * h if arch == "modernbert" else 2 * h * i  # GeGLU: Wi h -> 2i, Wo i -> h
    return layers * (attention + mlp)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_flops_count_the_encoder_per_token_and_the_head_per_prediction(arch):
    """The FLOPs a masked-LM step needs: the encoder's linears and attention on every real
    token, the head (transform + vocabulary decoder) only on each prediction, so neither
    contender is credited with the dense head's work on unmasked tokens."""
    m = load_config("tiny", [f"model.architecture={arch}"]).model
    model = build_model(m, 500, 0)
    seq = 128
    flops = model_flops(model, seq)
    encoder = 6 * _linear_count(arch, m.hidden_size, m.intermediate_size, m.num_layers)
    assert flops.per_token == encoder + 12 * m.num_layers * m.hidden_size * seq
    assert flops.per_prediction == 6 * (m.hidden_size * m.hidden_size + m.hidden_size * 500)
    assert flops.of(1000, 300) == 1000 * flops.per_token + 300 * flops.per_prediction


def test_flops_sliding_attention_sees_its_window():
    m = load_config("tiny", ["model.architecture=modernbert", "model.num_layers=3",
                             "model.max_position_embeddings=512"]).model
    model = build_model(m, 500, 0)
    kinds = model.config.layer_types
    window = model.config.local_attention
    assert "sliding_attention" in kinds and window < 512
    linear = model_flops(model, 0).per_token
    keys = sum(512 if k == "full_attention" else window for k in kinds)
    assert model_flops(model, 512).per_token - linear == 12 * m.hidden_size * keys


def _slots_of(labels: torch.Tensor, slots: int | None = None):
    slots = slots or int((labels != -100).sum())
    positions, targets, dropped = slot_targets(labels.numpy(), slots)
    return torch.from_numpy(positions), torch.from_numpy(targets), dropped


def test_one_masked_position_loss():
    """Training's objective and evaluation's sums agree on the masked-LM loss."""
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, 500, 0).eval()
    ids = torch.randint(5, 500, (3, 40))
    labels = torch.where(torch.rand(3, 40) < 0.2, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    positions, targets, _ = _slots_of(labels, prediction_slots(3, 40, 0.2))
    loss = masked_lm_objective(model)(ids, mask, positions, targets)
    assert torch.allclose(loss, masked_lm_loss(model, ids, mask, positions, targets))
    import pyarrow as pa

    from mlm.shards import to_table

    table = to_table(ids.numpy(), labels.numpy(), pa.array([40] * 3).to_numpy())
    sums = score(model, [table])
    assert sums["n"] == int((labels != -100).sum())
    assert sums["loss_sum"] / sums["n"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_bench_train_times_the_training_step(monkeypatch):
    """`mlm bench train` runs mlm.step.train_step with the training optimizer (AdamW
    betas (0.9, 0.98), eps 1e-6); grad_clip 0 means no clipping, not zeroed gradients."""
    import mlm.step
    from mlm.bench.train import _our_steps
    from mlm.compute import batch_arrays
    from mlm.shards import to_table

    calls = []
    real = mlm.step.train_step

    def spy(model, optimizer, micro_batches, **kw):
        group = optimizer.param_groups[1]  # no weight decay: moves only through gradients
        before = [p.detach().clone() for p in group["params"]]
        result = real(model, optimizer, micro_batches, **kw)
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, group["params"]))
        calls.append((group["betas"], group["eps"], kw["grad_clip"], float(result.grad_norm), moved))
        return result

    monkeypatch.setattr(mlm.step, "train_step", spy)
    cfg = load_config("tiny", ["train.grad_clip=0"])
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (4, 32), generator=rng)
    labels = torch.where(torch.rand(4, 32, generator=rng) < 0.3, ids, torch.full_like(ids, -100))
    batch = batch_arrays(to_table(ids.numpy(), labels.numpy(), torch.full((4,), 32).numpy()))
    ours = _our_steps(cfg, 500, 0, [batch] * 3, torch.device("cpu"), 1, 0.3)
    assert ours["seconds"] > 0 and ours["warmup_s"] > 0 and ours["dropped"] == 0
    assert len(calls) == 3
    for betas, eps, clip, norm, moved in calls:
        assert (betas, eps, clip) == ((0.9, 0.98), 1e-6, 0.0)
        assert norm > 0 and moved  # gradients reached the optimizer
