"""The data stage on real files: bad input is counted, not fatal; masking strategies
and static duplication land in the shards."""

from __future__ import annotations

import gzip
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlm.config import load_config
from mlm.shards import column_2d, read_manifest, verify

pytestmark = pytest.mark.integration


def _prose(n_docs: int = 400, words: int = 120) -> list[str]:
    import pydoc_data.topics as topics

    vocab = " ".join(topics.topics.values()).split()
    rng = random.Random(0)
    out = []
    for _ in range(n_docs):
        start = rng.randrange(len(vocab) - words)
        out.append(" ".join(vocab[start : start + words]))
    return out


@pytest.fixture(scope="module")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n\n".join(_prose()))
    return path


def test_bad_input_corpus_completes_and_counts_every_drop(ray_cluster, tmp_path):
    from mlm.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    docs = _prose(60)
    (src / "good.txt").write_text("\n\n".join(docs[:30]))
    (src / "invalid_utf8.txt").write_bytes(b"valid words then \xff\xfe broken bytes\n\nanother fine one")
    (src / "nul.txt").write_bytes(b"text with a \x00 nul byte in the middle of a sentence\n\n" * 3)
    (src / "empty_docs.jsonl").write_text('{"text": ""}\n{"text": "  "}\n{"text": "kept doc"}\n{"other": 1}\nnot json\n')
    (src / "latin1.txt").write_bytes("caf\u00e9 na\u00efve r\u00e9sum\u00e9\n\n".encode("latin-1") * 5)
    (src / "more.txt.gz").write_bytes(gzip.compress("\n\n".join(docs[30:]).encode()))
    (src / "binary.txt").write_bytes(bytes(range(256)) * 40)
    long_line = " ".join(docs * 110)  # a 5 MB single line, tokenized in 100k-char chunks
    (src / "long_line.txt").write_text(long_line)
    assert len(long_line) > 5_000_000
    cfg = load_config("tiny", ["tokenizer.vocab_size=800", "data.validation_fraction=0.2", "data.rows_per_shard=50000",
                               "data.max_chunk_chars=100000"])
    m = prepare([str(src)], tmp_path / "data", cfg).to_dict()
    assert verify(tmp_path / "data") == []
    assert [p.rsplit("/", 1)[1] for p in m["skipped_files"]["binary"]] == ["binary.txt"]
    dropped = m["documents"]["dropped"]
    assert dropped["empty"] >= 2 and dropped["bad_json_or_missing_field"] == 2
    assert m["documents"]["repaired_invalid_utf8"] >= 6  # the broken doc and the Latin-1 ones
    assert m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"] > len(long_line) // 8
    # .gz content arrived: 60 prose docs + others, identical documents counted once each
    assert m["documents"]["kept"] >= 60


def _prepare(prose_file, tmp_path, name, *overrides):
    from mlm.prepare import prepare

    cfg = load_config("tiny", ["tokenizer.vocab_size=1000", "data.validation_fraction=0.1", "masking.mode=static",
                               "masking.rate=0.15", *overrides])
    out = tmp_path / name
    prepare([str(prose_file)], out, cfg)
    manifest = read_manifest(out)
    tables = [pq.read_table(out / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    ids = np.concatenate([column_2d(t, "input_ids") for t in tables])
    labels = np.concatenate([column_2d(t, "labels") for t in tables])
    n = np.concatenate([np.asarray(t.column("num_tokens")) for t in tables])
    return out, manifest, ids, labels, n


def test_strategies_and_duplication(ray_cluster, prose_file, tmp_path):
    from mlm.tokenizer import load_tokenizer, word_start_table

    _, base, _, base_labels, _ = _prepare(prose_file, tmp_path, "random")
    out, dup, ids, labels, n = _prepare(prose_file, tmp_path, "whole_word", "masking.strategy=whole_word", "masking.duplication=2")
    assert dup["splits"]["train"]["rows"] == 2 * base["splits"]["train"]["rows"]
    rows = base["splits"]["train"]["rows"]
    assert not np.array_equal(labels[:rows], labels[rows:])  # two different maskings of the same rows
    tok = load_tokenizer(out / "tokenizer")
    original = np.where(labels >= 0, labels, ids)
    starts = word_start_table(tok)[original]
    selected = labels >= 0
    maskable = (np.arange(ids.shape[1])[None, :] < n[:, None]) & ~np.isin(original, list(tok.all_special_ids))
    # whole words: a selected continuation piece always follows a selected piece (unless
    # the word was cut by a sequence boundary, where [CLS] precedes it)
    cont = selected[:, 1:] & ~starts[:, 1:] & maskable[:, :-1]
    assert cont.any() and (selected[:, :-1][cont]).all()
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.015

    _, _, _, span_labels, _ = _prepare(prose_file, tmp_path, "span", "masking.strategy=span")
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], (span_labels.reshape(-1) >= 0).astype(int), [0]]))))
    mean_run = runs[::2].mean()
    base_runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], (base_labels.reshape(-1) >= 0).astype(int), [0]]))))
    assert mean_run > 2.0 > base_runs[::2].mean()

    terms = tmp_path / "terms.txt"
    terms.write_text("the\nreturn\n")
    _, _, t_ids, t_labels, _ = _prepare(prose_file, tmp_path, "terms", "masking.strategy=terms",
                                        f"masking.terms_file={terms}", "masking.term_rate=1.0", "masking.rate=0.3")
    the = tok.convert_tokens_to_ids("the")
    original = np.where(t_labels >= 0, t_labels, t_ids)
    assert (t_labels[original == the] >= 0).mean() > 0.95  # every occurrence of a term is selected


def test_killed_prepare_leaves_no_dataset_and_rerun_matches(ray_cluster, tmp_path, work):
    """SIGKILL `mlm prepare` once its first shard exists: the folder is not a dataset;
    a rerun gives exactly the shards (same sha256) of an uninterrupted run, which trains
    its own tokenizer (tokenizer training is deterministic). Only the killed run is an
    `mlm prepare` process; the rerun and the clean run call prepare() with the same
    config on the session's Ray (no second and third interpreter and Ray start-up)."""
    import os
    import signal
    import subprocess
    import time

    from mlm.shards import DatasetError

    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(_prose(3000, 60)))
    args = ["--set", "data.rows_per_shard=40", "--set", "data.pack_batch_docs=32", "--set", "tokenizer.vocab_size=800"]
    env = {**os.environ, "MLM_HOME": str(work), "MLM_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)

    def run(out, kill_on_first_shard=False):
        if not kill_on_first_shard:
            from mlm.prepare import prepare

            prepare([str(src)], out, load_config("tiny", args[1::2]))
            return False
        proc = subprocess.Popen(["mlm", "prepare", str(src), "--out", str(out), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.name.startswith("train-") for p in out.iterdir()):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        return False

    killed = tmp_path / "killed"
    assert run(killed, kill_on_first_shard=True), "prepare finished before its first shard could be seen"
    with pytest.raises(DatasetError, match="not a dataset"):
        read_manifest(killed)
    first_tokenizer = (killed / "tokenizer" / "tokenizer.json").read_bytes()
    run(killed)
    assert verify(killed) == []
    assert (killed / "tokenizer" / "tokenizer.json").read_bytes() == first_tokenizer
    clean = tmp_path / "clean"
    run(clean)
    assert (clean / "tokenizer" / "tokenizer.json").read_bytes() == first_tokenizer
    hashes = lambda d: [(s["file"], s["sha256"]) for sp in ("train", "validation")  # noqa: E731
                        for s in read_manifest(d)["splits"][sp]["shards"]]
    assert len(hashes(clean)) > 3 and hashes(killed) == hashes(clean)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
