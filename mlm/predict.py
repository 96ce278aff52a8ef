"""Fill-mask inference from a model directory or an MLflow model URI."""

from __future__ import annotations

from typing import Any


class PredictError(ValueError):
    pass


class FillMask:
    """Loads the model once; answers many texts."""

    def __init__(self, model: str):
        from transformers import pipeline

        from mlm.model import load_model_dir

        net, self.tokenizer = load_model_dir(model)
        net.eval()
        self.max_len = int(net.config.max_position_embeddings)
        self.pipe = pipeline("fill-mask", model=net, tokenizer=self.tokenizer, device="cpu")

    def __call__(self, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
        mask = self.tokenizer.mask_token
        if mask not in text:
            raise PredictError(f"no {mask} in the text: {text[:60]!r}")
        n = len(self.tokenizer(text)["input_ids"])
        if n > self.max_len:
            raise PredictError(f"text is {n} tokens; the model accepts at most {self.max_len}")
        out = self.pipe(text, top_k=top_k)
        # One [MASK] gives a flat list; several give one list per mask.
        per_mask = out if out and isinstance(out[0], list) else [out]
        return [[{"token": p["token_str"], "score": float(p["score"]), "sequence": p["sequence"]} for p in m] for m in per_mask]


class _BatchPredictor:
    """Ray Data stage: a batch of lines -> one JSON answer per line (fill-mask
    predictions, or a mean-pooled embedding), the model loaded once per actor."""

    def __init__(self, model_dir: str, task: str, top_k: int):
        self.task, self.top_k = task, top_k
        if task == "fill-mask":
            self.fill = FillMask(model_dir)
        else:
            from mlm.model import load_model_dir

            self.net, self.tokenizer = load_model_dir(model_dir)
            self.net.eval()
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
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.net.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean over real tokens
        return {"json": [json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]}, ensure_ascii=False)
                         for t, v in zip(texts, pooled)], "error": [False] * len(texts)}


def predict_file(model: str, input_path: str, out_path: str, task: str = "fill-mask", top_k: int = 5,
                 batch_size: int = 64) -> dict[str, Any]:
    """Batch inference over a text file (one input per line) with Ray Data; writes JSON
    lines in input order to `out_path`. Both may be local paths or object-store URIs: a
    URI input is read by Ray Data's tasks on any node, a local one on this node (only
    it is sure to see the file); the output is committed only when complete
    (temporary name, then rename or upload)."""
    import numpy as np
    import ray

    from mlm import storage
    from mlm.model import resolve_model_dir
    from mlm.runtime import ensure_ray, quiet_ray_data

    if task not in ("fill-mask", "embed"):
        raise PredictError(f"unknown task {task!r}; expected fill-mask or embed")
    try:
        if not storage.is_file(input_path):
            raise PredictError(f"no such file: {input_path}")
    except storage.StorageError as e:
        raise PredictError(str(e)) from None
    model_dir = resolve_model_dir(model)  # fails here, before Ray starts, on an unknown model
    # Actors get a URI itself and resolve it on their own node (a cluster has no shared
    # disk); a local directory must be on storage every node sees.
    remote_model = model.startswith(("models:/", "runs:/")) or storage.is_uri(model)
    ensure_ray()
    quiet_ray_data()
    # local://: Ray Data schedules the read tasks on this (the driver's) node
    source = input_path if storage.is_uri(input_path) else "local://" + storage.normalize(input_path)
    ds = ray.data.read_text(source).map_batches(
        _BatchPredictor, fn_constructor_kwargs={"model_dir": model if remote_model else model_dir, "task": task,
                                                "top_k": top_k},
        # Leave a CPU for the read tasks, or the actors hold every CPU and the read never runs.
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)),
        batch_format="numpy",
    )
    lines = errors = 0
    with storage.output_file(out_path) as local, open(local, "w", encoding="utf-8") as f:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["json"]:
                f.write(str(record) + "\n")
            lines += len(batch["json"])
            errors += int(np.sum(batch["error"]))
    return {"input": input_path, "out": storage.normalize(out_path), "task": task, "lines": lines, "errors": errors}
