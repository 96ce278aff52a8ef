"""Build the encoder from config, or warm-start it from a model directory; save and
load the Hugging Face model-directory layout (safetensors weights + tokenizer).

Model references (local folders, object-store folders, MLflow URIs) are resolved by
`mlm.resolve`; `ModelError` and `resolve_model_dir` are re-exported from there.
"""

from __future__ import annotations

from pathlib import Path

from mlm.compute import masked_lm_loss
from mlm.config import ModelConfig
from mlm.resolve import ModelError, resolve_model_dir

__all__ = ["ModelError", "build_model", "count_parameters", "fit_tokenizer", "load_model_dir",
           "masked_lm_objective", "resolve_model_dir", "save_model_dir"]


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
    shape["attn_implementation"] = "sdpa"  # PyTorch scaled-dot-product attention
    if cfg.architecture == "modernbert":
        config = ModernBertConfig(
            **shape, attention_dropout=cfg.dropout, mlp_dropout=cfg.dropout, embedding_dropout=cfg.dropout,
            cls_token_id=cls_token_id, sep_token_id=sep_token_id, bos_token_id=cls_token_id, eos_token_id=sep_token_id,
        )
        model_class = ModernBertForMaskedLM
    else:
        config = BertConfig(**shape, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        model_class = BertForMaskedLM
    return model_class(config)


def fit_tokenizer(tokenizer, config):
    """Set the tokenizer's `model_max_length` to the model's positions (the config's
    `max_position_embeddings`, BERT and ModernBERT alike), so that `truncation=True`
    anywhere (HF pipelines, MLflow's flavor) cuts a text where the model ends instead
    of at the tokenizer's generic 512. Returns the tokenizer."""
    tokenizer.model_max_length = int(config.max_position_embeddings)
    return tokenizer


def save_model_dir(model, tokenizer, out_dir: str | Path) -> str:
    """HF `save_pretrained` layout with safetensors weights, written to a local
    temporary folder and committed to `out_dir` (a local folder: renamed into place;
    a URI: uploaded with config.json last). The tokenizer is saved fitted to the model
    (`fit_tokenizer`)."""
    import tempfile

    from mlm import storage

    with tempfile.TemporaryDirectory(prefix="mlm-model-") as tmp:
        model.save_pretrained(tmp)  # safetensors: the transformers 5 default and only format
        if tokenizer is not None:
            fit_tokenizer(tokenizer, model.config).save_pretrained(tmp)
        return storage.put_dir(tmp, out_dir, marker="config.json")


def load_model_dir(path: str | Path):
    """(model, tokenizer) of a model reference; the tokenizer fitted to the model, so a
    folder written before tokenizers carried the model's length loads right too."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_dir(str(path))
    model = AutoModelForMaskedLM.from_pretrained(path)
    tokenizer = fit_tokenizer(AutoTokenizer.from_pretrained(path), model.config)
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def masked_lm_objective(model):
    """Wrap a masked-LM model so its forward returns `mlm.compute.masked_lm_loss` (the
    prediction head computed only at the batch's fixed prediction slots): what
    torch.compile and DDP wrap in training (`mlm.step.objective`)."""
    import torch

    class MaskedLMObjective(torch.nn.Module):
        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm

        def forward(self, input_ids, attention_mask, positions, targets):
            return masked_lm_loss(self.mlm, input_ids, attention_mask, positions, targets)

    return MaskedLMObjective(model)
