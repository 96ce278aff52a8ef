import gzip

import pytest

from mlm.corpus import InputError, _split_txt, clean_text, looks_binary, resolve_inputs


def test_clean_text_removes_control_and_nul_and_normalizes():
    assert clean_text("  caf\u0065\u0301\x00 ok\x07\n") == "caf\u00e9 ok"
    assert clean_text("\x00\x01 \t") == ""


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

    from mlm.corpus import decompress

    text = ("a real sentence of words.\n\n" * 200).encode()
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b.jsonl.zst").write_bytes(pa.Codec("zstd").compress(b'{"text": "hello"}\n' * 50, asbytes=True))
    (tmp_path / "c.txt.gz").write_bytes(b"not gzip at all")
    files, skipped = resolve_inputs([str(tmp_path)], tmp_path)
    assert sorted(f.path.rsplit("/", 1)[1] for f in files) == ["a.txt.gz", "b.jsonl.zst"]
    assert [p.rsplit("/", 1)[1] for p in skipped["unreadable"]] == ["c.txt.gz"]
    assert decompress(str(tmp_path / "a.txt.gz"), (tmp_path / "a.txt.gz").read_bytes()) == text


def test_split_long_cuts_at_whitespace_and_loses_nothing():
    from mlm.prepare import split_long

    text = " ".join(f"word{i}" for i in range(50_000))
    pieces = split_long(text, 10_000)
    assert "".join(pieces) == text
    assert all(len(p) <= 10_000 for p in pieces) and len(pieces) > 1
    assert all(p.endswith(" ") for p in pieces[:-1])  # never inside a word
    assert split_long("short", 10_000) == ["short"]
    assert "".join(split_long("x" * 25_000, 10_000)) == "x" * 25_000  # one huge word is cut anyway
