"""mlm.finetune without Ray: classifier metrics equal scikit-learn's, labelled files are
read and refused as they should be, the probe task is fixed and does not spell out its
labels, and the workers' rows partition each step's batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlm.config import load_config
from mlm.finetune import data as fdata
from mlm.finetune.data import LabelledDataError, label_ids, probe_split, read_labelled
from mlm.finetune.metrics import classification_metrics, confusion_figure


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learns(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = 6
    truth = rng.integers(0, classes - 1, 300)  # class 5 never true
    predicted = np.where(rng.random(300) < 0.6, truth, rng.integers(0, classes, 300))
    predicted[predicted == 3] = 2  # class 3 never predicted
    names = [f"c{i}" for i in range(classes)]
    m = classification_metrics(truth, predicted, names)
    labels = list(range(classes))
    p, r, f, s = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert m["macro_precision"] == pytest.approx(p.mean()) and m["macro_recall"] == pytest.approx(r.mean())
    assert m["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(f1_score(truth, predicted, labels=labels, average="weighted", zero_division=0))
    for row, pi, ri, fi, si in zip(m["per_class"], p, r, f, s):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((pi, ri, fi, si))
    assert m["confusion"] == confusion_matrix(truth, predicted, labels=labels).tolist()
    assert confusion_figure(m, names).axes  # draws without a display


def _write(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        (pq.write_table if name.endswith(".parquet") else pcsv.write_csv)(table, str(path))
    return str(path)


ROWS = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(10)]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet"])
def test_labelled_files_read_alike(tmp_path, name):
    rows = read_labelled(_write(tmp_path, name, ROWS))
    assert rows.texts == [r["text"] for r in ROWS] and rows.labels == [r["label"] for r in ROWS]
    assert rows.fingerprint == read_labelled(_write(tmp_path, "again.jsonl", ROWS)).fingerprint
    numeric = read_labelled(_write(tmp_path, "n" + name, [{"text": "x", "label": 3}, {"text": "y", "label": 4}]))
    assert numeric.labels == ["3", "4"]  # labels are names


def test_bad_labelled_input_is_one_clear_error(tmp_path):
    good = read_labelled(_write(tmp_path, "good.jsonl", ROWS))
    cases = {
        "no such file": lambda: read_labelled(str(tmp_path / "missing.jsonl")),
        "no column 'label'": lambda: read_labelled(_write(tmp_path, "a.jsonl", [{"text": "x", "y": 1}])),
        "row 2 has an empty": lambda: read_labelled(_write(tmp_path, "b.jsonl", [{"text": "x", "label": "a"},
                                                                                {"text": " ", "label": "b"}])),
        "row 1 has no 'label'": lambda: read_labelled(_write(tmp_path, "c.jsonl", [{"text": "x", "label": None}])),
        "unknown format": lambda: read_labelled(str(tmp_path / "d.txt")) if (tmp_path / "d.txt").write_text("x") else 0,
        "one class only": lambda: label_ids(read_labelled(_write(tmp_path, "e.jsonl", [{"text": "x", "label": "a"}])), good),
        "labels the training data lacks: 'zz'": lambda: label_ids(good, read_labelled(
            _write(tmp_path, "f.jsonl", [{"text": "x", "label": "zz"}]))),
    }
    for message, call in cases.items():
        with pytest.raises(LabelledDataError, match=message):
            call()


def test_the_probe_task_is_fixed_disjoint_and_unlabelled():
    train, test = probe_split(f"{fdata.PROBE}:train"), probe_split(f"{fdata.PROBE}:test")
    assert set(train.labels) == set(test.labels) == set(fdata.PROBE_PACKAGES)
    assert not set(train.texts) & set(test.texts)
    assert len(train) > 600 and len(test) > 300
    assert max(train.labels.count(p) for p in fdata.PROBE_PACKAGES) <= fdata.PROBE_PER_CLASS
    for text, label in zip(train.texts + test.texts, train.labels + test.labels):
        assert label not in text.lower().split()  # the package's name is taken out
    assert probe_split(f"{fdata.PROBE}:train").fingerprint == train.fingerprint
    with pytest.raises(LabelledDataError, match="unknown built-in"):
        probe_split("builtin:nothing:train")


def test_workers_split_each_step_batch():
    from mlm.finetune.train import schedule, step_rows

    cfg = load_config("tiny", ["finetune.batch_size=8", "finetune.epochs=2"])  # two workers (tiny)
    rows = 37
    sched = schedule(cfg, rows)
    assert (sched.per_epoch, sched.max_steps) == (4, 8)
    seen = []
    for step in range(sched.per_epoch):
        parts = [step_rows(cfg, rows, step, rank, 2) for rank in range(2)]
        assert all(len(p) == 4 for p in parts) and not set(parts[0]) & set(parts[1])
        seen += [int(x) for p in parts for x in p]
    assert len(set(seen)) == 32  # an epoch: each row at most once, the last 5 left out
    assert (step_rows(cfg, rows, 5, 1, 2) == step_rows(cfg, rows, 5, 1, 2)).all()  # a resumed worker reads the same
    assert set(step_rows(cfg, rows, 4, 0, 2)) != set(step_rows(cfg, rows, 0, 0, 2))  # another epoch, another order
