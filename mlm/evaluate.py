"""Held-out metrics on the fixed evaluation set: the validation shards, masked at
`eval.rate` with `eval.seed` whatever the training masking was.

perplexity = exp(mean cross-entropy over masked positions), as in run_mlm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


import numpy as np

from mlm import shards
from mlm.compute import score
from mlm.shards import plan_batches, read_batches


class EvalError(ValueError):
    pass


# The fixed evaluation set is masked with `random`; these are also scored, on the same
# rows re-masked at the same rate with the evaluation seed (the original ids are known:
# they are the labels where a label is set, the input elsewhere).
OTHER_STRATEGIES = ("whole_word", "span")


def _remasked(batches, tokenizer, manifest: shards.Manifest, strategy: str, first_index: int = 0):
    from mlm.config import MaskingConfig
    from mlm.masking import Masker, batch_rng
    from mlm.prepare import masker_spec

    # span lengths as the masking config's defaults; rate and seed of the evaluation set
    settings = MaskingConfig().model_dump() | manifest.masking["validation"] | {"strategy": strategy}
    masker = Masker(masker_spec(tokenizer, settings, []))
    for i, batch in enumerate(batches, start=first_index):
        ids, labels = shards.column_2d(batch, "input_ids"), shards.column_2d(batch, "labels")
        original = np.where(labels >= 0, labels, ids).astype(np.int32)
        n = np.asarray(batch.column("num_tokens"))
        rng = batch_rng(settings["seed"], strategy.encode(), i.to_bytes(8, "big"))
        yield shards.to_table(*masker(original, n, rng), n)


def _score_all(net, tokenizer, manifest: shards.Manifest, plan: list[tuple[str, int, int]], first_index: int = 0,
               progress=None, device=None) -> dict[str, dict[str, float]]:
    """Sums for the evaluation masking ("random") and each re-masked strategy; one
    `progress` step per batch scored. On a CUDA `device` with bf16 autocast."""
    import torch

    device = device or torch.device("cpu")
    net.to(device)
    on = {"device": device, "autocast": torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")}
    baseline = manifest.most_frequent_token.id
    out = {"random": score(net, _counted(read_batches(plan), progress), baseline, **on)}
    for strategy in OTHER_STRATEGIES:
        batches = _remasked(read_batches(plan), tokenizer, manifest, strategy, first_index)
        out[strategy] = score(net, _counted(batches, progress), **on)
    return out


def _counted(batches, progress):
    for batch in batches:
        yield batch
        if progress is not None:
            progress.update(1)  # the consumer asked for the next one: this one is scored


class _RayScorer:
    """Ray Data stage: one evaluation batch (a plan entry) -> its sums. The model is
    loaded once per actor; an MLflow URI is resolved on the actor's node."""

    def __init__(self, model: str, manifest: shards.Manifest):
        import ray
        import torch

        from mlm.compute import inference_device
        from mlm.model import load_model_dir

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]  # Ray assigned this actor a GPU (CUDA_VISIBLE_DEVICES)
        self.device = inference_device("auto" if self.gpu_ids else False)
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.net, self.tokenizer = load_model_dir(model)
        self.manifest = manifest

    def __call__(self, item: dict) -> dict:
        sums = _score_all(self.net, self.tokenizer, self.manifest,
                          [(str(item["file"][0]), int(item["start"][0]), int(item["rows"][0]))], int(item["index"][0]),
                          device=self.device)
        return {"sums": [json.dumps(sums)], "device": [self.device.type], "gpu_ids": [",".join(self.gpu_ids)]}


def _score_on_ray(model: str, manifest: shards.Manifest, plan: list[tuple[str, int, int]],
                  progress=None, use_gpu="auto") -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(sums, where they ran): one actor per GPU of the cluster (one GPU each) when
    `use_gpu` says so and it has any, else one per CPU."""
    import ray

    from mlm.compute import gpu_actors
    from mlm.runtime import ensure_ray, map_on_actors, quiet_ray_data

    ensure_ray()
    quiet_ray_data()
    items = [{"index": i, "file": f, "start": start, "rows": n} for i, (f, start, n) in enumerate(plan)]
    try:
        gpus = gpu_actors(use_gpu, ray.cluster_resources().get("GPU", 0), len(items))
    except RuntimeError as e:
        raise EvalError(str(e)) from None
    size = gpus or max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    ds = map_on_actors(
        ray.data.from_items(items, override_num_blocks=len(items)), _RayScorer,
        fn_constructor_kwargs={"model": model, "manifest": manifest}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if gpus else 0,
    )
    total: dict[str, dict[str, float]] = {}
    ran = {"devices": set(), "gpu_ids": set()}
    for row in ds.iter_rows():
        ran["devices"].add(str(row["device"]))
        ran["gpu_ids"] |= {g for g in str(row["gpu_ids"]).split(",") if g}
        for strategy, sums in json.loads(row["sums"]).items():
            acc = total.setdefault(strategy, dict.fromkeys(sums, 0))
            for k, v in sums.items():
                acc[k] += v
        if progress is not None:
            progress.update(1 + len(OTHER_STRATEGIES))
    return total, {"device": ",".join(sorted(ran["devices"])), "gpu_actors": gpus, "gpu_ids": sorted(ran["gpu_ids"])}


def evaluate(model: Any, data_dir: str | Path, batch_size: int = 64, max_batches: int | None = None,
             engine: str = "local", ray_min_rows: int = 50_000, use_gpu="auto") -> dict[str, Any]:
    """Top-1/top-5 masked accuracy, loss and perplexity of `model` (a model directory,
    an MLflow model URI, or a loaded (model, tokenizer) pair) on `data_dir`'s
    validation split. engine: "local" scores in this process, "ray" as Ray Data batch
    inference (one model per actor, summed here), "auto" on Ray from `ray_min_rows`
    evaluation rows. Both engines score the same batches and give the same metrics.
    `use_gpu` (True, False, "auto"): on a GPU of this machine (local) or one GPU per
    actor (ray), bf16; the metrics say where (`device`, `gpu_actors`)."""
    from mlm.progress import Progress
    from mlm.tokenizer import fingerprint

    if engine not in ("local", "ray", "auto"):
        raise EvalError(f"unknown evaluation engine {engine!r}; expected local, ray or auto")
    manifest = shards.Manifest.read(data_dir)
    plan = plan_batches(shards.checked_shards(data_dir, "validation", manifest), batch_size)[:max_batches]
    rows = sum(n for _, _, n in plan)
    on_ray = isinstance(model, (str, Path)) and (engine == "ray" or (engine == "auto" and rows >= ray_min_rows))
    model, net, tokenizer = _model_for(model, on_ray)
    if fingerprint(tokenizer) != manifest.tokenizer.fingerprint or len(tokenizer) != manifest.tokenizer.vocab_size:
        raise EvalError("the model's tokenizer is not the dataset's tokenizer; evaluate on data prepared with it")
    with Progress("evaluate", total=len(plan) * (1 + len(OTHER_STRATEGIES)), unit="batches") as line:
        sums, ran = _score_on_ray(model, manifest, plan, line, use_gpu) if on_ray else _score_here(
            net, tokenizer, manifest, plan, line, use_gpu)
        metrics = _metrics(sums, manifest, data_dir) | {"engine": "ray" if on_ray else "local"} | ran
        line.close(f"top-1 {metrics['top1_accuracy']:.4f}, loss {metrics['loss']:.4f} on {metrics['masked_tokens']:,} "
                   f"masked tokens ({metrics['engine']})")
    return metrics


def _score_here(net, tokenizer, manifest, plan, progress, use_gpu) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    from mlm.compute import inference_device

    try:
        device = inference_device(use_gpu)
    except RuntimeError as e:
        raise EvalError(str(e)) from None
    return _score_all(net, tokenizer, manifest, plan, progress=progress, device=device), {"device": device.type}


def _model_for(model: Any, on_ray: bool):
    """(model reference, loaded model or None, tokenizer). On Ray, URIs go to the actors
    as they are (each resolves them on its own node) and only the tokenizer is loaded
    here; locally the model is loaded (unless it is a loaded (model, tokenizer) pair)."""
    from mlm.model import load_model_dir, resolve_model_dir
    from mlm.resolve import is_remote

    if on_ray:
        model = str(model) if is_remote(model) else resolve_model_dir(str(model))
        return model, None, _tokenizer_of(model)
    net, tokenizer = load_model_dir(model) if isinstance(model, (str, Path)) else model
    return model, net, tokenizer


def _metrics(sums: dict[str, dict[str, float]], manifest: shards.Manifest, data_dir) -> dict[str, Any]:
    """The sums as metrics: the evaluation masking's, and each re-masked strategy's."""
    counts = sums["random"]
    loss_sum, top1, top5, baseline, n = (counts[k] for k in ("loss_sum", "top1", "top5", "baseline", "n"))
    if n == 0:
        raise EvalError(f"no masked tokens in the validation split of {data_dir}")
    loss = loss_sum / n
    per_strategy = {}
    for strategy in OTHER_STRATEGIES:
        c = sums[strategy]
        if c["n"]:
            per_strategy |= {f"{strategy}_loss": c["loss_sum"] / c["n"], f"{strategy}_top1_accuracy": c["top1"] / c["n"],
                             f"{strategy}_top5_accuracy": c["top5"] / c["n"]}
    return per_strategy | {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "top1_accuracy": top1 / n,
        "top5_accuracy": top5 / n,
        "masked_tokens": n,
        "baseline_top1_accuracy": baseline / n,
        "baseline_token": manifest.most_frequent_token.token,
        "data_fingerprint": manifest.fingerprint,
        "eval_set": manifest.masking["validation"],
    }


def _tokenizer_of(model: str):
    """The tokenizer alone (for the fingerprint check before Ray starts)."""
    from mlm.model import resolve_model_dir
    from mlm.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_dir(model))


SAMPLE_CONTEXT = 12  # tokens shown on each side of a sample's mask


def sample_predictions(model: Any, data_dir: str | Path, rows: int = 8, top_k: int = 5) -> list[dict[str, Any]]:
    """Fill-mask on the first `rows` held-out sequences (the validation split), for people:
    in each, one position the evaluation set masks (the first whole word there) is masked
    and the rest left as written. Per row: the text around the mask, the true token, the
    model's top-k tokens with their probabilities. `model`: a model reference or a loaded
    (model, tokenizer) pair."""
    import torch

    from mlm.compute import masked_logits
    from mlm.masking import IGNORE_INDEX
    from mlm.model import load_model_dir

    net, tokenizer = load_model_dir(model) if isinstance(model, (str, Path)) else model
    plan = plan_batches(shards.shard_paths(data_dir, "validation", verify=False), rows)[:1]
    batch = next(read_batches(plan))
    ids, labels = shards.column_2d(batch, "input_ids"), shards.column_2d(batch, "labels")
    lengths = np.asarray(batch.column("num_tokens"))
    original = np.where(labels >= 0, labels, ids).astype(np.int64)
    picked = [(r, _sample_position(tokenizer, original[r], labels[r])) for r in range(len(lengths))]
    picked = [(r, p) for r, p in picked if p is not None]
    if not picked:
        return []
    inputs, targets = original[[r for r, _ in picked]].copy(), np.full((len(picked), original.shape[1]), IGNORE_INDEX)
    for i, (r, p) in enumerate(picked):
        inputs[i, p], targets[i, p] = tokenizer.mask_token_id, original[r, p]
    attention = (np.arange(original.shape[1])[None, :] < lengths[[r for r, _ in picked], None]).astype(np.int64)
    net.eval()
    device = next(net.parameters()).device  # where evaluation left it
    with torch.inference_mode():
        logits, _ = masked_logits(net, *(torch.from_numpy(a).to(device) for a in (inputs, attention, targets)))
        best = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    return [{"masked_text": _around(tokenizer, inputs[i], p, int(lengths[r])),
             "true_token": tokenizer.convert_ids_to_tokens(int(original[r, p])),
             "predictions": [{"token": tokenizer.convert_ids_to_tokens(int(t)), "score": float(s)}
                             for t, s in zip(best.indices[i], best.values[i])]}
            for i, (r, p) in enumerate(picked)]


def _sample_position(tokenizer, ids: np.ndarray, labels: np.ndarray) -> int | None:
    """The first masked position holding a whole alphabetic word (else the first masked one)."""
    masked = [int(p) for p in np.flatnonzero(labels >= 0)]
    tokens = tokenizer.convert_ids_to_tokens([int(ids[p]) for p in masked])
    nexts = tokenizer.convert_ids_to_tokens([int(ids[p + 1]) if p + 1 < len(ids) else 0 for p in masked])
    for p, token, after in zip(masked, tokens, nexts):
        if token.isalpha() and not after.startswith("##"):
            return p
    return masked[0] if masked else None


def _around(tokenizer, ids: np.ndarray, position: int, length: int) -> str:
    """The row's text within SAMPLE_CONTEXT tokens of `position` ([CLS]/[SEP] left out)."""
    start, stop = max(1, position - SAMPLE_CONTEXT), min(length - 1, position + SAMPLE_CONTEXT + 1)
    text = tokenizer.decode([int(t) for t in ids[start:stop]])
    return ("… " if start > 1 else "") + text + (" …" if stop < length - 1 else "")


def better(metric: str, challenger: float, champion: float, margin: float) -> bool:
    """Does the challenger beat the champion by at least `margin` on `metric`?"""
    if metric == "loss":
        return challenger < champion - margin
    return challenger > champion + margin


EVAL_FILE = "eval_results.json"


def save_results(model_dir: str | Path, results: dict[str, Any]) -> None:
    from mlm import storage

    storage.write_bytes(storage.join(model_dir, EVAL_FILE), json.dumps(results, indent=2).encode())


def load_results(model_dir: str | Path) -> dict[str, Any] | None:
    from mlm import storage

    path = storage.join(model_dir, EVAL_FILE)
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else None
