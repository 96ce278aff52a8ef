"""The experiment is tagged as model training (issue 22, item 7): MLflow 3's UI opened an
untagged experiment in GenAI mode ("Traces", "Detect Issues") and listed the stage runs
under "Evaluation runs"."""

from __future__ import annotations


def test_experiments_are_tagged_as_model_training(tmp_path, monkeypatch):
    import mlflow

    from mlm.registry import setup

    monkeypatch.setenv("MLM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = setup("made-by-mlm")
    client = mlflow.MlflowClient()
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before", artifact_location=str(tmp_path / "a"))  # untagged
    assert setup("made-before") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
