"""Model lifecycle on a real SQLite MLflow store, without Ray: the gate, `show`,
`promote`, `rollback` through the champion history, and registrations that fail
before the alias step. Tiny untrained models with hand-made metrics, so the gate
decides without data. The tests run in order and share one registered model."""

from __future__ import annotations

import json

import pytest

from mlm.config import TokenizerConfig, load_config

pytestmark = pytest.mark.integration

NAME = "lifecycle"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh MLM_HOME (SQLite store) for this module; the session's is restored after."""
    home = tmp_path_factory.mktemp("registry-ops")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLM_HOME", str(home))
        mp.setenv("USER", "tester")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


@pytest.fixture(scope="module")
def model_dirs(store, tmp_path_factory):
    """Two tiny untrained models (different seeds) sharing a 500-token tokenizer."""
    import itertools

    import torch

    from mlm.corpus import _python_docs
    from mlm.model import build_model, save_model_dir
    from mlm.tokenizer import train_tokenizer

    tok = train_tokenizer(list(itertools.islice(_python_docs(), 300)), TokenizerConfig(vocab_size=500))
    cfg = load_config("tiny").model
    out = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dirs.append(str(save_model_dir(build_model(cfg, len(tok), tok.pad_token_id), tok, out / f"seed{seed}")))
    return dirs


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _metrics(top1: float, fingerprint: str = "fp1") -> dict:
    return {"top1_accuracy": top1, "top5_accuracy": top1 + 0.1, "loss": 5.0, "data_fingerprint": fingerprint}


def _aliases() -> dict[str, str]:
    from mlm.registry import describe

    return describe(NAME)["aliases"]


def _stored_history() -> list[str]:
    from mlflow import MlflowClient

    from mlm.registry import _client

    _client()
    return [str(v) for v in json.loads(MlflowClient().get_registered_model(NAME).tags["champion_history"])]


def test_first_version_is_champion(model_dirs, cfg):
    from mlm.registry import register, show

    reg = register(model_dirs[0], NAME, _metrics(0.30), cfg)
    assert (reg["version"], reg["alias"], reg["reason"]) == ("1", "champion", "no champion yet")
    assert _aliases() == {"champion": "1"} and _stored_history() == ["1"]
    info = show(NAME)
    assert info["version"] == "1" and info["aliases"] == ["champion"]
    assert info["why"].startswith("v1 is champion: the gate promoted it") and "no champion yet" in info["why"]


def test_worse_model_is_challenger_and_show_explains(model_dirs, cfg):
    from mlm.registry import register, show

    reg = register(model_dirs[1], NAME, _metrics(0.20), cfg)
    assert reg["alias"] == "challenger" and reg["version"] == "2"
    assert _aliases() == {"champion": "1", "challenger": "2"} and _stored_history() == ["1"]
    info = show(NAME, 2)
    assert info["gate"] == {
        "decision": "challenger", "reason": reg["reason"], "metric": "top1_accuracy", "score": 0.2,
        "champion_score": 0.3, "previous_champion": "1",
    }
    assert info["metrics"]["top1_accuracy"] == 0.2 and info["metrics"]["loss"] == 5.0
    assert info["data_fingerprint"] == "fp1" and info["config_hash"] == cfg.config_hash()
    assert info["code_version"] and info["source_run"] and info["aliases"] == ["challenger"]
    assert "0.2000 does not beat champion v1 0.3000" in info["why"] and info["why"].startswith("v2 is challenger")
    assert show(NAME, "challenger")["version"] == "2" and show(NAME, "v2")["version"] == "2"


def test_better_models_become_champion_and_extend_history(model_dirs, cfg):
    from mlm.registry import list_models, register, show

    assert register(model_dirs[1], NAME, _metrics(0.40), cfg)["alias"] == "champion"  # v3
    reg = register(model_dirs[0], NAME, _metrics(0.50), cfg)  # v4
    assert reg["alias"] == "champion" and reg["champion_score"] == 0.4
    assert _aliases() == {"champion": "4", "challenger": "2"} and _stored_history() == ["1", "3", "4"]
    info = show(NAME)
    assert info["version"] == "4" and info["gate"]["previous_champion"] == "3"
    assert "0.5000 beats champion v3 0.4000" in info["why"]
    [listed] = [m for m in list_models() if m["name"] == NAME]
    assert listed["aliases"] == {"champion": "4", "challenger": "2"} and listed["latest_version"] == "4"


def test_rollback_walks_back_through_history(model_dirs):
    from mlm.registry import RegistryError, rollback, show

    r = rollback(NAME)
    assert (r["version"], r["replaced"]) == ("3", "4")
    assert _aliases()["champion"] == "3" and _stored_history() == ["1", "3"]
    assert "restored by rollback by tester" in show(NAME)["why"] and "replacing v4" in show(NAME)["why"]
    assert "rolled back by tester" in show(NAME, 4)["why"]
    assert rollback(NAME)["version"] == "1"
    assert _aliases() == {"champion": "1", "challenger": "2"} and _stored_history() == ["1"]
    with pytest.raises(RegistryError, match="no earlier champion") as e:
        rollback(NAME)
    assert "\n" not in str(e.value)
    assert _aliases()["champion"] == "1"


def test_promote_by_hand_and_rollback_undoes_it(model_dirs):
    from mlm.registry import RegistryError, promote, rollback, show

    p = promote(NAME, 2, "challenger looks better on our domain")
    assert p["changed"] and p["previous_champion"] == "1"
    assert _aliases() == {"champion": "2", "challenger": "2"} and _stored_history() == ["1", "2"]
    info = show(NAME)
    assert info["promoted"]["by"] == "tester" and info["promoted"]["reason"] == "challenger looks better on our domain"
    assert info["tags"]["promote.at"] and info["why"].startswith("v2 is champion and challenger: promoted by hand by tester")
    assert "the gate said challenger" in info["why"]
    assert not promote(NAME, 2, "again")["changed"] and _stored_history() == ["1", "2"]
    with pytest.raises(RegistryError, match="reason"):
        promote(NAME, 3, " ")
    with pytest.raises(RegistryError, match="no version 99"):
        promote(NAME, 99, "typo")
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        show("nope")
    assert rollback(NAME)["version"] == "1"
    assert _aliases()["champion"] == "1" and _stored_history() == ["1"]


def test_history_survives_a_crash_between_alias_and_history(model_dirs):
    """The alias is the truth: a champion missing from the stored list counts as its last entry."""
    from mlm.registry import _client, rollback, show

    _client().set_registered_model_alias(NAME, "champion", "4")  # as if promote crashed before the history write
    assert show(NAME)["champion_history"] == ["1", "4"]
    assert rollback(NAME)["version"] == "1" and _stored_history() == ["1"]


def test_failed_registration_leaves_aliases(model_dirs, cfg, monkeypatch):
    import mlflow

    from mlm.registry import RegistryError, register, show

    before, history = _aliases(), _stored_history()

    def broken(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    with monkeypatch.context() as mp:
        mp.setattr(mlflow, "register_model", broken)
        with pytest.raises(RuntimeError, match="unreachable"):
            register(model_dirs[0], NAME, _metrics(0.9), cfg)
    assert _aliases() == before and _stored_history() == history

    # Fails after the version exists, at the gate: the champion was scored on other data.
    with pytest.raises(RegistryError, match="scored on other data"):
        register(model_dirs[0], NAME, _metrics(0.9, fingerprint="fp2"), cfg)
    assert _aliases() == before and _stored_history() == history
    info = show(NAME, 5)
    assert info["aliases"] == [] and "the gate never decided" in info["why"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_models_and_ui_over_rest(model_dirs, store):
    """`mlm models` reads the same store; `mlm ui` serves it on loopback over MLflow's REST API."""
    import os
    import subprocess
    import time
    import urllib.request

    env = {**os.environ, "MLM_HOME": str(store)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(["mlm", "models", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert NAME in [m["name"] for m in json.loads(out.stdout)]
    show = subprocess.run(["mlm", "models", "show", NAME], capture_output=True, text=True, env=env, timeout=120)
    assert show.returncode == 0 and show.stdout.startswith("v") and "champion" in show.stdout.splitlines()[0]
    bad = subprocess.run(["mlm", "models", "show", "no-such-model"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("mlm: error:")

    port = _free_port()
    server = subprocess.Popen(["mlm", "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name={NAME}"
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow server did not answer on loopback"
        model = body["registered_model"]
        assert {a["alias"] for a in model.get("aliases", [])} >= {"champion"}
        assert any(t["key"] == "champion_history" for t in model.get("tags", []))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
