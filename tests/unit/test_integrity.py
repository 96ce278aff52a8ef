"""Integrity without re-reading: shards carry Parquet page checksums that every read
checks, so train and evaluate start without hashing the dataset; the full sha256 pass is
prepare's and `mlm data verify`'s."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlm import shards, storage
from mlm.loader import EpochPlan, row_groups, worker_batches
from mlm.shards import DatasetError, Manifest, ShardWriter, column_2d, to_table


def _table(n, seq_len=16, start=0):
    ids = (np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) * 7 + start) % 1000
    labels = np.where(ids % 5 == 0, ids, -100).astype(np.int32)
    return to_table(ids, labels, np.full(n, seq_len, np.int32))


def _dataset(root, rows=(40, 40, 40), split="train"):
    """Three shards of one row group each, listed in a manifest (as `mlm prepare` lists them)."""
    w = ShardWriter(root, split, rows_per_shard=40)
    for i, n in enumerate(rows):
        w.add(_table(n, start=100 * i))
    lst = w.close()
    Manifest.of_shards({split: lst}, seq_len=16).write(root)
    return lst


def corrupt_page(path, row_group=0):
    """Flip one bit in the last byte of `row_group`'s input_ids column chunk: inside its
    last data page's (compressed) values, file size, footer and page headers unchanged.
    Read without checksums, such a page may well decode to wrong tokens without a word
    (zstd frames carry no checksum of their own)."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start + meta.total_compressed_size - 1] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.fixture
def sha256_calls(monkeypatch):
    """Every storage.sha256 call (the real function runs): the whole-file reads."""
    calls = []
    real = storage.sha256

    def counted(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(storage, "sha256", counted)
    return calls


def test_shards_are_written_with_page_checksums(tmp_path):
    """A flipped bit in a data page: pyarrow refuses the page by its checksum with
    verification on (the writer stored a CRC32 per page); the other row groups read."""
    w = ShardWriter(tmp_path, "train", rows_per_shard=30_000)
    w.add(_table(20_000))  # row groups of 8,192 rows: 3 of them
    path = tmp_path / w.close()[0]["file"]
    size = path.stat().st_size
    corrupt_page(path, row_group=1)
    assert path.stat().st_size == size
    checked = pq.ParquetFile(path, page_checksum_verification=True)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        checked.read_row_group(1)
    np.testing.assert_array_equal(column_2d(checked.read_row_group(0), "input_ids"),
                                  column_2d(_table(20_000).slice(0, 8192), "input_ids"))


def test_start_up_checks_read_no_shard_data(tmp_path, sha256_calls):
    """What train and evaluate check before they start (`checked_shards`) hashes nothing,
    so a same-size corrupt page passes it; reading that page then fails, naming the shard,
    in the training loader and in the evaluation batches alike."""
    lst = _dataset(tmp_path)
    bad = lst[1]["file"]
    corrupt_page(tmp_path / bad)
    paths = shards.checked_shards(tmp_path, "train")
    assert sha256_calls == [] and [storage.name(p) for p in paths] == [x["file"] for x in lst]

    plan = EpochPlan(row_groups(paths), seed=0, epoch=0, micro_batch=8, world=1, shuffle=False)
    batches = worker_batches(plan, rank=0)
    assert [len(next(batches)) for _ in range(5)] == [8] * 5  # the first shard reads
    with pytest.raises(DatasetError, match=rf"corrupt.*row group 0: .*CRC checksum.*{bad}"):
        next(batches)
    with pytest.raises(DatasetError, match=rf"corrupt.*CRC checksum.*{bad}"):
        list(shards.read_batches(shards.plan_batches(paths, 16)))
    assert sha256_calls == []


def test_start_up_refuses_missing_truncated_and_miscounted_shards(tmp_path, sha256_calls):
    lst = _dataset(tmp_path)
    first, second, third = (tmp_path / x["file"] for x in lst)
    data = third.read_bytes()
    third.write_bytes(data[: len(data) - 100])  # cut short: no footer at the end
    with pytest.raises(DatasetError, match=rf"corrupt shard \(Parquet footer: .*\): .*{third.name}"):
        shards.checked_shards(tmp_path, "train")
    third.write_bytes(data + b"\0" * 10)  # something appended
    with pytest.raises(DatasetError, match=third.name):
        shards.checked_shards(tmp_path, "train")
    third.write_bytes(data)
    second.write_bytes(_table_bytes(39))  # another (sound) shard under its name
    with pytest.raises(DatasetError, match=rf"39 rows, the manifest lists 40\): .*{second.name}"):
        shards.checked_shards(tmp_path, "train")
    second.unlink()
    with pytest.raises(DatasetError, match=rf"missing.*{second.name}"):
        shards.checked_shards(tmp_path, "train")
    assert sha256_calls == []


def _table_bytes(rows):
    import io

    buf = io.BytesIO()
    pq.write_table(_table(rows), buf, **shards.WRITE_OPTIONS)
    return buf.getvalue()


def test_data_verify_still_catches_a_corrupt_page_by_sha256(tmp_path):
    """`mlm data verify` reads every byte: the same-size corrupt page start-up lets through."""
    lst = _dataset(tmp_path)
    corrupt_page(tmp_path / lst[2]["file"])
    run = subprocess.run([sys.executable, "-m", "mlm.cli", "data", "verify", str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "MLM_DEBUG"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"mlm: error: corrupt shard (sha256 mismatch): {tmp_path / lst[2]['file']}"


def test_datasets_written_without_page_checksums_still_load(tmp_path):
    """Shards from before page checksums: nothing to verify, read as before."""
    tables = [_table(40, start=100 * i) for i in range(2)]
    lst = []
    for i, t in enumerate(tables):
        name = shards.shard_name("train", 0, i)
        pq.write_table(t, tmp_path / name, compression="zstd")  # the old writer's options
        lst.append({"file": name, "rows": 40, "tokens": 640, "masked": 0, "sha256": storage.sha256(tmp_path / name)})
    Manifest.of_shards({"train": lst}, seq_len=16).write(tmp_path)
    paths = shards.checked_shards(tmp_path, "train")
    assert shards.verify(tmp_path) == []
    read = list(shards.read_batches(shards.plan_batches(paths, 40)))
    assert [t.equals(x) for t, x in zip(read, tables)] == [True, True]
    plan = EpochPlan(row_groups(paths), seed=0, epoch=0, micro_batch=40, world=1, shuffle=False)
    assert [b.equals(t) for b, t in zip(worker_batches(plan, rank=0), tables)] == [True, True]
