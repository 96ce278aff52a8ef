"""The data stage on a two-node Ray cluster (two `ray start` nodes on loopback, token
auth on): the same input and seed give byte-identical shards on one and on two nodes."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from mlm.config import load_config
from mlm.shards import read_manifest, verify

pytestmark = pytest.mark.integration


def _shard_hashes(out):
    m = read_manifest(out)
    return [(s["file"], s["sha256"]) for split in ("train", "validation") for s in m["splits"][split]["shards"]]


def test_same_shards_on_one_and_two_nodes(ray_cluster, ray_two_nodes, tmp_path, work):
    import pydoc_data.topics as topics

    from mlm.prepare import prepare

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(5)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(" ".join(words[s : s + rng.randrange(10, 300)])
                               for s in (rng.randrange(len(words) - 300) for _ in range(4000))))
    sets = ["tokenizer.vocab_size=1000", "data.read_chunk_bytes=65536", "data.rows_per_shard=300",
            "data.pack_batch_docs=64", "masking.strategy=span"]
    one = tmp_path / "one"
    prepare([str(src)], one, load_config("tiny", sets))  # the session's single-node cluster
    assert verify(one) == [] and read_manifest(one)["ranges"] > 4

    two = tmp_path / "two"
    env = {**ray_two_nodes.env, "RAY_ADDRESS": ray_two_nodes.address, "MLM_HOME": str(work), "MLM_PROGRESS": "0"}
    args = [a for s in sets for a in ("--set", s)]  # the tokenizer is trained again: deterministic
    run = subprocess.run(["mlm", "prepare", str(src), "--out", str(two), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_manifest(two)["nodes_used"] == 2  # both nodes tokenized ranges
    assert len(_shard_hashes(one)) > 4 and _shard_hashes(two) == _shard_hashes(one)
    assert os.path.getsize(two / "train-00000.parquet") == os.path.getsize(one / "train-00000.parquet")
