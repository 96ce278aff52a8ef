"""`mlm serve` without a Ray cluster: the HTTP API's refusals (bodies, limits, the token),
what `mlm serve` agrees to start (loopback, or a token), the `serve` config section (the
token never shown), and the batched computations on a real tiny model against the
Hugging Face fill-mask pipeline. The server itself runs in
tests/integration/test_serve.py."""

from __future__ import annotations

import os
import asyncio
import itertools
import json

import pytest

from mlm.config import ConfigError, TokenizerConfig, load_config
from mlm.serve.api import Limits, check_token, parse, read_body, token_digest
from mlm.serve.model import RequestError, ServeError

LIMITS = Limits(max_body_bytes=2048, max_texts=4, max_text_tokens=64)


def _refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


# ---------------------------------------------------------------- request bodies


def test_parse_takes_texts_or_one_text_and_top_k():
    work = parse("fill-mask", b'{"texts": ["a [MASK].", "b [MASK]."], "top_k": 3}', LIMITS)
    assert (work.task, work.texts, work.top_k) == ("fill-mask", ["a [MASK].", "b [MASK]."], 3)
    assert parse("embed", b'{"text": "hello"}', LIMITS).texts == ["hello"]
    assert parse("fill-mask", b'{"text": "x"}', LIMITS).top_k == 5


@pytest.mark.parametrize("task, body, status, says", [
    ("embed", b"not json", 400, "not JSON"),
    ("embed", b"\xff\xfe", 400, "not JSON"),
    ("embed", b'["a list"]', 400, "JSON object"),
    ("embed", b'{"texts": ["a"], "text": "b"}', 400, "`texts`"),
    ("embed", b"{}", 400, "`texts`"),
    ("embed", b'{"texts": []}', 400, "non-empty"),
    ("embed", b'{"texts": "a string"}', 400, "list of strings"),
    ("embed", b'{"texts": ["a", 3]}', 400, "list of strings"),
    ("embed", b'{"texts": ["a"], "top_k": 2}', 400, "unknown field(s) 'top_k'"),
    ("fill-mask", b'{"texts": ["a"], "tokens": 2}', 400, "unknown field(s) 'tokens'"),
    ("fill-mask", b'{"text": "a", "top_k": 0}', 400, "top_k"),
    ("fill-mask", b'{"text": "a", "top_k": 101}', 400, "top_k"),
    ("fill-mask", b'{"text": "a", "top_k": true}', 400, "top_k"),
    ("fill-mask", b'{"text": "a", "top_k": "3"}', 400, "top_k"),
    ("embed", b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "at most 4 per request"),
])
def test_bad_bodies_get_a_4xx_that_says_why(task, body, status, says):
    err = _refused(parse, task, body, LIMITS)
    assert err.status == status and says in err.message, err.message


def _request(body: bytes, chunks: int = 1, content_length: int | None = None):
    """A real Starlette request whose body arrives in `chunks` pieces."""
    from starlette.requests import Request

    size = -(-len(body) // chunks)
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]

    async def receive():
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "path": "/v1/embed", "headers": headers}, receive)


def test_the_body_limit_holds_whatever_content_length_says():
    big = b'{"text": "' + b"x" * 3000 + b'"}'
    assert asyncio.run(read_body(_request(b'{"text": "ok"}', content_length=14), 2048)) == b'{"text": "ok"}'
    err = _refused(lambda: asyncio.run(read_body(_request(big, content_length=len(big)), 2048)))
    assert err.status == 413 and "at most 2048" in err.message  # refused before reading
    for declared in (None, 10):  # chunked, or a Content-Length that lies: cut off while reading
        err = _refused(lambda: asyncio.run(read_body(_request(big, chunks=8, content_length=declared), 2048)))
        assert err.status == 413 and "over 2048" in err.message
    assert _refused(lambda: asyncio.run(read_body(_request(b"{}", content_length=-1), 2048))).status == 400


# ---------------------------------------------------------------- the token


def test_token_is_checked_against_its_digest_only():
    digest = token_digest("s3cret-token")
    assert digest != "s3cret-token" and len(digest) == 64
    check_token("Bearer s3cret-token", digest)
    check_token("bearer  s3cret-token ", digest)
    check_token(None, None)  # no token configured: nothing to check
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret-token", "s3cret-token"):
        assert _refused(check_token, header, digest).status == 401


# ---------------------------------------------------------------- what `mlm serve` agrees to start


def test_loopback_needs_no_token_anything_else_does(monkeypatch):
    from mlm.serve.app import is_loopback, make_plan, replica_options

    monkeypatch.delenv("MLM_SERVE_TOKEN", raising=False)
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.com")] == [False] * 4
    plan = make_plan(None, "fill-mask", load_config("tiny"))
    assert plan.loopback and plan.token is None and plan.ref == "models:/mlm-tiny@champion"
    for host in ("0.0.0.0", "10.1.2.3"):
        with pytest.raises(ServeError, match="not loopback"):
            make_plan(None, "fill-mask", load_config("tiny", [f"serve.host={host}"]))
    monkeypatch.setenv("MLM_SERVE_TOKEN", "from-the-environment")
    plan = make_plan("models:/x@champion", "embed", load_config("tiny", ["serve.host=0.0.0.0"]))
    assert plan.token == "from-the-environment"
    plan = make_plan(None, "embed", load_config("tiny", ["serve.host=0.0.0.0", "serve.token=from-the-config"]))
    assert plan.token == "from-the-config"  # the config wins over the environment
    options = replica_options(plan, gpu=False)
    assert options["token_sha256"] == token_digest("from-the-config")
    assert "from-the-config" not in json.dumps(options)  # the replicas never see the token itself
    with pytest.raises(ServeError, match="unknown task"):
        make_plan(None, "translate", load_config("tiny"))


def test_classify_defaults_to_the_fine_tuned_champion():
    from mlm.serve.app import make_plan

    assert make_plan(None, "classify", load_config("tiny")).ref == "models:/mlm-tiny-classification@champion"


def test_replicas_and_autoscaling_come_from_the_config():
    from mlm.serve.app import deployment_options

    fixed = deployment_options(load_config("tiny", ["serve.replicas=3", "serve.cpus_per_replica=2"]), gpu=False)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    auto = deployment_options(load_config("tiny", ["serve.replicas=auto", "serve.max_replicas=6"]), gpu=True)
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 16.0}
    assert auto["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in auto
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config("tiny", ["serve.min_replicas=5", "serve.max_replicas=2"])


def test_the_token_is_never_shown_or_logged():
    cfg = load_config("tiny", ["serve.token=1234567890"])
    assert cfg.serve.token.get_secret_value() == "1234567890"  # a number on the command line is still a token
    shown = [json.dumps(cfg.to_dict()), cfg.to_yaml(), json.dumps(cfg.flat())]
    assert all("1234567890" not in text for text in shown)
    assert cfg.flat()["serve.token"] == "**********"
    # a config read back from MLflow (config.yaml) has the mask: that is no token
    assert load_config(base=cfg.to_dict()).serve.token is None


def test_submit_serve_runs_mlm_serve_as_a_ray_job():
    from mlm.cli import cli
    from mlm.jobs import entrypoint

    ctx = cli.commands["submit"].make_context("submit", ["serve", "--task", "embed", "--preset", "small"])
    assert ctx.params["command"] == "serve" and list(ctx.params["args"]) == ["--task", "embed", "--preset", "small"]
    assert entrypoint("serve", ["--task", "embed"]) == "python -m mlm serve --task embed"
    cli.commands["serve"].make_context("serve", ["--task", "embed", "--preset", "small"])


# ---------------------------------------------------------------- the computations, on a real tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untrained BERT with a 500-token tokenizer, saved as a model folder, loaded
    as a replica loads it."""
    import torch

    from mlm.corpus import _python_docs
    from mlm.model import build_model, save_model_dir
    from mlm.serve.model import load, resolve_source
    from mlm.tokenizer import train_tokenizer

    tok = train_tokenizer(list(itertools.islice(_python_docs(), 300)), TokenizerConfig(vocab_size=500))
    torch.manual_seed(0)
    folder = save_model_dir(build_model(load_config("tiny").model, len(tok), tok.pad_token_id), tok,
                            tmp_path_factory.mktemp("serve") / "model")
    return load(resolve_source(str(folder)))


def test_batched_fill_mask_answers_as_the_hugging_face_pipeline(tiny):
    """Texts of different lengths in one padded batch get the pipeline's tokens and scores."""
    from mlm.predict import FillMask

    texts = ["the [MASK] statement returns a value from a function call.", "a [MASK] is a [MASK].",
             "import [MASK]"]
    rows = [tiny.encode(t, "fill-mask", 512) for t in texts]
    batched = tiny.run("fill-mask", rows, [3, 2, 1])
    reference = FillMask(tiny.source.uri)
    for text, answer, k in zip(texts, batched, [3, 2, 1]):
        expected = reference(text, top_k=k)
        assert [[p["token"] for p in m] for m in answer["masks"]] == [[p["token"] for p in m] for m in expected]
        got = [p["score"] for m in answer["masks"] for p in m]
        assert got == pytest.approx([p["score"] for m in expected for p in m], abs=1e-5)


def test_embeddings_do_not_depend_on_the_batch(tiny):
    from mlm.serve.model import run_items

    short, long_ = tiny.encode("hello", "embed", 512), tiny.encode("hello world " * 20, "embed", 512)
    alone = tiny.run("embed", [short], [1])[0]
    together = run_items([(tiny, "embed", short, 5), (tiny, "fill-mask", tiny.encode("a [MASK].", "fill-mask", 512), 2),
                          (tiny, "embed", long_, 5)])
    assert len(alone) == 128 and together[0] == pytest.approx(alone, abs=1e-5)
    assert len(together[1]["masks"][0]) == 2 and len(together[2]) == 128


def test_one_failing_group_does_not_fail_the_batch(tiny):
    """A masked LM asked to classify fails (no labels); the embed request in the same batch is answered."""
    from mlm.serve.model import run_items

    row = tiny.encode("hello", "embed", 512)
    classify, embed = run_items([(tiny, "classify", row, 5), (tiny, "embed", row, 5)])
    assert isinstance(classify, Exception) and isinstance(embed, list)


def test_text_limits(tiny):
    assert _refused(tiny.encode, "word " * 100, "embed", 64).status == 413
    assert _refused(tiny.encode, "no mask here", "fill-mask", 512).status == 422
    past = _refused(tiny.encode, "word " * 300 + "[MASK]", "fill-mask", 10_000)
    assert past.status == 422 and "at most 128" in past.message
    cut = tiny.encode("word " * 300, "embed", 10_000)  # within the limit, past the model's positions: cut to them
    assert len(cut) == 128 and cut[-1] == tiny.tokenizer.sep_token_id


def test_the_haproxy_wrapper_binds_every_frontend_to_the_node(tmp_path):
    """Ray's HAProxy template binds stats (`bind *:PORT`) and metrics (`bind :PORT`) to
    every interface; the wrapper Ray runs rewrites them to the node's address and leaves
    the HTTP frontend's own host alone, then runs the real binary with the same arguments."""
    import subprocess

    from mlm.serve.ingress import local_env, write_wrapper

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind 127.0.0.1:8000\n"
                   "listen stats\n  bind *:8404\n  stats enable\n")
    out = tmp_path / "args"
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f'#!/bin/sh\necho "$@" > {out}\n')
    fake.chmod(0o755)
    wrapper = write_wrapper(tmp_path / "bin", str(fake), "127.0.0.1")
    subprocess.run([str(wrapper), "-db", "-f", str(cfg), "-dR"], check=True)
    assert cfg.read_text().splitlines() == ["frontend prometheus", "    bind 127.0.0.1:9101", "frontend http_frontend",
                                            "    bind 127.0.0.1:8000", "listen stats", "  bind 127.0.0.1:8404",
                                            "  stats enable"]
    assert out.read_text().split() == ["-db", "-f", str(cfg), "-dR"]
    assert local_env("proxy", "127.0.0.1", tmp_path) == {}
    env = local_env("haproxy", "127.0.0.1", tmp_path / "serve")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert len({env[k] for k in env if k.endswith("_PORT")}) == 4  # free ports: no clash between instances
