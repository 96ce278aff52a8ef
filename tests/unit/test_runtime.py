"""Tracking-store URIs: which are databases, and that a printed URI never holds a password."""

from mlm.runtime import is_database_store, redact_uri


def test_database_stores_by_scheme_driver_included():
    assert is_database_store("sqlite:////tmp/mlflow.db")
    assert is_database_store("postgresql://u:p@127.0.0.1:5432/mlflow")
    assert is_database_store("postgresql+psycopg2://u:p@db/mlflow")
    assert not is_database_store("http://127.0.0.1:5000") and not is_database_store("databricks")


def test_redact_uri_hides_the_password_only():
    assert redact_uri("postgresql+psycopg2://mlflow:s3cr3t@db.internal:5432/mlflow?sslmode=require") == \
        "postgresql+psycopg2://mlflow:***@db.internal:5432/mlflow?sslmode=require"
    assert redact_uri("postgresql://mlflow:s3cr3t@db/mlflow") == "postgresql://mlflow:***@db/mlflow"
    for uri in ("sqlite:////tmp/x.db", "http://127.0.0.1:5000", "postgresql://mlflow@db/mlflow"):
        assert redact_uri(uri) == uri


def test_the_pipeline_summary_prints_no_password():
    from mlm.pipeline import summary_text

    result = {"data_dir": "d", "model_dir": "m", "tracking_uri": "postgresql://u:pw123@h/db",
              "metrics": {"top1_accuracy": 0.2, "baseline_top1_accuracy": 0.04, "top5_accuracy": 0.3, "loss": 5.0,
                          "perplexity": 150.0},
              "registered": {"name": "x", "version": "1", "alias": "champion", "reason": "no champion yet"},
              "seconds": 10}
    assert "pw123" not in summary_text(result) and "u:***@h" in summary_text(result)
