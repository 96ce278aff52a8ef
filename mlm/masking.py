"""Masking strategies as pure functions: numpy in, numpy out, the rng passed in.

`labels` holds the original token where a prediction is required and -100
elsewhere (the ignore index of torch's cross entropy).

Every strategy first decides which positions to predict (the selection), then hands
them to `_corrupt`, which applies BERT's 80/10/10 replacement. Strategies differ only
in how they select:

- random      each maskable token on its own (BERT).
- whole_word  whole words: all WordPiece pieces of a word together.
- span        runs of whole words with geometric lengths (SpanBERT).
- terms       occurrences of user-given token sequences (entities, phrases), topped up
              with random tokens.

Inputs are `ids [rows, seq_len]` and a bool `maskable` of the same shape (False for
special tokens and padding: never selected). Word-aware strategies also take a bool
`word_start`, True where a token begins a word (`word_start_table(vocab)[ids]`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

IGNORE_INDEX = -100


def _corrupt(
    ids: np.ndarray,
    selected: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's replacement of the selected positions, shared by all strategies: of the
    selected, `mask_fraction` become [MASK], `random_fraction` a token drawn uniformly
    from `random_ids`, the rest stay as they are (so the model cannot learn that only
    [MASK] positions matter). Returns (input_ids, labels), both int32."""
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int32)
    action = rng.random(ids.shape)  # one draw per token decides mask / random / keep
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    out = ids.copy()
    out[to_mask] = mask_id
    out[to_random] = random_ids[rng.integers(0, len(random_ids), size=int(to_random.sum()))]
    return out, labels


def mask_random(
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: each maskable token is selected with probability `rate`; of the
    selected, `mask_fraction` become [MASK], `random_fraction` a random token drawn
    uniformly from `random_ids` (the non-special vocabulary), the rest stay as they are.

    ids: int array of any shape; maskable: bool array, False for special tokens and
    padding (never selected). Returns (input_ids, labels), both int32."""
    ids = np.asarray(ids, np.int32)
    selected = (rng.random(ids.shape) < rate) & maskable
    # Same rng draws in the same order as before the refactor: shards stay reproducible.
    return _corrupt(
        ids, selected, rng, mask_fraction=mask_fraction, random_fraction=random_fraction,
        mask_id=mask_id, random_ids=random_ids,
    )


def word_start_table(vocab_tokens: list[str], continuation_prefix: str = "##") -> np.ndarray:
    """Bool per token id, True where the token begins a word. WordPiece marks pieces that
    continue a word with "##"; callers get the per-position marks as `table[ids]`."""
    return np.array([not t.startswith(continuation_prefix) for t in vocab_tokens], dtype=bool)


# --- selection helpers ---------------------------------------------------------------


def _rows(ids, maskable, word_start=None):
    """Coerce and check the [rows, seq_len] inputs of the word-aware strategies."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D [rows, seq_len], got shape {ids.shape}")
    maskable = np.asarray(maskable, bool)
    if maskable.shape != ids.shape:
        raise ValueError(f"maskable has shape {maskable.shape}, ids {ids.shape}")
    if word_start is not None:
        word_start = np.asarray(word_start, bool)
        if word_start.shape != ids.shape:
            raise ValueError(f"word_start has shape {word_start.shape}, ids {ids.shape}")
    return ids, maskable, word_start


class _Words(NamedTuple):
    of_token: np.ndarray  # [rows * seq_len] word index per position, -1 where not maskable
    first: np.ndarray  # [n_words] flat position of the word's first token
    length: np.ndarray  # [n_words] tokens in the word
    row: np.ndarray  # [n_words] row of the word
    starts_run: np.ndarray  # [n_words] True where the word follows a non-maskable token (or column 0)


def _words(maskable: np.ndarray, word_start: np.ndarray) -> _Words:
    """Split the maskable tokens into words, numbered over the flattened batch.

    A word begins at a maskable token that starts a word or that follows a non-maskable
    one: a "##" piece right after [SEP] (packing cuts documents anywhere) or at column 0
    starts its own word, so a word never spans a special token or a row boundary."""
    seq_len = maskable.shape[1]
    prev_maskable = np.zeros_like(maskable)
    prev_maskable[:, 1:] = maskable[:, :-1]
    starts = maskable & (word_start | ~prev_maskable)
    flat_maskable = maskable.ravel()
    of_token = np.cumsum(starts.ravel()) - 1
    of_token[~flat_maskable] = -1
    first = np.flatnonzero(starts)
    length = np.bincount(of_token[flat_maskable], minlength=len(first))
    return _Words(of_token, first, length, first // seq_len, ~prev_maskable.ravel()[first])


def _fill_budget(
    unit_row: np.ndarray, unit_len: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Pick units (words, spans or single tokens) in a random order per row until the
    row's picked tokens reach `target[row]` (a float); returns a bool per unit.

    The unit that crosses the target is kept with probability (target - before) / length,
    so a row's expected number of picked tokens equals its target exactly (no rounding
    bias, which matters for short rows and long spans) and it misses the target by less
    than one unit. Units after the crossing one are dropped."""
    n = len(unit_row)
    order = np.lexsort((rng.random(n), unit_row))  # grouped by row, random within a row
    row, length = unit_row[order], unit_len[order]
    end = np.cumsum(length)
    first = np.searchsorted(row, row)  # position in `order` of the row's first unit
    before = end - length - (end[first] - length[first])  # tokens ahead of this unit in its row
    take = before + rng.random(n) * length < target[row]
    picked = np.empty(n, bool)
    picked[order] = take
    return picked


def _tokens_of_words(words: _Words, word_picked: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Expand a bool per word to a bool per position."""
    selected = np.zeros(words.of_token.shape, bool)
    inside = words.of_token >= 0
    selected[inside] = word_picked[words.of_token[inside]]
    return selected.reshape(shape)


# --- strategies ----------------------------------------------------------------------


def mask_whole_word(
    ids: np.ndarray,
    maskable: np.ndarray,
    word_start: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking: whole words are picked at random in each row until about
    `rate` of the row's maskable TOKENS are selected; all pieces of a picked word are
    selected together (predicting "##ing" from "play" + [MASK] is too easy otherwise).
    The 80/10/10 replacement is then drawn per token, as in BERT."""
    ids, maskable, word_start = _rows(ids, maskable, word_start)
    words = _words(maskable, word_start)
    picked = _fill_budget(words.row, words.length, rate * maskable.sum(axis=1), rng)
    selected = _tokens_of_words(words, picked, ids.shape)
    return _corrupt(
        ids, selected, rng, mask_fraction=mask_fraction, random_fraction=random_fraction,
        mask_id=mask_id, random_ids=random_ids,
    )


def mask_span(
    ids: np.ndarray,
    maskable: np.ndarray,
    word_start: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float,
    geometric_p: float = 0.2,
    max_span: int = 10,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """SpanBERT span masking: contiguous spans of whole words, lengths (in words) drawn
    from Geometric(`geometric_p`) restricted to 1..`max_span` (renormalized, as SpanBERT
    does: mean 3.8 words for p=0.2, max 10), are placed at random in each row until about
    `rate` of its maskable tokens are selected. Spans stop at non-maskable tokens.

    Vectorized instead of SpanBERT's per-span loop: the batch's words are cut into
    back-to-back spans of sampled lengths (also cut where a run of maskable tokens ends),
    then whole spans are picked in random order up to each row's budget. Unlike SpanBERT,
    spans never overlap; two picked neighbours join into a longer run, as overlaps do there."""
    if not 0.0 < geometric_p <= 1.0:
        raise ValueError(f"geometric_p must be in (0, 1], got {geometric_p}")
    if max_span < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    ids, maskable, word_start = _rows(ids, maskable, word_start)
    words = _words(maskable, word_start)
    n_words = len(words.first)
    lengths = np.arange(1, max_span + 1)
    probs = geometric_p * (1.0 - geometric_p) ** (lengths - 1)
    # n_words lengths of >= 1 word each always cover all the words.
    span_len = rng.choice(lengths, size=n_words, p=probs / probs.sum())
    span_start = words.starts_run.copy()  # a span never crosses a special token or a row end
    ends = np.cumsum(span_len)
    span_start[ends[ends < n_words]] = True
    if n_words:
        span_start[0] = True
    span_of_word = np.cumsum(span_start) - 1
    first_word = np.flatnonzero(span_start)
    span_tokens = np.add.reduceat(words.length, first_word) if n_words else words.length
    picked = _fill_budget(words.row[first_word], span_tokens, rate * maskable.sum(axis=1), rng)
    selected = _tokens_of_words(words, picked[span_of_word], ids.shape)
    return _corrupt(
        ids, selected, rng, mask_fraction=mask_fraction, random_fraction=random_fraction,
        mask_id=mask_id, random_ids=random_ids,
    )


def _find_terms(
    ids: np.ndarray, maskable: np.ndarray, term_ids: list[np.ndarray], word_start: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Every occurrence of a term whose tokens are all maskable, as (flat start position,
    length). With `word_start`, an occurrence must also begin and end on word boundaries,
    so "york" is not found inside "york ##shire"."""
    rows, seq_len = ids.shape
    # non-maskable tokens before each column; a window is clean when the count doesn't change
    blocked = np.zeros((rows, seq_len + 1), np.int32)
    blocked[:, 1:] = np.cumsum(~maskable, axis=1)
    if word_start is not None:
        # a word ends before a word start, a non-maskable token or the end of the row
        after_word_end = np.ones((rows, seq_len + 1), bool)
        after_word_end[:, :seq_len] = word_start | ~maskable
    by_length: dict[int, list[np.ndarray]] = defaultdict(list)
    for term in term_ids:
        term = np.asarray(term, np.int32).ravel()
        if len(term) == 0:
            raise ValueError("term_ids holds an empty term")
        by_length[len(term)].append(term)
    starts, lengths = [], []
    for k, terms in sorted(by_length.items()):
        if k > seq_len:
            continue
        n_windows = seq_len - k + 1
        # One opaque k*4-byte value per window, so all terms of this length are matched
        # with one isin (exact byte equality) instead of a pass per term.
        windows = np.ascontiguousarray(sliding_window_view(ids, k, axis=1)).view(f"V{4 * k}")[..., 0]
        wanted = np.ascontiguousarray(np.stack(terms)).view(f"V{4 * k}")[:, 0]
        hit = np.isin(windows, wanted)
        hit &= blocked[:, k:] == blocked[:, :n_windows]
        if word_start is not None:
            hit &= word_start[:, :n_windows] & after_word_end[:, k:]
        r, c = np.nonzero(hit)
        starts.append(r * seq_len + c)
        lengths.append(np.full(len(r), k))
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(lengths)


def mask_terms(
    ids: np.ndarray,
    maskable: np.ndarray,
    term_ids: list[np.ndarray],
    rng: np.random.Generator,
    *,
    rate: float,
    term_rate: float = 0.5,
    word_start: np.ndarray | None = None,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Entity / phrase masking: every occurrence of a term (a token-id sequence, e.g. a
    tokenized entity name) lying on maskable tokens is selected as a whole with
    probability `term_rate`, so the model must recall the entity from context rather than
    from its other pieces. Single random tokens then top each row up to about `rate` of
    its maskable tokens; a row whose terms already exceed `rate` gets nothing added.
    Overlapping occurrences are selected independently (their union is selected).
    `word_start` (optional) restricts matches to whole words."""
    ids, maskable, word_start = _rows(ids, maskable, word_start)
    rows, seq_len = ids.shape
    starts, lengths = _find_terms(ids, maskable, term_ids, word_start)
    keep = rng.random(len(starts)) < term_rate
    # Cover the kept occurrences: +1 at a start, -1 after its end, covered where the
    # running sum is > 0. An occurrence never crosses a row (all its tokens are maskable
    # within one window), so the flat batch can be treated as one line.
    cover = np.zeros(ids.size + 1, np.int32)
    np.add.at(cover, starts[keep], 1)
    np.add.at(cover, starts[keep] + lengths[keep], -1)
    selected = np.cumsum(cover[:-1]) > 0
    # Top-up: each free maskable token is a unit of length 1 for the per-row budget.
    target = np.maximum(rate * maskable.sum(axis=1) - selected.reshape(rows, seq_len).sum(axis=1), 0.0)
    free = np.flatnonzero(maskable.ravel() & ~selected)
    picked = _fill_budget(free // seq_len, np.ones(len(free), np.int64), target, rng)
    selected[free[picked]] = True
    return _corrupt(
        ids, selected.reshape(rows, seq_len), rng, mask_fraction=mask_fraction,
        random_fraction=random_fraction, mask_id=mask_id, random_ids=random_ids,
    )


# --- rngs ----------------------------------------------------------------------------


def batch_rng(seed: int, *keys: bytes) -> np.random.Generator:
    """An rng that depends only on the seed and on the batch's content, so the same
    input gives the same masks however the work is split over workers."""
    h = hashlib.blake2b(digest_size=16)
    for k in keys:
        h.update(k)
    words = np.frombuffer(h.digest(), dtype=np.uint32)
    return np.random.default_rng([seed & 0xFFFFFFFF, *words.tolist()])


_ROW_RNG_TAG = 0x726F77  # "row": keeps these streams apart from batch_rng's
_U64 = (1 << 64) - 1


def row_rng(seed: int, epoch: int, row_key: int) -> np.random.Generator:
    """The rng for dynamic masking: masks drawn at load time from (seed, epoch, row), so a
    row gets a new mask every epoch, the same one on a rerun, and the same one whichever
    worker or batch it lands in. `row_key` identifies the row (an index or a content
    hash); values are taken modulo 2**64.

    Each value is encoded as exactly two 32-bit words: SeedSequence splits a list of ints
    into a variable number of words and zero-pads short entropy, so e.g. [s, 2**32, 0] and
    [s, 0, 1] would give the same stream."""
    values = np.array([_ROW_RNG_TAG, seed & _U64, epoch & _U64, row_key & _U64], dtype=np.uint64)
    return np.random.default_rng(values.view(np.uint32))


# --- registry ------------------------------------------------------------------------

STRATEGIES = {
    "random": mask_random,
    "whole_word": mask_whole_word,
    "span": mask_span,
    "terms": mask_terms,
}


def apply(
    strategy: str,
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    word_start: np.ndarray | None = None,
    term_ids: list[np.ndarray] | None = None,
    rate: float,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
    **opts,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the strategy named `strategy` with the inputs it needs, so the prepare stage
    has one call for all of them. `word_start` is required by whole_word and span (and
    restricts terms to whole words when given); `term_ids` by terms. `opts` are the
    strategy's own options (span: geometric_p, max_span; terms: term_rate); one the
    strategy does not take is a TypeError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    common = dict(
        rate=rate, mask_fraction=mask_fraction, random_fraction=random_fraction,
        mask_id=mask_id, random_ids=random_ids, **opts,
    )
    if strategy == "random":
        return mask_random(ids, maskable, rng, **common)
    if strategy == "terms":
        if term_ids is None:
            raise ValueError("masking strategy 'terms' needs term_ids")
        return mask_terms(ids, maskable, term_ids, rng, word_start=word_start, **common)
    if word_start is None:
        raise ValueError(f"masking strategy {strategy!r} needs word_start")
    return STRATEGIES[strategy](ids, maskable, word_start, rng, **common)


# --- one object for the data stage (static) and the training loop (dynamic) -------------


class Masker:
    """A masking strategy bound to a tokenizer's tables, built from plain data (`spec`) so
    it travels to Ray workers in a config: the prepare stage masks batches with it
    (static masking), the training loop masks rows at load time (dynamic masking)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.strategy = spec.get("strategy", "random")
        self.special = np.asarray(spec["special_ids"], np.int32)
        self.mask_id = int(spec["mask_id"])
        self.random_ids = np.setdiff1d(np.arange(spec["vocab_size"], dtype=np.int32), self.special)
        self.word_start = np.asarray(spec["word_start"], bool)
        self.term_ids = [np.asarray(t, np.int32) for t in spec.get("term_ids", [])]
        self.common = {k: spec[k] for k in ("rate", "mask_fraction", "random_fraction")}
        if self.strategy == "span":
            self.common |= {"geometric_p": spec["span_geometric_p"], "max_span": spec["span_max_words"]}
        elif self.strategy == "terms":
            self.common["term_rate"] = spec["term_rate"]

    def __call__(self, ids: np.ndarray, num_tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Mask a batch [rows, seq_len] with one rng; padding and specials are never picked."""
        maskable = (np.arange(ids.shape[1])[None, :] < num_tokens[:, None]) & ~np.isin(ids, self.special)
        return apply(
            self.strategy, ids, maskable, rng, word_start=self.word_start[ids], term_ids=self.term_ids,
            mask_id=self.mask_id, random_ids=self.random_ids, **self.common,
        )

    def dynamic(self, ids: np.ndarray, num_tokens: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic masking at load time: each row is masked with its own rng drawn from
        (seed, epoch, row content), so a row gets a new mask every epoch, the same one on
        a rerun or a resume, whichever worker or batch it lands in."""
        out_ids, labels = np.empty_like(ids), np.empty_like(ids)
        for i in range(len(ids)):
            key = int.from_bytes(hashlib.blake2b(ids[i].tobytes(), digest_size=8).digest(), "big")
            out_ids[i : i + 1], labels[i : i + 1] = self(ids[i : i + 1], num_tokens[i : i + 1], row_rng(seed, epoch, key))
        return out_ids, labels
