"""The storage layer on a local folder and on the loopback S3 server: the same calls,
the same results; commits leave no temporary object; a failed write leaves nothing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlm import shards, storage

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    s3 = request.getfixturevalue("s3_server")
    return s3.uri(f"storage-test/{request.node.name}")


def test_files_round_trip_and_commit_cleanly(root):
    path = storage.join(root, "a", "b.bin")
    assert not storage.exists(path) and storage.list_names(root) == []
    storage.write_bytes(path, b"x" * 1000)
    storage.write_bytes(path, b"hello")  # replaced whole
    assert storage.read_bytes(path) == b"hello" and storage.size(path) == 5
    assert storage.is_file(path) and storage.is_dir(storage.join(root, "a"))
    assert storage.sha256(path) == hashlib.sha256(b"hello").hexdigest()
    assert storage.list_names(storage.join(root, "a")) == ["b.bin"]  # no temporary name left
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(storage.join(root, "missing"))
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(path)


def test_failed_output_leaves_nothing(root):
    target = storage.join(root, "out.jsonl")
    with pytest.raises(RuntimeError):
        with storage.output_file(target) as local:
            with open(local, "w") as f:
                f.write("half")
            raise RuntimeError("stopped while writing")
    assert not storage.exists(target) and storage.list_names(root) == []
    with storage.output_file(target) as local:
        with open(local, "w") as f:
            f.write("whole\n")
    assert storage.read_text(target) == "whole\n" and storage.list_names(root) == ["out.jsonl"]


def test_folders_upload_with_the_marker_last_and_come_back(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "weights.bin").write_bytes(np.arange(100, dtype=np.int64).tobytes())
    (src / "sub" / "x.txt").write_text("x")
    dest = storage.join(root, "model")
    storage.put_dir(src, dest, marker="config.json")
    assert storage.list_names(dest) == ["config.json", "sub", "weights.bin"]
    back = storage.get_dir(dest, tmp_path / "back")
    for rel in ("config.json", "weights.bin", "sub/x.txt"):
        assert (tmp_path / "back" / rel).read_bytes() == (src / rel).read_bytes()
    assert back == str(tmp_path / "back")
    with storage.local_dir(dest) as d:
        assert open(f"{d}/sub/x.txt").read() == "x"


def test_a_dataset_on_either_is_read_and_verified_alike(root):
    ids = np.arange(64, dtype=np.int32).reshape(4, 16)
    labels = np.where(ids % 5 == 0, ids, -100).astype(np.int32)
    w = shards.ShardWriter(root, "train", rows_per_shard=3, index=7)
    w.add(shards.to_table(ids, labels, np.full(4, 16, np.int32)))
    lst = w.close()
    assert [x["file"] for x in lst] == ["train-00007-000.parquet", "train-00007-001.parquet"]
    with pytest.raises(shards.DatasetError, match="not a dataset|no such dataset"):
        shards.read_manifest(root)  # shards without a manifest are not a dataset
    shards.Manifest.of_shards({"train": lst}, seq_len=16).write(root)
    paths = shards.shard_paths(root, "train")
    assert [storage.parquet_file(p).metadata.num_rows for p in paths] == [3, 1]
    storage.write_bytes(paths[1], storage.read_bytes(paths[0]))  # corrupt the second shard
    assert any("corrupt shard" in p for p in shards.verify(root))
