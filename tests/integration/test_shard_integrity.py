"""Integrity without re-reading, on a prepared dataset: train and evaluate start without
hashing the shards (on the loopback S3 server too); a corrupt page fails when it is read,
naming the shard; `mlm data verify` still finds it by sha256."""

from __future__ import annotations

import io
import random
import subprocess

import pyarrow.parquet as pq
import pytest

from mlm import shards, storage
from mlm.config import load_config
from mlm.shards import DatasetError

pytestmark = pytest.mark.integration

CRC = "CRC checksum verification failed"


def _docs(n: int, seed: int) -> list[str]:
    import pydoc_data.topics as topics

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(seed)
    return [" ".join(words[s : s + rng.randrange(20, 200)]) for s in (rng.randrange(len(words) - 200) for _ in range(n))]


def _cfg(*overrides: str):
    return load_config("tiny", ["tokenizer.vocab_size=1000", "data.rows_per_shard=200", "data.validation_fraction=0.1",
                                "train.num_workers=1", "train.micro_batch_size=16", "train.global_batch_size=16",
                                "train.max_steps=4", "train.checkpoint_every=4", "train.warmup_steps=1", *overrides])


@pytest.fixture(scope="module")
def data_dir(s3_server, ray_cluster, tmp_path_factory):
    """A small prepared dataset (local; s3_server first, so that Ray's workers reach it)."""
    from mlm.prepare import prepare

    root = tmp_path_factory.mktemp("integrity")
    (root / "c.txt").write_text("\n\n".join(_docs(1500, 5)))
    prepare([str(root / "c.txt")], root / "data", _cfg())
    return str(root / "data")


def corrupt_page(path: str, row_group: int = 0) -> None:
    """Flip one bit inside the last data page of `row_group`'s input_ids column chunk
    (local or URI): same size, footer and page headers unchanged."""
    data = bytearray(storage.read_bytes(path))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(row_group).column(0)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data[start + meta.total_compressed_size - 1] ^= 0x01
    storage.write_bytes(path, bytes(data))


def test_start_up_reads_no_shard_data_on_s3_and_reads_fail_on_a_corrupt_page(data_dir, s3_server, tmp_path,
                                                                              monkeypatch):
    """The dataset on S3 with a same-size corrupt page in a train and a validation shard:
    train's start-up checks (`_check_inputs`, `_loop_config`) pass without one sha256;
    the training loader, validation and `evaluate` fail on the page, naming the shard;
    `mlm data verify` finds both by sha256."""
    from mlm.evaluate import evaluate
    from mlm.loader import GroupCache, RowGroup
    from mlm.model import build_model, save_model_dir
    from mlm.train import _check_inputs, _loop_config

    uri = s3_server.uri("integrity/data")
    storage.put_dir(data_dir, uri, marker=shards.MANIFEST)
    manifest = shards.Manifest.read(uri)
    bad_train = storage.join(uri, manifest.splits["train"].shards[2].file)
    bad_validation = storage.join(uri, manifest.splits["validation"].shards[0].file)
    corrupt_page(bad_train)
    corrupt_page(bad_validation)

    hashed = []
    real_sha256 = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda path: hashed.append(path) or real_sha256(path))
    cfg = _cfg()
    manifest, tokenizer, cfg = _check_inputs(uri, cfg)
    loop = _loop_config(uri, str(tmp_path / "run"), manifest, tokenizer, cfg, None)
    assert hashed == []  # nothing read to hash: the corrupt pages are not found here
    assert loop["validation_files"] == [storage.join(uri, x.file) for x in manifest.splits["validation"].shards]

    group = next(RowGroup(**g) for g in loop["row_groups"] if g["path"] == bad_train)
    with pytest.raises(DatasetError, match=rf"corrupt.*row group 0: .*{CRC}.*: {bad_train}$"):
        GroupCache().get(group)  # what each training worker reads
    with pytest.raises(DatasetError, match=rf"{CRC}.*: {bad_validation}$"):
        next(shards.read_batches(shards.plan_batches(loop["validation_files"], 64)))  # in-training validation
    model_dir = save_model_dir(build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id), tokenizer,
                               tmp_path / "model")
    with pytest.raises(DatasetError, match=rf"{CRC}.*: {bad_validation}$"):
        evaluate(model_dir, uri, batch_size=64)
    assert hashed == []

    run = subprocess.run(["mlm", "data", "verify", uri], env=s3_server.subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"corrupt shard (sha256 mismatch): {bad_train}" in run.stderr
    assert f"corrupt shard (sha256 mismatch): {bad_validation}" in run.stderr


def test_training_stops_at_a_corrupt_page_naming_the_shard(data_dir, tmp_path):
    """Every row group of every train shard corrupt: train starts (no hashing), the first
    micro-batch read fails, and the failure names a shard and the checksum."""
    import shutil

    from mlm.train import train

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    for entry in shards.Manifest.read(broken).splits["train"].shards:
        path = str(broken / entry.file)
        for g in range(pq.ParquetFile(path).metadata.num_row_groups):
            corrupt_page(path, g)
    with pytest.raises(DatasetError, match=rf"^corrupt.*{CRC}.*{broken}/train-\d+-\d+\.parquet$"):
        train(broken, tmp_path / "run", _cfg())  # the worker's error itself, for the CLI's one line and exit 2
