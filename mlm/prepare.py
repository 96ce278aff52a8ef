"""The data stage: read -> clean -> tokenizer -> tokenize -> pack -> mask -> shards.

Composed from corpus, tokenizer, packing, masking and shards. Tokenizing, packing
and masking run in one class-based Ray Data stage (the tokenizer is loaded once per
actor); the driver streams the result into Parquet shards and writes the manifest
last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from mlm import corpus, shards, tokenizer as tok_mod
from mlm.config import Config, DataConfig
from mlm.masking import IGNORE_INDEX, Masker, batch_rng
from mlm.packing import pack, pad_documents

log = logging.getLogger(__name__)
_STATS = "_stats"


class TokenizePackMask:
    """Ray Data stage, one range of input per call: read -> clean -> tokenize -> pack ->
    mask, yielding a table of sequences (+ one stats row) per group of documents.

    Reading inside the stage keeps documents out of the object store; the groups are
    cut by position in the range, so the output depends on the input and the config
    only, never on how many workers run."""

    def __init__(self, tokenizer_file: str, special: dict[str, int], data_cfg: dict, maskers: dict[str, dict],
                 dynamic_train: bool, parallel_encode: bool = True):
        from tokenizers import Tokenizer

        if not parallel_encode:
            # One actor per core already keeps every core busy: the Rust library's own
            # thread pool would only add threads fighting for the same cores. It reads
            # this variable at each call, in this process only.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

        # The Rust tokenizer alone: importing transformers would add seconds to every
        # actor's start.
        backend = Tokenizer.from_file(tokenizer_file)
        backend.no_truncation()
        backend.no_padding()
        # "[SEP]" typed in a document is text, not a boundary: keeps packing invertible.
        backend.encode_special_tokens = True
        self.encode = tok_mod.DocumentEncoder(backend)
        self.data = DataConfig(**data_cfg)
        self.seq_len, self.max_chunk_chars = self.data.seq_len, self.data.max_chunk_chars
        self.cls, self.sep, self.pad = special["cls"], special["sep"], special["pad"]
        self.maskers = {split: Masker(spec) for split, spec in maskers.items()}
        self.dynamic_train = dynamic_train
        self.group_fn = pack if self.data.packing == "pack" else pad_documents

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids per document; a very long document is encoded in whitespace-cut
        chunks whose ids are concatenated, so memory stays bounded."""
        out: list[list[np.ndarray]] = [[] for _ in texts]
        group: list[tuple[int, str]] = []
        group_chars = 0

        def flush() -> None:
            # Encoded group by group (int32 arrays out), so a 50 MB document never has
            # all its words or Encodings in memory at once.
            for (i, _), ids in zip(group, self.encode([piece for _, piece in group])):
                out[i].append(ids)
            group.clear()

        for i, text in enumerate(texts):
            for piece in split_long(text, self.max_chunk_chars):
                group.append((i, piece))
                group_chars += len(piece)
                if group_chars >= 4 * self.max_chunk_chars:
                    flush()
                    group_chars = 0
        flush()
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in out]

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for job in batch.to_pylist():
            r = corpus.Range(**job["range"])
            skip, kept, rows = set(job["skip"]), 0, []
            for row in corpus.iter_range(r, self.data):
                if not row["drop_reason"]:
                    if kept in skip:  # an exact duplicate of an earlier document
                        row = corpus.DROPPED | {"drop_reason": "duplicate"}
                    kept += 1
                rows.append(row)
                if len(rows) == self.data.pack_batch_docs:
                    yield from self._group(rows)
                    rows = []
            yield from self._group(rows, range_bytes=job["bytes"])  # also reports the range as done

    @staticmethod
    def _node() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"

    def _group(self, rows: list[dict], range_bytes: int = 0) -> Iterator[pa.Table]:
        """Tables of sequences for a group of document rows, the last one ending with
        a stats row (drop counts for the driver). Masking runs in blocks of rows, so a
        50 MB document costs a few copies of its token ids, not of float masks."""
        reasons = np.array([r["drop_reason"] for r in rows], dtype=object)
        counts: Counter = Counter(r for r in reasons.tolist() if r)
        counts["_bytes"] = range_bytes
        if range_bytes:  # which node did the range, for the manifest's record
            counts[f"_node:{self._node()}"] = 1
        for split in ("train", "validation"):
            keep = [i for i, r in enumerate(rows) if not r["drop_reason"] and r["split"] == split]
            if not keep:
                continue
            docs = self._encode([rows[i]["text"] for i in keep])
            counts["no_tokens"] += sum(1 for d in docs if len(d) == 0)
            counts[f"docs_{split}"] += sum(1 for d in docs if len(d))
            ids, num_tokens = self.group_fn(docs, self.seq_len, self.cls, self.sep, self.pad)
            del docs
            if not len(ids):
                continue
            if split == "train" and self.dynamic_train:  # masked at load time by the trainer
                yield _with_split(shards.to_table(ids, np.full_like(ids, IGNORE_INDEX), num_tokens), split)
                continue
            masker = self.maskers[split]
            content = b"".join(rows[i]["doc_hash"] for i in keep)
            for copy in range(masker.spec.get("duplication", 1)):
                # The rng depends on the seed, the copy and the documents only: the same
                # input masks the same way whatever the number of workers.
                rng = batch_rng(masker.spec["seed"], split.encode(), copy.to_bytes(2, "big"), content)
                for start in range(0, len(ids), MASK_BLOCK_ROWS):
                    block = slice(start, start + MASK_BLOCK_ROWS)
                    input_ids, labels = masker(ids[block], num_tokens[block], rng)
                    yield _with_split(shards.to_table(input_ids, labels, num_tokens[block]), split)
        zero = np.zeros((1, self.seq_len), np.int32)
        yield _with_split(shards.to_table(zero, zero, np.zeros(1, np.int32)), _STATS, json.dumps(dict(counts)))


MASK_BLOCK_ROWS = 8192


def _with_split(table: pa.Table, split: str, stats: str = "") -> pa.Table:
    return table.append_column("split", pa.array([split] * table.num_rows)).append_column(
        "stats", pa.array([stats] * table.num_rows)
    )


def range_hashes(batch: pa.Table, data_cfg: dict) -> dict[str, list]:
    """Dedup pass: the content hashes of a range's kept documents, in order."""
    cfg = DataConfig(**data_cfg)
    out = []
    for job in batch.to_pylist():
        hashes = [row["doc_hash"] for row in corpus.iter_range(corpus.Range(**job["range"]), cfg) if not row["drop_reason"]]
        out.append(b"".join(hashes))
    return {"index": batch.column("index").to_pylist(), "hashes": out}


def _duplicates(hash_blobs: list[bytes], known: np.ndarray) -> list[list[int]]:
    """Per range, the positions of documents already seen earlier (in range order) or in
    `known` (the hashes of a dataset being extended): exact dedup, first one kept."""
    arrays = [np.frombuffer(b, dtype=">u8").astype(np.uint64) for b in hash_blobs]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)
    _, first = np.unique(flat, return_index=True)
    dup = np.ones(len(flat), bool)
    dup[first] = False
    dup |= np.isin(flat, known)
    out, offset = [], 0
    for a in arrays:
        out.append(np.flatnonzero(dup[offset : offset + len(a)]).tolist())
        offset += len(a)
    return out


def _read_terms(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise corpus.InputError(f"cannot read masking.terms_file {path}: {e}") from None
    terms = [t.strip() for t in lines if t.strip()]
    if not terms:
        raise corpus.InputError(f"masking.terms_file {path} holds no term")
    return terms


class Progress:
    """A live line on stderr: documents/s, tokens/s and an ETA from the input bytes of
    the ranges done (coarse: a range counts when it is finished)."""

    def __init__(self, total_bytes: int, every_s: float = 5.0):
        self.total, self.every, self.tokens = max(1, total_bytes), every_s, 0
        self.start = self.last = time.time()
        self.enabled = os.environ.get("MLM_PROGRESS", "1") != "0"

    def _line(self, counts: Counter) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        docs = sum(v for k, v in counts.items() if k.startswith("docs_"))
        chars = counts.get("_bytes", 0)  # input bytes of the ranges done
        eta = (self.total - chars) / (chars / elapsed) if chars else float("nan")
        return (f"prepare: {docs:,} docs ({docs / elapsed:,.0f}/s), {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f}/s), {min(1.0, chars / self.total):.0%} of input, eta {max(0.0, eta):,.0f}s")

    def update(self, counts: Counter, tokens: int) -> None:
        self.tokens += tokens
        if self.enabled and time.time() - self.last >= self.every:
            self.last = time.time()
            print(self._line(counts), file=sys.stderr, flush=True)

    def done(self, counts: Counter) -> None:
        if self.enabled:
            print(self._line(counts).replace("eta", "done, eta"), file=sys.stderr, flush=True)


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most about `max_chars`, at whitespace where there is
    some (a word is never cut unless a single word is longer than `max_chars`)."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + max_chars // 2, end)
            cut = max(cut, text.rfind("\n", start + max_chars // 2, end))
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces



def _config_sections(cfg: Config) -> dict[str, Any]:
    """The config that decides a dataset's content, as the manifest stores it."""
    return json.loads(json.dumps({k: cfg.to_dict()[k] for k in ("data", "tokenizer", "masking", "eval")}))


def _input_fingerprint(files: list[corpus.InputFile], cfg: Config, terms: list[str]) -> str:
    h = hashlib.sha256("\n".join(terms).encode())
    for f in sorted(files, key=lambda f: f.fingerprint):
        h.update(f.fingerprint.encode())
    h.update(json.dumps(_config_sections(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


_OURS = re.compile(r"^(\.?(train|validation)-\d{5}\.parquet(\.tmp\d+)?|\..*\.tmp\d+|tokenizer(\.tmp\d+)?"
                   r"|token-counts\.npy|dedup-hashes\.u64)$")
TOKENIZER_MARK = "mlm-inputs-fingerprint.txt"
TOKEN_COUNTS = "token-counts.npy"
DEDUP_HASHES = "dedup-hashes.u64"


def _reusable_tokenizer(out_dir: Path, fingerprint_inputs: str) -> bool:
    """An interrupted run's tokenizer, trained on these very inputs and settings, is
    kept: retraining could break frequency ties differently and change every shard."""
    mark = out_dir / "tokenizer" / TOKENIZER_MARK
    return mark.is_file() and mark.read_text().strip() == fingerprint_inputs


def _clear_unfinished(out_dir: Path, keep: set[str] = frozenset()) -> None:
    """Remove what an interrupted run left: every file of ours that the manifest (if
    any) does not list. A dataset being extended keeps its listed files."""
    for p in out_dir.iterdir():
        if _OURS.match(p.name) and p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _listed_files(manifest: dict[str, Any]) -> set[str]:
    names = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    return names | {manifest["tokenizer"]["dir"], TOKEN_COUNTS, DEDUP_HASHES}


SAMPLE_DOC_CHARS = 100_000


def _sample_texts(docs, n: int) -> list[str]:
    """The first `n` kept documents, each cut to SAMPLE_DOC_CHARS: a 50 MB document
    would otherwise dominate the sample and the trainer's memory."""
    kept = docs.filter(lambda r: r["drop_reason"] == "").select_columns(["text"]).limit(n)
    return [r["text"][:SAMPLE_DOC_CHARS] for r in kept.iter_rows()]


def masker_spec(tokenizer, settings: dict[str, Any], terms: list[str]) -> dict[str, Any]:
    """Plain data for `masking.Masker`: the settings plus the tokenizer's tables."""
    term_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in terms]
    return settings | {
        "special_ids": sorted(set(tokenizer.all_special_ids)),
        "mask_id": tokenizer.mask_token_id,
        "vocab_size": len(tokenizer),
        "word_start": tok_mod.word_start_table(tokenizer).tolist(),
        "term_ids": [ids for ids in term_ids if ids],
    }


def _incremental_base(out_dir: Path, files, cfg: Config, fingerprint_inputs: str, overwrite: bool):
    """What an existing dataset in `out_dir` means for this run: ("done", manifest) when
    it already holds these inputs, ("extend", manifest) when these inputs are its inputs
    plus new files under the same config, (None, None) when there is nothing there."""
    if not (out_dir / shards.MANIFEST).exists():
        return None, None
    existing = shards.read_manifest(out_dir)
    sound = not shards.verify(out_dir)
    if existing.get("inputs_fingerprint") == fingerprint_inputs and sound:
        return "done", existing
    old = {(i["path"], i["blake2b"]) for i in existing["inputs"]}
    new = {(f.path, f.fingerprint) for f in files}
    if sound and existing.get("config") == _config_sections(cfg) and old < new:
        return "extend", existing
    if not overwrite:
        raise shards.DatasetError(
            f"{out_dir} already holds a different dataset (other config, or inputs changed or removed); "
            "use another --out or --overwrite"
        )
    (out_dir / shards.MANIFEST).unlink()  # from here on the folder is not a dataset
    return None, None


def prepare(inputs: list[str], out_dir: str | Path, cfg: Config, *, overwrite: bool = False,
            ray_dashboard: bool = True) -> dict[str, Any]:
    """Prepare a dataset; returns its manifest. Idempotent for identical inputs and
    config; incremental when the inputs are a dataset's inputs plus new files.
    `ray_dashboard`: whether a local Ray instance started here runs the dashboard (Ray
    Train needs it; `mlm prepare` alone does not)."""
    from mlm.runtime import ensure_ray, quiet_ray_data, work_dir

    started = time.time()
    out_dir = Path(out_dir).resolve()
    files, skipped = corpus.resolve_inputs(list(inputs), work_dir())
    n_files = len(files) + sum(len(v) for v in skipped.values())
    if sum(len(v) for v in skipped.values()) / n_files > cfg.data.max_bad_fraction:
        raise corpus.InputError(
            f"{sum(len(v) for v in skipped.values())} of {n_files} input files are unusable "
            f"(> data.max_bad_fraction={cfg.data.max_bad_fraction}): {skipped}"
        )
    corpus.check_text_column(files, cfg.data.text_field)
    terms = _read_terms(cfg.masking.terms_file)
    fingerprint_inputs = _input_fingerprint(files, cfg, terms)
    mode, base = _incremental_base(out_dir, files, cfg, fingerprint_inputs, overwrite)
    if mode == "done":
        log.info("dataset in %s is up to date; nothing to do", out_dir)
        return base
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = out_dir / "tokenizer"
    if base:  # extend: keep every listed file, process only the new inputs
        old = {i["path"] for i in base["inputs"]}
        todo = [f for f in files if f.path not in old]
        _clear_unfinished(out_dir, keep=_listed_files(base))
        reuse_tokenizer = True
    else:
        todo = files
        reuse_tokenizer = not cfg.tokenizer.path and _reusable_tokenizer(out_dir, fingerprint_inputs)
        _clear_unfinished(out_dir, keep={"tokenizer"} if reuse_tokenizer else set())

    ensure_ray(dashboard=ray_dashboard)
    quiet_ray_data()
    import ray

    ranges = corpus.plan_ranges(todo, cfg.data.read_chunk_bytes)
    if reuse_tokenizer:
        log.info("reusing the tokenizer in %s", tok_dir)
    else:
        if cfg.tokenizer.path:
            tokenizer = tok_mod.load_view(cfg.tokenizer.path)
        else:
            texts = _sample_texts(corpus.read_documents(ranges, cfg.data), cfg.tokenizer.sample_docs)
            if not texts:
                raise corpus.InputError("empty corpus: no document left after cleaning")
            tokenizer = tok_mod.train_tokenizer(texts, cfg.tokenizer)
        tok_mod.save_tokenizer(tokenizer, tok_dir)
        (tok_dir / TOKENIZER_MARK).write_text(fingerprint_inputs)
    tokenizer = tok_mod.load_view(tok_dir)  # fingerprint what readers will load

    data_cfg = cfg.data.model_dump()
    known = np.zeros(0, np.uint64)
    if base and (out_dir / DEDUP_HASHES).exists():
        known = np.fromfile(out_dir / DEDUP_HASHES, dtype="<u8")
    skips: list[list[int]] = [[] for _ in ranges]
    if cfg.data.dedup:  # a first, cheaper pass: hashes only, no tokenizing
        found = ray.data.from_items(
            [{"index": i, "range": r.to_dict()} for i, r in enumerate(ranges)], override_num_blocks=len(ranges)
        ).map_batches(range_hashes, fn_kwargs={"data_cfg": data_cfg}, batch_size=1, batch_format="pyarrow")
        blobs = {row["index"]: row["hashes"] for row in found.iter_rows()}
        skips = _duplicates([blobs[i] for i in range(len(ranges))], known)
    size = {f.path: f.size for f in todo}
    per_file = Counter(r.path for r in ranges)
    nbytes = [r.end - r.start if r.end >= 0 and corpus.file_kind(r.path) in ("txt", "jsonl") else size[r.path] // per_file[r.path]
              for r in ranges]
    jobs = ray.data.from_items(
        [{"range": r.to_dict(), "skip": skips[i], "bytes": nbytes[i]} for i, r in enumerate(ranges)],
        override_num_blocks=len(ranges),
    )

    settings = cfg.masking.model_dump()
    eval_settings = {"strategy": "random", "rate": cfg.eval.rate, "mask_fraction": 0.8, "random_fraction": 0.1, "seed": cfg.eval.seed}
    maskers = {"train": masker_spec(tokenizer, settings, terms), "validation": masker_spec(tokenizer, eval_settings, [])}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = max(1, min(len(ranges), cpus))
    sequences = jobs.map_batches(
        TokenizePackMask,
        fn_constructor_kwargs={
            "tokenizer_file": str(tok_dir / "tokenizer.json"), "data_cfg": data_cfg, "maskers": maskers,
            "special": {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id},
            "dynamic_train": cfg.masking.mode == "dynamic",
            # a core per actor: each encodes on one thread; fewer ranges than cores: all threads
            "parallel_encode": pool < cpus,
        },
        batch_size=1,
        batch_format="pyarrow",
        # A fixed pool, all started at once (an autoscaling pool starts with one actor).
        concurrency=pool,
    )
    first = {s: len(base["splits"][s]["shards"]) if base else 0 for s in shards.SPLITS}
    writers = {s: shards.ShardWriter(out_dir, s, cfg.data.rows_per_shard, first_index=first[s]) for s in shards.SPLITS}
    counts: Counter = Counter()
    token_counts = np.zeros(len(tokenizer), np.int64)
    if base and (out_dir / TOKEN_COUNTS).exists():
        token_counts += np.load(out_dir / TOKEN_COUNTS, allow_pickle=False)
    special = np.array(sorted(set(tokenizer.all_special_ids)))
    progress = Progress(total_bytes=sum(nbytes))
    for batch in sequences.iter_batches(batch_format="pyarrow", batch_size=None):
        split_col = batch.column("split").to_numpy(zero_copy_only=False)
        for s in batch.column("stats").to_pylist():
            if s:
                counts.update(json.loads(s))
        progress.update(counts, int(np.asarray(batch.column("num_tokens")).sum()))
        for split, writer in writers.items():
            rows = np.flatnonzero(split_col == split)
            if not len(rows):
                continue
            table = batch.take(pa.array(rows)).select(["input_ids", "labels", "num_tokens"])
            writer.add(table)
            if split == "train":  # token frequencies, for the most-frequent-token baseline
                ids, labels = shards.column_2d(table, "input_ids"), shards.column_2d(table, "labels")
                original = np.where(labels >= 0, labels, ids)
                token_counts += np.bincount(original.reshape(-1), minlength=len(token_counts))[: len(token_counts)]
    new_shards = {s: w.close() for s, w in writers.items()}
    progress.done(counts)
    keep = _listed_files(base) if base else set()
    split_shards = {s: (base["splits"][s]["shards"] if base else []) + new_shards[s] for s in shards.SPLITS}
    for split, lst in split_shards.items():
        if not lst:
            _clear_unfinished(out_dir, keep)
            if split == "train":
                raise corpus.InputError("empty corpus: no tokens left after cleaning")
            raise corpus.InputError(
                "no validation documents; add documents or raise data.validation_fraction"
            )
    if base:  # counts of the dataset being extended
        for k, v in base["documents"]["dropped"].items():
            counts[k] += v
        for s in shards.SPLITS:
            counts[f"docs_{s}"] += base["splits"][s]["documents"]
        counts["_repaired_utf8"] += base["documents"]["repaired_invalid_utf8"]
        counts["_latin1"] += base["documents"]["decoded_as_latin1"]
    dropped = {k: v for k, v in counts.items() if v and not k.startswith(("docs_", "_"))}
    dropped_docs = sum(dropped.values())
    seen_docs = dropped_docs + sum(counts.get(f"docs_{s}", 0) for s in shards.SPLITS)
    if seen_docs and dropped_docs / seen_docs > cfg.data.max_bad_fraction:
        _clear_unfinished(out_dir, keep)
        raise corpus.InputError(
            f"{dropped_docs} of {seen_docs} documents were dropped (> data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}): {dropped}"
        )
    # Side files first (by rename), the manifest last.
    buf = io.BytesIO()
    np.save(buf, token_counts, allow_pickle=False)
    shards.atomic_write_bytes(out_dir / TOKEN_COUNTS, buf.getvalue())
    token_counts[special] = 0
    if cfg.data.dedup:
        kept_hashes = np.concatenate([known] + [np.frombuffer(blobs[i], ">u8").astype("<u8")[
            np.setdiff1d(np.arange(len(blobs[i]) // 8), skips[i])] for i in range(len(ranges))])
        shards.atomic_write_bytes(out_dir / DEDUP_HASHES, np.sort(kept_hashes).astype("<u8").tobytes())
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "inputs_fingerprint": fingerprint_inputs,
        "inputs": [f.to_dict() for f in files],
        "skipped_files": skipped,
        "config": _config_sections(cfg),
        "tokenizer": {
            "dir": "tokenizer",
            "fingerprint": tok_mod.fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "trained": cfg.tokenizer.path is None,
        },
        "schema": shards.schema_doc(cfg.data.seq_len, dynamic=cfg.masking.mode == "dynamic"),
        "seq_len": cfg.data.seq_len,
        "packing": cfg.data.packing,
        "masking": {
            # term_ids: the terms as the tokenizer splits them (the trainer's masker needs them)
            "train": settings | {"term_ids": maskers["train"]["term_ids"]},
            "validation": eval_settings | {"mode": "static"},
        },
        "splits": {
            s: {
                "shards": lst,
                "rows": sum(x["rows"] for x in lst),
                "tokens": sum(x["tokens"] for x in lst),
                "masked": sum(x["masked"] for x in lst),
                "documents": counts.get(f"docs_{s}", 0),
            }
            for s, lst in split_shards.items()
        },
        "documents": {
            "kept": sum(counts.get(f"docs_{s}", 0) for s in shards.SPLITS),
            "dropped": dropped,
            "repaired_invalid_utf8": counts.get("_repaired_utf8", 0),
            "decoded_as_latin1": counts.get("_latin1", 0),
        },
        "ranges": len(ranges),
        "nodes_used": len([k for k in counts if k.startswith("_node:")]),
        "increments": (base.get("increments", []) if base else []) + [
            {"created_unix": int(time.time()), "files_added": len(todo), "shards_added": {s: len(v) for s, v in new_shards.items()}}
        ],
        "most_frequent_token": {"id": int(token_counts.argmax()), "token": tokenizer.convert_ids_to_tokens(int(token_counts.argmax()))},
        "seconds": round(time.time() - started, 1),
    }
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps([manifest["inputs_fingerprint"], [x["sha256"] for s in split_shards.values() for x in s],
                    manifest["tokenizer"]["fingerprint"]]).encode()
    ).hexdigest()[:16]
    shards.write_manifest(out_dir, manifest)  # last: from now on this folder is a dataset
    return manifest
