"""Scheduled retraining, triggered repeatedly: two triggers at once give one run, no new
data does nothing, a failed run moves no alias, new data is prepared incrementally and
a worse model leaves the champion alone."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from mlm.config import load_config

pytestmark = pytest.mark.integration

NAME = "retrained"
# the local engine: retraining's logic is under test, not Ray Train (test_train_resume, test_jobs)
BASE = ["train.max_steps=40", "train.warmup_steps=4", "train.checkpoint_every=100", f"registry.model_name={NAME}",
        "train.engine=local"]


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])["summary"]


@pytest.fixture(scope="module")
def corpus_dir(work, tmp_path_factory):
    from mlm.corpus import materialize_builtin

    root = tmp_path_factory.mktemp("retrain")
    full = materialize_builtin("python-docs", work / "corpus")
    with open(full, encoding="utf-8") as src:
        lines = list(itertools.islice(src, 2400))
    (root / "corpus").mkdir()
    (root / "corpus" / "a.jsonl").write_text("".join(lines[:1800]), encoding="utf-8")
    (root / "later.jsonl").write_text("".join(lines[1800:]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def first(work, corpus_dir, ray_address):
    """Two triggers started at the same moment, as two processes, both joining the
    session's Ray cluster (RAY_ADDRESS)."""
    env = {**os.environ, "MLM_HOME": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "MLM_PROGRESS": "0", "RAY_ADDRESS": ray_address}
    cmd = [sys.executable, "-m", "mlm", "retrain", "--input", str(corpus_dir / "corpus"), "--preset", "tiny",
           *itertools.chain.from_iterable(("--set", s) for s in BASE)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return [p.communicate(timeout=900) + (p.returncode,) for p in procs]


def _champion():
    from mlm.registry import CHAMPION, _alias_version, _client

    return _alias_version(_client(), NAME, CHAMPION)


def _versions() -> list[str]:
    from mlm.registry import _client

    return sorted(str(v.version) for v in _client().search_model_versions(f"name='{NAME}'"))


def test_two_triggers_at_once_give_one_run(first):
    outs = sorted(first, key=lambda o: _summary(o[0])["status"])
    (busy_out, busy_err, busy_rc), (done_out, done_err, done_rc) = outs
    assert busy_rc == 0 and done_rc == 0, (busy_err[-2000:], done_err[-2000:])
    busy, done = _summary(busy_out), _summary(done_out)
    assert busy["status"] == "busy" and "another retrain of retrained is running" in busy["reason"]
    assert done["status"] == "registered" and done["registered"]["alias"] == "champion"
    assert done["init"] == "scratch" and len(done["new_files"]) == 1
    assert _versions() == ["1"]
    # trained in the retrain's own process (the local engine): the train stage's MLflow run
    # has the loop's metrics and ended as finished, as a Ray Train worker leaves it
    from mlm.registry import _client

    client = _client()
    version = client.get_model_version(NAME, "1")
    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    (train_run,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent}' and tags.`mlm.stage` = 'train'")
    assert train_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "train_loss")] == [20, 40]


def test_no_new_data_does_nothing(first, corpus_dir, ray_cluster):
    from mlm.retrain import retrain

    result = retrain([str(corpus_dir / "corpus")], load_config("tiny", BASE))
    assert result["status"] == "nothing_new"
    assert _versions() == ["1"]


def test_failed_run_moves_no_alias_and_releases_the_lock(first, corpus_dir, ray_cluster, tmp_path):
    from mlm.model import ModelError
    from mlm.retrain import retrain

    (corpus_dir / "corpus" / "b.jsonl").write_text((corpus_dir / "later.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    broken = load_config("tiny", [*BASE, f"model.init_from={tmp_path / 'no-such-model'}"])
    with pytest.raises((ModelError, OSError)):
        retrain([str(corpus_dir / "corpus")], broken, from_scratch=True)
    assert _versions() == ["1"] and str(_champion().version) == "1"


def test_new_data_worse_model_leaves_the_champion(first, corpus_dir, ray_cluster):
    from mlm import shards
    from mlm.retrain import dataset_dir, retrain
    from mlm.runtime import work_dir

    # A learning rate that wrecks the warm-started weights: the challenger scores worse.
    cfg = load_config("tiny", [*BASE, "train.max_steps=4", "train.warmup_steps=0", "train.learning_rate=0.5"])
    result = retrain([str(corpus_dir / "corpus")], cfg)
    assert result["status"] == "registered", result
    assert result["new_files"] == [str(corpus_dir / "corpus" / "b.jsonl")]
    assert result["init"] == f"models:/{NAME}/1"  # warm start from the champion
    reg = result["registered"]
    assert reg["alias"] == "challenger" and reg["score"] < reg["champion_score"], reg
    assert str(_champion().version) == "1"
    manifest = shards.read_manifest(dataset_dir(work_dir(), cfg))
    assert len(manifest["increments"]) == 2  # the new file was appended, the first not prepared again
    # and once more: nothing new since the completed run
    assert retrain([str(corpus_dir / "corpus")], cfg)["status"] == "nothing_new"


def test_retrain_keeps_the_champions_preset_and_name(first, corpus_dir, ray_cluster):
    """A retrain without --preset trains what is in production: the config the champion
    was trained with (here the `small` preset, with a narrower model than its L4/H512 to
    keep the test short, not the CLI's default tiny), under the same registered name,
    warm-started from it."""
    from mlm.model import load_model_dir
    from mlm.resolve import resolve_model_dir
    from mlm.retrain import retrain, retrain_config

    name = f"{NAME}-small"
    sets = ["train.engine=local", "train.use_gpu=false", "train.num_workers=1", "train.micro_batch_size=16", "train.global_batch_size=16",
            "train.max_steps=3", "train.warmup_steps=1", "train.checkpoint_every=100", "tokenizer.vocab_size=2000",
            "model.hidden_size=96", "model.num_heads=3", "model.intermediate_size=192",
            f"registry.model_name={name}"]
    cfg, origin = retrain_config("small", sets)
    assert origin == "preset small"
    assert retrain([str(corpus_dir / "corpus")], cfg)["registered"]["version"] == "1"
    (corpus_dir / "corpus" / "c.jsonl").write_text((corpus_dir / "later.jsonl").read_text(encoding="utf-8")[:20000]
                                                     .rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    again, origin = retrain_config(None, [], model=name)
    assert origin == f"the config of {name} v1 (champion)"
    assert again.registry.model_name == name and again.model.hidden_size == 96 and again.model.num_layers == 4
    assert again.train.micro_batch_size == 16 and again.tokenizer.vocab_size == 2000  # the champion's, not tiny's
    assert again.train.max_steps == 3 and again.model.init_from is None and again.train.engine == "local"
    result = retrain([str(corpus_dir / "corpus")], again)
    assert result["status"] == "registered" and result["registered"]["name"] == name
    assert result["registered"]["version"] == "2" and result["init"] == f"models:/{name}/1"
    model, _ = load_model_dir(resolve_model_dir(f"models:/{name}/2"))
    assert model.config.hidden_size == 96 and model.config.num_hidden_layers == 4
    # no champion yet: the default preset, under the given name
    cfg, origin = retrain_config(None, [], model="never-registered")
    assert cfg.registry.model_name == "never-registered" and "has no champion yet" in origin
