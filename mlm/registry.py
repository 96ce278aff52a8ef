"""MLflow: experiments and stage runs, model logging, registration, aliases and the
promotion gate.

Gate: a new version becomes `champion` when there is none, or when it beats the
champion by `registry.min_improvement` on `registry.metric` measured on the same
evaluation set (the champion is re-scored on the new version's data when its
recorded scores come from other data). Otherwise it becomes `challenger`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from mlm.config import Config

CHAMPION, CHALLENGER = "champion", "challenger"


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


def setup(experiment: str) -> str:
    """Point MLflow at the configured store and return the experiment id (created with
    an artifact root inside the work folder on the embedded store)."""
    import mlflow

    from mlm.runtime import artifact_root, tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = f"{artifact_root()}/{experiment}" if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(experiment, artifact_location=location)


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
    import mlflow
    from mlflow import MlflowClient

    from mlm.evaluate import better, evaluate
    from mlm.model import load_model_dir

    metric, margin = cfg.registry.metric, cfg.registry.min_improvement
    if metric not in metrics:
        raise RegistryError(f"evaluation results lack {metric!r}")
    model, tokenizer = load_model_dir(model_dir)
    setup(cfg.registry.experiment)
    client = MlflowClient()
    tags = {
        "data_fingerprint": str(metrics.get("data_fingerprint", "")),
        "config_hash": cfg.config_hash(),
        "code_version": code_version(),
        **{f"eval.{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    with contextlib.ExitStack() as stack:
        current = mlflow.active_run()
        if run_id is None:
            stack.enter_context(stage_run("register", cfg))
        elif current is None or current.info.run_id != run_id:
            stack.enter_context(mlflow.start_run(run_id=run_id))
        active = client.get_run(mlflow.active_run().info.run_id)
        tags["source_run"] = active.info.run_id
        parent = active.data.tags.get("mlflow.parentRunId")
        if parent:
            tags["parent_run"] = parent
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="fill-mask",
            pip_requirements=_pip_requirements(),
        )
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
        version = str(mv.version)

        # ---- the gate: decide first, then move exactly one alias
        champion = _alias_version(client, name, CHAMPION)
        challenger_score = float(metrics[metric])
        champion_score = None
        if champion is None:
            decision, reason = CHAMPION, "no champion yet"
        else:
            champion_score = _score(champion.tags, metric)
            same_data = champion.tags.get("data_fingerprint") == tags["data_fingerprint"]
            if not same_data or champion_score is None:
                if data_dir is None:
                    raise RegistryError(
                        f"champion v{champion.version} was scored on other data; pass the data to re-score it"
                    )
                rescored = evaluate(f"models:/{name}/{champion.version}", data_dir, cfg.eval.batch_size)
                champion_score = float(rescored[metric])
            if better(metric, challenger_score, champion_score, margin):
                decision = CHAMPION
                reason = f"{metric} {challenger_score:.4f} beats champion v{champion.version} {champion_score:.4f} (margin {margin})"
            else:
                decision = CHALLENGER
                reason = f"{metric} {challenger_score:.4f} does not beat champion v{champion.version} {champion_score:.4f} (margin {margin})"
        client.set_model_version_tag(name, version, "gate.decision", decision)
        client.set_model_version_tag(name, version, "gate.reason", reason)
        if champion_score is not None:
            client.set_model_version_tag(name, version, "gate.champion_score", str(champion_score))
        client.set_registered_model_alias(name, decision, version)
        mlflow.log_dict({"version": version, "alias": decision, "reason": reason}, "gate.json")
    return {
        "name": name,
        "version": version,
        "alias": decision,
        "reason": reason,
        "metric": metric,
        "score": challenger_score,
        "champion_score": champion_score,
        "model_uri": f"models:/{name}@{decision}",
    }


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model_dir(uri: str) -> str:
    """Download an MLflow transformers-flavor model and lay it out as a plain Hugging
    Face model directory (weights, config, tokenizer). Cached per resolved version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlm.model import ModelError
    from mlm.runtime import tracking_uri, work_dir

    mlflow.set_tracking_uri(tracking_uri())
    key = uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    if uri.startswith("models:/"):
        # Resolve aliases to a version so a moved alias never serves a stale cache.
        body = uri[len("models:/"):]
        client = MlflowClient()
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif "/" in body:
                name, ver = body.rsplit("/", 1)
                mv = client.get_model_version(name, ver)
            else:
                raise ModelError(f"bad model URI {uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
        except MlflowException:
            raise ModelError(f"unknown model {uri!r} in {tracking_uri()}") from None
        key = f"{mv.name}-v{mv.version}"
    dest = work_dir() / "model-cache" / key
    if (dest / "config.json").is_file():
        return str(dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "raw")))
    except MlflowException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot load {uri!r}: {str(e).splitlines()[0]}") from None
    hf = tmp / "hf"
    shutil.copytree(local / "model", hf)
    tok = local / "components" / "tokenizer"
    if tok.is_dir():
        shutil.copytree(tok, hf, dirs_exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(hf, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


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


def json_line(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)
