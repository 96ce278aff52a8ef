"""The fused read-tokenize-pack-mask stage, run in this process (no Ray)."""

import itertools
import os

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlm import corpus, prepare
from mlm.config import TokenizerConfig, load_config
from mlm.tokenizer import load_view, save_tokenizer, train_tokenizer


def _run_stage(tmp_path, parallel_encode: bool) -> list[pa.Table]:
    """The stage's summary rows; it writes the shards to tmp_path/out-{parallel_encode}."""
    docs = list(itertools.islice(corpus._python_docs(), 300))  # the first ones come without parsing the stdlib
    src = tmp_path / "docs.txt"
    if not src.exists():
        src.write_text("\n\n".join(docs), encoding="utf-8")
        save_tokenizer(train_tokenizer(docs, TokenizerConfig(vocab_size=512)), tmp_path / "tok")
    cfg = load_config("tiny", ["data.seq_len=64", "data.rows_per_shard=20"])
    tok = load_view(tmp_path / "tok")
    files, _ = corpus.resolve_inputs([str(src)], tmp_path)
    ranges = corpus.plan_ranges(files, 64 << 10)
    assert len(ranges) > 1
    evals = {"strategy": "random", "rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1, "seed": 1}
    stage = prepare.TokenizePackMask(
        (tmp_path / "tok" / "tokenizer.json").read_text(),
        {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id},
        cfg.data.model_dump(),
        {"train": prepare.masker_spec(tok, cfg.masking.model_dump(), []), "validation": prepare.masker_spec(tok, evals, [])},
        dynamic_train=False,
        out_dir=str(tmp_path / f"out-{parallel_encode}"),
        vocab_size=len(tok),
        parallel_encode=parallel_encode,
    )
    jobs = [{"index": i, "range": r.to_dict(), "skip": [], "bytes": r.end - r.start} for i, r in enumerate(ranges)]
    return [t for job in jobs for t in stage(pa.Table.from_pylist([job]))]


def test_one_thread_per_actor_gives_the_same_sequences(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # restored after the test
    threaded = _run_stage(tmp_path, parallel_encode=True)
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    single = _run_stage(tmp_path, parallel_encode=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # the Rust pool is off in this process
    assert len(threaded) == len(single) > 2
    for a, b in zip(threaded, single):
        assert a.equals(b)  # same shard names, hashes, counts
    entries = [x for t in single for x in json.loads(t.column("shards")[0].as_py())["train"]]
    assert len(entries) > 2 and len({x["file"] for x in entries}) == len(entries)
    rows = 0
    for x in entries:  # every shard committed under its name, with the hash and rows listed
        path = tmp_path / "out-False" / x["file"]
        assert prepare.shards.sha256_file(path) == x["sha256"] == prepare.shards.sha256_file(tmp_path / "out-True" / x["file"])
        table = pq.read_table(path)
        assert table.num_rows == x["rows"] <= 20
        rows += table.num_rows
        assert prepare.shards.column_2d(table, "input_ids").shape == (x["rows"], 64)
    assert rows > 10
    assert not [p for p in (tmp_path / "out-False").iterdir() if ".tmp" in p.name]  # nothing half written
    counts = sum(np.frombuffer(t.column("token_counts")[0].as_py(), np.int64) for t in single)
    assert counts.shape == (len(load_view(tmp_path / "tok")),) and counts.sum() > 0
