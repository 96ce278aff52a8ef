import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlm.shards import (
    MANIFEST, SCHEMA_VERSION, DatasetError, Manifest, ShardWriter, column_2d, read_manifest, sha256_file, shard_paths,
    to_table, verify,
)


def _table(n, seq_len=16, start=0):
    ids = (np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) + start) % 1000
    labels = np.where(ids % 7 == 0, ids, -100).astype(np.int32)
    return to_table(ids, labels, np.full(n, seq_len, np.int32))


def _dataset(tmp_path, rows=(7, 5, 9), rows_per_shard=6):
    w = ShardWriter(tmp_path, "train", rows_per_shard)
    for i, n in enumerate(rows):
        w.add(_table(n, start=100 * i))
    lst = w.close()
    Manifest.of_shards({"train": lst}, seq_len=16).write(tmp_path)
    return lst


def test_writer_cuts_exact_shards_with_hashes(tmp_path):
    lst = _dataset(tmp_path)
    assert [s["rows"] for s in lst] == [6, 6, 6, 3]
    assert [s["file"] for s in lst] == [f"train-00000-00{i}.parquet" for i in range(4)]
    for s in lst:
        table = pq.read_table(tmp_path / s["file"])
        assert table.num_rows == s["rows"] and s["sha256"] == sha256_file(tmp_path / s["file"])
        assert s["masked"] == int((column_2d(table, "labels") != -100).sum())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    # rows come back in order, slices included
    all_ids = np.concatenate([column_2d(pq.read_table(tmp_path / s["file"]), "input_ids") for s in lst])
    expected = np.concatenate([column_2d(_table(n, start=100 * i), "input_ids") for i, n in enumerate((7, 5, 9))])
    np.testing.assert_array_equal(all_ids, expected)


def test_no_manifest_no_dataset(tmp_path):
    _dataset(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(DatasetError, match="is not a dataset"):
        read_manifest(tmp_path)
    assert verify(tmp_path)


def test_corrupt_and_missing_shards_are_named(tmp_path):
    lst = _dataset(tmp_path)
    assert verify(tmp_path) == []
    target = tmp_path / lst[1]["file"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"corrupt shard.*{lst[1]['file']}"):
        shard_paths(tmp_path, "train")
    target.unlink()
    assert any(lst[1]["file"] in p and "missing" in p for p in verify(tmp_path))


def test_manifest_is_json_with_schema_version(tmp_path):
    _dataset(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["schema_version"] == SCHEMA_VERSION


# A manifest as `mlm prepare` writes it (schema_version 1), keys and nesting as stored.
STORED = {
    "schema_version": 1, "created_unix": 1700000000, "inputs_fingerprint": "0123456789abcdef",
    "inputs": [{"path": "/data/a.txt", "blake2b": "ff", "size": 10, "kind": "txt", "mtime": 1.0}],
    "skipped_files": {"binary": ["/data/b.bin"]},
    "config": {"data": {"seq_len": 16}, "tokenizer": {}, "masking": {}, "eval": {}},
    "tokenizer": {"dir": "tokenizer", "fingerprint": "abc", "vocab_size": 1000, "trained": True},
    "schema": {"input_ids": "...", "labels": "...", "num_tokens": "..."},
    "seq_len": 16, "packing": "pack",
    "masking": {"train": {"strategy": "random", "rate": 0.15, "mode": "static", "term_ids": []},
                "validation": {"strategy": "random", "rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1,
                               "seed": 1234, "mode": "static"}},
    "splits": {"train": {"shards": [{"file": "train-00000-000.parquet", "rows": 6, "tokens": 90, "masked": 12,
                                     "sha256": "aa"}], "rows": 6, "tokens": 90, "masked": 12, "documents": 3},
               "validation": {"shards": [], "rows": 0, "tokens": 0, "masked": 0, "documents": 0}},
    "documents": {"kept": 3, "dropped": {"empty": 1}, "repaired_invalid_utf8": 0, "decoded_as_latin1": 0},
    "ranges": 1, "nodes_used": 1,
    "increments": [{"created_unix": 1700000000, "files_added": 1, "shards_added": {"train": 1, "validation": 0}}],
    "most_frequent_token": {"id": 5, "token": "the"}, "seconds": 1.5, "fingerprint": "fedcba9876543210",
}


def test_manifest_is_typed_and_round_trips_the_stored_json(tmp_path):
    m = Manifest.from_dict(STORED)
    assert m.splits["train"].shards[0].sha256 == "aa" and m.tokenizer.vocab_size == 1000
    assert m.most_frequent_token.token == "the" and m.documents.dropped == {"empty": 1}
    assert m.to_dict() == STORED
    m.write(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text()) == STORED  # the format on disk is unchanged
    assert Manifest.read(tmp_path) == m


def test_older_and_newer_manifests_load():
    """Keys added later have defaults (a dataset from before them loads); keys this
    version does not know are kept through a round trip."""
    old = {k: v for k, v in STORED.items() if k not in ("packing", "increments", "nodes_used")}
    m = Manifest.from_dict(old)
    assert (m.packing, m.increments, m.nodes_used) == ("pack", [], 0)
    newer = STORED | {"future_field": {"x": 1}}
    assert Manifest.from_dict(newer).to_dict() == newer
    with pytest.raises(DatasetError, match="malformed manifest"):
        Manifest.from_dict({k: v for k, v in STORED.items() if k != "splits"})
