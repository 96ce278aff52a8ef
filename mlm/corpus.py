"""Corpus sources -> byte ranges -> cleaned documents, with bad-input accounting.

Sources: local paths, directories and globs; object-store URIs (s3://, gs://, any
scheme pyarrow.fs knows); Hugging Face `save_to_disk` folders (offline) and
`hf:NAME[:CONFIG]` hub datasets (online, cached as a `save_to_disk` folder).

Document boundaries: a .txt file holds documents separated by blank lines (BERT's
convention); a .jsonl line, a .parquet row or an Arrow row is one document
(`data.text_field`). .txt and .jsonl may be compressed (.gz, .zst).

Reading is planned as *ranges*: an uncompressed text file is cut at document
boundaries into pieces of about `data.read_chunk_bytes`, a Parquet file into groups of
row groups, a compressed or Arrow file is one range read as a stream. A range is the
unit of work of the data stage; the plan depends only on the input bytes and the
config, so the output does not depend on the number of workers or nodes.
Every document gets a content hash; the hash alone decides its split.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import hashlib
import json
import os
import re
import sysconfig
import tempfile
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from mlm import storage
from mlm.config import DataConfig

COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
TEXT_SUFFIXES = tuple(base + comp for base in (".txt", ".jsonl") for comp in ("", *COMPRESSION))
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
SUPPORTED = TEXT_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"
DEFAULT_CORPUS = "builtin:python-docs"

# Control characters that end a line (CR, VT, FF, the information separators, NEL):
# newlines, so the words on either side stay apart. The other C0/C1 controls (NUL
# included) are removed; tab and newline stay.
_LINE_BREAK = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1f\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_ANY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TXT_SEPARATOR = re.compile(rb"\n[ \t\r\f\v]*\n")


class InputError(ValueError):
    """A user mistake in the inputs (missing path, empty corpus, unreadable file)."""


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute local path or URI
    size: int
    fingerprint: str

    @property
    def kind(self) -> str:
        return file_kind(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blake2b": self.fingerprint}


def file_kind(path: str) -> str:
    """txt | jsonl | parquet | arrow, by suffix (compression suffixes ignored)."""
    base = path
    for suffix in COMPRESSION:
        base = base.removesuffix(suffix)
    return base.rsplit(".", 1)[-1]


def is_uri(path: str) -> bool:
    return storage.is_uri(path)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (see mlm.storage)."""
    try:
        return storage.resolve(path)
    except storage.StorageError as e:
        raise InputError(str(e)) from None


def _join(uri_like: str, inner: str) -> str:
    """The user-facing name of `inner` on the filesystem of `uri_like`."""
    if not is_uri(uri_like):
        return inner
    scheme = uri_like.split("://", 1)[0]
    return f"{scheme}://{inner}"
# --------------------------------------------------------------------------- builtin corpus


def docstrings(path: Path) -> Iterator[str]:
    """The docstrings of one Python file (module, classes, functions) in source order;
    none when it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


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
        yield from (doc for doc in docstrings(path) if len(doc) >= 200)


BUILTINS = {"python-docs": _python_docs}


def materialize_builtin(name: str, dest_dir: Path) -> Path:
    """Write a builtin corpus as .jsonl once; later calls reuse the file."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTINS:
        raise InputError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{key}.jsonl"
    if not out.exists():
        with storage.output_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for doc in BUILTINS[key]():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return out


# --------------------------------------------------------------------------- input resolution


def _fingerprint(path: str) -> str:
    """Content hash for local files; for object-store files (where reading everything
    twice costs money) size, modification time and path stand in for the content."""
    h = hashlib.blake2b(digest_size=16)
    fs, inner = filesystem(path)
    if is_uri(path):
        info = fs.get_file_info(inner)
        h.update(f"{path}:{info.size}:{info.mtime_ns}".encode())
        return h.hexdigest()
    with open(inner, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _codec(path: str) -> str | None:
    return next((codec for suffix, codec in COMPRESSION.items() if path.endswith(suffix)), None)


def open_stream(path: str):
    """A readable stream of the file's (decompressed) bytes."""
    import pyarrow as pa

    fs, inner = filesystem(path)
    raw = fs.open_input_file(inner)
    codec = _codec(path)
    return raw if codec is None else pa.CompressedInputStream(raw, codec)


def _head(path: str, n: int) -> bytes:
    with open_stream(path) as stream:
        return stream.read(n)


def looks_binary(path: str, sniff_bytes: int = 8192) -> bool:
    """More than 5% control bytes in the first (decompressed) block: not a text file.
    Parquet and Arrow files are binary by design and are not sniffed."""
    head = _head(path, sniff_bytes)
    if not head:
        return False
    # Control bytes (NUL included) are rare in text, even damaged text, and common in
    # binary formats; a stray NUL is cleaned later rather than costing the file.
    control = sum(1 for b in head if b < 32 and b not in (8, 9, 10, 11, 12, 13, 27))
    return control / len(head) > 0.05


def _hf_saved_dataset(folder: str) -> list[str] | None:
    """The Arrow files of a Hugging Face `save_to_disk` folder (a Dataset, or every split
    of a DatasetDict), or None when `folder` is not one."""
    fs, inner = filesystem(folder)
    read = lambda p: json.loads(fs.open_input_stream(p).read())  # noqa: E731
    import pyarrow.fs as pafs

    def exists(p: str) -> bool:
        return fs.get_file_info(p).type == pafs.FileType.File

    if exists(f"{inner}/state.json"):
        state = read(f"{inner}/state.json")
        return [_join(folder, f"{inner}/{f['filename']}") for f in state.get("_data_files", [])]
    if exists(f"{inner}/dataset_dict.json"):
        files: list[str] = []
        for split in read(f"{inner}/dataset_dict.json").get("splits", []):
            files += _hf_saved_dataset(_join(folder, f"{inner}/{split}")) or []
        return files
    return None


def hub_dataset(name: str, work_dir: Path) -> str:
    """`hf:NAME[:CONFIG]` -> a local `save_to_disk` folder of its train split (needs the
    network the first time and the `datasets` package)."""
    spec = name.removeprefix(HUB_PREFIX)
    repo, _, config = spec.partition(":")
    dest = work_dir / "corpus" / ("hf-" + re.sub(r"[^A-Za-z0-9._-]", "_", spec))
    if (dest / "state.json").exists():
        return str(dest)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{name} needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated...
        raise InputError(f"cannot load {name} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        ds.save_to_disk(os.path.join(tmp, "ds"))
        storage.put_dir(os.path.join(tmp, "ds"), dest, move=True)
    return str(dest)


def _expand(item: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = filesystem(item)
    if any(ch in inner for ch in "*?["):
        if is_uri(item):  # list the fixed prefix, match the rest
            base = re.split(r"[*?\[]", inner, maxsplit=1)[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = sorted(_join(item, i.path) for i in infos
                             if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, inner))
        else:
            matches = sorted(m for m in glob.glob(inner, recursive=True) if os.path.isfile(m))
        if not matches:
            raise InputError(f"no files match {item!r}")
        return matches
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        saved = _hf_saved_dataset(item)
        if saved is not None:
            return saved
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        return sorted(
            _join(item, i.path) for i in infos
            if i.type == pafs.FileType.File and not any(part.startswith(".") for part in i.path[len(inner):].split("/"))
        )
    if info.type == pafs.FileType.File:
        return [_join(item, inner)]
    raise InputError(f"no such file or directory: {item}")


def _local_name(path: str) -> str:
    """Absolute, except inside a Ray job's uploaded working directory: there a file of
    that directory keeps its relative name, so every node opens its own copy (each node
    unpacks the working directory at a different place) and manifests stay comparable
    between jobs."""
    path = os.path.abspath(path)
    cwd = os.getcwd()
    if f"{os.sep}working_dir_files{os.sep}" in cwd + os.sep and path.startswith(cwd + os.sep):
        return os.path.relpath(path, cwd)
    return path


def resolve_inputs(inputs: list[str], work_dir: Path) -> tuple[list[InputFile], dict[str, list[str]]]:
    """Expand paths, directories, globs, URIs, builtins and hub names into readable
    input files. Returns the files and the skipped ones by reason. Raises InputError
    when nothing readable is left."""
    if not inputs:
        raise InputError("no input given")
    files: list[InputFile] = []
    skipped: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in inputs:
        if item.startswith(BUILTIN_PREFIX):
            paths = [str(materialize_builtin(item, work_dir / "corpus"))]
        elif item.startswith(HUB_PREFIX):
            paths = _expand(hub_dataset(item, work_dir))
        else:
            paths = _expand(item)
        for p in paths:
            p = p if is_uri(p) else _local_name(p)
            if p in seen:
                continue
            seen.add(p)
            if not p.endswith(SUPPORTED):
                skipped.setdefault("unsupported_type", []).append(p)
                continue
            fs, inner = filesystem(p)
            if not is_uri(p) and not os.access(inner, os.R_OK):
                skipped.setdefault("unreadable", []).append(p)
                continue
            try:
                if p.endswith(TEXT_SUFFIXES) and looks_binary(p):
                    skipped.setdefault("binary", []).append(p)
                    continue
                size = fs.get_file_info(inner).size
                files.append(InputFile(p, size, _fingerprint(p)))
            except OSError:  # a corrupt .gz/.zst, a vanished or forbidden object
                skipped.setdefault("unreadable", []).append(p)
    if not files:
        why = "; ".join(f"{reason}: {', '.join(ps[:3])}" for reason, ps in skipped.items()) or "no files"
        raise InputError(f"no readable text input ({why})")
    if all(f.size == 0 for f in files):
        raise InputError("empty corpus: every input file is empty")
    return files, skipped


# --------------------------------------------------------------------------- range planning


@dataclass(frozen=True)
class Range:
    """A piece of one input file: bytes [start, end) of an uncompressed text file,
    row groups [start, end) of a Parquet file, or a whole file (end = -1)."""

    path: str
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _next_boundary(stream, offset: int, kind: str, block: int = 1 << 20) -> int | None:
    """The first document boundary at or after `offset`: the end of a blank-line
    separator (.txt) or of a line (.jsonl); None when the file ends first."""
    stream.seek(offset)
    pattern = _TXT_SEPARATOR if kind == "txt" else re.compile(rb"\n")
    carry, carry_start = b"", offset
    while True:
        data = stream.read(block)
        if not data:
            return None
        buf = carry + data
        m = pattern.search(buf)
        if m:
            return carry_start + m.end()
        # A separator may straddle blocks: keep the trailing whitespace only.
        keep = len(buf) - len(buf.rstrip(b" \t\r\f\v\n"))
        carry, carry_start = buf[len(buf) - keep:], carry_start + len(buf) - keep


def plan_ranges(files: list[InputFile], chunk_bytes: int) -> list[Range]:
    """Cut every input into ranges of about `chunk_bytes` at document boundaries."""
    import pyarrow.parquet as pq

    ranges: list[Range] = []
    for f in files:
        kind = f.kind
        if kind in ("txt", "jsonl") and _codec(f.path) is None and f.size > chunk_bytes:
            fs, inner = filesystem(f.path)
            cuts = [0]
            with fs.open_input_file(inner) as stream:
                target = chunk_bytes
                while target < f.size:
                    cut = _next_boundary(stream, target, kind)
                    if cut is None or cut >= f.size:
                        break
                    cuts.append(cut)
                    target = max(cut, target) + chunk_bytes
            cuts.append(f.size)
            ranges += [Range(f.path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        elif kind == "parquet":
            fs, inner = filesystem(f.path)
            try:
                meta = pq.ParquetFile(fs.open_input_file(inner)).metadata
            except Exception as e:  # noqa: BLE001
                raise InputError(f"cannot read parquet input {f.path}: {str(e).splitlines()[0]}") from None
            start, size = 0, 0
            for rg in range(meta.num_row_groups):
                size += meta.row_group(rg).total_byte_size
                if size >= chunk_bytes or rg == meta.num_row_groups - 1:
                    ranges.append(Range(f.path, start, rg + 1))
                    start, size = rg + 1, 0
        else:
            ranges.append(Range(f.path, 0, -1))
    return ranges
# --------------------------------------------------------------------------- cleaning


def clean_text(text: str) -> str:
    """NFC-normalize, line-ending controls to newlines, drop other control characters
    (NUL included), trim."""
    text = unicodedata.normalize("NFC", text)
    if _ANY_CONTROL.search(text):  # rare: one scan for the common case
        text = _CONTROL.sub("", _LINE_BREAK.sub("\n", text))
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


def _split_txt(data: bytes) -> Iterator[tuple[str, bool]]:
    """Yield (document, had_invalid_utf8) for blank-line separated blocks; blocks of
    whitespace only are not documents (so where a file is cut does not matter)."""
    for block in _TXT_SEPARATOR.split(data):
        if block.strip():
            yield _decode(block)


def _split_jsonl(data: bytes, field: str) -> Iterator[tuple[str | None, bool]]:
    for line in data.split(b"\n"):
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


DROPPED = {"text": "", "doc_hash": b"", "split": ""}


def _doc_row(text: str | None, reason: str, cfg: DataConfig) -> dict[str, Any]:
    if text is not None and not reason:
        text = clean_text(text)
        if len(text) < cfg.min_doc_chars:
            reason = "empty"
    if reason:
        return DROPPED | {"drop_reason": reason}
    h = doc_hash(text)
    split = "validation" if is_validation(h, cfg.validation_fraction) else "train"
    return {"text": text, "doc_hash": h, "split": split, "drop_reason": ""}


def _text_rows(data: bytes, kind: str, cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """Document rows of a piece of a .txt/.jsonl file, with the invalid-UTF-8 policy.
    Rows whose reason starts with '_' are counters, not drops."""
    docs = _split_jsonl(data, cfg.text_field) if kind == "jsonl" else _split_txt(data)
    for text, bad_utf8 in docs:
        if text is None:
            yield _doc_row(None, "bad_json_or_missing_field", cfg)
        elif bad_utf8 and cfg.invalid_utf8 == "drop":
            yield _doc_row(None, "invalid_utf8", cfg)
        elif bad_utf8 and cfg.invalid_utf8 == "latin1":
            yield _doc_row(text.encode("utf-8", "surrogateescape").decode("latin-1"), "", cfg)
            yield DROPPED | {"drop_reason": "_latin1"}
        else:
            if bad_utf8:  # invalid bytes become U+FFFD and the document is kept; counted
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
            row = _doc_row(text, "", cfg)
            yield row
            if bad_utf8 and not row["drop_reason"]:
                yield DROPPED | {"drop_reason": "_repaired_utf8"}


def _text_pieces(stream, kind: str, limit: int | None, block: int) -> Iterator[bytes]:
    """Read a text stream in blocks and yield pieces cut at the last document boundary
    of each block, so memory holds about one block (or one document, if longer)."""
    pattern = _TXT_SEPARATOR if kind == "txt" else re.compile(rb"\n")
    carry, remaining = b"", limit
    while remaining is None or remaining > 0:
        data = stream.read(block if remaining is None else min(block, remaining))
        if not data:
            break
        if remaining is not None:
            remaining -= len(data)
        buf = carry + data
        last = None
        for last in pattern.finditer(buf, max(0, len(carry) - 64)):
            pass
        if last is None:
            carry = buf
            continue
        yield buf[: last.end()]
        carry = buf[last.end():]
    if carry:
        yield carry


def iter_range(r: Range, cfg: DataConfig, block_bytes: int = 8 << 20) -> Iterator[dict[str, Any]]:
    """Document rows of one range, in file order. Dropped documents are rows with a
    reason, so the counts reach the manifest without a second pass over the corpus."""
    kind = file_kind(r.path)
    try:
        if kind in ("txt", "jsonl"):
            stream = open_stream(r.path)
            if r.end >= 0:
                stream.seek(r.start)
            with stream:
                for piece in _text_pieces(stream, kind, r.end - r.start if r.end >= 0 else None, block_bytes):
                    yield from _text_rows(piece, kind, cfg)
            return
        for texts in _table_texts(r, cfg.text_field):
            for t in texts:
                yield _doc_row(t, "", cfg) if isinstance(t, str) else _doc_row(None, "missing_text", cfg)
    except OSError:  # a truncated .gz, a file that vanished mid-run
        yield _doc_row(None, "unreadable_file", cfg)


def _table_texts(r: Range, field: str, batch_rows: int = 1024) -> Iterator[list]:
    """The text column of a Parquet range or an Arrow (IPC stream or file) input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner = filesystem(r.path)
    if file_kind(r.path) == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(inner))
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(range(r.start, r.end)), columns=[field]):
            yield batch.column(0).to_pylist()
        return
    source = fs.open_input_file(inner)
    try:
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    except pa.ArrowInvalid:  # the random-access IPC file format
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        col = batch.column(batch.schema.get_field_index(field))
        for start in range(0, len(col), batch_rows):
            yield col.slice(start, batch_rows).to_pylist()


def check_text_column(files: list[InputFile], field: str) -> None:
    """Parquet and Arrow inputs must have the text column: one clear error up front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if f.kind not in ("parquet", "arrow"):
            continue
        fs, inner = filesystem(f.path)
        try:
            if f.kind == "parquet":
                names = pq.ParquetFile(fs.open_input_file(inner)).schema_arrow.names
            else:
                try:
                    names = pa.ipc.open_stream(fs.open_input_file(inner)).schema.names
                except pa.ArrowInvalid:
                    names = pa.ipc.open_file(fs.open_input_file(inner)).schema.names
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise InputError(f"cannot read {f.kind} input {f.path}: {str(e).splitlines()[0]}") from None
        if field not in names:
            raise InputError(f"{f.path} has no column {field!r} (data.text_field); columns: {', '.join(names[:10])}")


def read_documents(ranges: list[Range], cfg: DataConfig):
    """Ray Dataset of document rows (text, doc_hash, split, drop_reason) in range order."""
    import ray

    def read(batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        for item in batch["item"]:
            rows: list[dict[str, Any]] = []
            for row in iter_range(Range(**item), cfg):
                rows.append(row)
                if len(rows) == 1024:
                    yield {k: [r[k] for r in rows] for k in rows[0]}
                    rows = []
            if rows:
                yield {k: [r[k] for r in rows] for k in rows[0]}

    items = ray.data.from_items([{"item": r.to_dict()} for r in ranges], override_num_blocks=max(1, len(ranges)))
    return items.map_batches(read, batch_size=1, batch_format="pandas")
