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


def fill_mask(text: str, model: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
    return FillMask(model)(text, top_k)
