"""The tiny pipeline end to end on the session's local Ray cluster (2 training
workers), then the registry gate, fresh-process loading, and the CLI on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("pipeline")]  # one worker: its session fixtures once

from conftest import PROBE_MARGIN, STEPS  # noqa: E402


@pytest.fixture(scope="module")
def result(pipeline_result):
    """The session's pipeline run (conftest.pipeline_result), the probe included."""
    return pipeline_result


def test_pretraining_helps_the_probe_task(result):
    """The evaluate stage fine-tuned the encoder and a random-init twin on the built-in
    probe task with one budget: the pretrained encoder is clearly better, and both
    scores are the version's tags and card rows."""
    from mlflow import MlflowClient

    from mlm.registry import _client

    m = result["metrics"]
    assert m["probe_macro_f1"] > m["probe_random_init_macro_f1"] + PROBE_MARGIN, m
    assert m["probe_gain"] == pytest.approx(m["probe_macro_f1"] - m["probe_random_init_macro_f1"])
    reg = result["registered"]
    _client()
    version = MlflowClient().get_model_version(reg["name"], reg["version"])
    assert float(version.tags["eval.probe_macro_f1"]) == pytest.approx(m["probe_macro_f1"])
    assert "eval.probe_random_init_macro_f1" in version.tags
    assert f"| probe_macro_f1 | {m['probe_macro_f1']:.4f} |" in version.description


def _env(work):
    return {**os.environ, "MLM_HOME": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}


def test_pipeline_learns_and_registers_champion(result):
    from mlm.registry import describe
    from mlm.shards import read_manifest, verify

    assert verify(result["data_dir"]) == []
    manifest = read_manifest(result["data_dir"])
    assert manifest["splits"]["train"]["rows"] > 1000 and manifest["splits"]["validation"]["rows"] > 50
    assert manifest["masking"]["train"]["mode"] == "dynamic" and manifest["splits"]["train"]["masked"] == 0
    masked = manifest["splits"]["validation"]["masked"] / manifest["splits"]["validation"]["tokens"]
    assert 0.10 < masked < 0.15  # the fixed evaluation set: 15% of the non-special tokens
    m = result["metrics"]
    assert m["top1_accuracy"] > 2 * m["baseline_top1_accuracy"], m
    assert m["top5_accuracy"] > m["top1_accuracy"]
    reg = result["registered"]
    assert reg["alias"] == "champion"
    info = describe(reg["name"])
    assert info["aliases"]["champion"] == reg["version"]
    tags = info["versions"][-1]["tags"]
    assert tags["data_fingerprint"] == manifest["fingerprint"]
    assert {"config_hash", "code_version", "eval.top1_accuracy", "gate.decision"} <= set(tags)
    # the model card: on the version's page and as an artifact of the register run
    from mlflow import MlflowClient

    from mlm.registry import _client

    _client()
    card = MlflowClient().get_model_version(reg["name"], reg["version"]).description
    assert card.startswith(f"# {reg['name']} v{reg['version']}") and "## Load it" in card
    assert f"| top1_accuracy | {m['top1_accuracy']:.4f} |" in card and manifest["tokenizer"]["fingerprint"] in card
    # MLflow 3's UI opens the experiment as model training, not GenAI (traces, "evaluation runs")
    experiment = MlflowClient().get_experiment_by_name(load_config("tiny").registry.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


LONG_TEXT = "the [MASK] statement returns a value. " + "word " * 400  # ~400 tokens; the tiny model has 128 positions

SERVED = """
m = mlflow.pyfunc.load_model(URI)
print(json.dumps(str(m.predict(['the [MASK] statement returns a value.']))))
schema = m.metadata.get_params_schema()
served = {'params': {s.name: s.default for s in (schema.params if schema else [])},
          'top2': m.predict('the [MASK] statement returns a value.', params={'top_k': 2})}
try:
    m.predict('the [MASK] statement.', params={'top_k': 'two'})
except mlflow.exceptions.MlflowException as e:
    served['bad_top_k'] = str(e)[:200]
pipe = mlflow.transformers.load_model(URI)
served['native_top2'] = len(pipe('the [MASK] statement returns a value.', top_k=2))
served['native_max_length'] = pipe.tokenizer.model_max_length
print(json.dumps(served))
"""


@pytest.fixture(scope="module")
def fresh_process(result, work):
    """One new interpreter (one import of transformers and MLflow, not two) loads the
    model folder with transformers alone (a text longer than the model's positions cut
    by `truncation=True`), checks that no project code came with it, then loads the
    registered champion through MLflow: pyfunc with the `top_k` param, and natively."""
    code = (
        "import sys, json\n"
        "from transformers import pipeline\n"
        f"p = pipeline('fill-mask', model={result['model_dir']!r})\n"
        "out = p('the [MASK] statement returns a value.', top_k=3)\n"
        f"long = p({LONG_TEXT!r}, top_k=3, tokenizer_kwargs={{'truncation': True}})\n"
        f"n = len(p.tokenizer({LONG_TEXT!r}, verbose=False)['input_ids'])\n"
        "assert not any(m == 'mlm' or m.startswith('mlm.') for m in sys.modules)\n"
        "print(json.dumps({'top3': [o['token_str'] for o in out], 'long': [o['token_str'] for o in long], 'n': n}))\n"
        "import mlflow\n"
        f"URI = 'models:/{result['registered']['name']}@champion'\n" + SERVED
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(work), cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-3:]]


def test_model_dir_is_plain_hugging_face(result, fresh_process):
    """Loads with transformers alone: no project code imported, safetensors weights; the
    tokenizer's model_max_length is the model's positions, so a fill-mask pipeline with
    `truncation=True` answers a text longer than them (on a 512 it crashed: tensor size
    mismatch at the position embeddings)."""
    model_dir = result["model_dir"]
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(model_dir))
    assert len(fresh_process[0]["top3"]) == 3
    positions = json.load(open(os.path.join(model_dir, "config.json")))["max_position_embeddings"]
    assert json.load(open(os.path.join(model_dir, "tokenizer_config.json")))["model_max_length"] == positions == 128
    assert fresh_process[0]["n"] > 3 * positions and len(fresh_process[0]["long"]) == 3


def test_registered_champion_predicts_in_a_new_process(fresh_process):
    assert fresh_process[1].strip()


def test_registered_model_takes_top_k_as_a_param(result, fresh_process):
    """The logged model has a signature with a `top_k` param (default 5) and an input
    example carrying it: served (pyfunc), `top_k` is accepted and a wrong type refused;
    MLflow's fill-mask pyfunc answers the top token of each mask whatever top_k (its
    output parser keeps the first candidate); loaded natively, top_k candidates."""
    import mlflow

    from mlm.registry import _client

    served = fresh_process[2]
    assert served["params"] == {"top_k": 5}
    assert served["top2"] and "top_k" in served["bad_top_k"]
    assert served["native_top2"] == 2 and served["native_max_length"] == 128
    _client()
    info = mlflow.models.get_model_info(f"models:/{result['registered']['name']}@champion")
    assert info.saved_input_example_info["params"] == "true" and info.signature.params.params[0].name == "top_k"


def test_fill_mask_cuts_a_long_text_unless_a_mask_is_past_the_cut(result):
    """`mlm fill-mask` / `mlm predict` answer a text longer than the model's positions
    from its first 128 tokens when every [MASK] is among them, and give a clear error
    (a per-line record in --file and predict) when a [MASK] is past them."""
    from mlm.predict import FillMask, PredictError

    fill = FillMask(result["model_dir"])
    assert len(fill(LONG_TEXT, top_k=2)[0]) == 2
    with pytest.raises(PredictError, match=r"a \[MASK\] is token \d+; the model reads at most 128"):
        fill("word " * 400 + "the [MASK] statement.", top_k=2)


def _cli(args: list[str], monkeypatch, capfd, stdin: str | None = None) -> tuple[int, str, str]:
    """`mlm ARGS` run in this process (mlm.cli.main, exit code and output as the command
    gives them, captured at the file descriptors, so a log handler's traceback counts
    too), for the checks that need no new interpreter: each `mlm` process spends seconds
    importing torch, transformers and MLflow. The environment variables and logger
    levels the command sets are restored afterwards."""
    import io
    import logging

    from mlm.cli import main

    levels = {n: logging.getLogger(n).level for n in ("mlflow", "alembic", "urllib3")}
    # what a process without logging set up prints (logging.lastResort): pytest's own
    # log capture would otherwise keep a logged traceback from reaching stderr
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    with monkeypatch.context() as mp:
        mp.delenv("MLM_DEBUG", raising=False)
        for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TRANSFORMERS_VERBOSITY",
                    "MLFLOW_LOGGING_LEVEL", "MLM_LOG"):
            mp.setenv(key, "x")
            mp.delenv(key)  # so the context restores its value (or its absence)
        mp.setattr(sys, "argv", ["mlm", *args])
        if stdin is not None:
            mp.setattr(sys, "stdin", io.StringIO(stdin))
        capfd.readouterr()
        handler.setStream(sys.stderr)  # the captured stream
        logging.getLogger().addHandler(handler)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            logging.getLogger().removeHandler(handler)
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
        out, err = capfd.readouterr()
    return code, out, err


def test_worse_model_becomes_challenger_and_champion_stays(result, work, tmp_path):
    from mlm.evaluate import evaluate
    from mlm.model import build_model, save_model_dir
    from mlm.registry import describe, register
    from mlm.tokenizer import load_tokenizer

    cfg = load_config("tiny")
    tokenizer = load_tokenizer(result["model_dir"])
    untrained = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    worse_dir = save_model_dir(untrained, tokenizer, tmp_path / "untrained")
    metrics = evaluate(str(worse_dir), result["data_dir"])
    assert metrics["top1_accuracy"] < result["metrics"]["top1_accuracy"]
    # the same rows re-masked with the other strategies are scored too
    assert all(0.0 <= metrics[f"{s}_top1_accuracy"] <= metrics[f"{s}_top5_accuracy"] <= 1.0 for s in ("whole_word", "span"))
    before = describe(result["registered"]["name"])["aliases"]["champion"]
    reg = register(worse_dir, result["registered"]["name"], metrics, cfg, data_dir=result["data_dir"])
    assert reg["alias"] == "challenger"
    assert "does not beat champion" in reg["reason"] and reg["champion_score"] == pytest.approx(result["metrics"]["top1_accuracy"])
    aliases = describe(result["registered"]["name"])["aliases"]
    assert aliases["champion"] == before and aliases["challenger"] == reg["version"]


def test_cli_fill_mask_and_data_commands(result, work, monkeypatch, capfd):
    name = result["registered"]["name"]
    out = subprocess.run(
        ["mlm", "fill-mask", "the [MASK] statement returns a [MASK].", "--model", f"models:/{name}@champion", "--top-k", "2"],
        capture_output=True, text=True, env=_env(work), timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("[MASK] #") == 2 and len(out.stdout.strip().splitlines()) == 6
    code, _, err = _cli(["fill-mask", "no mask here", "--model", result["model_dir"]], monkeypatch, capfd)
    assert code == 2 and "no [MASK]" in err and "Traceback" not in err
    code, out, _ = _cli(["data", "stats", result["data_dir"]], monkeypatch, capfd)
    assert code == 0 and json.loads(out)["splits"]["train"]["rows"] > 0


def test_prepare_is_idempotent_and_training_refuses_corrupt_shards(result, tmp_path):
    import shutil

    from mlm.prepare import prepare
    from mlm.shards import DatasetError, read_manifest, read_shard, verify
    from mlm.train import train

    data_dir = result["data_dir"]
    before = {p: os.path.getmtime(os.path.join(data_dir, p)) for p in os.listdir(data_dir)}
    cfg = load_config("tiny", [f"train.max_steps={STEPS}", "train.checkpoint_every=100"])
    again = prepare(["builtin:python-docs"], data_dir, cfg)
    assert again.fingerprint == read_manifest(data_dir)["fingerprint"]
    assert before == {p: os.path.getmtime(os.path.join(data_dir, p)) for p in os.listdir(data_dir)}

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    shard = sorted(broken.glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    # same size: found by the sha256 pass (prepare, `mlm data verify`) and by the page
    # checksums when training reads that row group, not at train's start (no hashing there)
    assert any("sha256 mismatch" in p and shard.name in p for p in verify(broken))
    with pytest.raises(DatasetError, match=shard.name):
        read_shard(str(shard), 0)
    shard.write_bytes(bytes(data[:-100]))  # cut short: refused before training starts
    with pytest.raises(DatasetError, match=shard.name):
        train(broken, tmp_path / "run", cfg)


def test_bench_train_reports_both_contenders(result):
    """The benchmark runs our step and the HF Trainer on the same data, real tokens and
    predictions counted alike; no timing asserted."""
    from mlm.bench.train import bench_train
    from mlm.compute import model_flops
    from mlm.model import build_model, count_parameters

    cfg = load_config("tiny")
    r = bench_train(cfg, result["data_dir"], steps=3, warmup=1, peers=("hf",))
    assert r["mlm_tokens_per_s"] > 0 and r["hf_trainer_tokens_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["mlm_tokens_per_s"] / r["hf_trainer_tokens_per_s"])
    assert "mlm_mfu" not in r and "hf_trainer_compiled_tokens_per_s" not in r  # no known peak on a CPU; peer not asked
    assert r["mlm_compiled"] is False and r["dropped_predictions"] == 0  # auto: not compiled on a CPU
    assert r["sdpa"] == {"flash (cpu)": 2}  # packed rows: no mask, SDPA's flash kernel in both layers
    assert r["tokens"] == 3 * 16 * 128 and 0.2 < r["predictions"] / r["tokens"] < 0.4  # 30% masking
    # the FLOP count follows the parameter count (6 per parameter-token, embeddings excluded)
    model = build_model(cfg.model, 4096, 0)
    n_params = count_parameters(model)
    embeddings = 4096 * 128 + 128 * 128 + 2 * 128
    flops = model_flops(model, 128)
    assert 5.5 * (n_params - embeddings) < flops.per_token + flops.per_prediction < 8 * n_params


def test_warm_start_from_the_registered_champion(result, tmp_path):
    """`model.init_from` takes an MLflow model URI: training continues from the champion
    (its first loss is far below a fresh model's), and the training log has validation
    and data-wait records. The micro-batch is `auto`: the probe's choice (the worker's
    whole share of the global batch, 32, on this CPU) is logged and trained with. In this
    process (the local engine): the warm start is under test, not Ray Train."""
    from mlm.train import train

    name = result["registered"]["name"]
    sets = ["train.num_workers=1", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=4",
            "train.warmup_steps=1", "train.validate_every=4", "train.validate_batches=2",
            "train.micro_batch_size=auto", "train.engine=local"]
    warm = train(result["data_dir"], tmp_path / "warm", load_config("tiny", sets + [f"model.init_from=models:/{name}@champion"]))
    assert warm["steps"] == 4
    log = [json.loads(line) for line in (tmp_path / "warm" / "train_log.jsonl").read_text().splitlines()]
    first = next(r for r in log if "train_loss" in r)
    assert first["train_loss"] < result["metrics"]["loss"] + 0.5  # the champion's level, not ~ln(vocab)
    assert first["train_loss"] < 6.0 and 0.0 <= first["data_wait_fraction"] <= 1.0
    assert any("val_loss" in r for r in log)
    assert {r["micro_batch_size"] for r in log if "train_loss" in r} == {32}
    assert all(r["dropped_predictions"] == 0 and r["first_step_seconds"] > 0 for r in log if "train_loss" in r)


def test_cli_fill_mask_answers_a_file_of_1000_lines(result, work, tmp_path, monkeypatch, capfd):
    """The model is loaded once; every line gets a JSON answer or an error record."""
    name = result["registered"]["name"]
    lines = [f"the [MASK] statement number {i} returns a value." for i in range(997)]
    lines += ["no mask on this line", "two [MASK] and [MASK].", " ".join(["word"] * 400) + " [MASK]"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["mlm", "fill-mask", "--file", str(src), "--model", f"models:/{name}@champion", "--top-k", "3"],
                         capture_output=True, text=True, env=_env(work), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["line"] for r in records] == list(range(1, 1001))
    assert all(len(r["masks"]) == 1 and len(r["masks"][0]) == 3 for r in records[:997])
    assert "no [MASK]" in records[997]["error"] and len(records[998]["masks"]) == 2
    assert "at most 128" in records[999]["error"]
    assert "fill-mask" in out.stderr and "1000 lines, 2 with errors" in out.stderr
    code, out, _ = _cli(["fill-mask", "--file", "-", "--model", result["model_dir"]], monkeypatch, capfd, stdin="a [MASK] b\n")
    assert code == 0 and json.loads(out)["masks"]
    code, _, err = _cli(["fill-mask", "x [MASK]", "--model", str(tmp_path / "nope")], monkeypatch, capfd)
    assert code == 2 and "not a model directory" in err and "Traceback" not in err


def test_onnx_export_matches_pytorch_on_the_evaluation_set(result, work, tmp_path, monkeypatch, capfd):
    """`mlm export onnx --out FOLDER`: model.onnx + config.json + tokenizer + parity.json
    (Optimum's ORTModelForMaskedLM layout), loaded back with onnxruntime, AutoTokenizer
    and AutoConfig alone; a non-empty folder is refused."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / "onnx"
    out = subprocess.run(["mlm", "export", "onnx", result["model_dir"], "--out", str(folder),
                          "--data", result["data_dir"]], capture_output=True, text=True, env=_env(work), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["top1_agreement"] == 1.0 and report["masked_positions"] > 500
    assert report["max_abs_logit_diff"] < report["atol"] == 1e-3
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "parity.json"} <= set(os.listdir(folder))
    assert report["onnx"] == str(folder / "model.onnx") and json.loads((folder / "parity.json").read_text()) == report
    assert sorted(os.listdir(tmp_path)) == ["onnx"]  # no temporary left beside it
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    assert tokenizer.model_max_length == config.max_position_embeddings == 128
    enc = tokenizer([LONG_TEXT], truncation=True, return_tensors="np")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})[0]
    assert logits.shape == (1, 128, config.vocab_size)
    code, _, err = _cli(["export", "onnx", result["model_dir"], "--out", str(folder)], monkeypatch, capfd)
    assert code == 2 and "not an empty folder" in err and "Traceback" not in err


def test_batch_predict_with_ray_data(result, work, tmp_path, ray_address):
    """`mlm predict`: fill-mask and embeddings over a file, answers in input order; the
    fill-mask command runs as a user runs it, joining the session's Ray cluster through
    RAY_ADDRESS; the embeddings come from the same function in this process."""
    from mlm.predict import predict_file

    src = tmp_path / "in.txt"
    lines = [f"the [MASK] value number {i}." for i in range(150)] + ["no mask here"]
    src.write_text("\n".join(lines) + "\n")
    env = {**_env(work), "MLM_PROGRESS": "0", "RAY_ADDRESS": ray_address, "PYTHONWARNINGS": "always"}
    uri = f"models:/{result['registered']['name']}/{result['registered']['version']}"  # resolved by each actor
    out = tmp_path / "fill-mask.jsonl"
    run = subprocess.run(["mlm", "predict", "--input", str(src), "--out", str(out), "--task", "fill-mask",
                          "--model", uri, "--top-k", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "local://" not in run.stderr  # Ray Data's deprecated scheme (removed after January 2027) is not used
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == lines
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert (summary["lines"], summary["errors"]) == (151, 1)
    assert all(len(r["masks"][0]) == 2 for r in records[:150]) and "no [MASK]" in records[150]["error"]

    embedded = predict_file(result["model_dir"], str(src), str(tmp_path / "embed.jsonl"), "embed")
    records = [json.loads(line) for line in (tmp_path / "embed.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == lines and (embedded["lines"], embedded["errors"]) == (151, 0)
    assert {len(r["embedding"]) for r in records} == {128}


GPU_CLUSTER = r"""
import json, sys
import ray
# A Ray instance that has a GPU to hand out (this machine has no CUDA device): the
# inference stages must ask for it, one per actor; the actors then run where torch can.
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
from mlm.evaluate import evaluate
from mlm.predict import predict_file
model_dir, data_dir, src, out = sys.argv[1:]
m = evaluate(model_dir, data_dir, 64, max_batches=2, engine="ray", use_gpu="auto")
p = predict_file(model_dir, src, out, "embed", use_gpu="auto")
print(json.dumps({"eval": {k: m[k] for k in ("gpu_actors", "gpu_ids", "device", "top1_accuracy")},
                  "predict": p["gpu_actors"]}))
"""


def test_inference_stages_ask_ray_for_gpus(result, work, tmp_path):
    """On a cluster with a GPU, Ray-side evaluation and batch prediction run one actor per
    GPU, each given its GPU by Ray (on main they asked for none); where torch sees no
    CUDA device (here) the actor scores on its CPU, with the same metrics. use_gpu=true
    where there is no GPU is one clear error."""
    from mlm.evaluate import EvalError, evaluate
    from mlm.predict import PredictError, predict_file

    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} of text\n" for i in range(20)))
    env = {**_env(work), "MLM_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", GPU_CLUSTER, result["model_dir"], result["data_dir"], str(src),
                          str(tmp_path / "out.jsonl")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["eval"]["gpu_actors"] == 1 and got["eval"]["gpu_ids"] == ["0"] and got["eval"]["device"] == "cpu"
    assert got["predict"] == 1
    local = evaluate(result["model_dir"], result["data_dir"], 64, max_batches=2, engine="local", use_gpu="auto")
    assert local["device"] == "cpu" and got["eval"]["top1_accuracy"] == pytest.approx(local["top1_accuracy"])
    with pytest.raises(EvalError, match="no CUDA GPU"):
        evaluate(result["model_dir"], result["data_dir"], 64, max_batches=1, use_gpu=True)
    with pytest.raises(PredictError, match="no GPU"):
        predict_file(result["model_dir"], str(src), str(tmp_path / "never.jsonl"), "embed", use_gpu=True)
    assert not (tmp_path / "never.jsonl").exists()


def test_evaluation_as_ray_data_batch_inference_equals_local(result, work):
    """The evaluation set scored as Ray Data batch inference (one model per actor, sums
    gathered in the driver) gives the local engine's metrics; the model is given as its
    registry URI, resolved by each actor. `auto` picks Ray from `ray_min_rows` rows
    (`engine="ray"` itself: test_inference_stages_ask_ray_for_gpus)."""
    from mlm.evaluate import evaluate

    uri = f"models:/{result['registered']['name']}/{result['registered']['version']}"
    local = evaluate(result["model_dir"], result["data_dir"], batch_size=32, engine="local")
    on_ray = evaluate(uri, result["data_dir"], batch_size=32, engine="auto", ray_min_rows=1)
    stays = evaluate(result["model_dir"], result["data_dir"], batch_size=32, max_batches=1, engine="auto")
    assert local["engine"] == "local" == stays["engine"] and on_ray["engine"] == "ray"
    assert on_ray["masked_tokens"] == local["masked_tokens"] > 1000
    for key in ("top1_accuracy", "top5_accuracy", "whole_word_top1_accuracy", "span_top1_accuracy"):
        assert on_ray[key] == local[key], key  # counts: exactly equal
    for key in ("loss", "whole_word_loss", "span_loss"):
        assert abs(on_ray[key] - local[key]) < 1e-6, key  # float sums in another order
    assert local["top1_accuracy"] > local["baseline_top1_accuracy"]


@pytest.fixture(scope="module")
def finetuned(result, tmp_path_factory):
    """The pipeline's champion fine-tuned on the built-in probe task through Ray Train
    (two workers, one epoch), evaluated and registered."""
    from mlm.finetune.stage import run_finetune

    cfg = load_config("tiny", ["finetune.epochs=1", "finetune.learning_rate=0.0003"])
    return run_finetune(f"models:/{result['registered']['name']}@champion", "builtin:stdlib-topics:train",
                        "builtin:stdlib-topics:test", cfg, out_dir=str(tmp_path_factory.mktemp("finetune") / "run"))


def test_finetune_registers_a_classifier_with_lineage(result, finetuned, work):
    """`mlm finetune`: `<base>-classification`, the gate's champion, tagged with the base
    version, the base's data and both labelled files; the run holds the per-class table
    and the confusion matrix; `mlm evaluate` of the classifier on the validation file
    gives the registered scores."""
    from mlflow import MlflowClient

    from mlm.finetune.data import PROBE, probe_split
    from mlm.finetune.evaluate import evaluate_classifier
    from mlm.registry import _client
    from mlm.shards import read_manifest

    base, reg = result["registered"], finetuned["registered"]
    assert reg["name"] == f"{base['name']}-classification" and reg["alias"] == "champion"
    assert finetuned["labels"] == sorted(finetuned["labels"]) and len(finetuned["labels"]) == 8
    _client()
    tags = MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    test = probe_split(f"{PROBE}:test")
    assert (tags["base.model"], tags["base.version"]) == (base["name"], base["version"])
    assert tags["base.data_fingerprint"] == read_manifest(result["data_dir"])["fingerprint"]
    assert tags["finetune.train_fingerprint"] == probe_split(f"{PROBE}:train").fingerprint
    assert tags["finetune.validation_fingerprint"] == test.fingerprint
    assert float(tags["eval.macro_f1"]) == pytest.approx(finetuned["metrics"]["macro_f1"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(finetuned["run_id"], "classifier")}
    assert {"classifier/confusion_matrix.png", "classifier/per_class.json"} <= artifacts
    again = evaluate_classifier(f"models:/{reg['name']}@champion", test)
    assert again["macro_f1"] == pytest.approx(finetuned["metrics"]["macro_f1"])
    assert finetuned["metrics"]["accuracy"] > 1 / 8  # it learned something in one epoch


CLASSIFY = r"""
import json, sys
from transformers import pipeline
import mlflow
folder, uri = sys.argv[1:]
answer = pipeline("text-classification", model=folder)("Return the event loop of the current thread. " * 40,
                                                        truncation=True)
served = mlflow.pyfunc.load_model(uri).predict(["Parse an e-mail message from a string."])
print(json.dumps({"answer": answer, "served": served.to_dict("records")}))
"""


def test_the_classifier_loads_in_transformers_and_mlflow(finetuned, work):
    """In a fresh process: `transformers.pipeline("text-classification")` on the model
    folder (a text longer than the model's positions, cut) and `mlflow.pyfunc` on the
    registered champion name a label of the task."""
    env = {**_env(work), "HF_HUB_OFFLINE": "1"}
    uri = f"models:/{finetuned['registered']['name']}@champion"
    run = subprocess.run([sys.executable, "-c", CLASSIFY, finetuned["model_dir"], uri], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["answer"][0]["label"] in finetuned["labels"] and 0 < got["answer"][0]["score"] <= 1
    assert got["served"][0]["label"] in finetuned["labels"]


def test_batch_classification_with_ray_data(finetuned, tmp_path):
    from mlm.predict import predict_file

    src = tmp_path / "texts.txt"
    src.write_text("Send the message to the SMTP server.\nCreate a new event loop.\n")
    summary = predict_file(finetuned["model_dir"], str(src), str(tmp_path / "out.jsonl"), "classify")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["lines"] == 2 and [r["text"] for r in records] == src.read_text().splitlines()
    assert all(r["label"] in finetuned["labels"] and sum(r["scores"].values()) == pytest.approx(1, abs=1e-4)
               for r in records)


def test_finetune_refuses_bad_input_in_one_line(result, finetuned, tmp_path, monkeypatch, capfd):
    """Missing label column, one class only, unknown validation labels, an empty text, a
    model that is not an encoder: one line, exit 2, nothing registered."""
    from mlm.registry import describe

    def rows(name, items):
        path = tmp_path / name
        path.write_text("".join(json.dumps(i) + "\n" for i in items))
        return str(path)

    good = rows("good.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)])
    encoder = f"models:/{result['registered']['name']}@champion"
    cases = [
        ([encoder, rows("nolabel.jsonl", [{"text": "x", "topic": "a"}]), good], "no column 'label'"),
        ([encoder, rows("one.jsonl", [{"text": "x", "label": "a"}]), good], "one class only"),
        ([encoder, good, rows("unknown.jsonl", [{"text": "x", "label": "zz"}])], "labels the training data lacks"),
        ([encoder, rows("empty.jsonl", [{"text": "", "label": "a"}, {"text": "y", "label": "b"}]), good], "empty"),
        ([finetuned["model_dir"], good, good], "is not an encoder"),
    ]
    before = describe(finetuned["registered"]["name"])["versions"]
    for (model, train, validation), message in cases:
        code, out, err = _cli(["finetune", "--model", model, "--train", train, "--validation", validation],
                              monkeypatch, capfd)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], (code, err)
    assert describe(finetuned["registered"]["name"])["versions"] == before
