import gzip
import os

import pytest

from mlm.corpus import InputError, _split_txt, clean_text, looks_binary, resolve_inputs


def test_clean_text_removes_control_and_nul_and_normalizes():
    assert clean_text("  caf\u0065\u0301\x00 ok\x07\n") == "caf\u00e9 ok"
    assert clean_text("\x00\x01 \t") == ""
    # line-ending controls keep the words apart (a lone CR, form feed, NEL); CRLF is one newline
    assert clean_text("old\rmac\x0cpage\x85nel\x1fsep\r\nend") == "old\nmac\npage\nnel\nsep\nend"


def test_txt_documents_are_blank_line_separated():
    docs = [d for d, _ in _split_txt(b"first doc\nline two\n\n\nsecond doc\n   \nthird \xff doc")]
    assert docs[0] == "first doc\nline two" and docs[1].strip() == "second doc"
    assert [bad for _, bad in _split_txt(b"ok\n\nbad \xff")] == [False, True]


def test_binary_detection(tmp_path):
    (tmp_path / "a.txt").write_text("plain words\n")
    (tmp_path / "b.txt").write_bytes(gzip.compress(b"x" * 1000))
    assert not looks_binary(str(tmp_path / "a.txt"))
    assert looks_binary(str(tmp_path / "b.txt"))


def test_resolve_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        resolve_inputs([str(tmp_path / "missing.txt")], tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty corpus"):
        resolve_inputs([str(tmp_path / "empty.txt")], tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(InputError, match="binary"):
        resolve_inputs([str(tmp_path / "bin.txt")], tmp_path)
    with pytest.raises(InputError, match="unknown builtin"):
        resolve_inputs(["builtin:nope"], tmp_path)


def test_resolve_inputs_expands_dirs_and_globs_and_skips_binary(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "d" / "c.bin.txt").write_bytes(b"\x00" * 64)
    files, skipped = resolve_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.txt")], tmp_path)
    assert sorted(f.path.rsplit("/", 1)[1] for f in files) == ["a.txt", "b.jsonl"]
    assert list(skipped) == ["binary"]


def test_compressed_inputs_are_read_and_sniffed(tmp_path):
    import pyarrow as pa

    from mlm.corpus import open_stream

    text = ("a real sentence of words.\n\n" * 200).encode()
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b.jsonl.zst").write_bytes(pa.Codec("zstd").compress(b'{"text": "hello"}\n' * 50, asbytes=True))
    (tmp_path / "c.txt.gz").write_bytes(b"not gzip at all")
    files, skipped = resolve_inputs([str(tmp_path)], tmp_path)
    assert sorted(f.path.rsplit("/", 1)[1] for f in files) == ["a.txt.gz", "b.jsonl.zst"]
    assert [p.rsplit("/", 1)[1] for p in skipped["unreadable"]] == ["c.txt.gz"]
    with open_stream(str(tmp_path / "a.txt.gz")) as stream:
        assert stream.read() == text


def test_split_long_cuts_at_whitespace_and_loses_nothing():
    from mlm.prepare import split_long

    text = " ".join(f"word{i}" for i in range(50_000))
    pieces = split_long(text, 10_000)
    assert "".join(pieces) == text
    assert all(len(p) <= 10_000 for p in pieces) and len(pieces) > 1
    assert all(p.endswith(" ") for p in pieces[:-1])  # never inside a word
    assert split_long("short", 10_000) == ["short"]
    assert "".join(split_long("x" * 25_000, 10_000)) == "x" * 25_000  # one huge word is cut anyway


def _docs_of(ranges, cfg):
    from mlm.corpus import iter_range

    return [(r["text"], r["drop_reason"]) for rg in ranges for r in iter_range(rg, cfg)]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_ranges_cut_at_document_boundaries_and_lose_nothing(tmp_path, kind):
    import json

    from mlm.config import DataConfig
    from mlm.corpus import Range, plan_ranges

    rng = __import__("random").Random(1)
    docs = [" ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(1, 400))) for _ in range(300)]
    if kind == "txt":  # separators of every shape: blank lines with spaces, runs of newlines
        seps = ["\n\n", "\n \t\n", "\n\n\n\n", "\r\n\r\n"]
        body = "".join(d + seps[i % len(seps)] for i, d in enumerate(docs))
    else:
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    path = tmp_path / f"c.{kind}"
    path.write_text(body)
    cfg = DataConfig()
    files, _ = resolve_inputs([str(path)], tmp_path)
    whole = _docs_of([Range(str(path), 0, -1)], cfg)
    ranges = plan_ranges(files, 1 << 16 if len(body) > 1 << 17 else 4096)
    assert len(ranges) > 3
    assert [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]] and ranges[-1].end == len(body.encode())
    assert _docs_of(ranges, cfg) == whole
    assert [t for t, _ in whole] == [d.strip() for d in docs]
    # Reading in tiny blocks (as a compressed file is streamed) gives the same documents.
    from mlm.corpus import iter_range

    assert [(r["text"], r["drop_reason"]) for r in iter_range(Range(str(path), 0, -1), cfg, block_bytes=97)] == whole


def test_compressed_file_is_streamed_with_the_same_documents(tmp_path):
    from mlm.config import DataConfig
    from mlm.corpus import Range, iter_range

    text = "".join(f"document {i} has some words.\n\n" for i in range(5000))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    cfg = DataConfig()
    plain = [r["text"] for r in iter_range(Range(str(tmp_path / "a.txt"), 0, -1), cfg)]
    packed = [r["text"] for r in iter_range(Range(str(tmp_path / "a.txt.gz"), 0, -1), cfg, block_bytes=1000)]
    assert plain == packed and len(plain) == 5000


def test_parquet_and_arrow_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlm.config import DataConfig
    from mlm.corpus import check_text_column, plan_ranges

    table = pa.table({"body": [f"row {i} text" for i in range(3000)] + [None]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=500)
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    files, _ = resolve_inputs([str(tmp_path)], tmp_path)
    with pytest.raises(InputError, match="no column 'text'"):
        check_text_column(files, "text")
    check_text_column(files, "body")
    cfg = DataConfig(text_field="body")
    ranges = plan_ranges(files, 1)  # one range per row group for parquet
    assert len(ranges) == 7 + 1  # 3001 rows in groups of 500, and the Arrow file
    rows = _docs_of(ranges, cfg)
    assert [t for t, r in rows if not r] == [f"row {i} text" for i in range(3000)] * 2
    assert [r for _, r in rows if r] == ["missing_text"] * 2


def test_hf_save_to_disk_folder_is_an_input(tmp_path):
    import datasets  # the test extra installs it
    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(50)], "id": list(range(50))})
    ds.save_to_disk(str(tmp_path / "saved"))
    files, _ = resolve_inputs([str(tmp_path / "saved")], tmp_path)
    assert files and all(f.path.endswith(".arrow") for f in files)
    from mlm.config import DataConfig
    from mlm.corpus import plan_ranges

    assert [t for t, _ in _docs_of(plan_ranges(files, 1 << 20), DataConfig())] == [f"doc {i}" for i in range(50)]


def test_inputs_in_a_ray_job_working_dir_keep_relative_names(tmp_path, monkeypatch):
    """Each node unpacks a job's working directory at its own place: a file of it must be
    named relative to the working directory, elsewhere absolutely."""
    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (job_dir / "data").mkdir(parents=True)
    (job_dir / "data" / "a.txt").write_text("one document\n")
    (tmp_path / "b.txt").write_text("another document\n")
    monkeypatch.chdir(job_dir)
    files, _ = resolve_inputs(["data", str(tmp_path / "b.txt")], tmp_path)
    assert [f.path for f in files] == [os.path.join("data", "a.txt"), str(tmp_path / "b.txt")]
    monkeypatch.chdir(tmp_path)
    files, _ = resolve_inputs(["b.txt"], tmp_path)
    assert [f.path for f in files] == [str(tmp_path / "b.txt")]
