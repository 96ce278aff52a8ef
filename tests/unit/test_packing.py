import numpy as np
import pytest

from mlm.packing import pack, unpack

CLS, SEP, PAD = 2, 3, 0


def _docs(seed, n=200, max_len=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 500, size=rng.integers(1, max_len), dtype=np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [8, 16, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip(seq_len, seed):
    docs = _docs(seed)
    ids, num_tokens = pack(docs, seq_len, CLS, SEP, PAD)
    assert ids.shape[1] == seq_len and ids.dtype == np.int32
    back = unpack(ids, num_tokens, SEP)
    assert len(back) == len(docs)
    for a, b in zip(back, docs):
        np.testing.assert_array_equal(a, b)


def test_layout_only_last_sequence_padded():
    docs = _docs(2, n=50)
    seq_len = 32
    ids, num_tokens = pack(docs, seq_len, CLS, SEP, PAD)
    assert (ids[:, 0] == CLS).all()
    assert (num_tokens[:-1] == seq_len).all() and (ids[:-1] != PAD).all()
    last = num_tokens[-1]
    assert ids[-1, last - 1] == SEP and (ids[-1, last:] == PAD).all()
    total = sum(len(d) + 1 for d in docs)  # each document plus its [SEP]
    assert int((num_tokens - 2).sum()) == total


def test_exact_fit_and_empty_documents():
    seq_len = 10
    docs = [np.arange(5, 12, dtype=np.int32), np.array([], np.int32)]  # 7 tokens + [SEP] = 8 = seq_len - 2
    ids, num_tokens = pack(docs, seq_len, CLS, SEP, PAD)
    assert ids.shape == (1, seq_len) and num_tokens.tolist() == [seq_len]
    assert [d.tolist() for d in unpack(ids, num_tokens, SEP)] == [list(range(5, 12))]
    empty_ids, empty_n = pack([], seq_len, CLS, SEP, PAD)
    assert empty_ids.shape == (0, seq_len) and unpack(empty_ids, empty_n, SEP) == []


def test_pad_documents_one_document_per_row_sorted_by_length():
    from mlm.packing import pad_documents

    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 100, size=n).astype(np.int32) for n in (5, 40, 1, 7, 30, 12)]
    ids, num_tokens = pad_documents(docs, 16, cls_id=2, sep_id=3, pad_id=0)
    assert list(num_tokens) == sorted(num_tokens)
    assert (ids[:, 0] == 2).all()
    pieces = sorted(tuple(row[1 : n - 1]) for row, n in zip(ids, num_tokens))
    assert all(row[n - 1] == 3 and (row[n:] == 0).all() for row, n in zip(ids, num_tokens))
    # every document is there, a long one continued over several rows of at most 14 tokens
    expected = sorted(tuple(d[i : i + 14]) for d in docs for i in range(0, len(d), 14))
    assert pieces == expected
