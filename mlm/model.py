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
    """A model directory, or an MLflow model URI downloaded to a local directory."""
    if model.startswith(("models:/", "runs:/")):
        from mlm.registry import download_model_dir

        return download_model_dir(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"not a model directory (no config.json): {model}")
    return str(path)


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """HF `save_pretrained` layout with safetensors weights, written to a temporary
    folder and renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


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
