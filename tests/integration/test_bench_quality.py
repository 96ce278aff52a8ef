"""`mlm bench quality` on a small budget: both contenders train to equal tokens and are
scored by one scorer on the same held-out rows (no timing assertions)."""

from __future__ import annotations

import math

import pytest

from mlm.bench.quality import LAYOUTS, bench_config, bench_quality, format_report, heldout_set

pytestmark = pytest.mark.integration

SMALL = ("tokenizer.vocab_size=1024", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2",
         "model.intermediate_size=128", "train.micro_batch_size=8", "train.global_batch_size=8")


def test_bench_quality_both_train_on_equal_tokens_and_one_heldout_set(ray_cluster, tmp_path):
    cfg = bench_config("tiny", SMALL, steps=12)
    r = bench_quality(["builtin:python-docs"], cfg, tmp_path, heldout_rows=48, echo=lambda m: None)
    ours, hf = r["mlm"], r["hf_trainer"]
    # equal tokens: 12 steps x 8 rows x 128 positions; ours counts real tokens (packed
    # rows are full but for the last one of a range), HF's grouped rows are all full
    assert hf["tokens"] == 12 * 8 * 128
    assert 0.97 <= r["ratios"]["tokens"] <= 1.0
    for layout in LAYOUTS:
        a, b = ours["heldout"][layout], hf["heldout"][layout]
        assert a["rows"] == b["rows"] == r["heldout_rows"][layout] == 48
        assert a["masked_positions"] == b["masked_positions"] > 48  # the same masked rows for both
        for scores in (a, b):
            assert 0.0 <= scores["top1_accuracy"] <= 1.0 and math.isfinite(scores["loss"])
            # trained: better than a uniform guess over the vocabulary
            assert scores["loss"] < math.log(1024)
    assert r["heldout_documents"] > 0 and r["train_documents"] > 10 * r["heldout_documents"] / 3
    text = format_report(r)
    assert "mlm/HF: top-1" in text and "hf_trainer" in text


def test_heldout_set_is_fixed_and_masked_at_15_percent(tmp_path):
    from mlm.tokenizer import train_tokenizer

    cfg = bench_config("tiny", SMALL, steps=1)
    texts = [f"document {i} says that the parser reads tokens and the compiler emits code " * 3 for i in range(40)]
    tok = train_tokenizer(texts, cfg.tokenizer.model_copy(update={"vocab_size": 256}))
    a, b = heldout_set(tok, texts, 32, 20, seed=7), heldout_set(tok, texts, 32, 20, seed=7)
    other = heldout_set(tok, texts, 32, 20, seed=8)
    for layout in LAYOUTS:
        assert all(bool((a[layout][k] == b[layout][k]).all()) for k in a[layout])
        assert not bool((a[layout]["labels"] == other[layout]["labels"]).all())
        labels, attention = a[layout]["labels"], a[layout]["attention_mask"]
        assert bool((labels[attention == 0] == -100).all())  # padding is never a target
        share = float((labels != -100).sum()) / float(attention.sum())
        assert 0.05 < share < 0.25
    docs = a["documents"]
    assert bool((docs["labels"][:, 0] == -100).all()) and bool((docs["input_ids"][:, 0] == tok.cls_token_id).all())
