"""The data stage: read -> clean -> tokenizer -> tokenize -> pack -> mask -> shards.

Composed from corpus, tokenizer, packing, masking, shards and storage. Reading,
tokenizing, packing, masking and shard writing run in one class-based Ray Data stage
(the tokenizer is loaded once per actor); each actor commits the shards of its input
ranges to the output (a local folder or an object-store URI) and sends the driver one
summary row per range; the driver writes the manifest last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from mlm import corpus, shards, storage, tokenizer as tok_mod
from mlm.config import Config, DataConfig
from mlm.masking import IGNORE_INDEX, Masker, batch_rng
from mlm.packing import pack, pad_documents
from mlm.progress import Progress

log = logging.getLogger(__name__)


class TokenizePackMask:
    """Ray Data stage, one range of input per call: read -> clean -> tokenize -> pack ->
    mask -> shards. The actor writes the range's shards itself (to `out_dir`, local or
    an object-store URI, each through a temporary name) and yields one row per range:
    its shard entries, drop counts and train token frequencies, for the driver's
    manifest. Nothing but those small rows reaches the driver.

    Reading inside the stage keeps documents out of the object store; the groups are
    cut by position in the range and the shards are named by the range's index, so
    the output depends on the input and the config only, never on how many workers
    run or on which node."""

    def __init__(self, tokenizer_json: str, special: dict[str, int], data_cfg: dict, maskers: dict[str, dict],
                 dynamic_train: bool, out_dir: str, vocab_size: int, parallel_encode: bool = True):
        from tokenizers import Tokenizer

        if isinstance(tokenizer_json, _ByRef):  # the large tables, put in the object store once by the driver
            tokenizer_json, maskers = tokenizer_json.get()

        if not parallel_encode:
            # One actor per core already keeps every core busy: the Rust library's own
            # thread pool would only add threads fighting for the same cores. It reads
            # this variable at each call, in this process only.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

        # The Rust tokenizer alone (from its JSON: no file the actor's node may not
        # have): importing transformers would add seconds to every actor's start.
        backend = Tokenizer.from_str(tokenizer_json)
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
        self.out_dir, self.vocab_size = out_dir, vocab_size

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
            yield self._range(job)

    def _range(self, job: dict) -> pa.Table:
        """Shards of one input range, and its summary row."""
        writers = {s: shards.ShardWriter(self.out_dir, s, self.data.rows_per_shard, job["index"]) for s in shards.SPLITS}
        counts: Counter = Counter({"_bytes": job["bytes"], f"_node:{self._node()}": 1})
        token_counts = np.zeros(self.vocab_size, np.int64)

        def write(rows: list[dict]) -> None:
            for split, table in self._group(rows, counts):
                writers[split].add(table)
                if split == "train":  # token frequencies, for the most-frequent-token baseline
                    ids, labels = shards.column_2d(table, "input_ids"), shards.column_2d(table, "labels")
                    original = np.where(labels >= 0, labels, ids).reshape(-1)
                    token_counts[:] += np.bincount(original, minlength=self.vocab_size)[: self.vocab_size]

        skip, kept, rows = set(job["skip"]), 0, []
        for row in corpus.iter_range(corpus.Range(**job["range"]), self.data):
            if not row["drop_reason"]:
                if kept in skip:  # an exact duplicate of an earlier document
                    row = corpus.DROPPED | {"drop_reason": "duplicate"}
                kept += 1
            rows.append(row)
            if len(rows) == self.data.pack_batch_docs:
                write(rows)
                rows = []
        write(rows)
        files = {s: w.close() for s, w in writers.items()}
        return pa.table({"index": [job["index"]], "stats": [json.dumps(dict(counts))], "shards": [json.dumps(files)],
                         "token_counts": [token_counts.tobytes()]})

    @staticmethod
    def _node() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"

    def _group(self, rows: list[dict], counts: Counter) -> Iterator[tuple[str, pa.Table]]:
        """(split, table of sequences) for a group of document rows; drop counts go to
        `counts`. Masking runs in blocks of rows, so a 50 MB document costs a few
        copies of its token ids, not of float masks."""
        counts.update(r["drop_reason"] for r in rows if r["drop_reason"])
        for split in shards.SPLITS:
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
                yield split, shards.to_table(ids, np.full_like(ids, IGNORE_INDEX), num_tokens)
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
                    yield split, shards.to_table(input_ids, labels, num_tokens[block])


MASK_BLOCK_ROWS = 8192


class _ByRef:
    """A large constructor argument handed to the actors as a reference to one object
    in Ray's object store: the actors' constructor arguments stay small (inlined), so
    a restarted actor never depends on arguments that may have gone out of scope
    (ray-project/ray#53727)."""

    def __init__(self, ref):
        self.ref = ref

    @classmethod
    def put(cls, value) -> "_ByRef":
        import ray

        return cls(ray.put(value))

    def get(self):
        import ray

        return ray.get(self.ref)


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


_OURS = re.compile(r"^(\.?(train|validation)-\d{5}(-\d{3})?\.parquet(\.tmp\d+)?|\..*\.tmp\d+|tokenizer(\.tmp\d+)?"
                   r"|token-counts\.npy|dedup-hashes\.u64|\.inputs)$")
TOKENIZER_MARK = "mlm-inputs-fingerprint.txt"
STAGED_INPUTS = ".inputs"  # local inputs copied for the other nodes of a cluster (removed at the end)
TOKEN_COUNTS = "token-counts.npy"
DEDUP_HASHES = "dedup-hashes.u64"


def _reusable_tokenizer(out_dir: str, fingerprint_inputs: str) -> bool:
    """An interrupted run's tokenizer, trained on these very inputs and settings, is
    kept: retraining could break frequency ties differently and change every shard."""
    mark = storage.join(out_dir, "tokenizer", TOKENIZER_MARK)
    return storage.is_file(mark) and storage.read_text(mark).strip() == fingerprint_inputs


def _clear_unfinished(out_dir: str, keep: set[str] = frozenset()) -> None:
    """Remove what an interrupted run left: every file of ours that the manifest (if
    any) does not list. A dataset being extended keeps its listed files."""
    for name in storage.list_names(out_dir):
        if _OURS.match(name) and name not in keep:
            storage.delete(storage.join(out_dir, name))


def _listed_files(manifest: shards.Manifest) -> set[str]:
    return manifest.files() | {manifest.tokenizer.dir, TOKEN_COUNTS, DEDUP_HASHES}


SAMPLE_DOC_CHARS = 100_000


def _sample_texts(docs, n: int) -> list[str]:
    """The first `n` kept documents, each cut to SAMPLE_DOC_CHARS: a 50 MB document
    would otherwise dominate the sample and the trainer's memory."""
    from ray.data.expressions import col

    kept = docs.filter(expr=col("drop_reason") == "").select_columns(["text"]).limit(n)
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


def _incremental_base(out_dir: str, files, cfg: Config, fingerprint_inputs: str, overwrite: bool):
    """What an existing dataset in `out_dir` means for this run: ("done", manifest) when
    it already holds these inputs, ("extend", manifest) when these inputs are its inputs
    plus new files under the same config, (None, None) when there is nothing there."""
    if not storage.exists(storage.join(out_dir, shards.MANIFEST)):
        return None, None
    existing = shards.Manifest.read(out_dir)
    sound = not shards.verify(out_dir)
    if existing.inputs_fingerprint == fingerprint_inputs and sound:
        return "done", existing
    old = {(i["path"], i["blake2b"]) for i in existing.inputs}
    new = {(f.path, f.fingerprint) for f in files}
    if sound and existing.config == _config_sections(cfg) and old < new:
        return "extend", existing
    if not overwrite:
        raise shards.DatasetError(
            f"{out_dir} already holds a different dataset (other config, or inputs changed or removed); "
            "use another --out or --overwrite"
        )
    storage.delete(storage.join(out_dir, shards.MANIFEST))  # from here on the folder is not a dataset
    return None, None


def _check_inputs(inputs: list[str], cfg: Config):
    """Resolved input files, skipped ones by reason, masking terms; fails on bad input."""
    from mlm.runtime import work_dir

    files, skipped = corpus.resolve_inputs(list(inputs), work_dir())
    n_files = len(files) + sum(len(v) for v in skipped.values())
    if sum(len(v) for v in skipped.values()) / n_files > cfg.data.max_bad_fraction:
        raise corpus.InputError(
            f"{sum(len(v) for v in skipped.values())} of {n_files} input files are unusable "
            f"(> data.max_bad_fraction={cfg.data.max_bad_fraction}): {skipped}"
        )
    corpus.check_text_column(files, cfg.data.text_field)
    return files, skipped, _read_terms(cfg.masking.terms_file)


def _tokenizer(out_dir: str, ranges, cfg: Config, fingerprint_inputs: str, reuse: bool, scratch: str):
    """The dataset's tokenizer: reused, loaded from tokenizer.path, or trained on a
    sample; saved as `out_dir/tokenizer`. Returns (view, tokenizer.json text), read
    from a local copy in `scratch` (what readers will load)."""
    tok_dir = storage.join(out_dir, "tokenizer")
    if reuse:
        log.info("reusing the tokenizer in %s", tok_dir)
    else:
        if cfg.tokenizer.path:
            with storage.local_dir(cfg.tokenizer.path) as src:
                tokenizer = tok_mod.load_view(src)
                tok_mod.save_tokenizer(tokenizer, Path(scratch) / "new-tokenizer")
        else:
            texts = _sample_texts(corpus.read_documents(ranges, cfg.data), cfg.tokenizer.sample_docs)
            if not texts:
                raise corpus.InputError("empty corpus: no document left after cleaning")
            tok_mod.save_tokenizer(tok_mod.train_tokenizer(texts, cfg.tokenizer), Path(scratch) / "new-tokenizer")
        (Path(scratch) / "new-tokenizer" / TOKENIZER_MARK).write_text(fingerprint_inputs)
        storage.put_dir(Path(scratch) / "new-tokenizer", tok_dir, marker=TOKENIZER_MARK)
    local = storage.get_dir(tok_dir, Path(scratch) / "tokenizer")
    return tok_mod.load_view(local), (Path(local) / "tokenizer.json").read_text(encoding="utf-8")


def _stage_inputs(ranges: list, todo: list, out_dir: str) -> tuple[list, bool]:
    """Ranges every node can read. On a cluster of several nodes a local input file is
    on this node only, so with an object-store output it is copied once under
    OUT/.inputs/ and its ranges point there; otherwise the ranges are returned as they
    are. Returns (ranges, whether anything was staged)."""
    import dataclasses

    import ray

    local = [f for f in todo if not storage.is_uri(f.path)]
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2 or (not local and storage.is_uri(out_dir)):
        return ranges, False
    if not storage.is_uri(out_dir):  # a local output: every node must see it (a shared disk)
        _check_nodes_see(nodes, [storage.parent(out_dir)] + [f.path for f in local])
        return ranges, False
    staged = {}
    for f in local:
        staged[f.path] = storage.join(out_dir, STAGED_INPUTS, f"{f.fingerprint[:16]}-{os.path.basename(f.path)}")
        storage.upload_file(f.path, staged[f.path])
    log.info("copied %d local input file(s) to %s for the cluster's other nodes", len(local), storage.join(out_dir, STAGED_INPUTS))
    return [dataclasses.replace(r, path=staged.get(r.path, r.path)) for r in ranges], True


def _check_nodes_see(nodes: list[str], paths: list[str]) -> None:
    """Fail with one line when some node of the cluster cannot see a local path (no
    shared disk there); a task pinned to each node looks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(paths: list[str]) -> list[str]:
        return [p for p in paths if not os.path.exists(p)]

    found = ray.get([missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths)
                     for n in nodes])
    for node, gone in zip(nodes, found):
        if gone:
            raise corpus.InputError(
                f"node {node[:12]} of the cluster cannot see {gone[0]}: there is no shared disk, so give the "
                "output (--out, paths.data) as an object-store URI (s3://...); local inputs are then copied there"
            )


def _check_visible(out_dir: str, new_shards: dict[str, list]) -> None:
    """Shards that workers on other nodes wrote to a local path are on their disks,
    not here: one clear error instead of a dataset with holes."""
    if storage.is_uri(out_dir):
        return
    missing = [x["file"] for lst in new_shards.values() for x in lst if not storage.is_file(storage.join(out_dir, x["file"]))]
    if missing:
        raise shards.DatasetError(
            f"{len(missing)} shard(s) written by workers on other nodes are not in {out_dir} as this node sees it "
            f"(e.g. {missing[0]}); on a cluster without a shared disk give --out an object-store URI (s3://...)"
        )


def _dedup_skips(ranges, data_cfg: dict, known: np.ndarray):
    """Per range, the positions of its duplicate documents, and the hash blobs."""
    import ray

    found = ray.data.from_items(
        [{"index": i, "range": r.to_dict()} for i, r in enumerate(ranges)], override_num_blocks=len(ranges)
    ).map_batches(range_hashes, fn_kwargs={"data_cfg": data_cfg}, batch_size=1, batch_format="pyarrow")
    blobs = {row["index"]: row["hashes"] for row in found.iter_rows()}
    return _duplicates([blobs[i] for i in range(len(ranges))], known), blobs


def _range_bytes(ranges, todo) -> list[int]:
    """Input bytes per range (text ranges: their span; others: a file's share)."""
    size = {f.path: f.size for f in todo}
    per_file = Counter(r.path for r in ranges)
    return [r.end - r.start if r.end >= 0 and corpus.file_kind(r.path) in ("txt", "jsonl") else size[r.path] // per_file[r.path]
            for r in ranges]


def _run_stage(out_dir: str, ranges, nbytes: list[int], skips, first: int, tokenizer, tokenizer_json: str,
               maskers, cfg: Config, line: Progress):
    """Run the fused stage; returns (new shards per split, counts, train token counts).
    `line` advances by each range's input bytes."""
    import ray
    from ray.data import ActorPoolStrategy

    from mlm.runtime import map_on_actors

    jobs = ray.data.from_items(
        [{"index": first + i, "range": r.to_dict(), "skip": skips[i], "bytes": nbytes[i]} for i, r in enumerate(ranges)],
        override_num_blocks=len(ranges),
    )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = max(1, min(len(ranges), cpus))
    summaries = map_on_actors(
        jobs,
        TokenizePackMask,
        fn_constructor_kwargs={
            "tokenizer_json": _ByRef.put((tokenizer_json, maskers)), "data_cfg": cfg.data.model_dump(), "maskers": {},
            "special": {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id},
            "dynamic_train": cfg.masking.mode == "dynamic", "out_dir": out_dir, "vocab_size": len(tokenizer),
            # a core per actor: each encodes on one thread; fewer ranges than cores: all threads
            "parallel_encode": pool < cpus,
        },
        batch_size=1,
        batch_format="pyarrow",
        # A fixed pool, all started at once (an autoscaling pool starts with one actor).
        compute=ActorPoolStrategy(size=pool),
    )
    counts: Counter = Counter()
    token_counts = np.zeros(len(tokenizer), np.int64)
    per_range: dict[int, dict[str, list]] = {}
    tokens = 0
    for row in summaries.iter_rows():
        stats = json.loads(row["stats"])
        counts.update(stats)
        per_range[row["index"]] = json.loads(row["shards"])
        token_counts += np.frombuffer(row["token_counts"], np.int64)
        tokens += sum(x["tokens"] for lst in per_range[row["index"]].values() for x in lst)
        docs = sum(v for k, v in counts.items() if k.startswith("docs_"))
        line.update(stats.get("_bytes", 0), f"{docs:,} docs, {tokens:,} tokens")
    new_shards = {s: [x for i in sorted(per_range) for x in per_range[i][s]] for s in shards.SPLITS}
    return new_shards, counts, token_counts


def _maskers(tokenizer, cfg: Config, terms: list[str]) -> dict[str, dict]:
    """Training masking as configured; the fixed evaluation masking for validation."""
    eval_settings = {"strategy": "random", "rate": cfg.eval.rate, "mask_fraction": 0.8, "random_fraction": 0.1,
                     "seed": cfg.eval.seed}
    return {"train": masker_spec(tokenizer, cfg.masking.model_dump(), terms),
            "validation": masker_spec(tokenizer, eval_settings, [])}


def _check_counts(split_shards: dict[str, list], counts: Counter, cfg: Config, out_dir: str, keep: set[str]) -> dict:
    """Fail (and clear the new shards) on an empty split or too many dropped documents;
    returns the drop counts by reason."""
    for split, lst in split_shards.items():
        if not lst:
            _clear_unfinished(out_dir, keep)
            if split == "train":
                raise corpus.InputError("empty corpus: no tokens left after cleaning")
            raise corpus.InputError("no validation documents; add documents or raise data.validation_fraction")
    dropped = {k: v for k, v in counts.items() if v and not k.startswith(("docs_", "_"))}
    seen_docs = sum(dropped.values()) + sum(counts.get(f"docs_{s}", 0) for s in shards.SPLITS)
    if seen_docs and sum(dropped.values()) / seen_docs > cfg.data.max_bad_fraction:
        _clear_unfinished(out_dir, keep)
        raise corpus.InputError(
            f"{sum(dropped.values())} of {seen_docs} documents were dropped (> data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}): {dropped}"
        )
    return dropped


def _add_base_counts(counts: Counter, base: shards.Manifest) -> None:
    """Counts of the dataset being extended, added to this increment's."""
    for k, v in base.documents.dropped.items():
        counts[k] += v
    for s in shards.SPLITS:
        counts[f"docs_{s}"] += base.splits[s].documents
    counts["_repaired_utf8"] += base.documents.repaired_invalid_utf8
    counts["_latin1"] += base.documents.decoded_as_latin1


def _manifest(*, files, skipped, cfg: Config, fingerprint_inputs: str, tokenizer, maskers, split_shards, counts,
              dropped, ranges: int, base, todo: int, new_shards, token_counts: np.ndarray,
              started: float) -> shards.Manifest:
    """The new dataset's manifest (`split_shards`: every shard entry, the extended
    dataset's first)."""
    settings = cfg.masking.model_dump()
    splits = {s: shards.Split(shards=lst, rows=sum(x.rows for x in lst), tokens=sum(x.tokens for x in lst),
                              masked=sum(x.masked for x in lst), documents=counts.get(f"docs_{s}", 0))
              for s, lst in split_shards.items()}
    tokenizer_info = shards.TokenizerInfo(dir="tokenizer", fingerprint=tok_mod.fingerprint(tokenizer),
                                          vocab_size=len(tokenizer), trained=cfg.tokenizer.path is None)
    increment = {"created_unix": int(time.time()), "files_added": todo,
                 "shards_added": {s: len(v) for s, v in new_shards.items()}}
    top = int(token_counts.argmax())
    return shards.Manifest(
        schema_version=shards.SCHEMA_VERSION,
        created_unix=int(time.time()),
        inputs_fingerprint=fingerprint_inputs,
        inputs=[f.to_dict() for f in files],
        skipped_files=skipped,
        config=_config_sections(cfg),
        tokenizer=tokenizer_info,
        schema=shards.schema_doc(cfg.data.seq_len, dynamic=cfg.masking.mode == "dynamic"),
        seq_len=cfg.data.seq_len,
        packing=cfg.data.packing,
        masking={
            # term_ids: the terms as the tokenizer splits them (the trainer's masker needs them)
            "train": settings | {"term_ids": maskers["train"]["term_ids"]},
            "validation": {k: maskers["validation"][k] for k in ("strategy", "rate", "mask_fraction", "random_fraction",
                                                                  "seed")} | {"mode": "static"},
        },
        splits=splits,
        documents=shards.Documents(kept=sum(counts.get(f"docs_{s}", 0) for s in shards.SPLITS), dropped=dropped,
                                   repaired_invalid_utf8=counts.get("_repaired_utf8", 0),
                                   decoded_as_latin1=counts.get("_latin1", 0)),
        ranges=ranges,
        nodes_used=len([k for k in counts if k.startswith("_node:")]),
        increments=(base.increments if base else []) + [increment],
        most_frequent_token=shards.MostFrequentToken(id=top, token=tokenizer.convert_ids_to_tokens(top)),
        seconds=round(time.time() - started, 1),
        fingerprint=hashlib.sha256(json.dumps([fingerprint_inputs, [x.sha256 for lst in split_shards.values() for x in lst],
                                               tokenizer_info.fingerprint]).encode()).hexdigest()[:16],
    )


def prepare(inputs: list[str], out_dir: str | Path, cfg: Config, *, overwrite: bool = False,
            ray_dashboard: bool = True) -> shards.Manifest:
    """Prepare a dataset in `out_dir` (a local folder or an object-store URI); returns
    its manifest. Idempotent for identical inputs and config; incremental when the
    inputs are a dataset's inputs plus new files. `ray_dashboard`: whether a local Ray
    instance started here runs the dashboard (Ray Train needs it; `mlm prepare` alone
    does not)."""
    import tempfile

    from mlm.runtime import ensure_ray, quiet_ray_data

    started = time.time()
    out_dir = storage.normalize(out_dir)
    files, skipped, terms = _check_inputs(inputs, cfg)
    fingerprint_inputs = _input_fingerprint(files, cfg, terms)
    mode, base = _incremental_base(out_dir, files, cfg, fingerprint_inputs, overwrite)
    if mode == "done":
        log.info("dataset in %s is up to date; nothing to do", out_dir)
        return base
    todo, reuse_tokenizer = _clear_for_run(out_dir, files, base, cfg, fingerprint_inputs)
    ensure_ray(dashboard=ray_dashboard)
    quiet_ray_data()
    ranges = corpus.plan_ranges(todo, cfg.data.read_chunk_bytes)
    nbytes = _range_bytes(ranges, todo)
    ranges, staged = _stage_inputs(ranges, todo, out_dir)
    with tempfile.TemporaryDirectory(prefix="mlm-prepare-") as scratch, \
            Progress("prepare", total=sum(nbytes), nbytes=True) as line:
        tokenizer, tokenizer_json = _tokenizer(out_dir, ranges, cfg, fingerprint_inputs, reuse_tokenizer, scratch)
        known = _known_hashes(out_dir, base)
        skips, blobs = (_dedup_skips(ranges, cfg.data.model_dump(), known) if cfg.data.dedup  # hashes only: cheaper
                        else ([[] for _ in ranges], {}))
        maskers = _maskers(tokenizer, cfg, terms)
        new_shards, counts, token_counts = _run_stage(out_dir, ranges, nbytes, skips, _first_index(base),
                                                      tokenizer, tokenizer_json, maskers, cfg, line)
        _check_visible(out_dir, new_shards)
        split_shards, dropped = _with_base(out_dir, base, new_shards, counts, token_counts, cfg)
        _write_side_files(out_dir, token_counts, tokenizer, known, blobs, skips, cfg)  # each committed on its own
        manifest = _manifest(files=files, skipped=skipped, cfg=cfg, fingerprint_inputs=fingerprint_inputs,
                             tokenizer=tokenizer, maskers=maskers, split_shards=split_shards, counts=counts,
                             dropped=dropped, ranges=len(ranges), base=base, todo=len(todo), new_shards=new_shards,
                             token_counts=token_counts, started=started)
        manifest.write(out_dir)  # last: from now on this folder is a dataset
        line.close(f"{manifest.documents.kept:,} documents, {manifest.splits['train'].tokens:,} training tokens "
                   f"in {len(manifest.files())} shards")
    if staged:
        storage.delete(storage.join(out_dir, STAGED_INPUTS))
    return manifest


def _clear_for_run(out_dir: str, files, base, cfg: Config, fingerprint_inputs: str):
    """The input files to process and whether the tokenizer in `out_dir` is kept; what an
    interrupted run left is removed. Extending a dataset keeps every listed file and
    processes only the new inputs."""
    storage.makedirs(out_dir)
    if base:
        old = {i["path"] for i in base.inputs}
        _clear_unfinished(out_dir, keep=_listed_files(base))
        return [f for f in files if f.path not in old], True
    reuse = not cfg.tokenizer.path and _reusable_tokenizer(out_dir, fingerprint_inputs)
    _clear_unfinished(out_dir, keep={"tokenizer"} if reuse else set())
    return files, reuse


def _known_hashes(out_dir: str, base) -> np.ndarray:
    """Content hashes of the documents of the dataset being extended (for dedup)."""
    path = storage.join(out_dir, DEDUP_HASHES)
    if base and storage.is_file(path):
        return np.frombuffer(storage.read_bytes(path), dtype="<u8")
    return np.zeros(0, np.uint64)


def _first_index(base) -> int:
    """Units of work of an extension are numbered after the dataset's own."""
    if not base:
        return 0
    return 1 + max((shards.shard_index(f) for f in base.files()), default=-1)


def _with_base(out_dir: str, base, new_shards: dict[str, list], counts: Counter, token_counts: np.ndarray,
               cfg: Config) -> tuple[dict[str, list], dict]:
    """The dataset's shards and counts once this run's are added to an extended
    dataset's (`counts` and `token_counts` updated in place); fails on an empty split or
    too many dropped documents. Returns (shard entries per split, drop counts by reason)."""
    path = storage.join(out_dir, TOKEN_COUNTS)
    if base and storage.is_file(path):
        token_counts += np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    split_shards = {s: (base.splits[s].shards if base else []) + [shards.ShardEntry(**x) for x in new_shards[s]]
                    for s in shards.SPLITS}
    if base:
        _add_base_counts(counts, base)
    dropped = _check_counts(split_shards, counts, cfg, out_dir, _listed_files(base) if base else set())
    return split_shards, dropped


def _write_side_files(out_dir: str, token_counts: np.ndarray, tokenizer, known: np.ndarray, blobs, skips,
                      cfg: Config) -> None:
    """Token frequencies and the dedup hashes, for the next extension. Special tokens are
    then left out of `token_counts` (the most-frequent-token baseline)."""
    buf = io.BytesIO()
    np.save(buf, token_counts, allow_pickle=False)
    storage.write_bytes(storage.join(out_dir, TOKEN_COUNTS), buf.getvalue())
    token_counts[np.array(sorted(set(tokenizer.all_special_ids)))] = 0
    if cfg.data.dedup:
        kept_hashes = np.concatenate([known] + [np.frombuffer(blobs[i], ">u8").astype("<u8")[
            np.setdiff1d(np.arange(len(blobs[i]) // 8), skips[i])] for i in range(len(skips))])
        storage.write_bytes(storage.join(out_dir, DEDUP_HASHES), np.sort(kept_hashes).astype("<u8").tobytes())
