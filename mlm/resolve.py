"""Model references -> a local Hugging Face model directory.

A model is named by a local directory, a directory on an object store (s3://...) or an
MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...). Every stage that
loads a model (training's warm start, evaluation, prediction, export) goes through
`resolve_model_dir`; remote models are fetched into this node's cache under
$MLM_HOME/model-cache, committed there by `mlm.storage.put_dir` (a half-fetched model is
never found in the cache). This module sits below `mlm.model` and `mlm.registry`, which
both use it.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from mlm import storage


class ModelError(ValueError):
    """Unknown model, or a folder that is not a model directory."""


MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_remote(model: str) -> bool:
    """An MLflow URI or an object-store URI: something each node resolves on its own."""
    return str(model).startswith(MLFLOW_SCHEMES) or storage.is_uri(model)


def resolve_model_dir(model: str) -> str:
    """A local model directory for `model`: a local directory as it is; an MLflow model
    URI or a model directory on an object store downloaded to this node's cache."""
    model = str(model)
    if model.startswith(MLFLOW_SCHEMES):
        return download_model_dir(model)
    if storage.is_uri(model):
        return _cached_copy(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"not a model directory (no config.json): {model}")
    return str(path)


def _cache_dir() -> Path:
    from mlm.runtime import work_dir

    return work_dir() / "model-cache"


def _cached_copy(uri: str) -> str:
    """A local copy of a model directory on an object store, keyed by its files' names
    and sizes (a model written again at the same URI is fetched again)."""
    try:
        if not storage.is_file(storage.join(uri, "config.json")):
            raise ModelError(f"not a model directory (no config.json): {uri}")
        stamp = [(n, storage.size(storage.join(uri, n))) for n in storage.list_names(uri)]
    except storage.StorageError as e:
        raise ModelError(str(e)) from None
    dest = _cache_dir() / hashlib.sha256(repr([uri, stamp]).encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        _commit(Path(storage.get_dir(uri, Path(tmp) / "model")), dest)
    return str(dest)


def _registered_version(uri: str):
    """The model version a models:/ URI names (an alias resolved now, so a moved alias
    never serves a stale cache)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlm.runtime import tracking_uri

    body = uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in body:
            name, ver = body.rsplit("/", 1)
            return client.get_model_version(name, ver)
    except MlflowException:
        raise ModelError(f"unknown model {uri!r} in {tracking_uri()}") from None
    raise ModelError(f"bad model URI {uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")


def download_model_dir(uri: str) -> str:
    """An MLflow transformers-flavor model (models:/ or runs:/ URI) as a plain Hugging
    Face model directory (weights, config, tokenizer), loaded through the flavor's public
    API (`mlflow.transformers.load_model(..., return_type="components")`) and saved with
    `save_pretrained`. Cached per resolved version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mlm.runtime import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    key = uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    if uri.startswith("models:/"):
        mv = _registered_version(uri)
        key = f"{mv.name}-v{mv.version}"
    dest = _cache_dir() / key
    if (dest / "config.json").is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        try:
            components = mlflow.transformers.load_model(uri, dst_path=tmp, return_type="components")
        except (MlflowException, OSError) as e:
            raise ModelError(f"cannot load {uri!r}: {str(e).splitlines()[0]}") from None
        local = Path(tmp) / "hf"
        components["model"].save_pretrained(local)
        if components.get("tokenizer") is not None:
            components["tokenizer"].save_pretrained(local)
        _commit(local, dest)
    return str(dest)


def _commit(local: Path, dest: Path) -> None:
    """Into the cache; another process of this node that committed the same model first wins."""
    try:
        storage.put_dir(local, dest, move=True)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
