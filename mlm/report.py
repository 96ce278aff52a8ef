"""What a person browsing MLflow sees besides params and metrics: the dataset as a run
input, the training-curve figure, the per-strategy accuracy table and the sample
fill-mask predictions table (docs/architecture.md, "MLflow").

The dataset is an MLflow `MetaDataset` (metadata only, nothing is copied): its source
is the data folder (a local path or an object-store URI), its digest the manifest's
fingerprint, its schema the shard columns and its profile rows and tokens per split.
The figure is drawn with matplotlib's Agg canvas on a `Figure` of its own (no pyplot,
no global backend switch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlflow.data.meta_dataset import MetaDataset

from mlm import shards, storage
from mlm.evaluate import OTHER_STRATEGIES

CURVES = "training_curves.png"  # on the pipeline (or retrain) run
STRATEGY_TABLE = "eval/strategy_accuracy.json"  # on the evaluate run
SAMPLES_TABLE = "eval/fill_mask_samples.json"  # on the evaluate run
CURVE_METRICS = ("train_loss", "val_loss", "val_top1_accuracy")  # from the train run's history


class ShardDataset(MetaDataset):
    """A prepared dataset folder as an MLflow dataset: a MetaDataset (source, name,
    digest, schema) with a profile of rows and tokens per split."""

    def __init__(self, source, name: str, manifest: shards.Manifest):
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.types.schema import Array

        self._profile = {f"{split}_{what}": getattr(manifest.splits[split], what)
                         for split in manifest.splits for what in ("rows", "tokens", "masked")}
        self._profile |= {"seq_len": manifest.seq_len, "packing": manifest.packing,
                          "vocab_size": manifest.tokenizer.vocab_size, "documents_kept": manifest.documents.kept}
        schema = Schema([ColSpec(Array(DataType.integer), "input_ids"), ColSpec(Array(DataType.integer), "labels"),
                         ColSpec(DataType.integer, "num_tokens")])
        super().__init__(source, name=name, digest=manifest.fingerprint, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def dataset(data_dir: str | Path, manifest: shards.Manifest | None = None) -> ShardDataset | None:
    """The dataset folder as an MLflow dataset; None when MLflow has no dataset source for
    its URI scheme (it has them for s3://, gs://, hdfs://, ...): then no input is logged
    and metrics are not tied to a dataset. A local folder is a LocalArtifactDatasetSource,
    named here: MLflow registers two (schemes "" and file) and resolving a local path
    warns that both match."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.exceptions import MlflowException

    uri = storage.normalize(data_dir)
    try:
        source = resolve_dataset_source(uri) if storage.is_uri(uri) else LocalArtifactDatasetSource(uri)
    except MlflowException:
        return None
    return ShardDataset(source, storage.name(uri), manifest or shards.Manifest.read(uri))


def log_dataset(ds: ShardDataset | None, context: str) -> None:
    """The dataset as an input of the active run, tagged `mlflow.data.context`."""
    import mlflow

    if ds is not None:
        mlflow.log_input(ds, context=context)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics MLflow can log (evaluation results also hold strings and dicts)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def strategy_table(metrics: dict[str, Any]) -> dict[str, list]:
    """One row per masking strategy scored by evaluation: the evaluation set's own
    (`random`) and the same rows re-masked (`whole_word`, `span`)."""
    rows = [(s, "" if s == "random" else f"{s}_") for s in ("random", *OTHER_STRATEGIES)]
    rows = [(s, p) for s, p in rows if f"{p}top1_accuracy" in metrics]
    return {
        "strategy": [s for s, _ in rows],
        "top1_accuracy": [float(metrics[f"{p}top1_accuracy"]) for _, p in rows],
        "top5_accuracy": [float(metrics[f"{p}top5_accuracy"]) for _, p in rows],
        "loss": [float(metrics[f"{p}loss"]) for _, p in rows],
        "perplexity": [math.exp(min(float(metrics[f"{p}loss"]), 50.0)) for _, p in rows],
    }


def samples_table(samples: list[dict[str, Any]]) -> dict[str, list]:
    """`evaluate.sample_predictions` as columns; the top-k as `token score` pairs."""
    return {
        "masked_text": [s["masked_text"] for s in samples],
        "true_token": [s["true_token"] for s in samples],
        "top1": [s["predictions"][0]["token"] for s in samples],
        "top1_correct": [s["predictions"][0]["token"] == s["true_token"] for s in samples],
        "predictions": [" | ".join(f"{p['token']} {p['score']:.3f}" for p in s["predictions"]) for s in samples],
    }


def log_evaluation(metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Both tables on the active (evaluate) run."""
    import mlflow

    mlflow.log_table(strategy_table(metrics), STRATEGY_TABLE)
    if samples:
        mlflow.log_table(samples_table(samples), SAMPLES_TABLE)


def metric_history(run_id: str, keys=CURVE_METRICS) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per logged metric of a run, in step order; absent metrics left out."""
    from mlflow import MlflowClient

    client = MlflowClient()
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    return {k: v for k, v in history.items() if v}


def curves_figure(history: dict[str, list[tuple[int, float]]], metrics: dict[str, Any], title: str):
    """Loss and accuracy against the training step: the train run's curves, the final
    evaluation as markers at the last step, the most-frequent-token baseline dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    end = max((step for series in history.values() for step, _ in series), default=0)
    for key, ax in (("train_loss", loss_ax), ("val_loss", loss_ax), ("val_top1_accuracy", acc_ax)):
        if key in history:
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 3 else None)
    if "loss" in metrics:
        loss_ax.scatter([end], [metrics["loss"]], marker="*", s=160, zorder=3, label="evaluation loss")
    for key, marker in (("top1_accuracy", "*"), ("top5_accuracy", "^"), ("whole_word_top1_accuracy", "s"),
                        ("span_top1_accuracy", "D")):
        if key in metrics:
            acc_ax.scatter([end], [metrics[key]], marker=marker, s=90, zorder=3, label=f"evaluation {key}")
    if "baseline_top1_accuracy" in metrics:
        acc_ax.axhline(metrics["baseline_top1_accuracy"], linestyle="--", color="grey",
                       label="most-frequent-token baseline")
    loss_ax.set(xlabel="step", ylabel="masked-LM cross-entropy", title="loss")
    acc_ax.set(xlabel="step", ylabel="masked-token accuracy", title="accuracy", ylim=(0, None))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def log_curves(train_run_id: str, metrics: dict[str, Any], title: str) -> None:
    """The figure, from the train run's history and the evaluation, on the active run."""
    import mlflow

    mlflow.log_figure(curves_figure(metric_history(train_run_id), metrics, title), CURVES)
