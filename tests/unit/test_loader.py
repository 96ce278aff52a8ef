"""The deterministic training input: every row once per epoch over all workers, the
same batches whatever the resume point, a new order every epoch."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm.loader import EpochPlan, Prefetcher, row_groups, worker_batches


@pytest.fixture
def groups(tmp_path):
    paths = []
    start = 0
    for i, n in enumerate([100, 37, 250]):
        path = tmp_path / f"train-{i:05d}.parquet"
        pq.write_table(pa.table({"row": np.arange(start, start + n)}), path, row_group_size=64)
        paths.append(str(path))
        start += n
    return row_groups(paths)


def _rows(plan, rank, start=0):
    return [t.column("row").to_pylist() for t in worker_batches(plan, rank, start)]


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_at_most_once_per_epoch_and_equal_batches(groups, world, window):
    plan = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=world, window=window)
    per_rank = [_rows(plan, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 387 // (8 * world)
    flat = [x for batches in per_rank for b in batches for x in b]
    assert len(flat) == len(set(flat)) and all(len(b) == 8 for batches in per_rank for b in batches)
    assert len(flat) >= 387 - 8 * world  # only the tail that cannot fill a batch on every worker is left out


@pytest.mark.parametrize("window", [1, 4])
def test_resume_point_gives_the_same_batches_and_epochs_differ(groups, window):
    plan = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=2, window=window)
    full = _rows(plan, 1)
    assert _rows(EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=2, window=window), 1, start=7) == full[7:]
    again = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=2, window=window)
    assert _rows(again, 1) == full
    assert _rows(EpochPlan(groups, seed=3, epoch=1, micro_batch=8, world=2, window=window), 1) != full
    ordered = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=1, shuffle=False, window=window)
    assert [x for b in _rows(ordered, 0) for x in b] == list(range(384))  # unshuffled: file order


def _group_of(row: int) -> int:
    """Row group of a row of the fixture: files of 100, 37, 250 rows in groups of 64."""
    bounds = [0, 64, 100, 137, 201, 265, 329, 387]
    return int(np.searchsorted(bounds, row, side="right")) - 1


def test_a_window_mixes_row_groups_into_every_batch(groups):
    """Shuffling inside one row group draws each batch from one place of the corpus; a
    window of all 7 groups draws it from all over."""
    narrow = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=1, window=1)
    wide = EpochPlan(groups, seed=3, epoch=0, micro_batch=8, world=1, window=len(groups))
    spread = {name: np.mean([len({_group_of(x) for x in b}) for b in _rows(plan, 0)])
              for name, plan in (("narrow", narrow), ("wide", wide))}
    assert spread["narrow"] < 1.3 and spread["wide"] > 3.5, spread
    assert len({x for b in _rows(wide, 0) for x in b}) == len({x for b in _rows(narrow, 0) for x in b}) == 384


def test_prefetcher_yields_in_order_measures_wait_and_reraises():
    out = list(Prefetcher(iter(range(50)), lambda x: x * 2, depth=3))
    assert out == [x * 2 for x in range(50)]

    def boom(x):
        if x == 5:
            raise ValueError("bad batch")
        return x

    p = Prefetcher(iter(range(10)), boom)
    with pytest.raises(ValueError, match="bad batch"):
        list(p)
    assert p.wait_s >= 0


def test_schedules():
    from mlm.config import load_config
    from mlm.train import get_lr

    for name in ("linear", "cosine", "wsd"):
        tc = load_config("tiny", [f"train.schedule={name}", "train.max_steps=100", "train.warmup_steps=10"]).train
        lrs = [get_lr(s, tc) for s in range(100)]
        assert lrs[9] == pytest.approx(tc.learning_rate) and lrs[0] < lrs[5] < lrs[9]
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.06 * tc.learning_rate
    wsd = load_config("tiny", ["train.schedule=wsd", "train.max_steps=100", "train.warmup_steps=10",
                               "train.decay_fraction=0.2"]).train
    assert get_lr(70, wsd) == pytest.approx(wsd.learning_rate) and get_lr(90, wsd) < wsd.learning_rate
    cos = load_config("tiny", ["train.schedule=cosine", "train.max_steps=100", "train.warmup_steps=10"]).train
    assert get_lr(55, cos) == pytest.approx(0.5 * cos.learning_rate, rel=0.02)
