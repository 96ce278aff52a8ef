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
