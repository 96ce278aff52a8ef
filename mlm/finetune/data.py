"""Labelled inputs for fine-tuning: a file of (text, label) rows, checked, and the
built-in probe task.

Inputs are JSON lines, CSV or Parquet (by extension), local or on an object store;
`builtin:stdlib-topics` is the probe task that ships with Python (below). Labels are
kept as strings and mapped to ids in sorted order (`label_ids`), so a model's
`id2label` is the same for the same set of labels whatever the row order.
"""

from __future__ import annotations

import hashlib
import io
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mlm import storage

BUILTIN = "builtin:"
PROBE = "builtin:stdlib-topics"
# The probe task: docstrings of these standard-library packages (present from Python 3.10
# to 3.13), each labelled by its top-level package: a topic task from real text that no
# one here labels by hand. Docstrings of 60 characters or more; the package's own name is
# replaced by "this module" so the label is not spelled out in the text.
PROBE_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "tkinter", "unittest", "xml")
PROBE_MIN_CHARS = 60
PROBE_TEST_SHARE = 0.25  # rows whose text hash falls below it form the test split
PROBE_PER_CLASS = 120  # at most this many training rows per package (tkinter has 4x asyncio's)


class LabelledDataError(ValueError):
    """Unusable labelled input: one line that says what and where."""


@dataclass(frozen=True)
class Labelled:
    """(text, label) rows of one file."""

    source: str
    texts: list[str]
    labels: list[str]
    fingerprint: str  # sha256 of the rows as read

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled(path: str, text_column: str = "text", label_column: str = "label") -> Labelled:
    """The rows of a .jsonl/.json, .csv or .parquet file (or `builtin:stdlib-topics:train|test`),
    every text non-empty and every label set; LabelledDataError otherwise."""
    if path.startswith(BUILTIN):
        return probe_split(path)
    table = _read_table(path)
    missing = [c for c in (text_column, label_column) if c not in table.column_names]
    if missing:
        raise LabelledDataError(f"{path}: no column {', '.join(map(repr, missing))}; it has {', '.join(table.column_names)} "
                                "(--text-column / --label-column)")
    texts, labels = table.column(text_column).to_pylist(), table.column(label_column).to_pylist()
    for i, (t, y) in enumerate(zip(texts, labels), start=1):
        if not isinstance(t, str) or not t.strip():
            raise LabelledDataError(f"{path}: row {i} has an empty or non-text {text_column!r}")
        if y is None or (isinstance(y, str) and not y.strip()):
            raise LabelledDataError(f"{path}: row {i} has no {label_column!r}")
    if not texts:
        raise LabelledDataError(f"{path}: no rows")
    labels = [str(y) for y in labels]
    return Labelled(path, texts, labels, _fingerprint(texts, labels))


LABELLED_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet")


def is_labelled_file(path: str) -> bool:
    """A labelled file (by its name), as opposed to a prepared dataset folder."""
    return path.startswith(BUILTIN) or Path(path.split("?")[0]).suffix.lower() in LABELLED_SUFFIXES


def _read_table(path: str):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if not storage.is_file(path):
        raise LabelledDataError(f"no such file: {path}")
    data = storage.read_bytes(path)
    suffix = Path(path.split("?")[0]).suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            return pjson.read_json(io.BytesIO(data))
        if suffix == ".csv":
            return pcsv.read_csv(io.BytesIO(data))
        if suffix == ".parquet":
            return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise LabelledDataError(f"{path}: not readable as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    raise LabelledDataError(f"{path}: unknown format {suffix or '(no extension)'}; use .jsonl, .csv or .parquet")


def _fingerprint(texts: list[str], labels: list[str]) -> str:
    h = hashlib.sha256()
    for t, y in zip(texts, labels):
        h.update(t.encode() + b"\x00" + y.encode() + b"\x01")
    return h.hexdigest()


def label_ids(train: Labelled, validation: Labelled) -> dict[str, int]:
    """label -> id, sorted; at least two classes in training, and no validation label the
    training data lacks."""
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise LabelledDataError(f"{train.source}: one class only ({classes[0]!r}); a classifier needs two or more")
    unknown = sorted(set(validation.labels) - set(classes))
    if unknown:
        raise LabelledDataError(f"{validation.source}: labels the training data lacks: {', '.join(map(repr, unknown[:5]))}")
    return {y: i for i, y in enumerate(classes)}


# --------------------------------------------------------------------------- the probe task


def probe_split(name: str) -> Labelled:
    """`builtin:stdlib-topics:train` or `...:test`: the probe task's fixed split (by a
    hash of each text, so it is the same on every machine with the same Python)."""
    base, _, split = name.rpartition(":")
    if base != PROBE or split not in ("train", "test"):
        raise LabelledDataError(f"unknown built-in labelled data {name!r}; use {PROBE}:train or {PROBE}:test")
    rows = _probe_rows()
    test = [(t, y) for t, y in rows if _share(t) < PROBE_TEST_SHARE]
    train: list[tuple[str, str]] = []
    if split == "train":
        per_class: dict[str, int] = {}
        for t, y in rows:
            if _share(t) >= PROBE_TEST_SHARE and per_class.get(y, 0) < PROBE_PER_CLASS:
                per_class[y] = per_class.get(y, 0) + 1
                train.append((t, y))
    chosen = train if split == "train" else test
    texts, labels = [t for t, _ in chosen], [y for _, y in chosen]
    return Labelled(name, texts, labels, _fingerprint(texts, labels))


def _share(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _probe_rows() -> list[tuple[str, str]]:
    """(docstring, package) of PROBE_PACKAGES, in a fixed order, each text once."""
    from mlm.corpus import docstrings

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, rows = set(), []
    for package in PROBE_PACKAGES:
        for path in sorted((stdlib / package).rglob("*.py")):
            if {"test", "tests", "__pycache__"} & set(path.relative_to(stdlib).parts):
                continue
            for doc in docstrings(path):
                if len(doc) >= PROBE_MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    rows.append((_unnamed(doc, package), package))
    return rows


def _unnamed(text: str, package: str) -> str:
    """The text without its package's name (the label), case-insensitively."""
    import re

    return re.sub(rf"\b{re.escape(package)}\b", "this module", text, flags=re.IGNORECASE)
