"""`mlm bench data` on a ~1 MB corpus: the three contenders (raw tokenizers, mlm prepare,
the Hugging Face datasets way) run in their own process trees and count the same work."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlm.bench.data import bench_data, build_corpus, iter_documents, scale_files

pytestmark = pytest.mark.integration

SEQ_LEN = 128


def test_bench_data_three_contenders_same_work(tmp_path, monkeypatch):
    # A RAY_ADDRESS in the caller's environment must not reach the subprocesses:
    # prepare has to start its own local Ray, never join (or fail to join) another.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    r = bench_data(None, 1.0, 1, SEQ_LEN, tmp_path, echo=None)
    raw, prep, hf = (r["runs"][k] for k in ("raw", "prepare", "hf"))

    # The built corpus is clean (no control characters, no literal [SEP], exactly one
    # blank line between documents), so all three see the same documents, and
    # tokenizing them with the same tokenizer gives the same content tokens, exactly:
    # prepare drops nothing and its specials ([SEP] per document, [CLS]/[SEP] per
    # row) are subtracted from its manifest's token count; HF's [CLS]/[SEP] per
    # document are subtracted before group_texts.
    assert raw["documents"] == prep["documents"] == hf["documents"] > 5000
    assert raw["content_tokens"] == prep["content_tokens"] == hf["content_tokens"] > 200_000
    # What prepare writes is the content plus its specials: a few % more, and it fits
    # its rows (only the last row of a batch is padded).
    extra = (prep["output_tokens"] - raw["content_tokens"]) / raw["content_tokens"]
    assert 0 < extra < 0.06
    assert prep["output_tokens"] <= prep["rows"] * SEQ_LEN
    # HF: full blocks only; group_texts drops less than a block per 1,000-row map batch.
    assert hf["output_tokens"] == hf["rows"] * SEQ_LEN
    assert 0 <= hf["dropped_by_group_texts"] < SEQ_LEN * (hf["documents"] // 1000 + 1 + r["cores"])
    assert hf["content_tokens"] + 2 * hf["documents"] - hf["dropped_by_group_texts"] == hf["output_tokens"]

    # Timings, peaks and ratios are real numbers; prepare's tree holds Ray's own
    # processes (its own cluster: GCS and raylet are its descendants), and nothing
    # outlives any run.
    for run in (raw, prep, hf):
        # CPU time is sampled with the memory: a sub-second raw run can end before a sample
        assert run["wall_s"] > 0 and run["tokens_per_s"] > 0 and run["peak_mib"] > 0 and run["cpu_s"] >= 0
        assert run["leftover_processes"] == []
    assert prep["cpu_s"] > 0 and hf["cpu_s"] > 0
    assert {"gcs_server", "raylet"} <= set(prep["process_names"])
    assert prep["peak_mib"] > raw["peak_mib"]
    assert {"prepare_over_raw_tokens_per_s", "prepare_over_raw_peak_mib",
            "prepare_over_hf_tokens_per_s", "prepare_over_hf_peak_mib"} <= set(r["ratios"])
    assert all(v > 0 for v in r["ratios"].values())
    assert r["tokenizer"]["timed"] is False and r["tokenizer"]["vocab_size"] == 4096
    assert (Path(r["run_dir"]) / "results.json").is_file()
    assert not (Path(r["run_dir"]) / "prepare-out").exists()  # outputs removed


def test_size_and_scale_build_distinct_documents_and_separate_files(tmp_path):
    files = build_corpus(3.5, tmp_path / "corpus", file_mb=1.0)
    assert len(files) == 4 and sum(f.stat().st_size for f in files) >= 3.5e6
    docs = [d for f in files for d in iter_documents(str(f))]
    # Copy k of the builtin corpus is copy 0 with "k " in front of every document: no
    # document of copy 1 is byte-identical to one of copy 0.
    n = docs.index("1 " + docs[0])
    assert n > 5000 and docs[n : 2 * n] == ["1 " + d for d in docs[:n]]
    assert set(docs[:n]).isdisjoint(docs[n : 2 * n])
    assert build_corpus(3.5, tmp_path / "corpus", file_mb=1.0) == files  # reused, not rebuilt

    scaled = scale_files(files[:2], 3, tmp_path / "scaled")
    assert len(scaled) == 6 and len({str(p) for p in scaled}) == 6
    assert [p.read_bytes() for p in scaled[2:4]] == [p.read_bytes() for p in files[:2]]
    assert scale_files(files, 1, tmp_path / "x1") == files
