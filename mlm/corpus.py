"""Corpus sources -> Ray Dataset of cleaned documents, with bad-input accounting.

Document boundaries: a .txt file holds documents separated by blank lines (BERT's
convention); a .jsonl line or a .parquet row is one document (`data.text_field`).
.txt and .jsonl may be compressed (.gz, .zst).
Every document gets a content hash; the hash alone decides its split, so the
train/validation split does not depend on file order or on the number of workers.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlm.config import DataConfig

COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
TEXT_SUFFIXES = tuple(base + comp for base in (".txt", ".jsonl") for comp in ("", *COMPRESSION))
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + PARQUET_SUFFIXES
BUILTIN_PREFIX = "builtin:"
DEFAULT_CORPUS = "builtin:python-docs"

# C0/C1 control characters except tab and newline; NUL included.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class InputError(ValueError):
    """A user mistake in the inputs (missing path, empty corpus, unreadable file)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blake2b": self.fingerprint}


# --------------------------------------------------------------------------- builtin corpus


def _python_docs() -> Iterator[str]:
    """Real English prose on every machine that runs this code: the Python language
    reference topics (pydoc_data) and the long docstrings of the standard library."""
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        yield topics.topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


BUILTINS = {"python-docs": _python_docs}


def materialize_builtin(name: str, dest_dir: Path) -> Path:
    """Write a builtin corpus as .jsonl once; later calls reuse the file."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTINS:
        raise InputError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{key}.jsonl"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in BUILTINS[key]():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- input resolution


def _fingerprint(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _codec(path: str) -> str | None:
    return next((codec for suffix, codec in COMPRESSION.items() if path.endswith(suffix)), None)


def decompress(path: str, data: bytes) -> bytes:
    """The file's bytes, decompressed by its suffix (.gz, .zst) with pyarrow's codecs."""
    import pyarrow as pa

    codec = _codec(path)
    # Ray's file readers may already have decompressed by extension: check the magic.
    if codec is None or not data.startswith(_MAGIC[codec]):
        return data
    return pa.CompressedInputStream(pa.BufferReader(data), codec).read()


_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def _head(path: str, n: int) -> bytes:
    import pyarrow as pa

    codec = _codec(path)
    if codec is None:
        with open(path, "rb") as f:
            return f.read(n)
    with pa.CompressedInputStream(pa.OSFile(path), codec) as stream:
        return stream.read(n)


def looks_binary(path: str, sniff_bytes: int = 8192) -> bool:
    """More than 5% control bytes in the first (decompressed) block: not a text file.
    Parquet files are binary by design and are not sniffed."""
    head = _head(path, sniff_bytes)
    if not head:
        return False
    # Control bytes (NUL included) are rare in text, even damaged text, and common in
    # binary formats; a stray NUL is cleaned later rather than costing the file.
    control = sum(1 for b in head if b < 32 and b not in (8, 9, 10, 11, 12, 13, 27))
    return control / len(head) > 0.05


def _expand(item: str) -> list[str]:
    if any(ch in item for ch in "*?["):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise InputError(f"no files match {item!r}")
        return [m for m in matches if os.path.isfile(m)]
    if os.path.isdir(item):
        found = sorted(
            os.path.join(root, name)
            for root, dirs, names in os.walk(item)
            for name in names
            if not name.startswith(".")
        )
        return found
    if os.path.isfile(item):
        return [item]
    raise InputError(f"no such file or directory: {item}")


def resolve_inputs(inputs: list[str], work_dir: Path) -> tuple[list[InputFile], dict[str, list[str]]]:
    """Expand paths, directories, globs and builtins into readable input files.

    Returns the files and the skipped ones by reason. Raises InputError when nothing
    readable is left."""
    if not inputs:
        raise InputError("no input given")
    files: list[InputFile] = []
    skipped: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in inputs:
        paths = [str(materialize_builtin(item, work_dir / "corpus"))] if item.startswith(BUILTIN_PREFIX) else _expand(item)
        for p in paths:
            p = os.path.abspath(p)
            if p in seen:
                continue
            seen.add(p)
            if not p.endswith(SUPPORTED):
                skipped.setdefault("unsupported_type", []).append(p)
                continue
            if not os.access(p, os.R_OK):
                skipped.setdefault("unreadable", []).append(p)
                continue
            if p.endswith(TEXT_SUFFIXES):
                try:
                    binary = looks_binary(p)
                except OSError:  # a corrupt .gz/.zst
                    skipped.setdefault("unreadable", []).append(p)
                    continue
                if binary:
                    skipped.setdefault("binary", []).append(p)
                    continue
            files.append(InputFile(p, os.path.getsize(p), _fingerprint(p)))
    if not files:
        why = "; ".join(f"{reason}: {', '.join(ps[:3])}" for reason, ps in skipped.items()) or "no files"
        raise InputError(f"no readable text input ({why})")
    if all(f.size == 0 for f in files):
        raise InputError("empty corpus: every input file is empty")
    return files, skipped


# --------------------------------------------------------------------------- cleaning


def clean_text(text: str) -> str:
    """NFC-normalize, drop control characters (NUL included), trim."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    return text.strip()


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def is_validation(h: bytes, fraction: float) -> bool:
    return int.from_bytes(h, "big") / 2**64 < fraction


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether it was invalid; invalid bytes are kept as surrogate
    escapes so a later policy (replace, drop, latin1) can still see them."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape"), True


def _finish(text: str, bad: bool, policy: str) -> str:
    if bad and policy != "latin1":
        return text.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
    return text


def _split_txt(data: bytes) -> Iterator[tuple[str, bool]]:
    """Yield (document, had_invalid_utf8) for blank-line separated blocks."""
    for block in re.split(rb"\n[ \t\r\f\v]*\n", data):
        yield _decode(block)


def _split_jsonl(data: bytes, field: str) -> Iterator[tuple[str | None, bool]]:
    for line in data.splitlines():
        if not line.strip():
            continue
        raw, bad = _decode(line)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeEncodeError):
            yield None, False
            continue
        value = obj.get(field) if isinstance(obj, dict) else None
        yield (value if isinstance(value, str) else None), bad


def _doc_row(text: str | None, reason: str, cfg: DataConfig) -> dict[str, Any]:
    if text is not None and not reason:
        text = clean_text(text)
        if len(text) < cfg.min_doc_chars:
            reason = "empty"
    if reason:
        return {"text": "", "doc_hash": b"", "split": "", "drop_reason": reason}
    h = doc_hash(text)
    split = "validation" if is_validation(h, cfg.validation_fraction) else "train"
    return {"text": text, "doc_hash": h, "split": split, "drop_reason": ""}


def read_documents(files: list[InputFile], cfg: DataConfig):
    """Ray Dataset of documents: text, doc_hash, split, drop_reason ('' when kept).

    Dropped documents stay in the stream as rows with a reason, so the counts reach
    the manifest without a second pass over the corpus."""
    import ray

    text_paths = [f.path for f in files if f.path.endswith(TEXT_SUFFIXES)]
    parquet_paths = [f.path for f in files if f.path.endswith(PARQUET_SUFFIXES)]
    parts = []
    if text_paths:

        def explode(row: dict[str, Any]) -> list[dict[str, Any]]:
            path = row["path"]
            try:
                data = decompress(path, row["bytes"])
            except OSError:
                return [_doc_row(None, "unreadable_file", cfg)]
            is_jsonl = path.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl")
            docs = _split_jsonl(data, cfg.text_field) if is_jsonl else _split_txt(data)
            out = []
            for text, bad_utf8 in docs:
                if text is None:
                    out.append(_doc_row(None, "bad_json_or_missing_field", cfg))
                elif bad_utf8 and cfg.invalid_utf8 == "drop":
                    out.append(_doc_row(None, "invalid_utf8", cfg))
                elif bad_utf8 and cfg.invalid_utf8 == "latin1":
                    out.append(_doc_row(text.encode("utf-8", "surrogateescape").decode("latin-1"), "", cfg))
                    out.append({"text": "", "doc_hash": b"", "split": "", "drop_reason": "_latin1"})
                else:
                    # Invalid bytes are replaced by U+FFFD and the document kept; counted.
                    row_ = _doc_row(_finish(text, bad_utf8, "replace"), "", cfg)
                    out.append(row_)
                    if bad_utf8 and not row_["drop_reason"]:
                        out.append({"text": "", "doc_hash": b"", "split": "", "drop_reason": "_repaired_utf8"})
            return out

        ds = ray.data.read_binary_files(text_paths, include_paths=True, shuffle=None)
        parts.append(ds.flat_map(explode))
    if parquet_paths:
        field = cfg.text_field

        def rows(batch: dict[str, Any]) -> dict[str, list]:
            out = [_doc_row(t if isinstance(t, str) else None, "" if isinstance(t, str) else "missing_text", cfg)
                   for t in batch[field]]
            return {k: [r[k] for r in out] for k in ("text", "doc_hash", "split", "drop_reason")}

        try:
            ds = ray.data.read_parquet(parquet_paths, columns=[field])
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise InputError(f"cannot read parquet input: {str(e).splitlines()[0]}") from None
        parts.append(ds.map_batches(rows, batch_format="numpy"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
