"""Dataset modes beyond the default: incremental extension, exact dedup, length-binned
padding and dynamic masking (masked by the training loop, one real Ray Train run)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlm.config import load_config
from mlm.shards import column_2d, read_manifest, verify

pytestmark = pytest.mark.integration


def _docs(n: int, seed: int) -> list[str]:
    import pydoc_data.topics as topics

    words = " ".join(topics.topics.values()).split()
    rng = random.Random(seed)
    return [" ".join(words[s : s + rng.randrange(20, 200)]) for s in (rng.randrange(len(words) - 200) for _ in range(n))]


def _shards(out, split="train"):
    m = read_manifest(out)
    tables = [pq.read_table(out / s["file"]) for s in m["splits"][split]["shards"]]
    return (np.concatenate([column_2d(t, "input_ids") for t in tables]),
            np.concatenate([column_2d(t, "labels") for t in tables]),
            np.concatenate([np.asarray(t.column("num_tokens")) for t in tables]))


def test_incremental_prepare_appends_only_new_files_and_dedups_across(ray_cluster, tmp_path):
    from mlm.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    a, b = _docs(300, 1), _docs(200, 2)
    (src / "a.txt").write_text("\n\n".join(a + a[:50]))  # 50 exact duplicates inside a
    cfg = load_config("tiny", ["tokenizer.vocab_size=1000", "data.validation_fraction=0.1", "data.dedup=true",
                               "data.rows_per_shard=100"])
    out = tmp_path / "data"
    first = prepare([str(src / "a.txt")], out, cfg).to_dict()  # the manifest as stored
    assert first["documents"]["dropped"]["duplicate"] == 50
    assert first["documents"]["kept"] == 300
    old = {s["file"]: s["sha256"] for sp in first["splits"].values() for s in sp["shards"]}

    (src / "b.txt").write_text("\n\n".join(b + a[:20]))  # 20 documents already in the dataset
    second = prepare([str(src / "a.txt"), str(src / "b.txt")], out, cfg).to_dict()
    assert verify(out) == []
    assert second["documents"]["dropped"]["duplicate"] == 70 and second["documents"]["kept"] == 500
    assert len(second["increments"]) == 2 and second["increments"][1]["files_added"] == 1
    now = {s["file"]: s["sha256"] for sp in second["splits"].values() for s in sp["shards"]}
    assert all(now[f] == h for f, h in old.items())  # old shards untouched, new ones appended
    assert len(now) > len(old)
    assert second["tokenizer"]["fingerprint"] == first["tokenizer"]["fingerprint"]
    tokens = lambda m: sum(m["splits"][s]["tokens"] for s in ("train", "validation"))  # noqa: E731
    assert tokens(second) > tokens(first)

    # Same inputs again: nothing to do. A changed old file: refused without --overwrite.
    assert prepare([str(src / "a.txt"), str(src / "b.txt")], out, cfg).created_unix == second["created_unix"]
    (src / "a.txt").write_text("\n\n".join(a))
    from mlm.shards import DatasetError

    with pytest.raises(DatasetError, match="different dataset"):
        prepare([str(src / "a.txt"), str(src / "b.txt")], out, cfg)
    assert read_manifest(out)["fingerprint"] == second["fingerprint"]


def test_padded_dynamic_dataset_trains(ray_cluster, tmp_path):
    """`data.packing=pad` + `masking.mode=dynamic`: one document per row, unmasked train
    rows; the training loop masks them (a short run of the loop in this process: the
    local engine)."""
    from mlm.prepare import prepare
    from mlm.tokenizer import load_tokenizer
    from mlm.train import train

    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(_docs(1500, 3)))
    cfg = load_config("tiny", ["tokenizer.vocab_size=1000", "data.packing=pad", "masking.mode=dynamic",
                               "masking.strategy=whole_word", "train.num_workers=1", "train.micro_batch_size=16",
                               "train.global_batch_size=16", "train.max_steps=12", "train.log_every=4",
                               "train.checkpoint_every=12", "train.warmup_steps=2", "train.engine=local"])
    out = tmp_path / "data"
    m = prepare([str(src)], out, cfg).to_dict()
    ids, labels, n = _shards(out)
    tok = load_tokenizer(out / "tokenizer")
    assert (labels == -100).all() and m["splits"]["train"]["masked"] == 0  # unmasked: masked at load time
    assert not (ids == tok.mask_token_id).any()
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert ((ids == tok.sep_token_id).sum(axis=1) == 1).all()  # one document (piece) per row
    assert n.min() < 60 < n.max()  # lengths vary, short rows are padded
    _, v_labels, _ = _shards(out, "validation")
    assert (v_labels >= 0).any()  # the evaluation set stays statically masked

    summary = train(out, tmp_path / "run", cfg)
    assert summary["steps"] == 12 and np.isfinite(summary["final_train_loss"])


def test_prepare_reads_an_s3_prefix(s3_server, tmp_path, work):
    """An object-store corpus (S3 API on loopback): a prefix with .txt, .jsonl.gz and
    .parquet objects, prepared by the CLI in its own process (its Ray workers get the
    credentials from the environment, as on a cluster with instance roles)."""
    import gzip
    import io
    import json
    import os
    import subprocess

    import pyarrow as pa

    docs = _docs(300, 4)
    s3_server.put("corpus/a.txt", "\n\n".join(docs[:100]))
    s3_server.put("corpus/sub/b.jsonl.gz", gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[100:200]).encode()))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs[200:]}), buf)
    s3_server.put("corpus/c.parquet", buf.getvalue())
    s3_server.put("corpus/notes.md", "not a corpus file")
    env = s3_server.subprocess_env({**os.environ, "MLM_HOME": str(work / "s3home"), "MLM_PROGRESS": "0"})
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "data"
    run = subprocess.run(["mlm", "prepare", s3_server.uri("corpus/"), "--out", str(out),
                          "--set", "tokenizer.vocab_size=800", "--set", "data.validation_fraction=0.1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    m = read_manifest(out)
    assert sorted(i["path"].rsplit("/", 1)[1] for i in m["inputs"]) == ["a.txt", "b.jsonl.gz", "c.parquet"]
    assert all(i["path"].startswith("s3://") for i in m["inputs"])
    assert m["documents"]["kept"] == 300 and m["skipped_files"]["unsupported_type"][0].endswith("notes.md")
    missing = subprocess.run(["mlm", "prepare", s3_server.uri("nothing-here/*.txt"), "--out", str(tmp_path / "x")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no files match" in missing.stderr and "Traceback" not in missing.stderr
