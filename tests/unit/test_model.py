import pytest
import torch

from mlm.config import load_config
from mlm.model import build_model, masked_lm_objective


@pytest.fixture(params=["bert", "modernbert"])
def model(request):
    torch.manual_seed(0)
    m = build_model(load_config("tiny", [f"model.architecture={request.param}"]).model, 500, 0)
    assert type(m).__name__ == {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}[request.param]
    m.eval()
    return m


def test_sparse_head_loss_equals_full_head_loss(model):
    ids = torch.randint(5, 500, (4, 64))
    labels = torch.where(torch.rand(4, 64) < 0.15, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    sparse = masked_lm_objective(model)(ids, mask, labels)
    assert torch.allclose(full, sparse, atol=1e-5)


def test_sparse_head_gradients_match_and_empty_batch_is_zero(model):
    ids = torch.randint(5, 500, (2, 32))
    labels = torch.where(torch.rand(2, 32) < 0.3, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    masked_lm_objective(model)(ids, mask, labels).backward()
    for a, p in zip(full, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)
    empty = masked_lm_objective(model)(ids, mask, torch.full_like(ids, -100))
    assert float(empty.detach()) == 0.0
