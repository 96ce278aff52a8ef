"""The fine-tuning stage as `mlm finetune` runs it: one MLflow run (`finetune`) that
trains the classifier (Ray Train), evaluates it on the validation file (metrics, the
per-class table and the confusion-matrix figure in MLflow) and registers it.
"""

from __future__ import annotations

import time
from typing import Any

from mlm.config import Config


def run_finetune(model_ref: str, train_path: str, validation_path: str, cfg: Config, *, out_dir: str | None = None,
                 name: str | None = None, register: bool = True) -> dict[str, Any]:
    """Fine-tune -> evaluate -> register in one MLflow run; returns the summary."""
    import mlflow

    from mlm import registry
    from mlm.finetune.evaluate import evaluate_classifier
    from mlm.finetune.metrics import log_to_mlflow
    from mlm.finetune.register import base_lineage, default_name, register_classifier
    from mlm import storage
    from mlm.finetune.train import finetune
    from mlm.runtime import work_dir

    name = name or default_name(model_ref, cfg)
    lineage = base_lineage(model_ref)  # fails early on an unknown registry URI
    # a new run folder under paths.runs (a folder or a URI every node reaches), as the pipeline's
    out_dir = out_dir or storage.join(cfg.paths.runs or work_dir() / "runs", f"finetune-{time.strftime('%Y%m%d-%H%M%S')}")
    with registry.stage_run("finetune", cfg) as run:
        mlflow.set_tags({"mlm.base_model": model_ref, "mlm.registered_name": name})
        trained = finetune(model_ref, train_path, validation_path, out_dir, cfg, mlflow_run_id=run.info.run_id)
        metrics = evaluate_classifier(trained["model_dir"], trained["validation"], cfg.eval.use_gpu)
        log_to_mlflow(metrics, trained["labels"])
        lineage |= {"finetune.train_fingerprint": trained["train"].fingerprint, "source_run": run.info.run_id}
        registered = register_classifier(trained["model_dir"], name, metrics, cfg, lineage,
                                         trained["validation"]) if register else None
    summary = {k: trained[k] for k in ("model_dir", "base", "labels", "steps", "seconds", "final_train_loss")}
    return summary | {"metrics": {k: v for k, v in metrics.items() if k != "confusion"}, "lineage": lineage,
                      "registered": registered, "run_id": run.info.run_id}
