"""Train a WordPiece tokenizer on the corpus, or load one from a directory.

transformers 5 note: `BertTokenizerFast(vocab_file=...)` silently builds a 5-token
vocabulary, so tokenizers are always built from a `tokenizers.Tokenizer` object or
loaded with `from_pretrained(dir)`, and the vocabulary size is asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from mlm.config import TokenizerConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerError(ValueError):
    pass


def _blank(cfg: TokenizerConfig):
    """An untrained tokenizer of `cfg.kind` and its trainer. All kinds share BERT's
    special tokens, so packing, masking and the model do not care which is used."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    common = {"vocab_size": cfg.vocab_size, "special_tokens": SPECIAL_TOKENS}
    if cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase, strip_accents=cfg.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok, trainers.WordPieceTrainer(min_frequency=cfg.min_frequency, **common)
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    if cfg.kind == "bpe":  # byte-level BPE (RoBERTa/ModernBERT style): no unknown tokens
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        return tok, trainers.BpeTrainer(
            min_frequency=cfg.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    tok = Tokenizer(models.Unigram())  # SentencePiece-style unigram LM
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok, trainers.UnigramTrainer(unk_token="[UNK]", **common)


def word_start_table(tokenizer):
    """bool per token id: True where the token begins a word (for whole-word and span
    masking). WordPiece marks continuations with '##'; byte-level BPE marks word starts
    with 'Ġ'; unigram/Metaspace with '▁'. Special tokens count as word starts."""
    import numpy as np

    from mlm.masking import word_start_table as wordpiece_starts

    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if kind == "WordPiece":
        table = wordpiece_starts(tokens)
    else:  # these mark the start of a word instead of its continuation
        marker = "\u0120" if kind == "BPE" else "\u2581"
        table = np.array([t.startswith(marker) for t in tokens], dtype=bool)
    table[list(tokenizer.all_special_ids)] = True
    return table


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig):
    """A tokenizer of `cfg.kind` trained from scratch on `texts`, with BERT's specials."""
    from tokenizers import processors
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    from tokenizers import models

    tok, trainer = _blank(cfg)
    tok.train_from_iterator(texts, trainer)
    if cfg.kind == "wordpiece":
        # The WordPiece trainer numbers its vocabulary in hash-map order; sorted ids at
        # least make equal vocabularies equal. (Its tie-breaking between equally frequent
        # pairs also follows hash-map order, so two trainings can still differ in a few
        # tokens: prepare reuses the tokenizer of an interrupted run for that reason.)
        vocab = tok.get_vocab()
        ordered = SPECIAL_TOKENS + sorted(t for t in vocab if t not in SPECIAL_TOKENS)
        tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    if cfg.kind == "wordpiece":
        hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=cfg.lowercase, model_max_length=512)
    else:
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=512, pad_token="[PAD]", unk_token="[UNK]",
            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        )
    _check(hf, expected=tok.get_vocab_size())
    return hf


def _check(tokenizer, expected: int | None = None) -> None:
    size = len(tokenizer)
    if size < len(SPECIAL_TOKENS) + 1 or (expected is not None and size != expected):
        raise TokenizerError(f"tokenizer has {size} tokens, expected {expected or 'more'}")
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        if getattr(tokenizer, name) is None:
            raise TokenizerError(f"tokenizer lacks {name.removesuffix('_id')}")


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Save atomically: a temporary folder renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise TokenizerError(f"no tokenizer in {path} (expected tokenizer.json or vocab.txt)")
    tok = AutoTokenizer.from_pretrained(str(path))
    _check(tok)
    return tok


def fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: normalizer, pre-tokenizer and model (vocabulary).
    Runtime settings (padding, truncation) are left out: they change on reload."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    blob = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
