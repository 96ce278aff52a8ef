"""Classifier metrics from predictions: accuracy, per-class and macro precision, recall
and F1, the confusion matrix, and the figure and table MLflow shows.

Definitions as scikit-learn's (`precision_recall_fscore_support`, `zero_division=0`):
a class never predicted has precision 0, a class absent from the truth recall 0, and
F1 is 0 where precision + recall is 0; macro averages are unweighted means over the
classes of `labels` (every class of the model), tested against scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] counts: row = true class, column = predicted class."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (np.asarray(truth, np.int64), np.asarray(predicted, np.int64)), 1)
    return m


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), float), where=den > 0)


def classification_metrics(truth, predicted, names: list[str]) -> dict[str, Any]:
    """accuracy, macro_precision, macro_recall, macro_f1, weighted_f1, per_class (one row
    per class: label, precision, recall, f1, support), confusion (the matrix as lists)."""
    m = confusion(truth, predicted, len(names))
    tp = np.diag(m).astype(float)
    support, predicted_n = m.sum(axis=1), m.sum(axis=0)
    precision, recall = _ratio(tp, predicted_n), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(m.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "examples": total,
        "per_class": [{"label": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for n, p, r, f, s in zip(names, precision, recall, f1, support)],
        "confusion": m.tolist(),
    }


def confusion_figure(metrics: dict[str, Any], names: list[str]):
    """The confusion matrix as a matplotlib Figure (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(metrics["confusion"])
    size = max(4.0, 0.6 * len(names) + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    return fig


def log_to_mlflow(metrics: dict[str, Any], names: list[str], prefix: str = "") -> None:
    """To the active MLflow run: the scalar metrics, the per-class table
    (`classifier/per_class.json`) and the confusion matrix (`classifier/confusion_matrix.png`)."""
    import mlflow

    mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    mlflow.log_table({k: [row[k] for row in metrics["per_class"]] for k in ("label", "precision", "recall", "f1", "support")},
                     "classifier/per_class.json")
    mlflow.log_figure(confusion_figure(metrics, names), "classifier/confusion_matrix.png")
