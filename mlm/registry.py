"""MLflow: experiments and stage runs, model logging, registration, aliases and the
promotion gate.

Gate: a new version becomes `champion` when there is none, or when it beats the
champion by `registry.min_improvement` on `registry.metric` measured on the same
evaluation set (the champion is re-scored on the new version's data when its
recorded scores come from other data). Otherwise it becomes `challenger`.

Lifecycle (`mlm models list | show | promote | rollback`): every change of champion,
by the gate or by hand, is appended to the registered-model tag `champion_history`
(a JSON list of versions, oldest first, ending with the current champion), so that
`rollback` can walk back through earlier champions one at a time. The `champion`
alias is the source of truth; the history is bookkeeping reconciled against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from mlm.config import Config
from mlm.resolve import download_model_dir  # noqa: F401 - models:/ URIs -> model dirs, at the model layer

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"  # registered-model tag: JSON list of champion versions, oldest first
HISTORY_MAX = 100  # entries kept; older champions drop off the front


class RegistryError(ValueError):
    pass


def code_version() -> str:
    from importlib.metadata import version

    v = version("mlm")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses GenAI ("Traces",
# "Detect Issues") and lists stage runs under "Evaluation runs"; this is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def setup(experiment: str) -> str:
    """Point MLflow at the configured store and return the experiment id (created with
    an artifact root inside the work folder when the store is a database, SQLite or
    PostgreSQL, rather than a tracking server), tagged as model training."""
    import mlflow

    from mlm.runtime import artifact_root, is_database_store, tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # made by an older mlm, or by hand
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    database = is_database_store(uri)
    location = f"{artifact_root()}/{experiment}" if database else None  # else MLflow's ./mlruns in the cwd
    return mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config, parent_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the pipeline run when there is one;
    the resolved config as params and as `config.yaml`."""
    import mlflow

    experiment_id = setup(cfg.registry.experiment)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, nested=parent_run_id is not None, parent_run_id=parent_run_id,
        tags={"mlm.stage": stage, "mlm.config_hash": cfg.config_hash(), "mlm.code_version": code_version()},
    ) as run:
        mlflow.log_params(cfg.flat())
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        yield run


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    reqs = []
    for pkg in ("transformers", "tokenizers", "torch", "safetensors"):
        reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
    return reqs


def _score(version_tags: dict[str, str], metric: str) -> float | None:
    raw = version_tags.get(f"eval.{metric}")
    return float(raw) if raw is not None else None


def register(
    model_dir: str | Path,
    name: str,
    metrics: dict[str, Any],
    cfg: Config,
    *,
    data_dir: str | Path | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Log the model (transformers flavor, fill-mask), register a version with its tags,
    then apply the gate. Aliases move only after the version exists and is tagged."""
    from mlflow import MlflowClient

    from mlm.model import load_model_dir
    from mlm.progress import Progress

    if cfg.registry.metric not in metrics:
        raise RegistryError(f"evaluation results lack {cfg.registry.metric!r}")
    with Progress("register", total=4, unit="steps") as line:
        model, tokenizer = load_model_dir(model_dir)
        setup(cfg.registry.experiment)
        client = MlflowClient()
        tags = _version_tags(tokenizer, metrics, cfg)
        line.update(1, "logging the model")
        with _register_run(cfg, run_id) as active:
            tags |= _lineage(active)
            version, gate = _register_and_gate(client, (model, tokenizer), name, metrics, cfg, tags,
                                               (model_dir, data_dir), line)
        line.close(f"{name} v{version} -> @{gate.decision}")
    return {"name": name, "version": version, "alias": gate.decision, "reason": gate.reason, "metric": gate.metric,
            "score": gate.score, "champion_score": gate.champion_score,
            "previous_champion": str(gate.previous) if gate.previous is not None else None,
            "model_uri": f"models:/{name}@{gate.decision}"}


def _register_and_gate(client, loaded, name: str, metrics: dict[str, Any], cfg: Config, tags: dict[str, str],
                       dirs: tuple, line) -> tuple[str, "Gate"]:
    """In the active run: log the model with its card (what is known before registration)
    and the evaluation metrics linked to it, register it, decide, move one alias, log the
    decision and the full card. `loaded`: (model, tokenizer); `dirs`: (model dir, data
    dir or None). Returns (version, gate)."""
    data_dir = dirs[1]
    info = _log_model(*loaded, hub_card(model_card(name, metrics, cfg, tags, data_dir), name, metrics, cfg, tags))
    _link_metrics(info.model_id, metrics, data_dir)
    version = _register_version(client, name, info, tags)
    line.update(1, f"v{version} registered, gate")
    gate = _gate(client, name, metrics, cfg, tags["data_fingerprint"], data_dir)
    line.update(1, f"v{version} -> @{gate.decision}")
    _apply_gate(client, name, version, gate)
    _log_gate(client, name, version, gate, metrics, cfg, tags, dirs)
    line.update(1)
    return version, gate


def _version_tags(tokenizer, metrics: dict[str, Any], cfg: Config) -> dict[str, str]:
    """What a version records about where it comes from and how it scored."""
    from mlm.report import numeric
    from mlm.tokenizer import fingerprint

    return {
        "data_fingerprint": str(metrics.get("data_fingerprint", "")),
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "config_hash": cfg.config_hash(),
        "code_version": code_version(),
        **{f"eval.{k}": str(v) for k, v in numeric(metrics).items()},
    }


@contextlib.contextmanager
def _register_run(cfg: Config, run_id: str | None) -> Iterator[Any]:
    """The MLflow run the model is logged to: `run_id` (resumed unless it is the active
    run), else a new `register` stage run. Yields the run as stored."""
    import mlflow

    with contextlib.ExitStack() as stack:
        current = mlflow.active_run()
        if run_id is None:
            stack.enter_context(stage_run("register", cfg))
        elif current is None or current.info.run_id != run_id:
            stack.enter_context(mlflow.start_run(run_id=run_id))
        yield mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id)


def _lineage(run) -> dict[str, str]:
    tags = {"source_run": run.info.run_id}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        tags["parent_run"] = parent
    return tags


FILL_MASK_TOP_K = 5  # the served model's default, as `mlm fill-mask --top-k`


def _log_model(model, tokenizer, card):
    """Log the model to the active run with its model card (a huggingface_hub ModelCard:
    MLflow writes it as the model's `model_card.md` and `model_card_data.yaml` instead of
    looking for one on the hub), a signature (a text in, a token out per mask, the
    `top_k` param) and an input example with that param. Returns MLflow's ModelInfo
    (`model_id`, `model_uri`)."""
    import logging

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("top_k", "long", FILL_MASK_TOP_K)]))

    # MLflow checks the input example by predicting with its params, and its transformers
    # flavor warns at every predict with params that they override the saved config.
    def notice(record) -> bool:
        return not record.getMessage().startswith("params provided to the `predict` method")

    flavor_log = logging.getLogger("mlflow.transformers")
    flavor_log.addFilter(notice)
    try:
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="fill-mask",
            signature=signature,  # given, not inferred: inference falls back to one without params on any error
            input_example=(f"Paris is the {tokenizer.mask_token} of France.", {"top_k": 3}),
            pip_requirements=_pip_requirements(),
            model_card=card,
        )
    finally:
        flavor_log.removeFilter(notice)


def _link_metrics(model_id: str, metrics: dict[str, Any], data_dir: str | Path | None) -> None:
    """The evaluation metrics logged to the active run for the logged model (MLflow 3:
    they are the model's metrics on its page and in the logged-models API), with the
    dataset they were measured on when it is known (then also the run's input: MLflow
    would add it without a context)."""
    import mlflow

    from mlm import report

    dataset = report.dataset(data_dir) if data_dir else None
    report.log_dataset(dataset, "evaluation")
    mlflow.log_metrics(report.numeric(metrics), model_id=model_id, dataset=dataset)


def _register_version(client, name: str, info, tags: dict[str, str]) -> str:
    """Register the logged model (the registered model is created on first use): the new
    version's number. MlflowClient's calls, not `mlflow.register_model`, which prints its
    progress on stderr."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return str(client.create_model_version(name, source=info.model_uri, tags=tags, model_id=info.model_id).version)


@dataclass(frozen=True)
class Gate:
    """The gate's decision on a new version: the alias it gets and why."""

    decision: str  # CHAMPION or CHALLENGER
    reason: str
    metric: str
    score: float
    champion_score: float | None = None
    previous: str | None = None  # the champion before this registration


def _gate(client, name: str, metrics: dict[str, Any], cfg: Config, data_fingerprint: str,
          data_dir: str | Path | None) -> Gate:
    """Decide (nothing moves here): champion when there is none or when the challenger
    beats the champion by `registry.min_improvement` on the same evaluation set (the
    champion re-scored on `data_dir` when its scores come from other data)."""
    from mlm.evaluate import better, evaluate

    metric, margin = cfg.registry.metric, cfg.registry.min_improvement
    score = float(metrics[metric])
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        return Gate(CHAMPION, "no champion yet", metric, score)
    champion_score = _score(champion.tags, metric)
    if champion.tags.get("data_fingerprint") != data_fingerprint or champion_score is None:
        if data_dir is None:
            raise RegistryError(f"champion v{champion.version} was scored on other data; pass the data to re-score it")
        rescored = evaluate(f"models:/{name}/{champion.version}", data_dir, cfg.eval.batch_size,
                            engine=cfg.eval.engine, ray_min_rows=cfg.eval.ray_min_rows, use_gpu=cfg.eval.use_gpu)
        champion_score = float(rescored[metric])
    wins = better(metric, score, champion_score, margin)
    verdict = "beats" if wins else "does not beat"
    reason = f"{metric} {score:.4f} {verdict} champion v{champion.version} {champion_score:.4f} (margin {margin})"
    return Gate(CHAMPION if wins else CHALLENGER, reason, metric, score, champion_score, str(champion.version))


def _apply_gate(client, name: str, version: str, gate: Gate) -> None:
    """Tag the version with the decision, then move exactly one alias."""
    tags = {"gate.decision": gate.decision, "gate.reason": gate.reason, "gate.metric": gate.metric,
            "gate.score": str(gate.score)}
    if gate.champion_score is not None:
        tags["gate.champion_score"] = str(gate.champion_score)
    if gate.previous is not None:
        tags["gate.previous_champion"] = gate.previous
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if gate.decision == CHAMPION:
        _move_champion(client, name, version)
    else:
        client.set_registered_model_alias(name, gate.decision, version)


def _log_gate(client, name: str, version: str, gate: Gate, metrics: dict[str, Any], cfg: Config,
              tags: dict[str, str], dirs: tuple) -> None:
    """gate.json and the full model card on the run; the card on the version's page too,
    and as README.md (with the Hugging Face metadata) in the model directory unless the
    model was given as an MLflow URI."""
    import mlflow

    from mlm import storage
    from mlm.resolve import MLFLOW_SCHEMES

    model_dir, data_dir = dirs
    mlflow.log_dict({"version": version, "alias": gate.decision, "reason": gate.reason}, "gate.json")
    card = model_card(name, metrics, cfg, tags, data_dir, version=version, gate=gate)
    mlflow.log_text(card, "model_card.md")
    client.update_model_version(name, version, description=card)
    if not str(model_dir).startswith(MLFLOW_SCHEMES):
        storage.write_text(storage.join(model_dir, MODEL_README), str(hub_card(card, name, metrics, cfg, tags)))


MODEL_README = "README.md"  # the model card in the model directory (the Hugging Face convention)


def hub_card(card: str, name: str, metrics: dict[str, Any], cfg: Config, tags: dict[str, str]):
    """The card as a huggingface_hub ModelCard: YAML metadata (library, task, tags, the
    evaluation as model-index) above the markdown. The license is `registry.license`
    (default `unknown`: it follows from the corpus, which mlm cannot know)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_name = f"mlm validation split {tags['data_fingerprint']}"
    results = [EvalResult(task_type="fill-mask", dataset_type="mlm-evaluation-set", dataset_name=dataset_name,
                          metric_type=kind, metric_name=label, metric_value=float(metrics[key]))
               for key, kind, label in (("top1_accuracy", "accuracy", "masked top-1 accuracy"),
                                        ("top5_accuracy", "accuracy", "masked top-5 accuracy"),
                                        ("perplexity", "perplexity", "perplexity")) if key in metrics]
    data = ModelCardData(license=cfg.registry.license, library_name="transformers", pipeline_tag="fill-mask", model_name=name,
                         tags=["mlm", "masked-lm", cfg.model.architecture], eval_results=results or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{card}")


def model_card(name: str, metrics: dict[str, Any], cfg: Config, tags: dict[str, str], data_dir: str | Path | None,
               version: str | None = None, gate: Gate | None = None) -> str:
    """Markdown: what the model is, what data and config made it, how it scored, how to
    load it; with `version` and `gate` (after registration) also which version it is and
    the gate's decision."""
    from mlm import shards

    manifest = shards.Manifest.read(data_dir) if data_dir else None
    alias = gate.decision if gate else CHAMPION
    m = cfg.model
    lines = [
        f"# {name} v{version} (`@{alias}`)" if version else f"# {name}", "",
        f"BERT-style masked language model ({m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} heads), pretrained with mlm — code version `{tags['code_version']}`, "
        f"config hash `{tags['config_hash']}`.", "",
        *(["## Gate", "", f"{gate.reason}.", ""] if gate else []),
        "## Evaluation (fixed evaluation set: validation split masked at "
        f"{cfg.eval.rate:.0%}, seed {cfg.eval.seed})", "",
        "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)],
        *[f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)],
        "", "## Data", "",
        f"Dataset fingerprint `{tags['data_fingerprint']}`.",
    ]
    if manifest:
        lines += [_data_line(manifest)]
    lines += [
        "", "## Training config", "", "```yaml", cfg.to_yaml().strip(), "```", "",
        "## Load it", "", "```python",
        "import mlflow",
        f'fill = mlflow.pyfunc.load_model("models:/{name}@{alias}")',
        'fill.predict(["the [MASK] statement returns a value."])',
        "# or, without MLflow or this project, from the downloaded model directory:",
        "from transformers import pipeline",
        'pipeline("fill-mask", model="MODEL_DIR")("the [MASK] statement returns a value.")',
        "```", "",
        f"CLI: `mlm fill-mask \"the [MASK] statement returns a value.\" --model models:/{name}@{alias}`", "",
    ]
    return "\n".join(lines)


def _data_line(manifest) -> str:
    train, masking = manifest.splits["train"], manifest.masking["train"]
    return (f"{len(manifest.inputs)} input file(s); {manifest.documents.kept:,} documents kept, dropped: "
            f"{manifest.documents.dropped or 'none'}; {train.tokens:,} training tokens in {train.rows:,} "
            f"sequences of {manifest.seq_len}; tokenizer {manifest.tokenizer.fingerprint} "
            f"({manifest.tokenizer.vocab_size:,} tokens); training masking "
            f"{masking.get('strategy')} at {masking.get('rate')} ({masking.get('mode', 'static')}).")


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def describe(name: str) -> dict[str, Any]:
    """Versions and aliases of a registered model (for people and tests)."""
    from mlflow import MlflowClient

    import mlflow

    from mlm.runtime import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    rm = client.get_registered_model(name)
    versions = client.search_model_versions(f"name='{name}'")
    return {
        "name": name,
        "aliases": {k: str(v) for k, v in rm.aliases.items()},
        "versions": [{"version": v.version, "tags": dict(v.tags)} for v in sorted(versions, key=lambda v: int(v.version))],
    }


# ---------------------------------------------------------------- lifecycle
#
# Crash safety. Readers resolve `models:/NAME@champion`; that alias is only ever moved
# with one `set_registered_model_alias` call (one transaction in the store) and never
# deleted first, so a reader sees the old champion or the new one, never none. The
# history tag is written around that call in the order that makes a crash between the
# two writes harmless, given that `_history` reconciles the stored list with the alias
# (the alias wins: when the champion is not the list's last entry it is appended):
#   promote: alias first, then history. A crash in between leaves the new champion
#            missing from the list; reading appends it, so the promotion happened.
#   rollback: history first (truncated to the restored version), then alias. A crash
#            in between leaves the old champion as the alias; reading appends it
#            again, so the rollback did not happen and can simply be rerun.
# Tags that explain a change (`promote.*`, `rollback.restored_*`) are written on the
# version before its alias moves, so anyone who sees the new champion can read why.
# Two people changing the champion at the same moment can lose a history entry (the
# tag is read, then rewritten); the alias itself is still consistent.


def _client():
    import mlflow
    from mlflow import MlflowClient

    from mlm.runtime import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    from mlm.runtime import tracking_uri

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if _not_found(e):
            raise RegistryError(f"no registered model {name!r} in {tracking_uri()}") from None
        raise


def _resolve(client, rm, ref: str | int | None):
    """A version of `rm` by number (`3`, `v3`) or alias (`champion`); None: the champion."""
    from mlflow.exceptions import MlflowException

    name = rm.name
    ref = CHAMPION if ref is None else str(ref).strip()
    number = ref[1:] if ref[:1] in ("v", "V") and ref[1:].isdigit() else ref
    if number.isdigit():
        try:
            return client.get_model_version(name, number)
        except MlflowException as e:
            if _not_found(e):
                raise RegistryError(f"{name} has no version {number}") from None
            raise
    aliases = {a: str(v) for a, v in rm.aliases.items()}
    if ref not in aliases:
        if ref == CHAMPION:
            raise RegistryError(f"{name} has no champion yet; name a version")
        raise RegistryError(f"{name} has no version or alias {ref!r} (aliases: {', '.join(sorted(aliases)) or 'none'})")
    return client.get_model_version(name, aliases[ref])


def _version_exists(client, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
        return True
    except MlflowException as e:
        if _not_found(e):
            return False
        raise


def _stored_history(rm) -> list[str]:
    try:
        raw = json.loads(rm.tags.get(HISTORY_TAG, "[]"))
    except json.JSONDecodeError:
        raw = []  # a hand-edited, broken tag: start again from the current champion
    return [str(v) for v in raw if str(v).isdigit()] if isinstance(raw, list) else []


def _reconcile(stored: list[str], champion: str | None) -> list[str]:
    """The history as it is: consecutive repeats collapsed, ending with the current
    champion (the alias is the truth; see the crash-safety note above)."""
    history: list[str] = []
    for v in stored:
        if not history or history[-1] != v:
            history.append(v)
    if champion is not None and (not history or history[-1] != champion):
        history.append(champion)
    return history


def _history(client, name: str) -> list[str]:
    rm = client.get_registered_model(name)
    champion = rm.aliases.get(CHAMPION)
    return _reconcile(_stored_history(rm), None if champion is None else str(champion))


def _write_history(client, name: str, history: list[str]) -> None:
    blob = json.dumps([int(v) for v in history[-HISTORY_MAX:]])
    client.set_registered_model_tag(name, HISTORY_TAG, blob)


def _move_champion(client, name: str, version: str) -> list[str]:
    """Make `version` champion: one alias call, then the history (see the note above)."""
    history = _history(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)  # the commit point
    history.append(str(version))
    _write_history(client, name, history)
    return history


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _user() -> str:
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _number(raw: str) -> float | str:
    try:
        return float(raw)
    except ValueError:
        return raw


def _when(ts: str | None) -> datetime:
    try:
        return datetime.fromisoformat(ts) if ts else datetime.min.replace(tzinfo=timezone.utc)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def list_models() -> list[dict[str, Any]]:
    """Every registered model with its aliases and latest version, by name."""
    client = _client()
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    out = []
    for rm in sorted(models, key=lambda m: m.name):
        quote = '"' if "'" in rm.name else "'"
        latest = client.search_model_versions(
            f"name={quote}{rm.name}{quote}", max_results=1, order_by=["version_number DESC"]
        )
        aliases = {a: str(v) for a, v in sorted(rm.aliases.items())}
        out.append({
            "name": rm.name,
            "aliases": aliases,
            "latest_version": str(latest[0].version) if latest else None,
            "champion_history": _reconcile(_stored_history(rm), aliases.get(CHAMPION)),
            "updated": _iso(rm.last_updated_timestamp),
        })
    return out


def show(name: str, version: str | int | None = None) -> dict[str, Any]:
    """One version (default: the champion; a number or an alias) with its lineage, metrics,
    the gate's decision with both scores, its aliases, and a `why` line for people."""
    client = _client()
    rm = _registered_model(client, name)
    mv = _resolve(client, rm, version)
    v = str(mv.version)
    tags = dict(mv.tags)
    alias_map = {a: str(x) for a, x in rm.aliases.items()}
    aliases = sorted((a for a, x in alias_map.items() if x == v), key=lambda a: (a != CHAMPION, a != CHALLENGER, a))
    metrics = {k[len("eval."):]: _number(x) for k, x in sorted(tags.items()) if k.startswith("eval.")}
    reason = tags.get("gate.reason")
    metric = tags.get("gate.metric")
    if metric is None and reason and reason.split()[0] in metrics:
        metric = reason.split()[0]  # versions registered before gate.metric was tagged
    score = tags.get("gate.score") or (tags.get(f"eval.{metric}") if metric else None)
    champion_score = tags.get("gate.champion_score")
    info = {
        "name": name,
        "version": v,
        "aliases": aliases,
        "champion": alias_map.get(CHAMPION),
        "created": _iso(mv.creation_timestamp),
        "metrics": metrics,
        "gate": {
            "decision": tags.get("gate.decision"),
            "reason": reason,
            "metric": metric,
            "score": float(score) if score is not None else None,
            "champion_score": float(champion_score) if champion_score is not None else None,
            "previous_champion": tags.get("gate.previous_champion"),
        },
        "data_fingerprint": tags.get("data_fingerprint"),
        "config_hash": tags.get("config_hash"),
        "code_version": tags.get("code_version"),
        "source_run": tags.get("source_run") or mv.run_id,
        "parent_run": tags.get("parent_run"),
        "promoted": {
            "by": tags["promoted_by"], "reason": tags.get("promote.reason"),
            "at": tags.get("promote.at"), "previous_champion": tags.get("promote.previous"),
        } if "promoted_by" in tags else None,
        "champion_history": _reconcile(_stored_history(rm), alias_map.get(CHAMPION)),
        "model_uri": f"models:/{name}/{v}",
        "tags": tags,
    }
    info["why"] = _why(v, aliases, alias_map.get(CHAMPION), tags, info["created"])
    return info


def _why(v: str, aliases: list[str], champion: str | None, tags: dict[str, str], created: str | None) -> str:
    """One sentence: which alias the version holds and the latest event that put it there."""
    gate = tags.get("gate.reason")
    if CHAMPION in aliases:
        events = []
        if tags.get("gate.decision") == CHAMPION:
            events.append((created, f"the gate promoted it at registration: {gate}"))
        if "promote.at" in tags:
            prev = tags.get("promote.previous")
            events.append((tags["promote.at"], f"promoted by hand by {tags.get('promoted_by', 'unknown')} at "
                           f"{tags['promote.at']}{f' over v{prev}' if prev else ''}: {tags.get('promote.reason', '')!r}"))
        if "rollback.restored_at" in tags:
            events.append((tags["rollback.restored_at"], f"restored by rollback by {tags.get('rollback.restored_by', 'unknown')} "
                           f"at {tags['rollback.restored_at']}, replacing v{tags.get('rollback.replaced', '?')}"))
        if not events:
            cause = "the champion alias was set outside mlm"
        else:
            cause = max(events, key=lambda e: _when(e[0]))[1]
        if gate and tags.get("gate.decision") != CHAMPION:
            cause += f" (at registration the gate said {tags.get('gate.decision')}: {gate})"
        held = " and ".join(aliases)
        return f"v{v} is {held}: {cause}"
    where = f"champion is v{champion}" if champion else "there is no champion"
    held = " and ".join(aliases) if aliases else "not champion"
    if gate:
        since = " (since replaced)" if tags.get("gate.decision") == CHAMPION else ""
        cause = f"the gate made it {tags.get('gate.decision')}{since}: {gate}"
    else:
        cause = "the gate never decided on it (its registration did not finish)"
    if CHALLENGER not in aliases and "rollback.demoted_at" in tags:
        cause += (f"; rolled back by {tags.get('rollback.demoted_by', 'unknown')} at {tags['rollback.demoted_at']} "
                  f"to v{tags.get('rollback.restored', '?')}")
    return f"v{v} is {held} ({where}): {cause}"


def promote(name: str, version: str | int, reason: str) -> dict[str, Any]:
    """Make `version` champion by hand; who (`$USER`), why and when are version tags, and
    the previous champion stays in the history for `rollback`."""
    if not reason or not reason.strip():
        raise RegistryError("promote needs a reason (it is recorded on the version)")
    client = _client()
    rm = _registered_model(client, name)
    mv = _resolve(client, rm, version)
    v = str(mv.version)
    previous = rm.aliases.get(CHAMPION)
    previous = None if previous is None else str(previous)
    result = {"name": name, "version": v, "previous_champion": previous, "model_uri": f"models:/{name}@{CHAMPION}"}
    if previous == v:
        return {**result, "changed": False, "history": _history(client, name)}
    who, at = _user(), _now()
    client.set_model_version_tag(name, v, "promoted_by", who)
    client.set_model_version_tag(name, v, "promote.reason", reason.strip())
    client.set_model_version_tag(name, v, "promote.at", at)
    if previous is not None:
        client.set_model_version_tag(name, v, "promote.previous", previous)
    elif "promote.previous" in mv.tags:
        client.delete_model_version_tag(name, v, "promote.previous")
    history = _move_champion(client, name, v)
    return {**result, "changed": True, "promoted_by": who, "reason": reason.strip(), "at": at, "history": history}


def rollback(name: str) -> dict[str, Any]:
    """Restore the champion before the current one (walking back one step per call);
    a RegistryError when there is none."""
    client = _client()
    rm = _registered_model(client, name)
    current = rm.aliases.get(CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    current = str(current)
    history = _reconcile(_stored_history(rm), current)
    # The newest earlier champion that still exists (deleted versions are skipped).
    target_index = next(
        (i for i in range(len(history) - 2, -1, -1) if history[i] != current and _version_exists(client, name, history[i])),
        None,
    )
    if target_index is None:
        raise RegistryError(f"{name} has no earlier champion to roll back to (v{current} is the first in its history)")
    target = history[target_index]
    who, at = _user(), _now()
    client.set_model_version_tag(name, target, "rollback.restored_by", who)
    client.set_model_version_tag(name, target, "rollback.restored_at", at)
    client.set_model_version_tag(name, target, "rollback.replaced", current)
    remaining = history[: target_index + 1]
    _write_history(client, name, remaining)  # history first, then the alias: see the note above
    client.set_registered_model_alias(name, CHAMPION, target)  # the commit point
    # What happened to the old champion, recorded after the fact (nobody needs it atomically).
    client.set_model_version_tag(name, current, "rollback.demoted_by", who)
    client.set_model_version_tag(name, current, "rollback.demoted_at", at)
    client.set_model_version_tag(name, current, "rollback.restored", target)
    return {
        "name": name, "version": target, "replaced": current, "rolled_back_by": who, "at": at,
        "history": remaining, "model_uri": f"models:/{name}@{CHAMPION}",
    }
