import pytest
import torch

from mlm.compute import prediction_slots, slot_targets
from mlm.config import load_config
from mlm.model import build_model, masked_lm_objective


@pytest.fixture(params=["bert", "modernbert"])
def model(request):
    torch.manual_seed(0)
    m = build_model(load_config("tiny", [f"model.architecture={request.param}"]).model, 500, 0)
    assert type(m).__name__ == {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}[request.param]
    m.eval()
    return m


def _slots(labels, rate):
    slots = prediction_slots(*labels.shape, rate)
    positions, targets, dropped = slot_targets(labels.numpy(), slots)
    assert dropped == 0 and len(positions) == slots
    return torch.from_numpy(positions), torch.from_numpy(targets)


def test_sparse_head_loss_equals_full_head_loss(model):
    """The fixed-slot head (padded slots ignored) gives the dense head's loss, with and
    without a padding mask (None: every row full)."""
    ids = torch.randint(5, 500, (4, 64))
    labels = torch.where(torch.rand(4, 64) < 0.15, ids, torch.full_like(ids, -100))
    for mask in (torch.ones_like(ids), None):
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        sparse = masked_lm_objective(model)(ids, mask, *_slots(labels, 0.15))
        assert torch.allclose(full, sparse, atol=1e-5)


def test_sparse_head_gradients_match_and_empty_batch_is_zero(model):
    ids = torch.randint(5, 500, (2, 32))
    labels = torch.where(torch.rand(2, 32) < 0.3, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    masked_lm_objective(model)(ids, mask, *_slots(labels, 0.3)).backward()
    for a, p in zip(full, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)
    model.zero_grad()
    empty = masked_lm_objective(model)(ids, mask, *_slots(torch.full_like(ids, -100), 0.3))
    assert float(empty.detach()) == 0.0
    empty.backward()  # every parameter stays in the graph (DDP needs them all)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
