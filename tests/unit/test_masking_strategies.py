"""Statistics and invariants of the masking strategies on ~110k maskable tokens.

The toy vocabulary: ids 0-4 are specials, 5-599 begin a word, 600-999 are "##" pieces,
so about 40% of tokens continue a word and whole-word logic has real work to do."""

import numpy as np
import pytest

from mlm.masking import (
    IGNORE_INDEX, STRATEGIES, apply, mask_random, mask_span, mask_terms,
    row_rng, word_start_table,
)

PAD, UNK, CLS, SEP, MASK_ID = 0, 1, 2, 3, 4
SPECIAL = np.array([PAD, UNK, CLS, SEP, MASK_ID])
VOCAB = 1000
FIRST_PIECE = 600
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, FIRST_PIECE)] + [
    f"##p{i}" for i in range(FIRST_PIECE, VOCAB)
]
TABLE = word_start_table(TOKENS)
TERMS = [np.array([10, 11, 12]), np.array([20, 650]), np.array([30])]  # 3 words, word + piece, 1 word
KW = dict(mask_fraction=0.8, random_fraction=0.1, mask_id=MASK_ID, random_ids=np.arange(5, VOCAB, dtype=np.int32))
RATE_TOL = 0.01  # the acceptance bound: rate within ±1% (absolute)


def _data(n_rows=1000, seq_len=128, seed=7, n_terms=3000):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n_rows, seq_len), dtype=np.int32)
    # Plant term occurrences (later ones may overwrite parts of earlier ones: fine, the
    # reference finder below works on the final ids).
    for t, r, c in zip(rng.integers(0, len(TERMS), n_terms), rng.integers(0, n_rows, n_terms),
                       rng.integers(1, seq_len - 4, n_terms)):
        ids[r, c:c + len(TERMS[t])] = TERMS[t]
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::3, 60] = SEP  # a document boundary inside some rows, as packing makes
    ids[-50:, 99], ids[-50:, 100:] = SEP, PAD  # padding in some rows
    maskable = ~np.isin(ids, SPECIAL)
    return ids, maskable, TABLE[ids]


DATA = _data()


def _apply(strategy, seed, rate=0.15, data=DATA, **opts):
    ids, maskable, word_start = data
    return apply(strategy, ids, maskable, np.random.default_rng(seed), word_start=word_start,
                 term_ids=TERMS, rate=rate, **KW, **opts)


def _continues_word(maskable, word_start):
    """[rows, seq_len - 1]: True where token i+1 is a piece of the same word as token i."""
    return maskable[:, :-1] & maskable[:, 1:] & ~word_start[:, 1:]


def _run_lengths(selected):
    """Lengths of the maximal runs of selected tokens, over all rows."""
    padded = np.zeros((selected.shape[0], selected.shape[1] + 2), np.int8)
    padded[:, 1:-1] = selected
    d = np.diff(padded, axis=1)
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)  # both in row-major order


def _reference_occurrences(ids, maskable, terms):
    """Bool [rows, seq_len]: tokens covered by some occurrence of a term on maskable
    tokens, found by comparing shifted columns (independent of the implementation)."""
    covered = np.zeros(ids.shape, bool)
    seq_len = ids.shape[1]
    for t in terms:
        n = seq_len - len(t) + 1
        hit = np.ones((ids.shape[0], n), bool)
        for j, tok in enumerate(t):
            hit &= (ids[:, j:j + n] == tok) & maskable[:, j:j + n]
        for j in range(len(t)):
            covered[:, j:j + n] |= hit
    return covered


def test_registry_lists_the_strategies():
    assert set(STRATEGIES) == {"random", "whole_word", "span", "terms"}


def test_data_is_big_enough_and_has_words_across_specials():
    ids, maskable, word_start = DATA
    assert maskable.sum() >= 100_000
    assert _continues_word(maskable, word_start).mean() > 0.3
    # "##" pieces right after a special token exist, so "a word never spans a special" is exercised
    assert (~maskable[:, :-1] & maskable[:, 1:] & ~word_start[:, 1:]).sum() > 100


@pytest.mark.parametrize("rate", [0.15, 0.3])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_rate_and_80_10_10(strategy, rate):
    ids, maskable, _ = DATA
    out, labels = _apply(strategy, seed=1, rate=rate)
    assert out.dtype == np.int32 and labels.dtype == np.int32 and out.shape == ids.shape
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum() / maskable.sum() - rate) < RATE_TOL
    np.testing.assert_array_equal(labels[selected], ids[selected])  # labels hold the originals
    as_mask = (out == MASK_ID) & selected
    kept = (out == ids) & selected
    randomized = selected & ~as_mask & ~kept
    n = selected.sum()
    assert abs(as_mask.sum() / n - 0.8) < 0.02
    assert abs(randomized.sum() / n - 0.1) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert (out[~selected] == ids[~selected]).all()  # nothing else changes


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_specials_and_padding_never_selected(strategy):
    ids, maskable, _ = DATA
    out, labels = _apply(strategy, seed=2, rate=0.5)
    assert (labels != IGNORE_INDEX).any()
    assert (labels[~maskable] == IGNORE_INDEX).all()
    assert (out[~maskable] == ids[~maskable]).all()
    replaced = (out != ids) & (out != MASK_ID)
    assert not np.isin(out[replaced], SPECIAL).any()  # random tokens are never special


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_same_seed_same_output_and_other_seed_differs(strategy):
    a, b, c = (_apply(strategy, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[1] != c[1]).any()


def test_budgeted_strategies_hit_the_rate_per_row():
    # whole_word and terms fill a per-row budget, so rows scatter around the rate far less
    # than with independent per-token draws (spans are too long to show this as clearly).
    ids, maskable, _ = DATA

    def mean_row_miss(strategy):
        _, labels = _apply(strategy, seed=5, rate=0.15)
        return np.abs((labels != IGNORE_INDEX).sum(axis=1) - 0.15 * maskable.sum(axis=1)).mean()

    random_miss = mean_row_miss("random")  # about 3 tokens per 120-token row
    assert mean_row_miss("whole_word") < 0.4 * random_miss
    assert mean_row_miss("terms") < 0.4 * random_miss


@pytest.mark.parametrize("strategy", ["whole_word", "span"])
@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_words_are_selected_whole(strategy, rate):
    ids, maskable, word_start = DATA
    _, labels = _apply(strategy, seed=6, rate=rate)
    selected = labels != IGNORE_INDEX
    same_word = _continues_word(maskable, word_start)
    # each piece has the fate of the token before it in the same word: all pieces or none
    np.testing.assert_array_equal(selected[:, 1:][same_word], selected[:, :-1][same_word])
    # a "##" piece right after a special token is a word of its own and still gets picked
    after_special = ~maskable[:, :-1] & maskable[:, 1:] & ~word_start[:, 1:]
    assert selected[:, 1:][after_special].any()


def test_random_strategy_splits_words():
    # the whole-word test above can fail: token-level masking breaks words apart
    ids, maskable, word_start = DATA
    _, labels = _apply("random", seed=6)
    selected = labels != IGNORE_INDEX
    same_word = _continues_word(maskable, word_start)
    assert (selected[:, 1:][same_word] != selected[:, :-1][same_word]).any()


def test_spans_are_long_contiguous_runs():
    _, span_labels = _apply("span", seed=7, rate=0.15)
    _, word_labels = _apply("whole_word", seed=7, rate=0.15)
    span_runs = _run_lengths(span_labels != IGNORE_INDEX)
    word_runs = _run_lengths(word_labels != IGNORE_INDEX)
    assert (span_runs >= 5).sum() > 1000  # many contiguous multi-word runs exist
    assert span_runs.mean() > 3.0  # tokens; SpanBERT's mean span is 3.8 words
    assert span_runs.mean() > 2 * word_runs.mean()


def test_span_lengths_follow_the_options():
    # geometric_p=1 gives one-word spans: runs are no longer than whole-word masking's
    ids, maskable, word_start = DATA
    one = mask_span(ids, maskable, word_start, np.random.default_rng(8), rate=0.15, geometric_p=1.0, **KW)
    geo = mask_span(ids, maskable, word_start, np.random.default_rng(8), rate=0.15, max_span=10, **KW)
    capped = mask_span(ids, maskable, word_start, np.random.default_rng(8), rate=0.15, max_span=2, **KW)
    one_runs, geo_runs, capped_runs = (_run_lengths(x[1] != IGNORE_INDEX).mean() for x in (one, geo, capped))
    assert one_runs < 2.5 < capped_runs < geo_runs - 1


def test_spans_stop_at_special_tokens():
    # one-token words in runs of 4 between [SEP]s: a span may cover a whole run but must
    # not go on past the [SEP], so the tokens on either side are picked independently.
    ids = np.random.default_rng(14).integers(5, FIRST_PIECE, size=(1000, 128), dtype=np.int32)
    ids[:, ::5] = SEP
    maskable = ~np.isin(ids, SPECIAL)
    _, labels = mask_span(ids, maskable, TABLE[ids], np.random.default_rng(14), rate=0.15, **KW)
    selected = labels != IGNORE_INDEX
    before_sep, after_sep = selected[:, 4:-1:5], selected[:, 6::5]  # around each inner [SEP]
    neighbours = maskable[:, :-1] & maskable[:, 1:]  # two maskable tokens side by side
    left, right = selected[:, :-1][neighbours], selected[:, 1:][neighbours]
    p_across = after_sep[before_sep].mean()
    p_within = right[left].mean()
    assert p_within > 0.6  # spans do run over neighbouring words
    assert p_across < 0.3  # but not over a [SEP] (the base rate is 0.15)


def test_span_rejects_bad_options():
    ids, maskable, word_start = DATA
    with pytest.raises(ValueError, match="geometric_p"):
        mask_span(ids, maskable, word_start, np.random.default_rng(0), rate=0.15, geometric_p=0.0, **KW)
    with pytest.raises(ValueError, match="max_span"):
        mask_span(ids, maskable, word_start, np.random.default_rng(0), rate=0.15, max_span=0, **KW)


def test_terms_with_term_rate_1_select_every_occurrence_and_nothing_else():
    ids, maskable, _ = DATA
    expected = _reference_occurrences(ids, maskable, TERMS)
    assert expected.sum() > 3000
    # rate=0: no top-up, so the selection is exactly the occurrences
    _, labels = mask_terms(ids, maskable, TERMS, np.random.default_rng(9), rate=0.0, term_rate=1.0, **KW)
    np.testing.assert_array_equal(labels != IGNORE_INDEX, expected)
    # with a top-up every occurrence is still fully selected
    _, labels = mask_terms(ids, maskable, TERMS, np.random.default_rng(9), rate=0.15, term_rate=1.0, **KW)
    assert (labels != IGNORE_INDEX)[expected].all()


def test_terms_on_non_maskable_tokens_are_not_matched():
    # a term holding [UNK] (an entity with an unknown character) matches no maskable
    # tokens; nor does a term over a token the caller marked unmaskable (column 6)
    ids = np.array([[CLS, 10, 11, 12, 40, UNK, 10, 11, 12, 30, SEP]], np.int32)
    maskable = ~np.isin(ids, SPECIAL)
    maskable[0, 6] = False
    _, labels = mask_terms(ids, maskable, TERMS + [np.array([40, UNK])], np.random.default_rng(0),
                           rate=0.0, term_rate=1.0, **KW)
    np.testing.assert_array_equal(labels[0] != IGNORE_INDEX, [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])


def test_terms_with_word_start_match_whole_words_only():
    # [30] followed by a "##" piece is part of a longer word; [20, 650] ends at a word end
    ids = np.array([[CLS, 30, 700, 20, 650, 30, 20, 650, 701, SEP]], np.int32)
    maskable = ~np.isin(ids, SPECIAL)
    _, labels = mask_terms(ids, maskable, TERMS, np.random.default_rng(0), rate=0.0, term_rate=1.0,
                           word_start=TABLE[ids], **KW)
    np.testing.assert_array_equal(labels[0] != IGNORE_INDEX, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])


def test_term_rate_picks_whole_occurrences_at_that_rate():
    ids, maskable, _ = DATA
    _, labels = mask_terms(ids, maskable, [TERMS[0]], np.random.default_rng(10), rate=0.0, term_rate=0.5, **KW)
    selected = labels != IGNORE_INDEX
    # [10, 11, 12] cannot overlap itself, so each occurrence is all-or-none
    n = ids.shape[1] - 2
    starts = (ids[:, :n] == 10) & (ids[:, 1:n + 1] == 11) & (ids[:, 2:] == 12)
    picked = [selected[:, j:j + n][starts] for j in range(3)]
    np.testing.assert_array_equal(picked[0], picked[1])
    np.testing.assert_array_equal(picked[0], picked[2])
    assert starts.sum() > 800
    assert abs(picked[0].mean() - 0.5) < 0.05
    assert selected.sum() == 3 * picked[0].sum()  # nothing outside the occurrences


def test_terms_above_the_rate_get_no_top_up():
    # every row is half term tokens, more than rate=0.3: the selection is the terms alone
    ids = np.full((200, 128), 40, np.int32)
    for c in range(1, 120, 6):
        ids[:, c:c + 3] = TERMS[0]
    ids[:, 0], ids[:, -1] = CLS, SEP
    maskable = ~np.isin(ids, SPECIAL)
    _, labels = mask_terms(ids, maskable, TERMS, np.random.default_rng(11), rate=0.3, term_rate=1.0, **KW)
    np.testing.assert_array_equal(labels != IGNORE_INDEX, _reference_occurrences(ids, maskable, TERMS))


def test_mask_random_is_unchanged():
    # the pre-refactor mask_random, inlined: same draws in the same order
    ids, maskable, _ = DATA
    rng = np.random.default_rng(12)
    selected = (rng.random(ids.shape) < 0.15) & maskable
    labels = np.where(selected, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    out = ids.copy()
    out[to_mask] = MASK_ID
    out[to_random] = KW["random_ids"][rng.integers(0, len(KW["random_ids"]), size=int(to_random.sum()))]
    got = mask_random(ids, maskable, np.random.default_rng(12), rate=0.15, **KW)
    np.testing.assert_array_equal(got[0], out)
    np.testing.assert_array_equal(got[1], labels)


def test_apply_dispatches_and_checks_inputs():
    ids, maskable, word_start = DATA
    direct = mask_span(ids, maskable, word_start, np.random.default_rng(13), rate=0.15, max_span=4, **KW)
    via = _apply("span", seed=13, max_span=4)
    np.testing.assert_array_equal(direct[0], via[0])
    np.testing.assert_array_equal(direct[1], via[1])
    with pytest.raises(ValueError, match="unknown masking strategy 'zigzag'"):
        _apply("zigzag", seed=0)
    with pytest.raises(ValueError, match="needs word_start"):
        apply("whole_word", ids, maskable, np.random.default_rng(0), rate=0.15, **KW)
    with pytest.raises(ValueError, match="needs term_ids"):
        apply("terms", ids, maskable, np.random.default_rng(0), rate=0.15, **KW)
    with pytest.raises(TypeError):
        _apply("whole_word", seed=0, max_span=4)  # an option the strategy does not take


def test_word_start_table_marks_wordpiece_continuations():
    np.testing.assert_array_equal(word_start_table(["[CLS]", "play", "##ing", "#", "##"]),
                                  [True, True, False, True, False])


def test_row_rng_is_deterministic_and_differs_across_epochs_rows_and_seeds():
    draw = lambda *a: row_rng(*a).random(4)  # noqa: E731
    np.testing.assert_array_equal(draw(0, 1, 5), draw(0, 1, 5))
    base = draw(0, 1, 5)
    for other in [(0, 2, 5), (0, 1, 6), (1, 1, 5)]:
        assert (base != draw(*other)).any(), other
    # fixed-width encoding: a big epoch must not alias a small (epoch, row_key) pair
    assert (draw(0, 2**32, 0) != draw(0, 0, 1)).any()
    assert (draw(0, 0, 2**63 + 1) != draw(0, 0, 1)).any()


def test_dynamic_masking_changes_every_epoch_and_repeats_on_rerun():
    ids, maskable, word_start = DATA

    def epoch_labels(epoch):
        return np.concatenate([
            apply("whole_word", ids[i:i + 1], maskable[i:i + 1], row_rng(0, epoch, i),
                  word_start=word_start[i:i + 1], rate=0.15, **KW)[1]
            for i in range(50)
        ])

    e1, e1_again, e2 = epoch_labels(1), epoch_labels(1), epoch_labels(2)
    np.testing.assert_array_equal(e1, e1_again)
    assert ((e1 != e2).any(axis=1)).mean() > 0.9  # nearly every row gets a new mask


def test_edge_cases_empty_and_unmaskable_rows():
    for strategy in STRATEGIES:
        empty = np.zeros((0, 16), np.int32)
        out, labels = apply(strategy, empty, empty.astype(bool), np.random.default_rng(0),
                            word_start=empty.astype(bool), term_ids=TERMS, rate=0.15, **KW)
        assert out.shape == labels.shape == (0, 16)
        pads = np.zeros((3, 16), np.int32)
        out, labels = apply(strategy, pads, pads.astype(bool), np.random.default_rng(0),
                            word_start=pads.astype(bool), term_ids=TERMS, rate=0.15, **KW)
        assert (labels == IGNORE_INDEX).all() and (out == pads).all()


def test_dynamic_masking_depends_on_seed_epoch_and_row_only():
    from mlm.masking import IGNORE_INDEX, Masker

    vocab = 500
    spec = {"strategy": "random", "rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1, "seed": 7,
            "special_ids": [0, 1, 2, 3, 4], "mask_id": 4, "vocab_size": vocab, "word_start": [True] * vocab}
    masker = Masker(spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(64, 128)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    n = np.full(64, 128, np.int32)
    a_ids, a_labels = masker.dynamic(ids, n, seed=7, epoch=0)
    # the same rows in another batch order, and split over two "workers": same masks
    order = rng.permutation(64)
    b_ids, b_labels = masker.dynamic(ids[order], n[order], seed=7, epoch=0)
    assert (b_ids == a_ids[order]).all() and (b_labels == a_labels[order]).all()
    c_ids, _ = masker.dynamic(ids[:10], n[:10], seed=7, epoch=0)
    assert (c_ids == a_ids[:10]).all()
    # a new epoch is a new mask; the rate holds; specials are never picked
    e_ids, e_labels = masker.dynamic(ids, n, seed=7, epoch=1)
    assert (e_labels != a_labels).any()
    assert abs((a_labels != IGNORE_INDEX).mean() - 0.15 * 126 / 128) < 0.02
    assert (a_labels[:, [0, -1]] == IGNORE_INDEX).all()
    assert (np.where(a_labels != IGNORE_INDEX, a_labels, ids) == ids).all()
