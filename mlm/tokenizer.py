"""Train a WordPiece tokenizer on the corpus, or load one from a directory.

transformers 5 note: `BertTokenizerFast(vocab_file=...)` silently builds a 5-token
vocabulary, so tokenizers are always built from a `tokenizers.Tokenizer` object or
loaded with `from_pretrained(dir)`, and the vocabulary size is asserted.

Determinism: the same texts and config give the same tokenizer (same `fingerprint`) in
every process. `tokenizers`' trainers (0.23) keep their counts in Rust hash maps, whose
iteration order is seeded at random per process, and some steps follow that order:
- WordPiece (the BPE trainer with a '##' prefix): the alphabet gets ids sorted by
  character, but each '##c' continuation symbol gets the next free id when the trainer
  first meets it while walking the word-count map, so in hash-map order. Equally frequent
  pairs are merged in pair-id order, so those ids pick which tied pairs win, and the
  vocabulary differs run to run. Fixed by handing the trainer every symbol it starts from,
  sorted, as leading "special" tokens: it numbers them in the order given, so every id and
  every tie-break is fixed (`_wordpiece_symbols`, `_train_wordpiece`).
- byte-level BPE: a fixed 256-symbol alphabet and no prefix, so no id follows hash order;
  deterministic as it is.
- both: one theoretical gap is left in the merge queue. A merge that recreates an existing
  token can leave two queue entries for one pair, and if their counts are equal, which one
  pops first follows the heap layout (hash order); never seen to change a vocabulary.
- unigram: its word list comes from a hash map, so the EM sums run in a random order
  (scores differ by ~1e-10), and the characters it adds back at the end get scores
  `min + k * 1e-4` in hash-set order. `_canonical_unigram` gives those steps in
  alphabetical order and rounds scores to 1e-3. That removes every difference seen, but
  it is not a guarantee: a score within the noise of a rounding boundary (about one
  training in a few hundred at 30k pieces), or an EM pruning decision settled by the
  noise, would still differ.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from itertools import chain
from pathlib import Path
from typing import Iterable

from mlm.config import TokenizerConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerError(ValueError):
    pass


def _blank(cfg: TokenizerConfig, specials: list[str] = SPECIAL_TOKENS):
    """An untrained tokenizer of `cfg.kind` and its trainer. All kinds share BERT's
    special tokens, so packing, masking and the model do not care which is used.
    `specials` (BERT's first) get the first ids, in order: the WordPiece trainer is given
    its alphabet that way too (see `_wordpiece_symbols`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # show_progress off: the Rust trainer draws its bars on stdout, which carries results only
    common = {"vocab_size": cfg.vocab_size, "special_tokens": list(specials), "show_progress": False}
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


def _wordpiece_symbols(texts: list[str], tok) -> list[str]:
    """Every symbol the WordPiece trainer starts from, in a fixed order: each character of
    the normalized corpus, then '##c' for each character that continues a word somewhere.

    Cheap next to training: one `set()` per text, the tokenizer's own normalizer and
    pre-tokenizer run once per distinct character (normalizing whole texts would cost a
    third of the training), and a scan for the few characters not yet seen continuing a
    word. Assumes the normalizer works character by character (BertNormalizer does); a
    '##c' missed anyway is caught after training (`_train_wordpiece`)."""
    norm, pre = tok.normalizer, tok.pre_tokenizer
    forms: dict[str, str] = {}  # raw character -> its normalized form ('' when dropped)
    joins: dict[str, bool] = {}  # normalized character -> can it be inside a longer word
    alphabet: set[str] = set()
    tails: set[str] = set()  # characters seen continuing a word
    pending: set[str] = set()  # raw characters whose form may continue a word, not yet seen to
    for text in texts:
        chars = set(text)
        for r in chars.difference(forms):
            form = forms[r] = norm.normalize_str(r)
            for c in form:
                if c not in joins:
                    joins[c] = [w for w, _ in pre.pre_tokenize_str("a" + c)] == ["a" + c]
                    if any(c in w for w, _ in pre.pre_tokenize_str(c)):
                        alphabet.add(c)
            tails.update(b for a, b in zip(form, form[1:]) if joins[a] and joins[b])
            if form and joins[form[0]]:
                pending.add(r)
        for r in chars.intersection(pending):
            first = forms[r][0]
            i = -1 if first in tails else text.find(r)
            while i >= 0:
                j = i - 1
                while j >= 0 and not forms[text[j]]:  # skip what the normalizer drops
                    j -= 1
                if j >= 0 and joins[forms[text[j]][-1]]:
                    tails.add(first)
                    break
                i = text.find(r, i + 1)
            if first in tails:
                pending.discard(r)
    return sorted(alphabet) + ["##" + c for c in sorted(tails)]


def _train_wordpiece(texts: list[str], cfg: TokenizerConfig):
    """WordPiece with fixed ids for its starting symbols, renumbered in sorted order."""
    from tokenizers import models

    symbols = set(_wordpiece_symbols(texts, _blank(cfg)[0]))
    for _ in range(2):
        pinned = SPECIAL_TOKENS + sorted(symbols - set(SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
        tok, trainer = _blank(cfg, specials=pinned)
        tok.train_from_iterator(texts, trainer)
        vocab = tok.get_vocab()
        # Merges make pieces of two characters or more, so single characters and '##c' are
        # the starting symbols. One we missed (a character the normalizer changes only in
        # context) would get an id in hash-map order: train again with it in place, which
        # gives what finding it up front would have.
        missed = {t for t in vocab if len(t) == 1 or (len(t) == 3 and t.startswith("##"))} - set(pinned)
        if not missed:
            break
        symbols |= missed
    ordered = SPECIAL_TOKENS + sorted(t for t in vocab if t not in SPECIAL_TOKENS)
    tok, _ = _blank(cfg)  # a fresh tokenizer: the pinned symbols must not stay special tokens
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _canonical_unigram(tok, cfg: TokenizerConfig):
    """The trained unigram model without its hash-order and float-summation noise: scores
    rounded to 1e-3 (the noise is ~1e-10); the characters the trainer appended at
    `min + k * 1e-4` in hash-set order get those steps in alphabetical order; pieces are
    numbered by (score, piece)."""
    from tokenizers import models

    spec = json.loads(tok.to_str())["model"]
    scores = {p: s for p, s in spec["vocab"] if p not in SPECIAL_TOKENS}
    low = min(scores.values())
    step, appended, k = 1e-4, [], 0
    while True:  # the run of single characters at low, low + step, low + 2 * step, ...
        here = [p for p, s in scores.items() if len(p) == 1 and abs(s - (low + k * step)) < 1e-7]
        if not here:
            break
        appended += here
        k += 1
    scores = {p: round(s, 3) for p, s in scores.items()}
    for k, p in enumerate(sorted(appended)):
        scores[p] = round(round(low, 3) + k * step, 7)
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + sorted(scores.items(), key=lambda ps: (-ps[1], ps[0]))
    fresh, _ = _blank(cfg)
    fresh.model = models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("[UNK]"), byte_fallback=spec.get("byte_fallback", False))
    fresh.add_special_tokens(SPECIAL_TOKENS)
    return fresh


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig):
    """A tokenizer of `cfg.kind` trained from scratch on `texts`, with BERT's specials.
    The same texts and config give the same tokenizer in every process (see the module
    docstring; for unigram as far as float noise allows)."""
    from tokenizers import processors
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    texts = texts if isinstance(texts, list) else list(texts)  # read twice for WordPiece
    if cfg.kind == "wordpiece":
        tok = _train_wordpiece(texts, cfg)
    else:
        tok, trainer = _blank(cfg)
        tok.train_from_iterator(texts, trainer)
        if cfg.kind == "unigram":
            tok = _canonical_unigram(tok, cfg)
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
    """Save to a local folder, committed whole (`mlm.storage.put_dir`: a temporary folder
    renamed into place)."""
    import tempfile

    from mlm import storage

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as scratch:
        tmp = Path(scratch) / "tokenizer"
        if isinstance(tokenizer, TokenizerView):  # its files, as they are
            tmp.mkdir()
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tokenizer.path / name).is_file():
                    shutil.copy2(tokenizer.path / name, tmp / name)
        else:
            tokenizer.save_pretrained(str(tmp))
        storage.put_dir(tmp, out_dir, move=True)


class TokenizerView:
    """A saved fast tokenizer as the data stage's driver uses it (ids, special tokens,
    length, fingerprint, word starts), read with the Rust `tokenizers` library only:
    importing transformers (and torch with it) costs ~2 s of a prepare run. Gives the
    same answers as `load_tokenizer` (tested)."""

    SPECIAL = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.backend_tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        conf = json.loads((self.path / "tokenizer_config.json").read_text(encoding="utf-8"))
        self._tokens = {name: conf.get(name) for name in self.SPECIAL}
        self._extra = [t if isinstance(t, str) else t.get("content") for t in conf.get("additional_special_tokens") or []]

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        token = self._tokens.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    pad_token_id = property(lambda self: self._id("pad_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))

    @property
    def all_special_ids(self) -> list[int]:
        ids = [self._id(n) for n in self.SPECIAL] + [self.backend_tokenizer.token_to_id(t) for t in self._extra]
        return sorted({i for i in ids if i is not None})

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]


def load_view(path: str | Path):
    """A TokenizerView when `path` holds tokenizer.json and tokenizer_config.json, else
    the transformers tokenizer (e.g. a vocab.txt-only folder)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file():
        try:
            view = TokenizerView(path)
        except Exception:  # noqa: BLE001 - anything unusual: let transformers read it
            return load_tokenizer(path)
        _check(view)
        return view
    return load_tokenizer(path)


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
    norm = spec.get("normalizer") or {}
    if norm.get("type") == "BertNormalizer" and norm.get("strip_accents") == norm.get("lowercase"):
        # the same normalizer: strip_accents None follows `lowercase`. transformers writes
        # None when it rebuilds a BertTokenizer; the tokenizer.json file says true.
        spec["normalizer"] = norm | {"strip_accents": None}
    blob = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- encoding documents fast ---------------------------------------------------------

# Characters Python's str.split() cuts at but BERT's normalizer (clean_text) deletes, so
# that the text on either side joins into one word: vertical tab, form feed, the
# separators \x1c-\x1f and NEL. Every other character str.split() cuts at is one the
# normalizer turns into a space (Unicode White_Space), where the pre-tokenizer cuts too.
_SPLIT_BUT_DELETED = re.compile(r"[\x0b\x0c\x1c-\x1f\x85]")


def _splits_at_whitespace(backend) -> bool:
    """True for a BERT-style tokenizer: BertNormalizer with clean_text, BertPreTokenizer,
    no added tokens but special ones, and special tokens typed in the text read as text.
    Its ids for a text are the concatenation of its ids for the text's whitespace-cut
    chunks: the normalizer works character by character (strip_accents' NFD only reorders
    marks that follow a letter, never across a space) and the pre-tokenizer cuts at
    every whitespace; the model sees one word at a time."""
    spec = json.loads(backend.to_str())
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    return bool(norm.get("type") == "BertNormalizer" and norm.get("clean_text") and pre.get("type") == "BertPreTokenizer"
                and all(t.get("special") for t in spec.get("added_tokens") or []) and backend.encode_special_tokens
                and spec.get("truncation") is None and spec.get("padding") is None)


class DocumentEncoder:
    """Token ids of documents (no special tokens added), exactly those of
    `backend.encode_batch_fast(texts, add_special_tokens=False)`, with a BERT-style
    tokenizer at a fifth to a half of its cost (the more a corpus repeats its words,
    the less).

    Natural text repeats its words, and the Rust pipeline spends most of its time on the
    normalizer's per-character alignment bookkeeping and the model's per-word work, every
    time. Here each text is cut at whitespace (str.split, in C), each distinct chunk goes
    through the real tokenizer once (new chunks joined, `_encode_chunks`) and its ids are
    cached (past `max_cached_words` chunks the cache keeps only the last batch's), and a
    batch's ids are gathered from the cache with numpy. Other tokenizers (byte-level BPE
    and Metaspace treat spaces as part of the tokens) go to `encode_batch_fast` as they
    are. The equality is tested for every BMP character between words, random ASCII and
    real documents (tests/unit/test_tokenizer.py)."""

    def __init__(self, backend, max_cached_words: int = 500_000):
        import numpy as np

        self.backend = backend
        self.fast = _splits_at_whitespace(backend)
        self.max_cached_words = max_cached_words
        # For encoding new chunks joined (`_encode_chunks`): a special token to put between
        # them, read as that token by a copy of the tokenizer, and every special's text.
        spec = json.loads(backend.to_str())
        added = [t for t in spec.get("added_tokens") or [] if t.get("special") and t.get("content")]
        self.specials = [t["content"].lower() for t in added]
        # matched in the raw text, not after the normalizer (BERT's specials are)
        raw = added and not any(t.get("normalized") for t in added)
        self.joiner = (added[0]["id"], added[0]["content"]) if self.fast and raw else None
        if self.joiner:
            from tokenizers import Tokenizer

            self.joined_backend = Tokenizer.from_str(backend.to_str())
            self.joined_backend.encode_special_tokens = False
        # The cache: chunk -> row; row r's ids are table[first[r] : first[r] + length[r]].
        self.rows = _Rows()
        self.first, self.length = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.table = np.zeros(0, np.int32)

    def __call__(self, texts: list[str]):
        import numpy as np

        if not self.fast:
            return [np.asarray(e.ids, np.int32) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        chunks = [(_SPLIT_BUT_DELETED.sub("", t) if _SPLIT_BUT_DELETED.search(t) else t).split() for t in texts]
        every = list(chain.from_iterable(chunks))
        which = np.fromiter(map(self.rows.__getitem__, every), np.int64, len(every))  # new chunks get rows
        if self.rows.new:
            self._learn(self.rows.new)
        flat, ends = self._gather(which)
        per_text = np.fromiter(map(len, chunks), np.int64, len(chunks))
        bounds = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(per_text)])].tolist()
        if len(self.rows) > self.max_cached_words:
            self._shrink(np.unique(which))
        return [flat[a:b] for a, b in zip(bounds, bounds[1:])]

    def _gather(self, rows):
        """The cached ids of `rows`, concatenated, and where each row's ids end."""
        import numpy as np

        n = self.length[rows]
        ends = np.cumsum(n)
        total = int(ends[-1]) if len(ends) else 0
        # ids of row k are table[first[rows[k]] + j] for j < n[k]: one gather for all
        return self.table[np.repeat(self.first[rows] - (ends - n), n) + np.arange(total)], ends

    def _learn(self, new: list[str]) -> None:
        """Give the rows just handed out to `new` chunks their ids (the real tokenizer's)."""
        import numpy as np

        flat, length = self._encode_chunks(new)
        self.first = np.concatenate([self.first, len(self.table) + np.cumsum(length) - length])
        self.length = np.concatenate([self.length, length])
        self.table = np.concatenate([self.table, flat])
        self.rows.new = []

    def _shrink(self, keep) -> None:
        """Past its bound, the cache keeps only the chunks of the last batch (the frequent
        ones are among them), renumbered, their ids moved, none encoded again."""
        chunks = list(self.rows)  # in row order
        length = self.length[keep]
        self.table, ends = self._gather(keep)
        self.first, self.length = ends - length, length
        self.rows = _Rows(zip((chunks[r] for r in keep.tolist()), range(len(keep))))

    def _encode_chunks(self, chunks: list[str], group: int = 2048):
        """The ids of `chunks`, concatenated in order, and how many each has.

        A Rust Encoding per chunk costs ~10 us whatever its length, so chunks are encoded
        joined, `group` at a time, with a special token between them that a second copy
        of the tokenizer reads as the special token: the text between two of them is
        normalized and split on its own, exactly like the chunk alone, and the special's
        id appears nowhere else. A group holding any special token's text in a chunk is
        encoded chunk by chunk."""
        import numpy as np

        groups = [chunks[i : i + group] for i in range(0, len(chunks), group)]
        joined: dict[int, str] = {}  # group -> its joined text, where joining is safe
        if self.joiner:
            sep_id, sep = self.joiner
            others = [t for t in self.specials if t != sep.lower()]
            for k, g in enumerate(groups):
                text = f" {sep} ".join(g)
                low = text.lower()
                if low.count(sep.lower()) == len(g) - 1 and not any(t in low for t in others):
                    joined[k] = text
        single = [c for k, g in enumerate(groups) if k not in joined for c in g]
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        encodings = self.joined_backend.encode_batch_fast(list(joined.values()), add_special_tokens=False) if joined else []
        for (k, _), enc in zip(joined.items(), encodings):
            ids = np.asarray(enc.ids, np.int32)
            cuts = np.flatnonzero(ids == sep_id)
            if len(cuts) != len(groups[k]) - 1:  # cannot happen; never guess
                raise RuntimeError(f"joined encoding gave {len(cuts) + 1} pieces for {len(groups[k])} chunks")
            out[k] = np.delete(ids, cuts), np.diff(np.concatenate([[-1], cuts, [len(ids)]])) - 1
        encodings = iter(self.backend.encode_batch_fast(single, add_special_tokens=False) if single else [])
        for k, g in enumerate(groups):
            if k not in joined:
                ids = [next(encodings).ids for _ in g]
                length = np.fromiter(map(len, ids), np.int64, len(ids))
                out[k] = np.fromiter(chain.from_iterable(ids), np.int32, int(length.sum())), length
        if not groups:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return (np.concatenate([out[k][0] for k in range(len(groups))]).astype(np.int32, copy=False),
                np.concatenate([out[k][1] for k in range(len(groups))]).astype(np.int64, copy=False))


class _Rows(dict):
    """chunk -> its row in DocumentEncoder's cache; a chunk not there yet gets the next
    row on lookup and is noted in `new` (one dict lookup per chunk, no set arithmetic)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.new: list[str] = []

    def __missing__(self, chunk: str) -> int:
        row = self[chunk] = len(self)
        self.new.append(chunk)
        return row
