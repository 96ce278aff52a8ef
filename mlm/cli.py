"""The `mlm` command: thin wrappers over the library functions.

User mistakes (bad config, missing input, corrupt data, unknown model) print one
line on stderr and exit 2; set MLM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from mlm.config import ConfigError, load_config

PRESET = click.option("--preset", default="tiny", show_default=True, help="Preset name or YAML path.")
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.max_steps=100.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from mlm.corpus import InputError
    from mlm.evaluate import EvalError
    from mlm.export import ExportError
    from mlm.finetune.data import LabelledDataError
    from mlm.jobs import JobsError
    from mlm.model import ModelError
    from mlm.predict import PredictError
    from mlm.registry import RegistryError
    from mlm.serve.model import ServeError
    from mlm.shards import DatasetError
    from mlm.storage import StorageError
    from mlm.tokenizer import TokenizerError

    return (ConfigError, InputError, DatasetError, TokenizerError, ModelError, PredictError, RegistryError, EvalError,
            LabelledDataError,
            ExportError, JobsError, StorageError, ServeError)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _wants_json() -> bool:
    """`--json` was given: print exactly one JSON document on stdout (every command takes it)."""
    return bool(click.get_current_context().meta.get("mlm.json"))


def _add_json_option(cmd: click.Command) -> None:
    """Give `cmd` (and every command under a group) the `--json` flag; commands whose
    result is JSON anyway accept it as it is."""
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _add_json_option(sub)
        return
    if any(p.name == "as_json" for p in cmd.params):
        return

    def remember(ctx, _param, value):
        if value:
            ctx.meta["mlm.json"] = True

    cmd.params.append(click.Option(["--json"], is_flag=True, expose_value=False, callback=remember,
                                   help="Print exactly one JSON document on stdout (human text goes to stderr)."))


@click.group()
@click.version_option(package_name="mlm")
@click.option("-v", "--verbose", is_flag=True,
              help="Show Ray Data's per-operator progress and logs, the workers' output and library progress bars "
                   "(as MLM_LOG=debug does).")
def cli(verbose: bool) -> None:
    """Pretrain BERT-style masked language models: prepare -> train -> evaluate -> register.

    Results go to stdout (JSON, or a short summary for pipeline/retrain); progress (one
    line per stage) and logs go to stderr."""
    from mlm.runtime import quiet_libraries

    if verbose:
        os.environ["MLM_LOG"] = "debug"
    quiet_libraries()


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Dataset folder, or an object-store URI (s3://bucket/prefix).")
@click.option("--overwrite", is_flag=True, help="Replace a different dataset already in --out.")
@PRESET
@SET
def prepare(inputs, out_dir, overwrite, preset, overrides) -> None:
    """Tokenize, pack and mask INPUT files/dirs/globs (or builtin:python-docs) into Parquet shards."""
    from mlm.prepare import prepare as run
    from mlm.storage import normalize

    cfg = load_config(preset, overrides)
    # a Ray instance started here runs nothing that needs the dashboard
    m = run(list(inputs), out_dir, cfg, overwrite=overwrite, ray_dashboard=False).to_dict()
    _echo_json({"out": normalize(out_dir), "fingerprint": m["fingerprint"], "documents": m["documents"],
                "splits": {s: {k: v for k, v in d.items() if k != "shards"} for s, d in m["splits"].items()}})


@cli.command()
@click.option("--data", "data_dir", required=True, help="Dataset folder or URI from `mlm prepare`.")
@click.option("--out", "out_dir", required=True, help="Run folder or URI; the model lands in OUT/model, checkpoints in OUT/ray.")
@PRESET
@SET
def train(data_dir, out_dir, preset, overrides) -> None:
    """Train the encoder with Ray Train (DDP) on a prepared dataset."""
    from mlm import registry
    from mlm.shards import Manifest
    from mlm.train import train as run

    cfg = load_config(preset, overrides)
    Manifest.read(data_dir)  # fail fast, before Ray and MLflow start
    with registry.stage_run("train", cfg) as r:
        _echo_json(run(data_dir, out_dir, cfg, mlflow_run_id=r.info.run_id))


@cli.command()
@click.argument("model")
@click.option("--data", "data_dir", required=True, help="Dataset folder whose validation split is the evaluation set.")
@click.option("--log/--no-log", default=True, show_default=True, help="Log the metrics to MLflow.")
@PRESET
@SET
def evaluate(model, data_dir, log, preset, overrides) -> None:
    """Masked-token accuracy (top-1/top-5), loss and perplexity of MODEL (dir or models:/ URI)
    on a dataset; for a fine-tuned classifier, accuracy and precision/recall/F1 on a
    labelled file (--data FILE.jsonl|.csv|.parquet)."""
    import mlflow

    from mlm import registry
    from mlm.evaluate import evaluate as run, save_results
    from mlm.finetune.data import is_labelled_file

    cfg = load_config(preset, overrides)
    if is_labelled_file(data_dir):  # a classifier on labelled rows, not a masked-LM on a dataset
        return _evaluate_classifier(model, data_dir, log, cfg)
    metrics = run(model, data_dir, cfg.eval.batch_size, engine=cfg.eval.engine, ray_min_rows=cfg.eval.ray_min_rows,
                  use_gpu=cfg.eval.use_gpu)
    if not model.startswith(("models:/", "runs:/")):  # a model folder (local or URI) keeps its results
        save_results(model, metrics)
    if log:
        with registry.stage_run("evaluate", cfg):
            mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            mlflow.set_tag("mlm.model", model)
    _echo_json(metrics)


def _evaluate_classifier(model: str, path: str, log: bool, cfg) -> None:
    import mlflow

    from mlm import registry
    from mlm.finetune.metrics import log_to_mlflow
    from mlm.finetune.evaluate import evaluate_file

    metrics = evaluate_file(model, path, cfg)
    if log:
        with registry.stage_run("evaluate", cfg):
            log_to_mlflow(metrics, [r["label"] for r in metrics["per_class"]])
            mlflow.set_tags({"mlm.model": model, "mlm.data": path})
    _echo_json(metrics)


@cli.command()
@click.option("--model", "model_ref", required=True,
              help="The encoder: a model folder, a URI, or models:/NAME@champion (default alias of a registry name).")
@click.option("--train", "train_path", required=True, help="Labelled training file (.jsonl, .csv, .parquet; local or URI) "
              "or builtin:stdlib-topics:train.")
@click.option("--validation", "validation_path", required=True, help="Labelled validation file (same formats).")
@click.option("--task", type=click.Choice(["classification"]), default="classification", show_default=True)
@click.option("--text-column", default=None, help="Column holding the text (default: finetune.text_column, text).")
@click.option("--label-column", default=None, help="Column holding the label (default: finetune.label_column, label).")
@click.option("--name", default=None, help="Registered name (default: finetune.model_name, else <base>-<task>).")
@click.option("--out", "out_dir", default=None, help="Run folder or URI (default: a new one under paths.runs).")
@click.option("--no-register", is_flag=True, help="Train and evaluate only.")
@PRESET
@SET
def finetune(model_ref, train_path, validation_path, task, text_column, label_column, name, out_dir, no_register,
             preset, overrides) -> None:
    """Fine-tune an encoder as a sequence classifier on Ray Train, evaluate it (accuracy,
    precision/recall/F1, confusion matrix in MLflow) and register it with lineage."""
    from mlm.finetune.stage import run_finetune

    sets = [*overrides, f"finetune.task={task}"]
    sets += [f"finetune.text_column={text_column}"] if text_column else []
    sets += [f"finetune.label_column={label_column}"] if label_column else []
    result = run_finetune(model_ref, train_path, validation_path, load_config(preset, sets), out_dir=out_dir,
                          name=name, register=not no_register)
    _echo_json(result)


@cli.command()
@click.option("--model", "model_ref", default=None,
              help="The encoder to probe (default: models:/<registry.model_name>@champion).")
@PRESET
@SET
def probe(model_ref, preset, overrides) -> None:
    """Fine-tune the encoder and a same-shape random-init twin on the built-in probe task
    (builtin:stdlib-topics) with one budget; both macro-F1s and the gain."""
    from mlm.finetune.probe import probe as run

    cfg = load_config(preset, overrides)
    result = run(model_ref or f"models:/{cfg.registry.model_name}@champion", cfg, cfg.eval.use_gpu)
    if not _wants_json():
        click.echo(f"probe {result['task']}: pretrained macro-F1 {result['pretrained']['macro_f1']:.4f}, random-init "
                   f"{result['random_init']['macro_f1']:.4f} (gain {result['gain']:+.4f})", err=True)
    _echo_json(result)


@cli.command()
@click.argument("model")
@click.option("--name", default=None, help="Registered model name (default: registry.model_name).")
@click.option("--data", "data_dir", default=None, help="Evaluate on this dataset first (else MODEL/eval_results.json is used).")
@PRESET
@SET
def register(model, name, data_dir, preset, overrides) -> None:
    """Log MODEL to MLflow, register a version and apply the champion/challenger gate."""
    from mlm import storage
    from mlm.evaluate import EvalError, evaluate as run_eval, load_results, save_results
    from mlm.model import ModelError
    from mlm.registry import register as run

    cfg = load_config(preset, overrides)
    if not storage.is_file(storage.join(model, "config.json")):
        raise ModelError(f"not a model directory (no config.json): {model}")
    if data_dir:
        metrics = run_eval(model, data_dir, cfg.eval.batch_size, engine=cfg.eval.engine, ray_min_rows=cfg.eval.ray_min_rows,
                           use_gpu=cfg.eval.use_gpu)
        save_results(model, metrics)
    else:
        metrics = load_results(model)
        if metrics is None:
            raise EvalError(f"{model} has no evaluation; run `mlm evaluate {model} --data DATA_DIR` or pass --data")
    _echo_json(run(model, name or cfg.registry.model_name, metrics, cfg, data_dir=data_dir))


@cli.command("fill-mask")
@click.argument("text", required=False)
@click.option("--file", "file_", default=None, help="One text per line ('-': stdin); answers as JSON lines.")
@click.option("--model", default=None, help="Model dir or MLflow URI (default: models:/<registry.model_name>@champion).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100))
@PRESET
@SET
def fill_mask(text, file_, model, top_k, preset, overrides) -> None:
    """Predict the [MASK] tokens of TEXT, or of every line of --file (the model is
    loaded once; a progress bar on stderr; a bad line gets an error record, not an abort)."""
    from mlm.predict import FillMask, PredictError

    if (text is None) == (file_ is None):
        raise PredictError("give TEXT or --file (one of them)")
    model = model or f"models:/{load_config(preset, overrides).registry.model_name}@champion"
    predictor = FillMask(model)
    if text is not None:
        masks = predictor(text, top_k)
        if _wants_json():
            return _echo_json({"text": text, "masks": masks})
        for i, preds in enumerate(masks):
            click.echo(f"[MASK] #{i + 1}")
            for p in preds:
                click.echo(f"  {p['score']:.4f}  {p['token']}")
        return
    if file_ != "-" and not os.path.isfile(file_):
        raise PredictError(f"no such file: {file_}")
    stream = sys.stdin if file_ == "-" else open(file_, encoding="utf-8", errors="replace")
    with stream:
        lines = [line.rstrip("\n") for line in stream]
    errors, records = 0, []
    with click.progressbar(lines, label="fill-mask", file=sys.stderr) as bar:
        for n, line in enumerate(bar, 1):
            try:
                record = {"line": n, "text": line, "masks": predictor(line, top_k)}
            except PredictError as e:
                record, errors = {"line": n, "text": line, "error": str(e)}, errors + 1
            if _wants_json():
                records.append(record)
            else:
                click.echo(json.dumps(record, ensure_ascii=False))  # JSON lines, one per input line
    click.echo(f"fill-mask: {len(lines)} lines, {errors} with errors", err=True)
    if _wants_json():
        _echo_json({"lines": len(lines), "errors": errors, "records": records})


@cli.command("predict")
@click.option("--input", "input_path", required=True, help="Text file, one input per line (a path or a URI).")
@click.option("--out", "out_path", required=True, help="JSON lines, in input order (a path or an s3:// / gs:// URI).")
@click.option("--task", type=click.Choice(["fill-mask", "embed", "classify"]), default="fill-mask", show_default=True,
              help="classify: a fine-tuned classifier (mlm finetune) labels each line.")
@click.option("--model", default=None, help="Model dir or MLflow URI (default: models:/<registry.model_name>@champion).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100))
@PRESET
@SET
def predict(input_path, out_path, task, model, top_k, preset, overrides) -> None:
    """Batch fill-mask or embedding extraction over a large file with Ray Data."""
    from mlm.predict import predict_file

    cfg = load_config(preset, overrides)
    model = model or f"models:/{cfg.registry.model_name}@champion"
    _echo_json(predict_file(model, input_path, out_path, task, top_k, use_gpu=cfg.eval.use_gpu))


@cli.command("serve")
@click.option("--model", "model_ref", default=None,
              help="A model folder, a URI, models:/NAME/VERSION or models:/NAME@ALIAS (followed when it moves). "
                   "Default: models:/<registry.model_name>@champion (classify: the fine-tuned <name>-classification).")
@click.option("--task", type=click.Choice(["fill-mask", "embed", "classify"]), default="fill-mask", show_default=True,
              help="What the model must answer (checked at start); a masked LM also answers /v1/embed, a "
                   "classifier /v1/classify and /v1/embed.")
@PRESET
@SET
def serve_model(model_ref, task, preset, overrides) -> None:
    """Serve a model over HTTP with Ray Serve (dynamic batching, replicas, following an
    alias) until Ctrl-C or SIGTERM. Binds serve.host (127.0.0.1) and serve.port (8000);
    another host needs a token ($MLM_SERVE_TOKEN or serve.token), which every endpoint but
    /healthz and /readyz then requires. What is served where: one JSON document on stdout."""
    from mlm.serve.app import run_until_stopped

    def ready(info) -> None:
        m = info["model"]
        version = f" v{m['version']}" if m["version"] else ""
        click.echo(f"mlm serve: {m['name']}{version} ({m['kind']}) on {info['url']} "
                   f"[{', '.join(info['listening']) or 'listening elsewhere'}]"
                   f"{', token required' if info['token_required'] else ''}"
                   f"{', following @' + m['alias'] if info['follows_alias'] else ''}; Ctrl-C stops it", err=True)
        _echo_json(info)
        sys.stdout.flush()

    run_until_stopped(model_ref, task, load_config(preset, overrides), ready)
    click.echo("mlm serve: stopped", err=True)


@cli.group()
def export() -> None:
    """Export models."""


@export.command("onnx")
@click.argument("model")
@click.option("--out", "out", required=True,
              help="The folder to write (a path or a URI; new or empty): model.onnx, config.json, the tokenizer, "
                   "parity.json.")
@click.option("--data", "data_dir", default=None, help="Check parity on this dataset's validation split (default: sample text).")
def export_onnx(model, out, data_dir) -> None:
    """ONNX (input_ids, attention_mask -> logits) with a parity check against PyTorch, as a
    folder that onnxruntime with AutoTokenizer, or Optimum's ORTModelForMaskedLM, loads."""
    from mlm.export import export_onnx as run

    _echo_json(run(model, out, data_dir))


@cli.group()
def data() -> None:
    """Inspect prepared datasets."""


@data.command("verify")
@click.argument("data_dir")
def data_verify(data_dir) -> None:
    """Check the manifest and every shard's sha256."""
    from mlm.shards import DatasetError, verify

    problems = verify(data_dir)
    if problems:
        raise DatasetError("; ".join(problems))
    if _wants_json():
        return _echo_json({"data_dir": data_dir, "ok": True})
    click.echo(f"ok: {data_dir}")


@data.command("stats")
@click.argument("data_dir")
def data_stats(data_dir) -> None:
    """Print the manifest's numbers."""
    from mlm.shards import Manifest

    m = Manifest.read(data_dir).to_dict()  # the stored JSON's sections, as they are
    _echo_json({
        "inputs": len(m["inputs"]), "skipped_files": {k: len(v) for k, v in m["skipped_files"].items()},
        "documents": m["documents"], "tokenizer": m["tokenizer"], "seq_len": m["seq_len"],
        "packing": m.get("packing", "pack"),
        "masking": {s: {k: v for k, v in d.items() if k in ("strategy", "mode", "rate", "duplication")}
                    for s, d in m["masking"].items()},
        "splits": {s: {k: v for k, v in d.items() if k != "shards"}
                   | {"shards": len(d["shards"]), "masked_ratio": round(d["masked"] / max(1, d["tokens"]), 4)}
                   for s, d in m["splits"].items()},
        "increments": len(m.get("increments", [])), "fingerprint": m["fingerprint"],
    })


@cli.group()
def models() -> None:
    """Registered models: list, show, promote and roll back by hand."""


@models.command("list")
def models_list() -> None:
    """Every registered model with its aliases and latest version."""
    from mlm.registry import list_models

    _echo_json(list_models())


@models.command("show")
@click.argument("name")
@click.argument("version", required=False)
def models_show(name, version) -> None:
    """A version (default: the champion): metrics, lineage tags and why it holds its alias."""
    from mlm.registry import show

    info = show(name, version)
    if _wants_json():
        return _echo_json({k: v for k, v in info.items() if k != "tags"})
    click.echo(info["why"])
    _echo_json({k: v for k, v in info.items() if k not in ("why", "tags")})


@models.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="Why, recorded on the version.")
def models_promote(name, version, reason) -> None:
    """Make VERSION the champion (the previous one can be restored with rollback)."""
    from mlm.registry import promote

    _echo_json(promote(name, version, reason))


@models.command("rollback")
@click.argument("name")
def models_rollback(name) -> None:
    """Restore the previous champion."""
    from mlm.registry import rollback

    _echo_json(rollback(name))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you mean it).")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Server processes (MLflow's default is 4: one fits one user and a SQLite store, and starts in half the time).")
def ui(host, port, workers) -> None:
    """Open the MLflow UI on the configured store."""
    from mlm.runtime import artifact_root, is_database_store, redact_uri, tracking_uri

    uri = tracking_uri()
    if not is_database_store(uri):
        if _wants_json():
            return _echo_json({"server": redact_uri(uri)})
        click.echo(f"the tracking store is a server: open {redact_uri(uri)}")
        return
    # the store URI (it may hold a password) goes by environment, not on the command line
    os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    cmd = [sys.executable, "-m", "mlflow", "server", "--default-artifact-root", artifact_root(),
           "--host", host, "--port", str(port), "--workers", str(workers)]
    click.echo(f"MLflow UI on http://{host}:{port} for {redact_uri(uri)} (Ctrl-C stops it)", err=True)
    os.execv(sys.executable, cmd)


@cli.group()
def bench() -> None:
    """Benchmarks: ratios against a reference measured in the same run."""


@bench.command("train")
@click.option("--data", "data_dir", default=None, help="Dataset folder (default: the built-in corpus, prepared once).")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0), help="Untimed first steps (compilation included).")
@click.option("--peers", default="hf,hf_compiled", show_default=True,
              help="Comma-separated references: hf (the HF Trainer's defaults), hf_compiled (torch_compile=True); '' for none.")
@PRESET
@SET
def bench_train(data_dir, steps, warmup, peers, preset, overrides) -> None:
    """Training tokens/s (and MFU on GPUs) next to the Hugging Face Trainer, default and
    compiled, same model, batch, precision and data. The table goes to stderr, the JSON
    document to stdout."""
    from mlm.bench.train import PEERS, bench_train as run
    from mlm.corpus import DEFAULT_CORPUS
    from mlm.pipeline import data_key
    from mlm.runtime import work_dir

    chosen = tuple(p.strip() for p in peers.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise click.BadParameter(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}", param_hint="--peers")
    cfg = load_config(preset, overrides)
    if data_dir is None:
        from mlm.prepare import prepare

        data_dir = work_dir() / "data" / data_key([DEFAULT_CORPUS], cfg)
        prepare([DEFAULT_CORPUS], data_dir, cfg, overwrite=True)
    r = run(cfg, data_dir, steps, warmup, chosen)
    say = functools.partial(click.echo, err=True)
    say(f"mlm bench train: preset {preset}, {r['device']}, {r['precision']}, batch {r['batch']}, "
        f"{r['timed_steps']} timed steps after {warmup} warm-up; mlm compiled: {r['mlm_compiled']}, SDPA {r['sdpa']}")
    for who, key in (("mlm", "mlm"), ("HF Trainer", "hf_trainer"), ("HF compiled", "hf_trainer_compiled")):
        if key + "_tokens_per_s" in r:
            mfu = f"  MFU {r[key + '_mfu']:.1%}" if key + "_mfu" in r else ""
            ratio = r["mlm_tokens_per_s"] / r[key + "_tokens_per_s"]
            say(f"  {who:<11} {r[key + '_tokens_per_s']:>12,.0f} tokens/s{mfu}  (mlm: {ratio:.2f}x)")
    _echo_json(r)


@bench.command("quality")
@click.option("--input", "inputs", multiple=True, help="Corpus file/dir/glob or builtin:NAME; repeatable (default: the built-in corpus).")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1), help="Optimizer steps of each contender.")
@click.option("--heldout-rows", default=512, show_default=True, type=click.IntRange(1), help="Held-out rows per layout.")
@click.option("--work", default=None, type=click.Path(file_okay=False), help="Data and tokenizer (default: $MLM_HOME/bench-quality).")
@click.option("--skip-hf", is_flag=True, help="Train and score ours only (for ablations against a recorded HF run).")
@PRESET
@SET
def bench_quality(inputs, steps, heldout_rows, work, skip_hf, preset, overrides) -> None:
    """Held-out masked-LM accuracy at equal tokens: our training next to the Hugging Face
    Trainer (run_mlm's recipe), same tokenizer, model, batch, lr, warmup, steps and seed."""
    from mlm.bench.quality import bench_config, bench_quality as run, format_report
    from mlm.corpus import DEFAULT_CORPUS
    from mlm.runtime import work_dir

    cfg = bench_config(preset, overrides, steps)
    r = run(list(inputs) or [DEFAULT_CORPUS], cfg, Path(work) if work else work_dir() / "bench-quality",
            heldout_rows, skip_hf, echo=lambda m: click.echo(m, err=True))
    click.echo(format_report(r), err=True)
    _echo_json(r)


@bench.command("data")
@click.option("--input", "inputs", multiple=True,
              help="Corpus file/dir/glob or builtin:NAME (.txt/.jsonl[.gz]); repeatable. Default: a --size-mb corpus.")
@click.option("--size-mb", default=None, type=click.FloatRange(0, min_open=True),
              help="Build at least this many MB from builtin:python-docs (default 16 without --input).")
@click.option("--scale", default=1, show_default=True, type=click.IntRange(1),
              help="Repeat the corpus N times as N separate copies of every file (compare peak memory at 1x and 10x).")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8, 8192))
@click.option("--work", default=None, type=click.Path(file_okay=False), help="Corpus, tokenizer and run logs (default: $MLM_HOME/bench-data).")
@click.option("--skip-hf", is_flag=True, help="Leave out the Hugging Face datasets contender.")
@click.option("--raw-method", type=click.Choice(["encode_batch", "encode_batch_fast"]), default="encode_batch", show_default=True)
@click.option("--keep-outputs", is_flag=True, help="Keep shards, HF caches and the run's MLM_HOME.")
def bench_data(inputs, size_mb, scale, seq_len, work, skip_hf, raw_method, keep_outputs) -> None:
    """Data-stage tokens/s and peak memory (whole process tree) of `mlm prepare` next to raw
    tokenizers and the Hugging Face datasets run_mlm.py way: same corpus, tokenizer and cores."""
    from mlm.bench.data import bench_data as run
    from mlm.corpus import InputError
    from mlm.runtime import work_dir

    if inputs and size_mb:
        raise InputError("give --input or --size-mb, not both")
    r = run(list(inputs) or None, 0.0 if inputs else (size_mb or 16.0), scale, seq_len,
            Path(work) if work else work_dir() / "bench-data", skip_hf,
            raw_method=raw_method, keep_outputs=keep_outputs, echo=functools.partial(click.echo, err=True))
    _echo_json(r)


@bench.command("serve")
@click.option("--model", "model_ref", default=None,
              help="Registered model (models:/NAME@ALIAS or models:/NAME/VERSION; default: the champion of "
                   "registry.model_name); both servers load the same version.")
@click.option("--requests", "requests_", default=400, show_default=True, type=click.IntRange(1),
              help="Requests per server and concurrency level.")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--skip-mlflow", is_flag=True, help="Measure our server only.")
@PRESET
@SET
def bench_serve(model_ref, requests_, concurrency, skip_mlflow, preset, overrides) -> None:
    """Requests/s and p50/p95/p99 latency of `mlm serve` next to `mlflow models serve`
    on the same registered model, one fill-mask text per request, both on loopback, at
    each concurrency level. The table goes to stderr, the JSON document to stdout."""
    from mlm.serve.bench import bench_serve as run, format_report

    try:
        levels = sorted({int(c) for c in concurrency.split(",") if c.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise click.BadParameter(f"expected positive integers separated by commas, got {concurrency!r}",
                                 param_hint="--concurrency")
    r = run(model_ref, load_config(preset, overrides), requests_, levels, not skip_mlflow,
            echo=functools.partial(click.echo, err=True))
    click.echo(format_report(r), err=True)
    _echo_json(r)


@cli.group()
def pipeline() -> None:
    """End-to-end pipelines."""


@pipeline.command("run")
@click.option("--input", "inputs", multiple=True, help="Corpus path/dir/glob (repeatable). Default: builtin:python-docs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document instead of a summary.")
@PRESET
@SET
def pipeline_run(inputs, as_json, preset, overrides) -> None:
    """prepare -> train -> evaluate -> register, tracked in MLflow."""
    from mlm.corpus import DEFAULT_CORPUS
    from mlm.pipeline import pretrain, summary_text

    cfg = load_config(preset, overrides)
    result = pretrain(list(inputs) or [DEFAULT_CORPUS], cfg)
    if as_json:
        _echo_json(result)
    else:
        click.echo(summary_text(result, with_json=False))


@cli.command()
@click.option("--input", "inputs", multiple=True, required=True,
              help="The corpus (path/dir/glob/URI, repeatable), new files included: only new files are prepared.")
@click.option("--from-scratch", is_flag=True, help="Do not warm-start from the champion (e.g. a monthly full retrain).")
@click.option("--model", default=None, metavar="NAME",
              help="Registered model to retrain with its champion's config (default: registry.model_name).")
@click.option("--preset", default=None, help="Train with this preset instead of the champion's config.")
@SET
def retrain(inputs, from_scratch, model, preset, overrides) -> None:
    """Retrain on new corpus files: prepare only those, warm-start from the champion,
    evaluate, register through the gate. Trains with the config the champion was trained
    with (+ --set) unless --preset says otherwise. Safe to trigger repeatedly (lock;
    nothing new: nothing done)."""
    from mlm.retrain import retrain as run, retrain_config, summary_text

    cfg, origin = retrain_config(preset, overrides, model)
    result = run(list(inputs), cfg, from_scratch=from_scratch) | {"config_from": origin}
    if _wants_json():
        return _echo_json(result)
    click.echo(summary_text(result))


ADDRESS = click.option("--address", default=None, metavar="URL",
                       help="Ray job API (dashboard) URL; default: $RAY_ADDRESS if it is a URL, else http://127.0.0.1:8265.")


def _env_pairs(pairs) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint="--env")
        out[key] = value
    return out


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@ADDRESS
@click.option("--follow", is_flag=True, help="Stream the job's log until it ends; exit 1 unless it succeeded.")
@click.option("--submission-id", default=None, help="Job id; Ray refuses a second job with the same id.")
@click.option("--working-dir", default=".", show_default=True,
              help="Uploaded with the job (mlm-work, .git, *.db excluded); relative inputs are read from it. '' for none.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow tracking URI for the job; default: the cluster nodes' own MLFLOW_TRACKING_URI.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the job (repeatable); nothing else is taken from this shell.")
@click.argument("command", type=click.Choice(["pipeline", "prepare", "train", "evaluate", "retrain", "serve"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit(address, follow, submission_id, working_dir, tracking_uri, env, command, args) -> None:
    """Run `mlm COMMAND ARGS...` on a Ray cluster as a Ray job (pipeline means `pipeline run`)."""
    from mlm import jobs

    jobs.use_token_auth()  # before ray is imported

    job = jobs.submit(command, list(args), address=address, working_dir=working_dir or None, env=_env_pairs(env),
                      submission_id=submission_id, tracking_uri=tracking_uri)
    click.echo(f"submitted {job['submission_id']}: {job['entrypoint']}", err=True)
    if not follow:
        return _echo_json(job) if _wants_json() else click.echo(job["submission_id"])
    _follow(job["submission_id"], address, job)


def _follow(job_id: str, address: str | None, job: dict | None = None) -> None:
    """Stream the job's log (stdout; stderr with --json), then its final status; exit 1
    unless it succeeded."""
    from mlm import jobs

    as_json = _wants_json()
    for chunk in jobs.follow(job_id, address):
        click.echo(chunk, nl=False, err=as_json)
    final = jobs.wait(job_id, address, timeout_s=60)
    click.echo(f"job {job_id}: {final}", err=True)
    if as_json:
        _echo_json((job or {"submission_id": job_id}) | {"status": final})
    if final != "SUCCEEDED":
        sys.exit(1)


@cli.group()
def jobs() -> None:
    """Ray jobs on a cluster: list, logs, stop."""
    from mlm.jobs import use_token_auth

    use_token_auth()  # before ray is imported


@jobs.command("list")
@ADDRESS
def jobs_list(address) -> None:
    from mlm import jobs as j

    rows = j.list_jobs(address)
    if _wants_json():
        return _echo_json(rows)
    for row in rows:
        click.echo(f"{row['submission_id']}  {row['status']:<9}  {row['start'] or '-':<19}  {row['entrypoint']}")


@jobs.command("logs")
@click.argument("job_id")
@ADDRESS
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
def jobs_logs(job_id, address, follow) -> None:
    from mlm import jobs as j

    if follow:
        _follow(job_id, address)
    elif _wants_json():
        _echo_json({"submission_id": job_id, "logs": j.logs(job_id, address)})
    else:
        click.echo(j.logs(job_id, address), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@ADDRESS
def jobs_stop(job_id, address) -> None:
    from mlm import jobs as j

    stopped = j.stop(job_id, address)
    if _wants_json():
        return _echo_json({"submission_id": job_id, "stopped": stopped})
    click.echo(f"job {job_id}: {'stop requested' if stopped else 'already ended'}")


@cli.group("config")
def config_group() -> None:
    """The configuration: resolved values and every key."""


@config_group.command("show")
@PRESET
@SET
def config_show(preset, overrides) -> None:
    """The resolved config (defaults <- preset <- --set <- MLFLOW_EXPERIMENT_NAME) as YAML (--json: JSON)."""
    cfg = load_config(preset, overrides)
    if _wants_json():
        return _echo_json(cfg.to_dict())
    click.echo(cfg.to_yaml(), nl=False)


@config_group.command("keys")
def config_keys() -> None:
    """Every config key with its type, default and description."""
    from mlm.config import describe_keys

    keys = describe_keys()
    if _wants_json():
        return _echo_json(keys)
    for k in keys:
        click.echo(f"{k['key']} = {json.dumps(k['default'])}  ({k['type']})\n    {k['description']}")


_add_json_option(cli)


def main() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep stderr for what matters
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if os.environ.get("MLM_DEBUG"):
            raise
        if isinstance(e, _user_errors()):
            click.echo(f"mlm: error: {e}", err=True)
            sys.exit(2)
        click.echo(f"mlm: failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                   " (MLM_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
