"""The data stage: read -> clean -> tokenizer -> tokenize -> pack -> mask -> shards.

Composed from corpus, tokenizer, packing, masking and shards. Tokenizing, packing
and masking run in one class-based Ray Data stage (the tokenizer is loaded once per
actor); the driver streams the result into Parquet shards and writes the manifest
last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mlm import corpus, shards, tokenizer as tok_mod
from mlm.config import Config
from mlm.masking import apply as apply_masking, batch_rng
from mlm.packing import pack

log = logging.getLogger(__name__)
_STATS = "_stats"


class TokenizePackMask:
    """Ray Data stage: a batch of documents -> packed, masked sequences (+ one stats row)."""

    def __init__(self, tokenizer_dir: str, seq_len: int, train_masking: dict, eval_masking: dict,
                 max_chunk_chars: int = 1_000_000, terms: list[str] | None = None):
        tok = tok_mod.load_tokenizer(tokenizer_dir)
        self.backend = tok.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        # "[SEP]" typed in a document is text, not a boundary: keeps packing invertible.
        self.backend.encode_special_tokens = True
        self.seq_len, self.max_chunk_chars = seq_len, max_chunk_chars
        self.cls, self.sep, self.pad, self.mask = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id
        self.special = np.array(sorted(set(tok.all_special_ids)), np.int32)
        self.random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int32), self.special)
        self.masking = {"train": train_masking, "validation": eval_masking}
        self.word_start = tok_mod.word_start_table(tok)
        self.term_ids = [ids for ids in self._encode(list(terms or [])) if len(ids)]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids per document; a very long document is encoded in whitespace-cut
        chunks whose ids are concatenated, so memory stays bounded."""
        enc = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        group: list[tuple[int, str]] = []
        group_chars = 0

        def flush() -> None:
            # Encodings are heavy (strings, offsets per token): turn them into int32
            # arrays group by group so a 50 MB document never holds them all at once.
            for (i, _), e in zip(group, enc([piece for _, piece in group], add_special_tokens=False)):
                out[i].append(np.asarray(e.ids, np.int32))
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

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        reasons = batch["drop_reason"]
        counts: Counter = Counter(r for r in reasons.tolist() if r)
        counts["_chars"] = int(sum(len(t) for t in batch["text"].tolist()))
        tables, splits = [], []
        tokens = {"train": 0, "validation": 0}
        for split in ("train", "validation"):
            keep = (reasons == "") & (batch["split"] == split)
            if not keep.any():
                continue
            docs = self._encode(batch["text"][keep].tolist())
            counts["no_tokens"] += sum(1 for d in docs if len(d) == 0)
            counts[f"docs_{split}"] += sum(1 for d in docs if len(d))
            ids, num_tokens = pack(docs, self.seq_len, self.cls, self.sep, self.pad)
            if not len(ids):
                continue
            m = self.masking[split]
            positions = np.arange(self.seq_len)[None, :]
            maskable = (positions < num_tokens[:, None]) & ~np.isin(ids, self.special)
            content = b"".join(batch["doc_hash"][keep].tolist())
            for copy in range(m.get("duplication", 1)):
                # The rng depends on the seed, the copy and the documents only: the same
                # input masks the same way whatever the number of workers.
                rng = batch_rng(m["seed"], split.encode(), copy.to_bytes(2, "big"), content)
                input_ids, labels = apply_masking(
                    m.get("strategy", "random"), ids, maskable, rng,
                    word_start=self.word_start[ids], term_ids=self.term_ids,
                    rate=m["rate"], mask_fraction=m["mask_fraction"], random_fraction=m["random_fraction"],
                    mask_id=self.mask, random_ids=self.random_ids, **_strategy_options(m),
                )
                tables.append(shards.to_table(input_ids, labels, num_tokens))
                splits += [split] * len(ids)
                tokens[split] += int(num_tokens.sum())
        # One stats row per batch carries the drop counts to the driver.
        zero = np.zeros((1, self.seq_len), np.int32)
        tables.append(shards.to_table(zero, zero, np.zeros(1, np.int32)))
        splits.append(_STATS)
        out = pa.concat_tables(tables)
        stats = json.dumps(dict(counts))
        return out.append_column("split", pa.array(splits)).append_column(
            "stats", pa.array([""] * (len(splits) - 1) + [stats])
        )


def _strategy_options(m: dict) -> dict:
    """The options `masking.apply` takes for the chosen strategy."""
    strategy = m.get("strategy", "random")
    if strategy == "span":
        return {"geometric_p": m["span_geometric_p"], "max_span": m["span_max_words"]}
    if strategy == "terms":
        return {"term_rate": m["term_rate"]}
    return {}


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
    """A live line on stderr: documents/s, tokens/s and an ETA from the input bytes
    (approximate for compressed inputs)."""

    def __init__(self, total_chars: int, every_s: float = 5.0):
        self.total, self.every, self.tokens = max(1, total_chars), every_s, 0
        self.start = self.last = time.time()
        self.enabled = os.environ.get("MLM_PROGRESS", "1") != "0"

    def _line(self, counts: Counter) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        docs = sum(v for k, v in counts.items() if k.startswith("docs_"))
        chars = counts.get("_chars", 0)
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


def _input_fingerprint(files: list[corpus.InputFile], cfg: Config, terms: list[str]) -> str:
    h = hashlib.sha256("\n".join(terms).encode())
    for f in sorted(files, key=lambda f: f.fingerprint):
        h.update(f.fingerprint.encode())
    sections = {k: cfg.to_dict()[k] for k in ("data", "tokenizer", "masking", "eval")}
    h.update(json.dumps(sections, sort_keys=True).encode())
    return h.hexdigest()[:16]


_OURS = re.compile(r"^(\.?(train|validation)-\d{5}\.parquet(\.tmp\d+)?|\..*\.tmp\d+|tokenizer(\.tmp\d+)?)$")
TOKENIZER_MARK = "mlm-inputs-fingerprint.txt"


def _reusable_tokenizer(out_dir: Path, fingerprint_inputs: str) -> bool:
    """An interrupted run's tokenizer, trained on these very inputs and settings, is
    kept: retraining could break frequency ties differently and change every shard."""
    mark = out_dir / "tokenizer" / TOKENIZER_MARK
    return mark.is_file() and mark.read_text().strip() == fingerprint_inputs


def _clear_unfinished(out_dir: Path, keep_tokenizer: bool = False) -> None:
    """Remove what an interrupted run left (never a dataset: it had no manifest)."""
    for p in out_dir.iterdir():
        if _OURS.match(p.name) and not (keep_tokenizer and p.name == "tokenizer"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


SAMPLE_DOC_CHARS = 100_000


def _sample_texts(docs, n: int) -> list[str]:
    """The first `n` kept documents, each cut to SAMPLE_DOC_CHARS: a 50 MB document
    would otherwise dominate the sample and the trainer's memory."""
    kept = docs.filter(lambda r: r["drop_reason"] == "").select_columns(["text"]).limit(n)
    return [r["text"][:SAMPLE_DOC_CHARS] for r in kept.iter_rows()]


def prepare(inputs: list[str], out_dir: str | Path, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
    """Prepare a dataset; returns its manifest. Idempotent for identical inputs and config."""
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
    terms = _read_terms(cfg.masking.terms_file)
    fingerprint_inputs = _input_fingerprint(files, cfg, terms)
    if (out_dir / shards.MANIFEST).exists():
        existing = shards.read_manifest(out_dir)
        if existing.get("inputs_fingerprint") == fingerprint_inputs and not shards.verify(out_dir):
            log.info("dataset in %s is up to date; nothing to do", out_dir)
            return existing
        if not overwrite:
            raise shards.DatasetError(
                f"{out_dir} already holds a different dataset; use another --out or --overwrite"
            )
        (out_dir / shards.MANIFEST).unlink()  # from here on the folder is not a dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    reuse_tokenizer = not cfg.tokenizer.path and _reusable_tokenizer(out_dir, fingerprint_inputs)
    _clear_unfinished(out_dir, keep_tokenizer=reuse_tokenizer)

    ensure_ray()
    quiet_ray_data()
    docs = corpus.read_documents(files, cfg.data)

    tok_dir = out_dir / "tokenizer"
    if reuse_tokenizer:
        log.info("reusing the tokenizer of an interrupted run in %s", tok_dir)
    else:
        if cfg.tokenizer.path:
            tokenizer = tok_mod.load_tokenizer(cfg.tokenizer.path)
        else:
            texts = _sample_texts(docs, cfg.tokenizer.sample_docs)
            if not texts:
                raise corpus.InputError("empty corpus: no document left after cleaning")
            tokenizer = tok_mod.train_tokenizer(texts, cfg.tokenizer)
        tok_mod.save_tokenizer(tokenizer, tok_dir)
        (tok_dir / TOKENIZER_MARK).write_text(fingerprint_inputs)
    tokenizer = tok_mod.load_tokenizer(tok_dir)  # fingerprint what readers will load

    masking = cfg.masking.model_dump()
    eval_masking = {"rate": cfg.eval.rate, "mask_fraction": 0.8, "random_fraction": 0.1, "seed": cfg.eval.seed}
    import ray

    sequences = docs.map_batches(
        TokenizePackMask,
        fn_constructor_kwargs={
            "tokenizer_dir": str(tok_dir), "seq_len": cfg.data.seq_len,
            "train_masking": masking, "eval_masking": eval_masking, "max_chunk_chars": cfg.data.max_chunk_chars,
            "terms": terms,
        },
        batch_size=cfg.data.pack_batch_docs,
        batch_format="numpy",
        concurrency=(1, max(1, int(ray.cluster_resources().get("CPU", 1)))),
    )
    writers = {s: shards.ShardWriter(out_dir, s, cfg.data.rows_per_shard) for s in shards.SPLITS}
    counts: Counter = Counter()
    token_counts = np.zeros(len(tokenizer), np.int64)
    special = np.array(sorted(set(tokenizer.all_special_ids)))
    progress = Progress(total_chars=sum(f.size for f in files))
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
    split_shards = {s: w.close() for s, w in writers.items()}
    progress.done(counts)
    for split, lst in split_shards.items():
        if not lst:
            _clear_unfinished(out_dir)
            if split == "train":
                raise corpus.InputError("empty corpus: no tokens left after cleaning")
            raise corpus.InputError(
                "no validation documents; add documents or raise data.validation_fraction"
            )
    token_counts[special] = 0
    dropped = {k: v for k, v in counts.items() if v and not k.startswith(("docs_", "_"))}
    dropped_docs = sum(dropped.values())
    seen_docs = dropped_docs + sum(counts.get(f"docs_{s}", 0) for s in shards.SPLITS)
    if seen_docs and dropped_docs / seen_docs > cfg.data.max_bad_fraction:
        _clear_unfinished(out_dir)
        raise corpus.InputError(
            f"{dropped_docs} of {seen_docs} documents were dropped (> data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}): {dropped}"
        )
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "inputs_fingerprint": fingerprint_inputs,
        "inputs": [f.to_dict() for f in files],
        "skipped_files": skipped,
        "config": {k: cfg.to_dict()[k] for k in ("data", "tokenizer", "masking", "eval")},
        "tokenizer": {
            "dir": "tokenizer",
            "fingerprint": tok_mod.fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "trained": cfg.tokenizer.path is None,
        },
        "schema": shards.schema_doc(cfg.data.seq_len),
        "seq_len": cfg.data.seq_len,
        "masking": {"train": masking | {"strategy": cfg.masking.strategy}, "validation": eval_masking | {"strategy": "random"}},
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
        "most_frequent_token": {"id": int(token_counts.argmax()), "token": tokenizer.convert_ids_to_tokens(int(token_counts.argmax()))},
        "seconds": round(time.time() - started, 1),
    }
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps([manifest["inputs_fingerprint"], [x["sha256"] for s in split_shards.values() for x in s],
                    manifest["tokenizer"]["fingerprint"]]).encode()
    ).hexdigest()[:16]
    shards.write_manifest(out_dir, manifest)  # last: from now on this folder is a dataset
    return manifest
