"""The fused read-tokenize-pack-mask stage, run in this process (no Ray)."""

import itertools
import os

import numpy as np
import pyarrow as pa

from mlm import corpus, prepare
from mlm.config import TokenizerConfig, load_config
from mlm.tokenizer import load_view, save_tokenizer, train_tokenizer


def _run_stage(tmp_path, parallel_encode: bool) -> list[pa.Table]:
    docs = list(itertools.islice(corpus._python_docs(), 300))  # the first ones come without parsing the stdlib
    src = tmp_path / "docs.txt"
    if not src.exists():
        src.write_text("\n\n".join(docs), encoding="utf-8")
        save_tokenizer(train_tokenizer(docs, TokenizerConfig(vocab_size=512)), tmp_path / "tok")
    cfg = load_config("tiny", ["data.seq_len=64"])
    tok = load_view(tmp_path / "tok")
    files, _ = corpus.resolve_inputs([str(src)], tmp_path)
    ranges = corpus.plan_ranges(files, 64 << 10)
    assert len(ranges) > 1
    evals = {"strategy": "random", "rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1, "seed": 1}
    stage = prepare.TokenizePackMask(
        str(tmp_path / "tok" / "tokenizer.json"),
        {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id},
        cfg.data.model_dump(),
        {"train": prepare.masker_spec(tok, cfg.masking.model_dump(), []), "validation": prepare.masker_spec(tok, evals, [])},
        dynamic_train=False,
        parallel_encode=parallel_encode,
    )
    jobs = [{"range": r.to_dict(), "skip": [], "bytes": r.end - r.start} for r in ranges]
    return [t for job in jobs for t in stage(pa.Table.from_pylist([job]))]


def test_one_thread_per_actor_gives_the_same_sequences(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # restored after the test
    threaded = _run_stage(tmp_path, parallel_encode=True)
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    single = _run_stage(tmp_path, parallel_encode=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # the Rust pool is off in this process
    assert len(threaded) == len(single) > 2
    rows = sum(t.num_rows for t in threaded if t.column("split")[0].as_py() == "train")
    assert rows > 10
    for a, b in zip(threaded, single):
        assert a.equals(b)
    ids = np.concatenate([prepare.shards.column_2d(t, "input_ids") for t in single if t.column("split")[0].as_py() == "train"])
    assert ids.shape == (rows, 64)
