"""A fine-tuned classifier in the registry: its own registered model (`<base>-<task>`),
lineage tags back to the base version and both datasets, the champion/challenger gate
on macro-F1, a model card, and MLflow's transformers flavor with task
`text-classification` (so `mlflow.pyfunc` and `transformers.pipeline` load it).

Built from the registry's parts (`mlm.registry`): the experiment, the version, the
gate's decision and alias move; what differs from a masked-LM is the flavor's task,
the metric and where the champion is re-scored (the validation file, not a dataset).
"""

from __future__ import annotations

from typing import Any

from mlm import storage
from mlm.config import Config
from mlm.finetune.data import Labelled

METRIC = "macro_f1"


def base_lineage(model_ref: str) -> dict[str, str]:
    """What the base encoder was: `base.model`, `base.version` (for a registry URI, the
    version an alias pointed at when it was read), `base.data_fingerprint` (the data it
    was pretrained and evaluated on, when known), `base.ref` (as given)."""
    from mlm.evaluate import load_results
    from mlm.registry import _alias_version, _client

    tags = {"base.ref": model_ref}
    if model_ref.startswith("models:/"):
        name, _, rest = model_ref.removeprefix("models:/").partition("@")
        client = _client()
        if rest:
            version = _alias_version(client, name, rest)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number) if number else None
        if version is not None:
            tags |= {"base.model": name, "base.version": str(version.version),
                     "base.data_fingerprint": version.tags.get("data_fingerprint", "")}
        return tags
    results = load_results(model_ref) if not model_ref.startswith("runs:/") else None
    if results and results.get("data_fingerprint"):
        tags["base.data_fingerprint"] = str(results["data_fingerprint"])
    return tags


def default_name(model_ref: str, cfg: Config) -> str:
    """`finetune.model_name`, else `<base registered name>-<task>` (a folder's base: `registry.model_name`)."""
    if cfg.finetune.model_name:
        return cfg.finetune.model_name
    base = model_ref.removeprefix("models:/").split("@")[0].split("/")[0] if model_ref.startswith("models:/") else \
        cfg.registry.model_name
    return f"{base}-{cfg.finetune.task}"


def register_classifier(model_dir: str, name: str, metrics: dict[str, Any], cfg: Config, lineage: dict[str, str],
                        validation: Labelled) -> dict[str, Any]:
    """Log the classifier to the active run, register a version with its lineage and
    scores, gate it on macro-F1 against the champion (re-scored on this validation file
    when its own score is from another one), write its card. Aliases move last."""
    from mlm.registry import _apply_gate, _client, _register_version, code_version

    client = _client()
    tags = lineage | {"finetune.validation_fingerprint": validation.fingerprint, "config_hash": cfg.config_hash(),
                      "code_version": code_version(), "task": "text-classification"}
    tags |= {f"eval.{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    info = _log_classifier(model_dir, metrics)
    version = _register_version(client, name, info, tags)
    gate = _gate(client, name, metrics, cfg, validation)
    _apply_gate(client, name, version, gate)
    card = model_card(name, version, metrics, tags, gate)
    client.update_model_version(name, version, description=card)
    if not model_dir.startswith(("models:/", "runs:/")):
        storage.write_text(storage.join(model_dir, "README.md"), card)
    return {"name": name, "version": version, "alias": gate.decision, "reason": gate.reason, "metric": METRIC,
            "score": gate.score, "champion_score": gate.champion_score, "model_uri": f"models:/{name}@{gate.decision}"}


def _log_classifier(model_dir: str, metrics: dict[str, Any]):
    """The transformers flavor, task text-classification, with an input example; the
    evaluation metrics linked to the logged model."""
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mlm.model import fit_tokenizer, resolve_model_dir
    from mlm.registry import _pip_requirements

    local = resolve_model_dir(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(local)
    tokenizer = fit_tokenizer(AutoTokenizer.from_pretrained(local), model.config)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-classification",
        input_example=["Return the value of the named attribute of this object."],
        pip_requirements=_pip_requirements())
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, model_id=info.model_id)
    return info


def _gate(client, name: str, metrics: dict[str, Any], cfg: Config, validation: Labelled):
    """Champion when there is none, or when macro-F1 beats the champion's on the same
    validation rows by `finetune.min_improvement`."""
    from mlm.evaluate import better
    from mlm.registry import CHALLENGER, CHAMPION, Gate, _alias_version

    score, margin = float(metrics[METRIC]), cfg.finetune.min_improvement
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        return Gate(CHAMPION, "no champion yet", METRIC, score)
    recorded = champion.tags.get(f"eval.{METRIC}")
    if champion.tags.get("finetune.validation_fingerprint") == validation.fingerprint and recorded is not None:
        champion_score = float(recorded)
    else:
        from mlm.finetune.evaluate import evaluate_classifier

        champion_score = float(evaluate_classifier(f"models:/{name}/{champion.version}", validation)[METRIC])
    wins = better(METRIC, score, champion_score, margin)
    reason = (f"{METRIC} {score:.4f} {'beats' if wins else 'does not beat'} champion v{champion.version} "
              f"{champion_score:.4f} (margin {margin})")
    return Gate(CHAMPION if wins else CHALLENGER, reason, METRIC, score, champion_score, str(champion.version))


def model_card(name: str, version: str, metrics: dict[str, Any], tags: dict[str, str], gate) -> str:
    """The version's description and the model folder's README.md."""
    base = f"{tags.get('base.model', tags.get('base.ref'))}" + (f" v{tags['base.version']}" if "base.version" in tags else "")
    rows = "\n".join(f"| {r['label']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
                     for r in metrics["per_class"])
    return f"""# {name} v{version} (`@{gate.decision}`)

A sequence classifier fine-tuned from the encoder **{base}** (pretrained on data
`{tags.get('base.data_fingerprint') or 'unknown'}`), on labelled data `{tags.get('finetune.train_fingerprint', '?')[:16]}`,
validated on `{tags['finetune.validation_fingerprint'][:16]}`.

| metric | value |
| --- | --- |
| accuracy | {metrics['accuracy']:.4f} |
| macro precision | {metrics['macro_precision']:.4f} |
| macro recall | {metrics['macro_recall']:.4f} |
| macro F1 | {metrics['macro_f1']:.4f} |
| examples | {metrics['examples']} |

| class | precision | recall | F1 | support |
| --- | --- | --- | --- | --- |
{rows}

Gate: {gate.reason}.

## Load it

```python
from transformers import pipeline
classify = pipeline("text-classification", model="MODEL_DIR")  # or mlflow.pyfunc.load_model("models:/{name}@champion")
```
"""
