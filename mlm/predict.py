"""Inference from a model directory or an MLflow model URI: fill-mask, embeddings,
classification (fine-tuned classifiers); batch inference over a file with Ray Data."""

from __future__ import annotations

from typing import Any


class PredictError(ValueError):
    pass


class FillMask:
    """Loads the model once; answers many texts."""

    def __init__(self, model: str, device="cpu"):
        import torch
        from transformers import pipeline

        from mlm.model import load_model_dir

        net, self.tokenizer = load_model_dir(model)
        net.eval()
        device = torch.device(device)
        if device.type == "cuda":
            net.to(device, dtype=torch.bfloat16)
        self.max_len = int(net.config.max_position_embeddings)
        self.pipe = pipeline("fill-mask", model=net, tokenizer=self.tokenizer, device=device)

    def __call__(self, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k tokens per mask. A text longer than the model reads is cut to its first
        `max_len` tokens (as `truncation=True` does: [CLS] ... [SEP]) when every mask
        is in that part; a mask past it is an error: its prediction would not be seen."""
        mask = self.tokenizer.mask_token
        if mask not in text:
            raise PredictError(f"no {mask} in the text: {text[:60]!r}")
        ids = self.tokenizer(text, verbose=False)["input_ids"]  # verbose: no "longer than" warning
        cut = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id and i >= self.max_len - 1]
        if len(ids) > self.max_len and cut:
            raise PredictError(f"text is {len(ids)} tokens and a {mask} is token {cut[0] + 1}; the model reads "
                               f"at most {self.max_len} (masks past token {self.max_len - 1} cannot be predicted)")
        out = self.pipe(text, top_k=top_k, tokenizer_kwargs={"truncation": True, "max_length": self.max_len})
        # One [MASK] gives a flat list; several give one list per mask.
        per_mask = out if out and isinstance(out[0], list) else [out]
        return [[{"token": p["token_str"], "score": float(p["score"]), "sequence": p["sequence"]} for p in m] for m in per_mask]


def classifier_config(path: str, shown: str | None = None):
    """The config of the model directory `path`, which must hold a sequence classifier."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise PredictError(f"{shown or path} is not a sequence classifier ({', '.join(config.architectures or ['?'])}); "
                           "fine-tune it first (mlm finetune)")
    return config


class Classifier:
    """A sequence classifier (a fine-tuned model directory or MLflow URI), loaded once:
    texts -> (label ids, probabilities [n, classes]); `labels` are its `id2label` names."""

    def __init__(self, model, device="cpu", batch_size: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from mlm.model import fit_tokenizer, resolve_model_dir

        path = resolve_model_dir(str(model))
        config = classifier_config(path, str(model))
        self.device, self.batch_size = torch.device(device), batch_size
        self.net = AutoModelForSequenceClassification.from_pretrained(path).eval().to(self.device)
        self.tokenizer = fit_tokenizer(AutoTokenizer.from_pretrained(path), config)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        ids, probs = [], []
        cuda = self.device.type == "cuda"
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = self.net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            probs.append(p)
            ids.append(p.argmax(axis=-1))
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), (np.concatenate(probs) if probs else np.zeros((0, len(self.labels))))


class _BatchPredictor:
    """Ray Data stage: a batch of lines -> one JSON answer per line (fill-mask
    predictions, or a mean-pooled embedding), the model loaded once per actor."""

    def __init__(self, model_dir: str, task: str, top_k: int):
        import ray

        from mlm.compute import inference_device

        self.task, self.top_k = task, top_k
        self.device = inference_device("auto" if ray.get_gpu_ids() else False)  # a GPU when Ray gave this actor one
        if task == "fill-mask":
            self.fill = FillMask(model_dir, self.device)
        elif task == "classify":
            self.classify = Classifier(model_dir, self.device)
        else:
            from mlm.model import load_model_dir

            self.net, self.tokenizer = load_model_dir(model_dir)
            self.net.eval().to(self.device)
            self.max_len = int(self.net.config.max_position_embeddings)

    def __call__(self, batch: dict) -> dict:
        import json

        texts = [str(t) for t in batch["text"]]
        if self.task == "fill-mask":
            out, failed = [], []
            for t in texts:
                try:
                    record = {"text": t, "masks": self.fill(t, self.top_k)}
                except PredictError as e:
                    record = {"text": t, "error": str(e)}
                out.append(json.dumps(record, ensure_ascii=False))
                failed.append("error" in record)
            return {"json": out, "error": failed}
        if self.task == "classify":
            ids, probs = self.classify(texts)
            names = self.classify.labels
            return {"json": [json.dumps({"text": t, "label": names[int(i)], "score": round(float(p[int(i)]), 6),
                                         "scores": {n: round(float(x), 6) for n, x in zip(names, p)}}, ensure_ascii=False)
                             for t, i, p in zip(texts, ids, probs)], "error": [False] * len(texts)}
        import torch

        # a longer text is cut to the model's positions: the embedding of its first max_len tokens
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            hidden = self.net.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu()  # mean over real tokens
        return {"json": [json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]}, ensure_ascii=False)
                         for t, v in zip(texts, pooled)], "error": [False] * len(texts)}


def predict_file(model: str, input_path: str, out_path: str, task: str = "fill-mask", top_k: int = 5,
                 batch_size: int = 64, use_gpu="auto") -> dict[str, Any]:
    """Batch inference over a text file (one input per line) with Ray Data; writes JSON
    lines in input order to `out_path`. Both may be local paths or object-store URIs: a
    URI input is read by Ray Data's tasks on any node, a local one by this process (only
    it is sure to see the file) and handed to Ray Data; the output is committed only
    when complete (temporary name, then rename or upload). `use_gpu` (True, False,
    "auto"): one actor per GPU of the cluster, one GPU each, bf16, batches 4x larger."""
    import numpy as np
    import ray

    from mlm import storage
    from mlm.model import resolve_model_dir
    from mlm.runtime import ensure_ray, map_on_actors, quiet_ray_data

    if task not in ("fill-mask", "embed", "classify"):
        raise PredictError(f"unknown task {task!r}; expected fill-mask, embed or classify")
    try:
        if not storage.is_file(input_path):
            raise PredictError(f"no such file: {input_path}")
    except storage.StorageError as e:
        raise PredictError(str(e)) from None
    model_dir = resolve_model_dir(model)  # fails here, before Ray starts, on an unknown model
    if task == "classify":
        classifier_config(model_dir, model)
    # Actors get a URI itself and resolve it on their own node (a cluster has no shared
    # disk); a local directory must be on storage every node sees.
    remote_model = model.startswith(("models:/", "runs:/")) or storage.is_uri(model)
    ensure_ray()
    quiet_ray_data()
    from mlm.compute import gpu_actors

    try:
        gpus = gpu_actors(use_gpu, ray.cluster_resources().get("GPU", 0), 1 << 16)
    except RuntimeError as e:
        raise PredictError(str(e)) from None
    ds = ray.data.read_text(input_path) if storage.is_uri(input_path) else _local_lines(input_path)
    ds = map_on_actors(
        ds, _BatchPredictor, fn_constructor_kwargs={"model_dir": model if remote_model else model_dir, "task": task,
                                                "top_k": top_k},
        # Leave a CPU for the read tasks, or the actors hold every CPU and the read never runs.
        batch_size=batch_size * (4 if gpus else 1), num_gpus=1 if gpus else 0,
        compute=ray.data.ActorPoolStrategy(size=gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)),
        batch_format="numpy",
    )
    lines = errors = 0
    with storage.output_file(out_path) as local, open(local, "w", encoding="utf-8") as f:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["json"]:
                f.write(str(record) + "\n")
            lines += len(batch["json"])
            errors += int(np.sum(batch["error"]))
    return {"input": input_path, "out": storage.normalize(out_path), "task": task, "lines": lines, "errors": errors,
            "gpu_actors": gpus}


LINES_PER_BLOCK = 4096


def _local_lines(path: str):
    """A local text file as a Ray Data dataset of lines (`text`), read by this process:
    the file is on this node only, and Ray Data's `local://` scheme, which pinned reads
    to the driver's node, is deprecated (removed after January 2027)."""
    import ray

    with open(path, encoding="utf-8", errors="replace", newline=None) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line, as read_text drops it
    return ray.data.from_items([{"text": t} for t in lines], override_num_blocks=max(1, len(lines) // LINES_PER_BLOCK))
