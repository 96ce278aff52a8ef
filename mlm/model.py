"""Build the encoder from config, or warm-start it from a model directory; save and
load the Hugging Face model-directory layout (safetensors weights + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlm.config import ModelConfig


class ModelError(ValueError):
    pass


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int, cls_token_id: int = 2, sep_token_id: int = 3):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    if cfg.init_from:
        model = AutoModelForMaskedLM.from_pretrained(resolve_model_dir(cfg.init_from))
        if model.config.vocab_size != vocab_size:
            raise ModelError(
                f"model.init_from has vocab_size {model.config.vocab_size} but the data's tokenizer has {vocab_size}"
            )
        return model
    shape = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=pad_token_id,
    )
    if cfg.architecture == "modernbert":
        config = ModernBertConfig(
            **shape, attention_dropout=cfg.dropout, mlp_dropout=cfg.dropout, embedding_dropout=cfg.dropout,
            cls_token_id=cls_token_id, sep_token_id=sep_token_id, bos_token_id=cls_token_id, eos_token_id=sep_token_id,
        )
        model_class = ModernBertForMaskedLM
    else:
        config = BertConfig(**shape, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        model_class = BertForMaskedLM
    config._attn_implementation = "sdpa"  # PyTorch scaled-dot-product attention
    return model_class(config)


def resolve_model_dir(model: str) -> str:
    """A local model directory for `model`: a local directory as it is; an MLflow model
    URI (models:/, runs:/) or a model directory on an object store (s3://...) downloaded
    to this node's cache under $MLM_HOME/model-cache."""
    from mlm import storage

    model = str(model)
    if model.startswith(("models:/", "runs:/")):
        from mlm.registry import download_model_dir

        return download_model_dir(model)
    if storage.is_uri(model):
        return _cached_copy(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"not a model directory (no config.json): {model}")
    return str(path)


def _cached_copy(uri: str) -> str:
    """A local copy of a model directory on an object store, keyed by its files' names,
    sizes and times (a model written again at the same URI is fetched again)."""
    import hashlib
    import tempfile

    from mlm import storage
    from mlm.runtime import work_dir

    try:
        if not storage.is_file(storage.join(uri, "config.json")):
            raise ModelError(f"not a model directory (no config.json): {uri}")
        stamp = [(n, storage.size(storage.join(uri, n))) for n in storage.list_names(uri)]
    except storage.StorageError as e:
        raise ModelError(str(e)) from None
    dest = work_dir() / "model-cache" / hashlib.sha256(repr([uri, stamp]).encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        local = storage.get_dir(uri, Path(tmp) / "model")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(local, dest)
    return str(dest)


def save_model_dir(model, tokenizer, out_dir: str | Path) -> str:
    """HF `save_pretrained` layout with safetensors weights, written to a local
    temporary folder and committed to `out_dir` (a local folder: renamed into place;
    a URI: uploaded with config.json last)."""
    import tempfile

    from mlm import storage

    with tempfile.TemporaryDirectory(prefix="mlm-model-") as tmp:
        model.save_pretrained(tmp)  # safetensors: the transformers 5 default and only format
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return storage.put_dir(tmp, out_dir, marker="config.json")


def load_model_dir(path: str | Path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_dir(str(path))
    model = AutoModelForMaskedLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prediction_head(mlm):
    """hidden [n, H] -> vocabulary logits [n, V] of a masked-LM model (BERT's `cls`,
    ModernBERT's `head` + `decoder`)."""
    if hasattr(mlm, "cls"):
        return mlm.cls
    return lambda hidden: mlm.decoder(mlm.head(hidden))


def masked_lm_objective(model):
    """Wrap a BertForMaskedLM so its forward returns the masked-LM loss with the
    prediction head computed only at masked positions (Cramming/MosaicBERT): with 15%
    masking the vocabulary projection, the costliest matmul of a small model, shrinks
    about 7x. Same loss as `model(..., labels=...)`: mean cross entropy over the
    positions whose label is not -100."""
    import torch

    class MaskedLMObjective(torch.nn.Module):
        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm

        def forward(self, input_ids, attention_mask, labels):
            hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            selected = labels != -100  # [B, L] -> gather [n_masked, H]
            logits = prediction_head(self.mlm)(hidden[selected])
            if logits.shape[0] == 0:  # keep the graph (DDP needs every parameter) but add nothing
                return logits.sum() * 0.0
            return torch.nn.functional.cross_entropy(logits.float(), labels[selected])

    return MaskedLMObjective(model)
