"""The pretrain pipeline: prepare -> train -> evaluate -> register, one MLflow run per
stage nested under one pipeline run. `pipelines/pretrain.py` is its Ray-job entry."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mlm import corpus, storage
from mlm.config import Config


def data_key(inputs: list[str], cfg: Config) -> str:
    """Folder name of a pipeline's dataset: same inputs and data settings, same folder
    (so a rerun finds its data prepared)."""
    sections = {k: cfg.to_dict()[k] for k in ("data", "tokenizer", "masking", "eval")}
    blob = json.dumps([sorted(inputs), sections], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def data_root(cfg: Config, work: Path) -> str:
    """Where datasets go: `paths.data` (a folder or URI), else WORK/data."""
    return storage.normalize(cfg.paths.data or work / "data")


def run_dir(cfg: Config, work: Path) -> str:
    """A new run folder under `paths.runs` (a folder or URI), else under WORK/runs."""
    return storage.join(cfg.paths.runs or work / "runs", time.strftime("%Y%m%d-%H%M%S"))


def pretrain(inputs: list[str], cfg: Config, work: Path | None = None, *, data_dir: str | None = None,
             stage: str = "pipeline") -> dict[str, Any]:
    """Run every stage; `data_dir` (default: one per inputs and data settings under
    `paths.data`) is prepared, or extended when it holds a subset of the inputs. Every
    path may be an object-store URI (a cluster has no shared disk). The pipeline run
    gets the dataset as its input, the evaluation metrics as `eval_*` and the
    training-curve figure."""
    import mlflow

    from mlm import registry, report
    from mlm.runtime import redact_uri, tracking_uri, work_dir

    work = Path(work) if work else work_dir()
    corpus.resolve_inputs(list(inputs), work)  # bad input fails here, before any run is recorded
    data_dir = storage.normalize(data_dir) if data_dir else storage.join(data_root(cfg, work), data_key(inputs, cfg))
    out_dir = run_dir(cfg, work)
    started = time.time()
    with registry.stage_run(stage, cfg) as parent:
        pid = parent.info.run_id
        dataset = report.dataset(data_dir, _prepare_stage(inputs, data_dir, cfg, pid))
        report.log_dataset(dataset, "training")
        summary, train_run_id = _train_stage(data_dir, out_dir, cfg, pid, dataset)
        metrics = _evaluate_stage(summary["model_dir"], data_dir, cfg, pid, dataset)
        with registry.stage_run("register", cfg, pid) as run:
            reg = registry.register(
                summary["model_dir"], cfg.registry.model_name, metrics, cfg, data_dir=data_dir, run_id=run.info.run_id
            )
        mlflow.log_metrics({f"eval_{k}": v for k, v in report.numeric(metrics).items()})
        report.log_curves(train_run_id, metrics, f"{cfg.registry.model_name} v{reg['version']}: training and evaluation")
    return {
        "data_dir": str(data_dir),
        "model_dir": summary["model_dir"],
        "tracking_uri": redact_uri(tracking_uri()),  # printed: never a password
        "pipeline_run_id": pid,
        "metrics": {k: metrics[k] for k in ("top1_accuracy", "top5_accuracy", "loss", "perplexity", "baseline_top1_accuracy",
                                            "probe_macro_f1", "probe_random_init_macro_f1", "probe_gain") if k in metrics},
        "registered": reg,
        "seconds": round(time.time() - started, 1),
    }


def _prepare_stage(inputs: list[str], data_dir: str, cfg: Config, pid: str):
    """The prepare run: the dataset, its manifest as an artifact, its sizes as metrics."""
    import mlflow

    from mlm import registry
    from mlm.prepare import prepare

    with registry.stage_run("prepare", cfg, pid):
        manifest = prepare(inputs, data_dir, cfg, overwrite=True)
        mlflow.log_dict(manifest.to_dict(), "manifest.json")
        mlflow.log_metrics({
            "documents_kept": manifest.documents.kept,
            "train_tokens": manifest.splits["train"].tokens,
            "validation_tokens": manifest.splits["validation"].tokens,
        })
    return manifest


def _train_stage(data_dir: str, out_dir: str, cfg: Config, pid: str, dataset) -> tuple[dict[str, Any], str]:
    """The train run (the dataset as its training input): (train's summary, the run's id)."""
    import mlflow

    from mlm import registry, report
    from mlm.train import train

    with registry.stage_run("train", cfg, pid) as run:
        report.log_dataset(dataset, "training")
        summary = train(data_dir, out_dir, cfg, mlflow_run_id=run.info.run_id)
        mlflow.log_metrics({"train_seconds": summary["seconds"], "approx_tokens_per_s": summary["approx_tokens_per_s"]})
    return summary, run.info.run_id


def _evaluate_stage(model_dir: str, data_dir: str, cfg: Config, pid: str, dataset) -> dict[str, Any]:
    """The evaluate run: the dataset as its evaluation input, the metrics (also saved in
    the model directory), the per-strategy and sample fill-mask tables; with
    `registry.probe`, the probe task's macro-F1s too (`probe.json`; metrics, so the
    version's tags and card carry them)."""
    import mlflow

    from mlm import registry, report
    from mlm.evaluate import evaluate, sample_predictions, save_results

    with registry.stage_run("evaluate", cfg, pid):
        report.log_dataset(dataset, "evaluation")
        metrics = evaluate(model_dir, data_dir, cfg.eval.batch_size, engine=cfg.eval.engine,
                           ray_min_rows=cfg.eval.ray_min_rows, use_gpu=cfg.eval.use_gpu)
        if cfg.registry.probe:  # downstream use: the probe task, pretrained vs random-init (mlm probe)
            from mlm.finetune.probe import probe, probe_metrics

            result = probe(model_dir, cfg, cfg.eval.use_gpu)
            metrics |= probe_metrics(result)
            mlflow.log_dict(result, "probe.json")
        save_results(model_dir, metrics)
        mlflow.log_metrics(report.numeric(metrics))
        report.log_evaluation(metrics, sample_predictions(model_dir, data_dir))
    return metrics


def summary_text(result: dict[str, Any], with_json: bool = True) -> str:
    """For people: where things are, how the model scored, what the gate decided; with
    `with_json`, the result as a last JSON line (`{"summary": ...}`, what `mlm retrain`
    prints for scripts)."""
    reg, m = result["registered"], result["metrics"]
    from mlm.runtime import redact_uri

    uri = redact_uri(result["tracking_uri"])
    ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite:") else uri
    lines = [
        f"data      {result['data_dir']}",
        f"model     {result['model_dir']}",
        f"mlflow    {uri}",
        f"metrics   top1 {m['top1_accuracy']:.4f} (most-frequent-token baseline {m['baseline_top1_accuracy']:.4f}), "
        f"top5 {m['top5_accuracy']:.4f}, loss {m['loss']:.4f}, perplexity {m['perplexity']:.1f}",
        f"registry  {reg['name']} v{reg['version']} -> @{reg['alias']} ({reg['reason']})",
        f"try       mlm fill-mask \"the [MASK] statement returns a value.\" --model models:/{reg['name']}@{reg['alias']}",
        f"ui        {ui}",
        f"took      {result['seconds']:.0f}s",
    ]
    if with_json:
        summary = {k: v for k, v in result.items() if k != "registered"} | {"tracking_uri": uri, "registered": reg}
        lines.append(json.dumps({"summary": summary}, default=str))
    return "\n".join(lines)
