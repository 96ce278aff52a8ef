"""A classifier scored on labelled rows (`mlm evaluate CLASSIFIER --data FILE`, the
fine-tuning stage, the gate's re-scoring of a champion)."""

from __future__ import annotations

from typing import Any

from mlm.config import Config
from mlm.finetune.data import Labelled, read_labelled


def evaluate_classifier(model: str, rows: Labelled, use_gpu="auto") -> dict[str, Any]:
    """accuracy, macro and per-class precision/recall/F1, confusion matrix of the
    classifier `model` (a folder or MLflow URI) on labelled rows. A label the model does
    not know is an error."""
    import numpy as np

    from mlm.compute import inference_device
    from mlm.finetune.data import LabelledDataError
    from mlm.finetune.metrics import classification_metrics
    from mlm.predict import Classifier

    classifier = Classifier(model, inference_device(use_gpu))
    known = {n: i for i, n in enumerate(classifier.labels)}
    unknown = sorted(set(rows.labels) - set(known))
    if unknown:
        raise LabelledDataError(f"{rows.source}: labels the model does not know: {', '.join(map(repr, unknown[:5]))}")
    predicted, _ = classifier(rows.texts)
    truth = np.asarray([known[y] for y in rows.labels])
    return classification_metrics(truth, predicted, classifier.labels) | {"data_fingerprint": rows.fingerprint}


def evaluate_file(model: str, path: str, cfg: Config) -> dict[str, Any]:
    """`mlm evaluate CLASSIFIER --data FILE`: the classifier's metrics on a labelled file."""
    rows = read_labelled(path, cfg.finetune.text_column, cfg.finetune.label_column)
    return evaluate_classifier(model, rows, cfg.eval.use_gpu)
