import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlm.shards import (
    MANIFEST, SCHEMA_VERSION, DatasetError, ShardWriter, column_2d, read_manifest, sha256_file, shard_paths, to_table,
    verify, write_manifest,
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
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "splits": {"train": {"shards": lst}}})
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
