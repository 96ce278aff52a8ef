"""Parquet shard writing, the manifest (`Manifest`), verification and batch plans.

A dataset is a folder (local or an object-store URI, see `mlm.storage`) with
`manifest.json`; each shard is written to a temporary name and committed by the
prepare actor that made it, and the manifest is written last by the driver, so a
folder without a manifest, or a shard without an entry in it, is never taken for data.

Integrity without re-reading: every data page of a shard carries a CRC32 (Parquet page
checksums) that is checked whenever the page is read (`open_shard`, `read_shard`), so
a corrupt page fails the read, naming the shard. The sha256 of whole shards (in the
manifest) is checked only where reading everything is the point: by prepare before it
reuses or extends a dataset, and by `mlm data verify`. Train and evaluate check what
costs no data reads (`checked_shards`: listed, present, footer readable, row count).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlm import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


class DatasetError(ValueError):
    """Missing manifest, missing or corrupt shard."""


# How every shard is written: zstd, and a CRC32 in each data page's header that readers
# check (shards written before page checksums have none; they read as before, unchecked).
WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}


def arrow_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_len)),
            pa.field("labels", pa.list_(pa.int32(), seq_len)),
            pa.field("num_tokens", pa.int32()),
        ]
    )


def schema_doc(seq_len: int, dynamic: bool = False) -> dict[str, Any]:
    train = "unmasked token ids (masked at load time) in train, " if dynamic else ""
    return {
        "input_ids": f"fixed_size_list<int32>[{seq_len}]: {train}masked token ids ([CLS] ... [SEP] [PAD]...)",
        "labels": f"fixed_size_list<int32>[{seq_len}]: original id where predicted, -100 elsewhere"
                  + (" (all -100 in a dynamic train split)" if dynamic else ""),
        "num_tokens": "int32: real tokens in the row; positions >= num_tokens are padding",
    }


def to_table(ids: np.ndarray, labels: np.ndarray, num_tokens: np.ndarray) -> pa.Table:
    seq_len = ids.shape[1]
    fixed = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.int32()), seq_len)  # noqa: E731
    return pa.Table.from_arrays(
        [fixed(ids), fixed(labels), pa.array(num_tokens, pa.int32())], schema=arrow_schema(seq_len)
    )


def column_2d(batch: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """A fixed-size-list column as an [rows, seq_len] array (slice offsets honoured)."""
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def sha256_file(path: str | Path) -> str:
    return storage.sha256(path)


class ShardWriter:
    """Buffers rows of one split and writes `{split}-{index:05d}-{part:03d}.parquet`
    shards of at most `rows_per_shard` rows (zstd, page checksums) into `out_dir` (local
    or URI), each through a temporary name. `index` numbers the unit of work (an input
    range), so the names, like the content, do not depend on which worker wrote them."""

    def __init__(self, out_dir: str | Path, split: str, rows_per_shard: int, index: int = 0):
        self.out_dir, self.split, self.rows_per_shard = str(out_dir), split, rows_per_shard
        self.index = index
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> list[dict[str, Any]]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.buffer).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        name = shard_name(self.split, self.index, len(self.shards))
        buf = io.BytesIO()
        pq.write_table(head, buf, row_group_size=min(rows, 8192), **WRITE_OPTIONS)
        data = buf.getvalue()
        storage.write_bytes(storage.join(self.out_dir, name), data)
        labels = column_2d(head, "labels")
        self.shards.append(
            {
                "file": name,
                "rows": head.num_rows,
                "tokens": int(pc_sum(head.column("num_tokens"))),
                "masked": int((labels != -100).sum()),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )


def shard_name(split: str, index: int, part: int) -> str:
    return f"{split}-{index:05d}-{part:03d}.parquet"


def shard_index(file: str) -> int:
    """The unit-of-work number in a shard's name (`train-00012-000.parquet` -> 12)."""
    return int(file.split("-")[1].split(".")[0])


def pc_sum(col: pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    return pc.sum(col).as_py() or 0


@dataclass(frozen=True)
class ShardEntry:
    file: str  # name inside the dataset folder
    rows: int
    tokens: int  # real tokens (specials included)
    masked: int  # positions with a label
    sha256: str


@dataclass(frozen=True)
class Split:
    shards: list[ShardEntry]
    rows: int
    tokens: int
    masked: int
    documents: int


@dataclass(frozen=True)
class TokenizerInfo:
    dir: str  # folder inside the dataset
    fingerprint: str
    vocab_size: int
    trained: bool  # trained on this data (else loaded from tokenizer.path)


@dataclass(frozen=True)
class Documents:
    kept: int
    dropped: dict[str, int]  # by reason
    repaired_invalid_utf8: int = 0
    decoded_as_latin1: int = 0


@dataclass(frozen=True)
class MostFrequentToken:
    id: int
    token: str


@dataclass(frozen=True)
class Manifest:
    """A dataset's `manifest.json`, typed. Written last by `mlm prepare` (the folder is a
    dataset from then on); every stage that reads a dataset reads it through
    `Manifest.read`. `to_dict()` is the JSON as stored: the format is unchanged, so
    existing datasets load (fields added later have defaults)."""

    schema_version: int
    inputs_fingerprint: str  # inputs' content hashes + the config sections below + masking terms
    inputs: list[dict[str, Any]]  # corpus.InputFile.to_dict(): path, blake2b, size, ...
    config: dict[str, Any]  # the data, tokenizer, masking and eval sections that made it
    tokenizer: TokenizerInfo
    seq_len: int
    masking: dict[str, dict[str, Any]]  # train: the training masking; validation: the fixed evaluation masking
    splits: dict[str, Split]
    documents: Documents
    most_frequent_token: MostFrequentToken  # in the train split, specials left out (the baseline)
    fingerprint: str  # inputs fingerprint + every shard's sha256 + the tokenizer's fingerprint
    created_unix: int = 0
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # unusable inputs by reason
    schema: dict[str, str] = field(default_factory=dict)  # column -> description
    packing: str = "pack"
    ranges: int = 0  # units of work of the last run
    nodes_used: int = 0
    increments: list[dict[str, Any]] = field(default_factory=list)  # one per run that added files
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know, kept

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in d.items() if k in known} | {
                "tokenizer": TokenizerInfo(**d["tokenizer"]),
                "splits": {name: Split(**(sp | {"shards": [ShardEntry(**x) for x in sp["shards"]]}))
                           for name, sp in d["splits"].items()},
                "documents": Documents(**d["documents"]),
                "most_frequent_token": MostFrequentToken(**d["most_frequent_token"]),
                "extra": {k: v for k, v in d.items() if k not in known},
            })
        except (KeyError, TypeError) as e:
            raise DatasetError(f"malformed manifest: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return out.pop("extra") | out

    @classmethod
    def read(cls, data_dir: str | Path) -> "Manifest":
        """The manifest of the dataset in `data_dir`; DatasetError when there is none (an
        unfinished or foreign folder), it is not valid JSON or of another schema version."""
        return cls.from_dict(read_manifest(data_dir))

    def write(self, out_dir: str | Path) -> None:
        blob = json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()
        storage.write_bytes(storage.join(out_dir, MANIFEST), blob)

    @classmethod
    def of_shards(cls, split_shards: dict[str, list[dict[str, Any]]], seq_len: int = 0) -> "Manifest":
        """A manifest listing these shards and nothing else (tools and tests that make
        a dataset by hand)."""
        splits = {name: Split(shards=[ShardEntry(**x) for x in lst], rows=sum(x["rows"] for x in lst),
                              tokens=sum(x["tokens"] for x in lst), masked=sum(x["masked"] for x in lst), documents=0)
                  for name, lst in split_shards.items()}
        return cls(schema_version=SCHEMA_VERSION, inputs_fingerprint="", inputs=[], config={},
                   tokenizer=TokenizerInfo(dir="tokenizer", fingerprint="", vocab_size=0, trained=False),
                   seq_len=seq_len, masking={}, splits=splits, documents=Documents(kept=0, dropped={}),
                   most_frequent_token=MostFrequentToken(id=0, token=""), fingerprint="")

    def files(self) -> set[str]:
        """Every shard file the manifest lists."""
        return {x.file for sp in self.splits.values() for x in sp.shards}


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest's JSON as stored (for tools and tests; code uses `Manifest.read`)."""
    path = storage.join(data_dir, MANIFEST)
    try:
        found = storage.is_file(path)
        if not found and not storage.is_dir(data_dir):
            raise DatasetError(f"no such dataset directory: {data_dir}")
        if not found:
            raise DatasetError(f"{data_dir} is not a dataset: no {MANIFEST} (an unfinished or foreign folder)")
        text = storage.read_bytes(path)
    except storage.StorageError as e:
        raise DatasetError(str(e)) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}")
    return manifest


def plan_batches(files: list[str], batch_size: int) -> list[tuple[str, int, int]]:
    """Shards as (file, first row, rows) batches, in order: the evaluation set's batches.
    Every engine that scores them (local, Ray Data, in-training validation, the ONNX
    parity check) reads exactly these."""
    plan = []
    for f in files:
        n = open_shard(f).metadata.num_rows
        plan += [(f, start, min(batch_size, n - start)) for start in range(0, n, batch_size)]
    return plan


def read_batches(plan: list[tuple[str, int, int]]):
    """The pyarrow tables of a `plan_batches` plan, each file read once (pages checked)."""
    table, current = None, None
    for f, start, n in plan:
        if f != current:
            table, current = read_shard(f), f
        yield table.slice(start, n)


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_shard(path: str):
    """A shard opened for reading (a pyarrow ParquetFile): its footer is read now, and
    each data page's checksum is checked when the page is read. DatasetError naming the
    shard when it is missing or its footer cannot be read (truncated, not Parquet)."""
    try:
        return storage.parquet_file(path, page_checksums=True)
    except storage.StorageError as e:  # names the path
        raise DatasetError(f"shard missing or unreadable: {_reason(e)}") from None
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"corrupt shard (Parquet footer: {_reason(e)}): {path}") from None


def read_shard(path: str, row_group: int | None = None) -> pa.Table:
    """A shard's rows, all or one row group, every data page checked against its
    checksum: a corrupt page raises DatasetError naming the shard (and the row group)
    instead of handing wrong tokens to training or evaluation."""
    pf = open_shard(path)
    try:
        return pf.read() if row_group is None else pf.read_row_group(row_group)
    except (OSError, pa.ArrowException) as e:
        where = "" if row_group is None else f"row group {row_group}: "
        raise DatasetError(f"corrupt or unreadable shard ({where}{_reason(e)}; `mlm data verify` checks every "
                           f"shard): {path}") from None


def shard_paths(data_dir: str | Path, split: str, verify: bool = True) -> list[str]:
    """Paths (absolute, or URIs) of a split's shards, each checked to be there; with
    `verify`, each sha256 is checked too, which reads the whole split (prepare before it
    reuses a dataset, `mlm data verify`), and a corrupt shard raises an error naming it.
    Train and evaluate use `checked_shards` instead."""
    manifest = Manifest.read(data_dir)
    out = _present(data_dir, manifest, split)
    for shard, path in zip(manifest.splits[split].shards, out if verify else []):
        if storage.sha256(path) != shard.sha256:
            raise DatasetError(f"corrupt shard (sha256 mismatch): {path}")
    return out


def _present(data_dir: str | Path, manifest: Manifest, split: str) -> list[str]:
    """Paths of a split's shards, each found in one listing of the folder (on an object
    store one request per 1,000 names, not one per shard); DatasetError naming the first
    one missing."""
    found = set(storage.list_names(data_dir))
    out = []
    for shard in manifest.splits[split].shards:
        path = storage.join(data_dir, shard.file)
        if shard.file not in found:
            raise DatasetError(f"shard missing: {path}")
        out.append(path)
    return out


def checked_shards(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> list[str]:
    """Paths of a split's shards, checked without reading their data: every shard the
    manifest lists is there, its Parquet footer reads and holds the manifest's row count
    (a truncated or extended file fails here, naming it). What train and
    evaluate check before they start; the data pages are checked as they are read.
    `manifest`: the dataset's, when the caller has read it already."""
    manifest = Manifest.read(data_dir) if manifest is None else manifest
    out = _present(data_dir, manifest, split)
    for shard, path in zip(manifest.splits[split].shards, out):
        rows = open_shard(path).metadata.num_rows
        if rows != shard.rows:
            raise DatasetError(f"corrupt shard ({rows} rows, the manifest lists {shard.rows}): {path}")
    return out


def verify(data_dir: str | Path) -> list[str]:
    """All problems found in a dataset (empty list: it is sound)."""
    problems = []
    try:
        manifest = Manifest.read(data_dir)
    except DatasetError as e:
        return [str(e)]
    for split in manifest.splits:
        try:
            shard_paths(data_dir, split, verify=True)
        except DatasetError as e:
            problems.append(str(e))
    return problems
