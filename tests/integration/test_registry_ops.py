"""Model lifecycle on real MLflow stores, without Ray: the gate, `show`, `promote`,
`rollback` through the champion history, and registrations that fail before the alias
step, once on SQLite (MLM_HOME's embedded store) and once on PostgreSQL (a real server on
loopback, tests/integration/pg_server.py, through MLFLOW_TRACKING_URI). Tiny untrained
models with hand-made metrics, so the gate decides without data. Within each store the
tests run in order and share one registered model.

Then the head of cluster.yaml as it runs: deploy/aws/mlflow_store.py sets up the
PostgreSQL role and databases and writes the server's files, `mlflow server --app-name
basic-auth` runs on them with artifacts on S3 (moto), deploy/aws/mlflow_service_user.py
creates the service account, and a model is registered and loaded back over HTTP."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlm.config import TokenizerConfig, load_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]  # one worker: its session fixtures once

NAME = "lifecycle"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Store:
    kind: str  # "sqlite" | "postgresql"
    home: Path  # MLM_HOME
    uri: str  # the tracking URI mlm uses
    postgres: object = None  # the PostgresServer for kind "postgresql"

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Straight from the database, past MLflow."""
        if self.kind == "postgresql":
            return self.postgres.query(sql, params, dbname="registry_ops")
        with sqlite3.connect(self.home / "mlflow.db") as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory):
    """A fresh store for this module, once per kind: SQLite in a fresh MLM_HOME, or a fresh
    PostgreSQL database named by MLFLOW_TRACKING_URI; the session's environment is restored
    after."""
    home = tmp_path_factory.mktemp(f"registry-ops-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLM_HOME", str(home))
        mp.setenv("USER", "tester")
        if request.param == "postgresql":
            pg = request.getfixturevalue("postgres")
            uri = pg.create_database("registry_ops")
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            yield Store("postgresql", home, uri, pg)
        else:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            yield Store("sqlite", home, f"sqlite:///{home / 'mlflow.db'}")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
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


def test_first_version_is_champion(store, model_dirs, cfg):
    from mlm.registry import register, show

    reg = register(model_dirs[0], NAME, _metrics(0.30), cfg)
    assert (reg["version"], reg["alias"], reg["reason"]) == ("1", "champion", "no champion yet")
    assert _aliases() == {"champion": "1"} and _stored_history() == ["1"]
    info = show(NAME)
    assert info["version"] == "1" and info["aliases"] == ["champion"]
    assert info["why"].startswith("v1 is champion: the gate promoted it") and "no champion yet" in info["why"]


def test_worse_model_is_challenger_and_show_explains(store, model_dirs, cfg):
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


def test_better_models_become_champion_and_extend_history(store, model_dirs, cfg):
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


def test_rollback_walks_back_through_history(store, model_dirs):
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


def test_promote_by_hand_and_rollback_undoes_it(store, model_dirs):
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


def test_history_survives_a_crash_between_alias_and_history(store, model_dirs):
    """The alias is the truth: a champion missing from the stored list counts as its last entry."""
    from mlm.registry import _client, rollback, show

    _client().set_registered_model_alias(NAME, "champion", "4")  # as if promote crashed before the history write
    assert show(NAME)["champion_history"] == ["1", "4"]
    assert rollback(NAME)["version"] == "1" and _stored_history() == ["1"]


def test_failed_registration_leaves_aliases(store, model_dirs, cfg, monkeypatch):
    import mlflow

    from mlm.registry import RegistryError, register, show

    before, history = _aliases(), _stored_history()

    def broken(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    with monkeypatch.context() as mp:
        # The registry refuses the new version (mlflow.register_model ends in this call too).
        mp.setattr(mlflow.MlflowClient, "create_model_version", broken)
        with pytest.raises(RuntimeError, match="unreachable"):
            register(model_dirs[0], NAME, _metrics(0.9), cfg)
    assert _aliases() == before and _stored_history() == history

    # Fails after the version exists, at the gate: the champion was scored on other data.
    with pytest.raises(RegistryError, match="scored on other data"):
        register(model_dirs[0], NAME, _metrics(0.9, fingerprint="fp2"), cfg)
    assert _aliases() == before and _stored_history() == history
    info = show(NAME, 5)
    assert info["aliases"] == [] and "the gate never decided" in info["why"]


def test_the_database_holds_what_the_registry_reports(store, cfg):
    """Read past MLflow, from the database itself: the versions, the aliases, the history
    tag, and experiments whose artifacts are in the work folder (not MLflow's ./mlruns in
    whatever the current directory is)."""
    from mlm.registry import describe

    described = describe(NAME)
    versions = {str(v) for (v,) in store.rows("SELECT version FROM model_versions WHERE name = %s", (NAME,))}
    assert versions == {str(v["version"]) for v in described["versions"]} == {"1", "2", "3", "4", "5"}
    aliases = dict(store.rows("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (NAME,)))
    assert {a: str(v) for a, v in aliases.items()} == described["aliases"] == {"champion": "1", "challenger": "2"}
    (history,) = store.rows("SELECT value FROM registered_model_tags WHERE name = %s AND key = 'champion_history'", (NAME,))
    assert json.loads(history[0]) == [1]
    (location,) = store.rows("SELECT artifact_location FROM experiments WHERE name = %s", (cfg.registry.experiment,))
    assert location[0] == f"{(store.home / 'mlartifacts').as_uri()}/{cfg.registry.experiment}"
    assert list((store.home / "mlartifacts").rglob("model.safetensors")), "no model weights under the work folder"


def _stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace_s`: nothing to save, and
    on a busy machine MLflow's graceful stop (uvicorn workers, job runner) outlasts any wait."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `mlm ui` execs `mlflow server` on the embedded store; on PostgreSQL the tracking server test
# below runs `mlflow server` itself, as the cluster's head does.
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_cli_models_and_ui_over_rest(model_dirs, store):
    """`mlm models` reads the same store; `mlm ui` serves it on loopback over MLflow's REST API."""
    env = {**os.environ, "MLM_HOME": str(store.home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(["mlm", "models", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert NAME in [m["name"] for m in json.loads(out.stdout)]
    show = subprocess.run(["mlm", "models", "show", NAME], capture_output=True, text=True, env=env, timeout=120)
    assert show.returncode == 0 and show.stdout.startswith("v") and "champion" in show.stdout.splitlines()[0]
    shown = subprocess.run(["mlm", "models", "show", NAME, "--json"], capture_output=True, text=True, env=env, timeout=120)
    doc = json.loads(shown.stdout)  # one JSON document, nothing before it (the prose line is its "why")
    assert shown.returncode == 0 and "champion" in doc["why"] and doc["aliases"]
    bad = subprocess.run(["mlm", "models", "show", "no-such-model"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("mlm: error:")

    port = _free_port()
    server = subprocess.Popen(["mlm", "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name={NAME}"
        deadline, body = time.time() + 240, None  # ~20 s when idle; minutes on a machine shared with other runs
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
        _stop_group(server)


# ---------------------------------------------------------------- the head's MLflow server
#
# `sudo -u postgres psql` on the head (peer login as the superuser on the Unix socket) is,
# here, psql as the test server's superuser over loopback: the same SQL reaches a real server.
SUDO_PSQL = """#!/bin/sh
while [ "$#" -gt 0 ] && [ "$1" != psql ]; do shift; done
shift
exec "$PG_BIN/psql" -h 127.0.0.1 -U "$PG_SUPERUSER" "$@"
"""


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    # ~15 s on an idle 2-core machine (two processes import MLflow, one migrates two empty
    # databases); the margin is for a machine shared with other test runs.
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    import base64
    import urllib.error

    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_head_tracking_server_on_postgresql_with_s3_artifacts(s3_server, postgres, model_dirs, cfg, tmp_path, monkeypatch):
    """What cluster.yaml's head runs, for real: mlflow_store.py creates the role and both
    databases on PostgreSQL and writes the server's files; `mlflow server --app-name
    basic-auth` reads the store from MLFLOW_BACKEND_STORE_URI and the auth store from the
    rendered ini, artifacts go to S3; the service account is created through the auth API;
    a model registered over HTTP as that account loads back, and every row and object is
    where it should be."""
    import secrets as pysecrets

    import psycopg2
    import torch
    from safetensors.torch import load_file

    from mlm.registry import download_model_dir, register

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    role_pw = pysecrets.token_urlsafe(24)
    # As an operator would write it: plain postgresql:// (read as +psycopg2), the auth store derived.
    (secrets_dir / "mlflow-db.env").write_text(
        f"MLM_MLFLOW_DB_URI=postgresql://mlflow_head:{role_pw}@127.0.0.1:{postgres.port}/mlflow_head\n")
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    (stub_bin / "sudo").write_text(SUDO_PSQL)
    (stub_bin / "sudo").chmod(0o755)
    tool_env = {**os.environ, "PATH": f"{stub_bin}:{os.environ['PATH']}", "PG_BIN": str(postgres.bindir),
                "PG_SUPERUSER": postgres.user, "PGPASSWORD": postgres.password,
                "MLM_LOCAL_PG_PORT": str(postgres.port)}  # the head's own PostgreSQL, here
    store_cmd = [sys.executable, str(REPO / "deploy/aws/mlflow_store.py"), str(secrets_dir),
                 str(REPO / "deploy/aws/mlflow-auth.ini")]
    for _ in range(2):  # a restart finds everything in place
        out = subprocess.run(store_cmd, env=tool_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert role_pw not in out.stdout + out.stderr
    assert {"mlflow_head", "mlflow_head_auth"} <= postgres.databases()
    owners = dict(postgres.query("SELECT datname, pg_get_userbyid(datdba) FROM pg_database"))
    assert owners["mlflow_head"] == owners["mlflow_head_auth"] == "mlflow_head"
    (superuser,) = postgres.query("SELECT rolsuper FROM pg_roles WHERE rolname = 'mlflow_head'")
    assert superuser == (False,)
    backend = dict(shlex.split(line)[0].split("=", 1) for line in (secrets_dir / "mlflow-backend.env").read_text().splitlines())
    store_uri = backend["MLFLOW_BACKEND_STORE_URI"]
    assert store_uri.startswith("postgresql+psycopg2://mlflow_head:")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    admin_pw = pysecrets.token_urlsafe(24)
    server_env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": store_uri,
                  "MLFLOW_AUTH_CONFIG_PATH": str(secrets_dir / "mlflow-auth.ini"),
                  "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": pysecrets.token_urlsafe(24),
                  # No huey job runner (a third process importing MLflow); mlm runs no MLflow jobs.
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        server_env.pop(name, None)
    log = tmp_path / "mlflow-server.log"
    artifacts = s3_server.uri("mlartifacts")
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--serve-artifacts", "--artifacts-destination", artifacts],
            env=server_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, server, log)
        probe = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(probe) == 401  # basic auth is on
        client_env = secrets_dir / "mlflow-client.env"
        svc_pw = pysecrets.token_urlsafe(24)
        client_env.write_text(f"MLFLOW_TRACKING_USERNAME=mlm\nMLFLOW_TRACKING_PASSWORD={svc_pw}\n")
        out = subprocess.run([sys.executable, str(REPO / "deploy/aws/mlflow_service_user.py"), url, str(client_env)],
                             env={**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw}, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "'mlm': created" in out.stdout, out.stdout + out.stderr
        assert _status(probe, "mlm", svc_pw) == 200 and _status(probe, "mlm", "wrong") == 401

        # A job on the cluster: the tracking URI is the server, the login the service account's.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mlm")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", svc_pw)
        monkeypatch.setenv("MLM_HOME", str(tmp_path / "work"))
        reg = register(model_dirs[1], "served", _metrics(0.25), cfg)
        assert (reg["version"], reg["alias"]) == ("1", "champion")
        local = Path(download_model_dir("models:/served@champion"))
        got, want = load_file(local / "model.safetensors"), load_file(Path(model_dirs[1]) / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (local, Path(model_dirs[1]))]
        assert vocab[0] == vocab[1] and len(vocab[0]) == 500
    finally:
        _stop_group(server)

    # Rows in PostgreSQL, read as the role the server used.
    conn = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="mlflow_head", password=role_pw, dbname="mlflow_head")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'served'")
            assert cur.fetchall() == [("champion", 1)]
            cur.execute("SELECT artifact_location FROM experiments WHERE name = %s", (cfg.registry.experiment,))
            assert cur.fetchone()[0].startswith("mlflow-artifacts:/")  # proxied by the server
    finally:
        conn.close()
    users = dict(postgres.query("SELECT username, is_admin FROM users", dbname="mlflow_head_auth"))
    assert users == {"admin": True, "mlm": False}
    # Objects in S3, under the server's artifacts destination, not on this machine.
    keys = [o["Key"] for page in s3_server.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix="mlartifacts/") for o in page.get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    assert not (tmp_path / "work" / "mlartifacts").exists()
