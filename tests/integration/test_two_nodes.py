"""The data stage on a two-node Ray cluster with no shared disk (two `ray start` nodes on
loopback, token auth on, each seeing only its own files; input and output on the
loopback S3): the same input and seed give byte-identical shards on one node (local
folders) and on two (object store), each shard written by the node that made it."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from mlm.config import load_config
from mlm.shards import read_manifest, verify

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]  # one worker: its session fixtures once


def _shard_hashes(out):
    m = read_manifest(out)
    return [(s["file"], s["sha256"]) for split in ("train", "validation") for s in m["splits"][split]["shards"]]


def test_same_shards_on_one_and_two_nodes(ray_cluster, ray_two_nodes, s3_server, tmp_path, work):
    import pydoc_data.topics as topics

    from mlm import storage
    from mlm.prepare import prepare

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(5)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(" ".join(words[s : s + rng.randrange(10, 300)])
                               for s in (rng.randrange(len(words) - 300) for _ in range(4000))))
    sets = ["tokenizer.vocab_size=1000", "data.read_chunk_bytes=65536", "data.rows_per_shard=300",
            "data.pack_batch_docs=64", "masking.strategy=span"]
    one = tmp_path / "one"
    prepare([str(src)], one, load_config("tiny", sets))  # the session's single-node cluster, local folders
    assert verify(one) == [] and read_manifest(one)["ranges"] > 4

    # Two nodes: the corpus on S3 (the worker node cannot see tmp_path), the dataset too.
    corpus_uri = s3_server.put("two-nodes/corpus.txt", src.read_bytes())
    two = s3_server.uri("two-nodes/data")
    env = {**ray_two_nodes.env, "RAY_ADDRESS": ray_two_nodes.address, "MLM_HOME": str(work)}
    args = [a for s in sets for a in ("--set", s)]  # the tokenizer is trained again: deterministic
    run = subprocess.run(["mlm", "prepare", corpus_uri, "--out", two, *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_manifest(two)["nodes_used"] == 2  # both nodes tokenized ranges and wrote their shards
    assert verify(two) == []
    assert len(_shard_hashes(one)) > 4 and _shard_hashes(two) == _shard_hashes(one)
    first = read_manifest(one)["splits"]["train"]["shards"][0]["file"]
    assert storage.size(f"{two}/{first}") == os.path.getsize(one / first)
    assert not [n for n in storage.list_names(two) if ".tmp" in n]  # nothing half written left


def test_local_inputs_are_staged_and_local_output_is_refused(ray_two_nodes, tmp_path, work, s3_server):
    """A local corpus is on the driver's node only: with an S3 output prepare copies it
    for the other node (and removes the copy); with a local output on a cluster whose
    other node cannot see it, prepare fails with one line instead of leaving holes."""
    from mlm import storage

    src = tmp_path / "small.txt"
    # ~1.3 MB in 64 KiB ranges: both nodes' actors get some (the second node reads the copy)
    src.write_text("\n\n".join(f"document {i} about the return statement, {i % 7} loops and {i % 11} classes"
                                for i in range(20000)))
    env = {**ray_two_nodes.env, "RAY_ADDRESS": ray_two_nodes.address, "MLM_HOME": str(work)}
    sets = ["--set", "tokenizer.vocab_size=200", "--set", "data.read_chunk_bytes=65536"]
    out = s3_server.uri("two-nodes/staged")
    ok = subprocess.run(["mlm", "prepare", str(src), "--out", out, *sets], env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert verify(out) == [] and read_manifest(out)["nodes_used"] == 2
    assert read_manifest(out)["inputs"][0]["path"] == str(src)  # the dataset names the user's file
    assert ".inputs" not in storage.list_names(out)
    bad = subprocess.run(["mlm", "prepare", str(src), "--out", str(tmp_path / "local-out"), *sets], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot see" in lines[0] and "no shared disk" in lines[0], bad.stderr[-2000:]
    assert not (tmp_path / "local-out" / "manifest.json").exists()
