"""`mlm serve` on the session's Ray cluster: the session pipeline's model behind Ray Serve, answering fill-mask and embedding requests over HTTP; the
token; bad requests refused with a 4xx while the replica lives on; loopback-only
listeners (the machine's listening sockets); the alias followed through a promotion and
a rollback with a client sending requests the whole time and none failing. Then
`mlm bench serve` on a tiny budget (no timing asserted), and the `mlm serve` command in
a process of its own: quiet, on loopback, stopped by SIGTERM."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest

from mlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("pipeline")]  # one worker: its session fixtures once

NAME = "mlm-serve-test"  # its own registered model: promotions here never touch other tests' champions
TOKEN = "tok-" + secrets.token_hex(16)
SETTINGS = [f"registry.model_name={NAME}"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, JSON answer, headers) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, data, headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"null"), {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()


def _loopback(address: str) -> bool:
    """`ip:port` on a loopback address (IPv4-mapped ::ffff:127.x included)."""
    return ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")).is_loopback


@pytest.fixture(scope="module")
def versions(pipeline_result, work):
    """v1: the session pipeline's model, registered here under a name of its own (so the
    tests' promotions touch no other test's champion); v2: an untrained model with the
    same tokenizer, evaluated and registered: the gate makes it challenger (the tests
    promote it)."""
    import torch

    from mlm.evaluate import evaluate, load_results
    from mlm.model import build_model, load_model_dir, save_model_dir
    from mlm.registry import register

    cfg = load_config("tiny", SETTINGS)
    first = dict(pipeline_result)
    # the evaluation the pipeline saved with the model (its data fingerprint included)
    registered = register(first["model_dir"], NAME, load_results(first["model_dir"]), cfg, data_dir=first["data_dir"])
    assert registered["alias"] == "champion", registered
    first["registered"] = registered
    _, tokenizer = load_model_dir(first["model_dir"])
    torch.manual_seed(7)
    folder = save_model_dir(build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id), tokenizer,
                            work / "serve-test-untrained")
    metrics = evaluate(folder, first["data_dir"], cfg.eval.batch_size)  # on the champion's evaluation set
    second = register(folder, NAME, metrics, cfg, data_dir=first["data_dir"])
    assert second["alias"] == "challenger", second
    return {"v1": first["registered"]["version"], "v2": second["version"], "model_dir": first["model_dir"],
            "data_dir": first["data_dir"]}


class TestServing:
    @pytest.fixture(scope="class")
    def served(self, versions, monkeypatch_class):
        """The champion served on a free loopback port with a token and small limits;
        Serve shut down after (the session's Ray cluster is left as it was)."""
        from mlm.serve.app import start, stop

        monkeypatch_class.delenv("MLM_SERVE_TOKEN", raising=False)
        cfg = load_config("tiny", [*SETTINGS, f"serve.port={_free_port()}", f"serve.token={TOKEN}", "serve.poll_s=1",
                                   "serve.max_texts=8", "serve.max_body_bytes=4096", "serve.max_text_tokens=64",
                                   "serve.max_batch_size=8"])
        info = start(None, "fill-mask", cfg)
        try:
            yield {"info": info, "port": cfg.serve.port}
        finally:
            stop(shutdown=True)

    def test_answers_fill_mask_and_embed_over_http(self, served, versions):
        from mlm.predict import FillMask
        from mlm.shards import Manifest

        port, v1 = served["port"], versions["v1"]
        texts = ["the [MASK] statement returns a value.", "a [MASK] is a [MASK] of items."]
        status, answer, headers = _call(port, "POST", "/v1/fill-mask", {"texts": texts, "top_k": 3})
        assert status == 200, answer
        assert answer["version"] == v1 and headers["x-model-version"] == v1 and answer["model"] == NAME
        first, second = answer["results"]
        assert len(first["masks"]) == 1 and len(second["masks"]) == 2 and len(first["masks"][0]) == 3
        expected = FillMask(versions["model_dir"])(texts[0], top_k=3)  # the pipeline's model, loaded as `mlm fill-mask` does
        assert [p["token"] for p in first["masks"][0]] == [p["token"] for p in expected[0]]
        status, answer, _ = _call(port, "POST", "/v1/embed", {"texts": ["hello", "the for statement", "x"]})
        assert status == 200 and answer["version"] == v1
        assert [len(e) for e in answer["embeddings"]] == [128, 128, 128]
        status, model, _ = _call(port, "GET", "/v1/model")
        assert status == 200 and (model["name"], model["version"], model["alias"]) == (NAME, v1, "champion")
        assert model["data_fingerprint"] == Manifest.read(versions["data_dir"]).fingerprint and model["following"]
        status, answer, _ = _call(port, "POST", "/v1/classify", {"texts": ["x"]})
        assert status == 404 and "masked-lm" in answer["error"]["message"]

    def test_the_token_is_required_but_for_health(self, served):
        port = served["port"]
        for token in (None, "wrong-" + TOKEN):
            for method, path, body in (("POST", "/v1/fill-mask", {"text": "a [MASK]."}), ("GET", "/v1/model", None)):
                status, answer, headers = _call(port, method, path, body, token=token)
                assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (path, answer)
        for path in ("/healthz", "/readyz"):
            status, answer, _ = _call(port, "GET", path, token=None)
            assert status == 200 and answer["version"], answer

    def test_bad_requests_get_4xx_and_the_replica_lives_on(self, served):
        port = served["port"]
        _, before, _ = _call(port, "GET", "/v1/model")
        bad = [
            (400, "POST", "/v1/fill-mask", b"{not json"),
            (400, "POST", "/v1/embed", b'{"texts": [1, 2]}'),
            (400, "POST", "/v1/fill-mask", b'{"text": "a [MASK].", "top_k": 0}'),
            (413, "POST", "/v1/embed", json.dumps({"texts": ["a"] * 9}).encode()),
            (413, "POST", "/v1/embed", json.dumps({"text": "x" * 5000}).encode()),
            (413, "POST", "/v1/embed", json.dumps({"text": "word " * 200}).encode()),
            (422, "POST", "/v1/fill-mask", b'{"text": "no mask here"}'),
            (405, "GET", "/v1/fill-mask", None),
            (404, "POST", "/v1/translate", b"{}"),
        ]
        for expected, method, path, raw in bad:
            status, answer, _ = _call(port, method, path, raw=raw)
            assert status == expected and answer["error"]["status"] == expected, (path, raw, answer)
            status, answer, _ = _call(port, "POST", "/v1/fill-mask", {"text": "the [MASK] statement."})
            assert status == 200, answer  # the next good one succeeds
        _, after, _ = _call(port, "GET", "/v1/model")
        assert after["replica"] == before["replica"]  # the same replica: none was restarted

    def test_listens_on_loopback_only(self, served):
        """The machine's listening sockets (psutil), not a setting: on the port, and every
        socket of Serve's processes (the replicas' gRPC servers included, which Ray Serve
        binds to every interface unless mlm rebinds them)."""
        import psutil

        from mlm.serve.app import listeners, serve_process

        bound = listeners(served["port"])
        assert bound and all(_loopback(b) for b in bound), bound
        assert served["info"]["listening"] == bound
        kinds = {serve_process(p) for p in psutil.Process().children(recursive=True)}
        assert {"ServeController", "ProxyActor", "ServeReplica", "HAProxyManager", "haproxy"} <= kinds, kinds
        # HAProxy (the default ingress): its HTTP frontend, stats page and metrics, which
        # Ray's template binds to every interface unless mlm rebinds them
        haproxy = {f"{c.laddr.ip}:{c.laddr.port}" for p in psutil.Process().children(recursive=True)
                   if serve_process(p) == "haproxy" for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert len(haproxy) >= 3 and all(_loopback(b) for b in haproxy), haproxy
        sockets = listeners()
        assert len(sockets) > len(bound) and all(_loopback(b) for b in sockets), sockets

    def test_follows_the_alias_with_no_failed_request(self, served, versions):
        """A client sends requests throughout; the champion moves to v2 (promote), then back
        (rollback): answers switch to the new version, and not one request fails."""
        from mlm.registry import promote, rollback

        port, v1, v2 = served["port"], versions["v1"], versions["v2"]
        seen, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                status, answer, _ = _call(port, "POST", "/v1/embed", {"texts": ["hello"]})
                seen.append((status, answer.get("version"), (answer.get("embeddings") or [[None]])[0][:4]))

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            _wait_for(seen, v1)
            promote(NAME, v2, "serving test")
            _wait_for(seen, v2)
            rollback(NAME)
            _wait_for(seen, v1, after=v2)
        finally:
            stop.set()
            thread.join(timeout=120)
        assert [s for s, _, _ in seen if s != 200] == [], seen[-5:]
        order = [v for i, (_, v, _) in enumerate(seen) if i == 0 or v != seen[i - 1][1]]
        assert order == [v1, v2, v1], order  # one replica: each switch happens once, between requests
        vectors = {v: {tuple(e) for _, vv, e in seen if vv == v} for v in (v1, v2)}
        assert len(vectors[v1]) == len(vectors[v2]) == 1 and vectors[v1] != vectors[v2]  # really another model


def _wait_for(seen: list, version: str, after: str | None = None, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        versions = [v for _, v, _ in seen]
        start = versions.index(after) if after in versions else 0
        if version in versions[start:]:
            time.sleep(1.0)  # and a few more requests on it
            return
        time.sleep(0.2)
    raise AssertionError(f"no answer from v{version} within {timeout_s} s; last: {seen[-3:]}")


@pytest.fixture(scope="class")
def monkeypatch_class():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_bench_serve_runs_on_a_tiny_budget(versions):
    """`mlm bench serve` end to end, both servers, a few requests per level (in CI: no
    timing asserted, only that every request was answered)."""
    from click.testing import CliRunner

    from mlm.cli import cli

    from ray import serve

    try:
        out = CliRunner().invoke(cli, ["bench", "serve", "--model", f"models:/{NAME}/{versions['v1']}", "--requests",
                                       "6", "--concurrency", "1,2", "--set", SETTINGS[0]])
    finally:
        serve.shutdown()  # the command leaves Serve to its Ray instance's end; this one is the session's
    assert out.exit_code == 0, (out.output, out.exception)
    r = json.loads(out.stdout)
    assert [(row["server"], row["concurrency"]) for row in r["results"]] == [
        ("mlm", 1), ("mlflow", 1), ("mlm", 2), ("mlflow", 2)]
    assert all(row["requests"] == 6 and row["errors"] == 0 and row["requests_per_s"] > 0 for row in r["results"])
    assert set(r["speedup"]) == {"1", "2"} and r["model"]["version"] == versions["v1"]
    assert r["listening"] and all(_loopback(b) for b in r["listening"])
    assert "mlm bench serve:" in out.stderr and "requests/s" in out.stderr


def test_mlm_serve_command_is_quiet_on_loopback_and_stops_on_sigterm(versions, work):
    """The command in a process of its own (its own Ray instance): one JSON document on
    stdout, its own lines on stderr and nothing of Serve's, loopback listeners, and a
    clean stop on SIGTERM (the application deleted, nothing listening)."""
    import psutil

    from mlm.serve.app import listeners, serve_process

    port = _free_port()
    env = {**os.environ, "MLM_HOME": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("MLM_SERVE_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlm", "serve", "--set", SETTINGS[0], "--set", f"serve.port={port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # the JSON document, printed when the application is up
            lines.append(line)
            if line.startswith("}"):
                break
        if not lines or not lines[-1].startswith("}"):
            proc.wait(timeout=120)
            raise AssertionError(f"mlm serve exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        info = json.loads("".join(lines))
        assert info["model"]["version"] == versions["v1"] and info["token_required"] is False
        assert _call(port, "POST", "/v1/fill-mask", {"text": "the [MASK] statement."}, token=None)[0] == 200
        bound = listeners(port)
        assert bound and all(_loopback(b) for b in bound) and info["listening"] == bound
        serving = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if serve_process(p)]
        # the default ingress: HAProxy, whose stats and metrics frontends Ray binds to every interface
        assert info["ingress"] == "haproxy" and any(serve_process(p) == "haproxy" for p in serving)
        sockets = {f"{c.laddr.ip}:{c.laddr.port}" for p in serving for c in p.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN}
        assert serving and sockets and all(_loopback(b) for b in sockets), sockets
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert rest.strip() == ""  # stdout: the one JSON document
    ours = [line for line in err.splitlines() if line.startswith("mlm serve:")]
    assert len(ours) == 2 and ours[-1] == "mlm serve: stopped", err
    others = [line for line in err.splitlines() if not line.startswith("mlm")]
    assert not [line for line in others if any(w in line for w in ("serve", "Serve", "replica", "Deploy", "Application"))], others
    assert listeners(port) == []
