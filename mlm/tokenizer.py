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


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig):
    """A BERT-style WordPiece tokenizer trained from scratch on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase, strip_accents=cfg.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIAL_TOKENS
    )
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=cfg.lowercase, model_max_length=512)
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
