import pytest

from mlm.config import TokenizerConfig
from mlm.corpus import _python_docs
from mlm.tokenizer import TokenizerError, fingerprint, load_tokenizer, save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def texts():
    docs = []
    for d in _python_docs():
        docs.append(d)
        if len(docs) == 300:
            return docs


def test_train_save_load_round_trip(texts, tmp_path):
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=1000, min_frequency=2))
    assert len(tok) == 1000
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == 1000  # transformers 5 must not fall back to a 5-token vocabulary
    assert fingerprint(loaded) == fingerprint(load_tokenizer(tmp_path / "tok"))
    enc = loaded("The return statement leaves a function.")["input_ids"]
    assert enc[0] == loaded.cls_token_id and enc[-1] == loaded.sep_token_id
    assert loaded.unk_token_id not in enc[1:-1]
    assert loaded.mask_token == "[MASK]"


def test_fingerprint_changes_with_vocabulary(texts, tmp_path):
    a = train_tokenizer(texts, TokenizerConfig(vocab_size=800))
    b = train_tokenizer(texts, TokenizerConfig(vocab_size=900))
    save_tokenizer(a, tmp_path / "a")
    save_tokenizer(b, tmp_path / "b")
    assert fingerprint(load_tokenizer(tmp_path / "a")) != fingerprint(load_tokenizer(tmp_path / "b"))


def test_load_rejects_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_every_kind_has_bert_specials_and_word_starts(texts, tmp_path, kind):
    from mlm.tokenizer import word_start_table

    save_tokenizer(train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=700)), tmp_path / kind)
    tok = load_tokenizer(tmp_path / kind)
    assert len(tok) == 700
    ids = tok("the function returns")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.mask_token == "[MASK]"
    starts = word_start_table(tok)
    assert starts.shape == (700,) and starts[ids[1]]  # "the" begins a word
    assert not starts.all()  # some pieces continue a word


def test_byte_level_bpe_training_is_deterministic(texts):
    """BPE with its fixed byte alphabet gives the same ids run after run. (WordPiece and
    unigram training in `tokenizers` break ties in hash-map order; prepare reuses an
    interrupted run's tokenizer instead, tested in integration/test_prepare.py.)"""
    vocabs = [train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=700)).get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
