"""`mlm bench data`: our data stage against two references, same corpus, tokenizer and cores.

Three contenders, each a separate subprocess run one after the other:

* ``prepare`` -- ``python -m mlm.cli prepare FILES --preset tiny --set tokenizer.path=TOK
  --set data.seq_len=L --overwrite`` end to end: imports, local Ray start-up (its own
  cluster: a fresh ``MLM_HOME`` and ``RAY_TMPDIR``, ``RAY_ADDRESS`` removed), read,
  clean, tokenize, pack, mask, Parquet shards and manifest.
* ``raw`` -- the floor: read the same files, split them into documents the way mlm does
  (.txt: blank-line separated; .jsonl: the ``text`` field) and ``tokenizers.Tokenizer
  .encode_batch`` (Rust, all cores; ``raw_method="encode_batch_fast"`` skips the
  offsets, as prepare does) in batches of 1,000 documents, counting tokens. Nothing is
  packed, masked or written.
* ``hf`` -- the Hugging Face ``run_mlm.py`` way: ``datasets.load_dataset("text",
  sample_by="paragraph")`` / ``("json")`` on the local files (offline, cache in the run
  folder), ``.map(tokenize, batched=True, num_proc=cores)`` with
  ``AutoTokenizer.from_pretrained(TOK)`` and ``return_special_tokens_mask=True``,
  ``.map(group_texts, batched=True, num_proc=cores)`` exactly as run_mlm.py (blocks of
  ``seq_len``, the remainder of every 1,000-row map batch dropped), then
  ``DataCollatorForLanguageModeling(mlm_probability=0.15)`` over batches of 1,000 rows
  and the masked ``input_ids``/``labels`` written to Parquet (zstd). run_mlm.py's
  validation slicing is left out: every document is tokenized, as in prepare.

The tokenizer is trained once, before and outside the timed runs, and shared by all three.

What is measured, per contender:

* wall seconds: from starting the subprocess to its exit (interpreter start, imports
  and, for prepare, Ray start-up and shutdown included);
* documents and *content tokens* (document tokens, no [CLS]/[SEP]/[PAD]): the same work
  for all three on a clean corpus, so tokens/s = content tokens / wall seconds and the
  ratios compare like with like. prepare's content tokens are derived exactly from its
  manifest (tokens - one [SEP] per document - [CLS]+[SEP] per row); HF's are the
  tokenized lengths before grouping minus [CLS]+[SEP] per document;
* output tokens: what each produces (prepare: real tokens in its rows, specials
  included; HF: rows x seq_len after group_texts dropped its remainders; raw: content);
* peak memory of the whole process tree: every ~0.25 s the proportional set size (PSS,
  ``psutil.Process.memory_full_info().pss``, RSS where PSS is unavailable) of the
  subprocess and all its descendants (for prepare: the driver, Ray's GCS, raylet,
  dashboard, agents and workers; for HF: the ``num_proc`` pool) is summed; the
  largest sum is reported in MiB. PSS splits each shared page among the processes
  that map it, so shared libraries and Ray's object store (a /dev/shm mapping shared
  by raylet and workers) are counted once in the sum, not once per process; file pages
  a process has mapped (Arrow files memory-mapped by ``datasets``) count too. Not
  counted: /dev/shm or page-cache pages no process maps, memory freed and re-used
  between two samples (every 0.25 s, or 20x a sample's own CPU time when that is
  longer, about 1 s for Ray's ~20 processes, so the sampler takes at most ~5% of one
  core; shorter spikes can be missed), and this process;
* the tree's CPU seconds (summed from the samples) and tokens per CPU-second, which a
  busy machine disturbs less than wall time, and the share of the machine's CPU that
  *other* processes used during the run: timings taken on a busy machine are flagged.

`bench_data` prints a table and returns the numbers as a dict.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mlm import storage

DOC_BATCH = 1000  # documents per encode_batch call (raw) and rows per collator batch (hf)
CORPUS_FILE_MB = 16  # size of each generated corpus file
TOKENIZER_SAMPLE_DOCS = 20_000
SUPPORTED = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # mlm.corpus._split_txt's rule, on str
CONTENDERS = {"raw": "raw tokenizers", "prepare": "mlm prepare", "hf": "HF datasets run_mlm"}  # table labels


# --------------------------------------------------------------------------- corpus


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith(".jsonl")


def _read_bytes(path: str) -> bytes:
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Documents of one file, split as mlm splits them: .txt on blank lines (a line of
    whitespace only counts as blank), .jsonl one document per line (its `text_field`);
    empty documents skipped. No cleaning beyond strip(): the tokenizer's normalizer
    does the rest (NFC and control characters make no difference to its tokens)."""
    data = _read_bytes(path)
    if _is_jsonl(path):
        for line in data.split(b"\n"):
            if line.strip():
                try:
                    value = json.loads(line).get(text_field)
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    continue
                if isinstance(value, str) and value.strip():
                    yield value.strip()
        return
    for block in _BLANK_LINE.split(data.decode("utf-8", errors="replace")):
        block = block.strip()
        if block:
            yield block


def build_corpus(size_mb: float, dest: Path, file_mb: float = CORPUS_FILE_MB) -> list[Path]:
    """At least `size_mb` MB (10^6 bytes) of .txt files of about `file_mb` MB each, from
    the builtin python-docs corpus: one document per paragraph (documents separated by
    exactly one blank line, none inside a document, so mlm's and `datasets`' paragraph
    splitting agree), the corpus repeated with the copy number put in front of every
    document of copies 1, 2, ... so that no two documents are byte-identical.
    Reused when `dest` already holds a corpus built with the same settings."""
    from mlm.corpus import _python_docs

    dest = Path(dest)
    spec = {"source": "builtin:python-docs", "size_mb": size_mb, "file_mb": file_mb, "version": 1}
    marker = dest / "corpus.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("spec") == spec and all((dest / f).is_file() for f in done["files"]):
            return [dest / f for f in done["files"]]
    paragraphs = [p.strip() for d in _python_docs() for p in _BLANK_LINE.split(d) if p.strip()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as scratch:
        tmp = Path(scratch) / "corpus"
        tmp.mkdir()
        names, written, docs = _write_corpus(paragraphs, tmp, int(size_mb * 1e6), int(file_mb * 1e6))
        (tmp / "corpus.json").write_text(json.dumps({"spec": spec, "files": names, "bytes": written, "documents": docs}))
        storage.put_dir(tmp, dest, move=True)  # renamed into place, whole
    return [dest / n for n in names]


def _write_corpus(paragraphs: list[str], folder: Path, target: int, per_file: int) -> tuple[list[str], int, int]:
    """Files of about `per_file` bytes until `target` bytes: (names, bytes, documents)."""
    names: list[str] = []
    written = docs = copy = 0
    out = None
    try:
        while written < target:
            for p in paragraphs:
                if out is None or out.tell() >= per_file:
                    if out is not None:
                        out.close()
                    names.append(f"corpus-{len(names):05d}.txt")
                    out = open(folder / names[-1], "wb")
                blob = (p if copy == 0 else f"{copy} {p}").encode("utf-8") + b"\n\n"
                out.write(blob)
                written += len(blob)
                docs += 1
                if written >= target:
                    break
            copy += 1
    finally:
        if out is not None:
            out.close()
    return names, written, docs


def _expand(item: str) -> list[str]:
    import glob

    from mlm.corpus import InputError

    if any(ch in item for ch in "*?["):
        return sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
    if os.path.isdir(item):
        return sorted(os.path.join(root, n) for root, dirs, names in os.walk(item) for n in names
                      if not n.startswith(".") and "/." not in root[len(item):])
    if os.path.isfile(item):
        return [item]
    raise InputError(f"no such file or directory: {item}")


def resolve_files(inputs: list[str], work: Path) -> list[Path]:
    """Local files, directories, globs and builtin:NAME -> the corpus files (.txt,
    .jsonl, optionally .gz); anything else is an InputError."""
    from mlm.corpus import BUILTIN_PREFIX, InputError, materialize_builtin

    files: list[Path] = []
    for item in inputs:
        paths = [materialize_builtin(item, Path(work) / "corpus")] if item.startswith(BUILTIN_PREFIX) else _expand(item)
        for p in (Path(x).resolve() for x in paths):
            if not str(p).endswith(SUPPORTED):
                raise InputError(f"mlm bench data reads {', '.join(SUPPORTED)} files only, not {p}")
            if p not in files:
                files.append(p)
    if not files:
        raise InputError(f"no input files in {inputs}")
    return files


def scale_files(files: list[Path], scale: int, dest: Path) -> list[Path]:
    """The corpus `scale` times over, as `scale` x len(files) separate files (hard links,
    copies where linking fails), so a scaled run can be set against the 1x run."""
    if scale <= 1:
        return list(files)
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    out = []
    for i in range(scale):
        for j, f in enumerate(files):
            target = dest / f"x{i:03d}-{j:03d}-{f.name}"
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
            out.append(target)
    return out


class _stdout_to_stderr:
    """File descriptor 1 points at 2 for the duration (catches writes from Rust too)."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)


def train_shared_tokenizer(files: list[Path], out_dir: Path, preset: str = "tiny",
                           sample_docs: int = TOKENIZER_SAMPLE_DOCS) -> dict[str, Any]:
    """Train the preset's tokenizer once on the first `sample_docs` documents (each cut to
    100k characters, as prepare does) and save it; not part of any timed run."""
    from mlm.config import load_config
    from mlm.tokenizer import save_tokenizer, train_tokenizer

    started = time.perf_counter()
    sample: list[str] = []
    for f in files:
        for doc in iter_documents(str(f)):
            sample.append(doc[:100_000])
            if len(sample) >= sample_docs:
                break
        if len(sample) >= sample_docs:
            break
    cfg = load_config(preset).tokenizer
    with _stdout_to_stderr():  # the Rust trainer's progress output would land in the table's stream
        tok = train_tokenizer(sample, cfg)
    save_tokenizer(tok, out_dir)
    return {"dir": str(out_dir), "kind": cfg.kind, "vocab_size": len(tok), "sample_docs": len(sample),
            "train_s": round(time.perf_counter() - started, 2), "timed": False}


# --------------------------------------------------------------------------- process-tree memory


class TreeMemory:
    """Samples the summed PSS (RSS where PSS is unavailable) of a process and all its
    descendants every `interval` seconds in a background thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.max_processes = 0
        self.measure = "pss"
        self.names: dict[int, str] = {}
        self.seen: dict[int, Any] = {}
        self.cpu: dict[int, float] = {}  # last seen user+system seconds per process
        self.peak_by_name: dict[str, int] = {}  # the peak sample, summed by process name
        self.sampler_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Reading smaps of ~20 Ray processes costs ~50 ms of CPU: wait at least 20x the
        # sample's own CPU, so the sampler takes <= 5% of one core from what it measures
        # (a fixed 0.25 s took ~10% of a 2-core machine from prepare, ~0 from a
        # single-process contender).
        while not self._stop.is_set():
            t0 = time.thread_time()
            self.sample()
            cost = time.thread_time() - t0
            self.sampler_cpu_s += cost
            self._stop.wait(max(self.interval, 20 * cost))

    def sample(self) -> int:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = alive = 0
        by_name: dict[str, int] = {}
        for p in procs:
            try:
                with p.oneshot():
                    try:
                        used = getattr(p.memory_full_info(), "pss", None)
                    except psutil.AccessDenied:
                        used = None
                    if used is None:
                        used = p.memory_info().rss
                        self.measure = "rss (pss unavailable)"
                    name = p.name()  # Ray workers rename themselves (ray::IDLE -> ray::MapWorker...)
                    if p.pid not in self.names:
                        self.names[p.pid] = name
                        self.seen[p.pid] = p
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
            except psutil.Error:  # gone between listing and reading
                continue
            total += used
            alive += 1
            by_name[name] = by_name.get(name, 0) + used
        self.samples += 1
        if total > self.peak:
            self.peak_by_name = by_name
        self.peak = max(self.peak, total)
        self.max_processes = max(self.max_processes, alive)
        return total

    def leftovers(self, grace_s: float = 10.0) -> list[str]:
        """Descendants still running after the root exited: waited for `grace_s`, then
        terminated by pid (they were started by the measured subprocess)."""
        import psutil

        others = [p for pid, p in self.seen.items() if pid != self.root.pid]
        gone, alive = psutil.wait_procs(others, timeout=grace_s)
        names = []
        for p in alive:
            try:
                names.append(f"{p.name()}({p.pid})")
                p.terminate()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        return names


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()  # guest time is already inside user time on Linux
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))


def _self_cpu_s() -> float:
    """CPU seconds of this process (the sampler thread included)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_measured(cmd: list[str], env: dict[str, str], log_dir: Path, name: str,
                 interval: float = 0.25) -> dict[str, Any]:
    """Run `cmd` with stdout/stderr to files: wall seconds, process-tree peak memory, and
    the share of the machine's CPU that other processes used meanwhile (machine CPU
    time minus this process's and the measured tree's, the latter as last sampled, so
    a tree's last 0.25 s and processes shorter than that count as "other"; a busy
    machine spoils timings, so it is reported)."""
    import psutil

    log_dir.mkdir(parents=True, exist_ok=True)
    out_log, err_log = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        busy0, self0 = _busy_cpu_s(), _self_cpu_s()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        mem = TreeMemory(proc.pid, interval)
        try:
            with mem:
                rc = proc.wait()
            wall = time.perf_counter() - started
            busy, own = _busy_cpu_s() - busy0, _self_cpu_s() - self0
        finally:
            if proc.poll() is None:  # interrupted: end what we started, by pid
                for p in [*mem.seen.values(), psutil.Process(proc.pid)]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                proc.wait()
    leftovers = mem.leftovers()
    if rc != 0:
        tail = err_log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"bench data: {name} failed with exit code {rc}; {err_log}:\n" + "\n".join(tail))
    tree_cpu = sum(mem.cpu.values())
    capacity = wall * (os.cpu_count() or 1)
    return {"wall_s": wall, "peak_mib": mem.peak / 2**20, "memory_measure": mem.measure, "samples": mem.samples,
            "max_processes": mem.max_processes, "sampler_cpu_s": round(mem.sampler_cpu_s, 2), "process_names": sorted(set(mem.names.values())),
            "peak_by_process_mib": {k: round(v / 2**20, 1) for k, v in
                                    sorted(mem.peak_by_name.items(), key=lambda kv: -kv[1])},
            "leftover_processes": leftovers, "cpu_s": round(tree_cpu, 1),
            "other_cpu_share": round(max(0.0, busy - own - tree_cpu) / capacity, 3)}


# --------------------------------------------------------------------------- subprocess bodies


def _child_entry(fn: str) -> list[str]:
    """A command that runs `mlm.bench.data.<fn>(json args from argv[1])`."""
    return [sys.executable, "-c", f"import json, sys; from mlm.bench.data import {fn}; {fn}(json.loads(sys.argv[1]))"]


def _run_raw(args: dict[str, Any]) -> None:
    """Subprocess body of the raw contender: split and encode_batch, count tokens."""
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(Path(args["tokenizer"]) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    load_s = time.perf_counter() - t0
    encode = getattr(tok, args.get("method", "encode_batch"))
    docs = tokens = 0
    read_s = encode_s = 0.0
    for path in args["files"]:
        t = time.perf_counter()
        texts = list(iter_documents(path))
        read_s += time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, len(texts), DOC_BATCH):
            encodings = encode(texts[i : i + DOC_BATCH], add_special_tokens=False)
            tokens += sum(len(e) for e in encodings)
        encode_s += time.perf_counter() - t
        docs += len(texts)
    Path(args["result"]).write_text(json.dumps({
        "documents": docs, "content_tokens": tokens, "output_tokens": tokens,
        "method": encode.__name__, "phases_s": {"load_tokenizer": round(load_s, 2),
                                            "read_split": round(read_s, 2), "encode": round(encode_s, 2)},
    }))


def _run_hf(args: dict[str, Any]) -> None:
    """Subprocess body of the Hugging Face contender (run_mlm.py's data path)."""
    phases: dict[str, float] = {}
    lap = _stopwatch(phases)
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])
    lap("import_and_load_tokenizer")
    raw, sample_by = _hf_load(args["files"])
    lap("load_dataset")
    tokenized = raw.map(lambda examples: tokenizer(examples["text"], return_special_tokens_mask=True),
                        batched=True, num_proc=args["num_proc"], remove_columns=raw.column_names)
    lap("map_tokenize")
    import pyarrow as pa

    before_group = int(pa.compute.sum(pa.compute.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0)
    grouped = tokenized.map(_group_texts, fn_kwargs={"seq_len": args["seq_len"]}, batched=True,
                            num_proc=args["num_proc"])
    lap("map_group_texts")
    rows = _hf_collate_and_write(grouped, tokenizer, args["seq_len"], args["out"])
    lap("collate_and_write_parquet")
    Path(args["result"]).write_text(json.dumps({
        "documents": len(raw), "content_tokens": before_group - 2 * len(raw), "output_tokens": rows * args["seq_len"],
        "rows": rows, "dropped_by_group_texts": before_group - rows * args["seq_len"], "sample_by": sample_by,
        "phases_s": phases,
    }))


def _stopwatch(phases: dict[str, float]) -> Callable[[str], None]:
    """lap(name): the seconds since the previous lap, into `phases[name]`."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - last[0], 2)
        last[0] = now

    return lap


def _hf_load(files: list[str]):
    """datasets.load_dataset on the local files: "text" by paragraph, "json" (its text
    column). Returns (dataset, how text files were split)."""
    import datasets

    txt = [f for f in files if not _is_jsonl(f)]
    jsonl = [f for f in files if _is_jsonl(f)]
    parts = []
    sample_by = "line"
    if txt:
        from datasets.packaged_modules.text.text import TextConfig

        sample_by = "paragraph" if "sample_by" in TextConfig.__dataclass_fields__ else "line"
        kw = {"sample_by": sample_by} if sample_by == "paragraph" else {}
        parts.append(datasets.load_dataset("text", data_files=txt, split="train", **kw))
    if jsonl:
        parts.append(datasets.load_dataset("json", data_files=jsonl, split="train").select_columns(["text"]))
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), sample_by


def _group_texts(examples, seq_len: int):  # verbatim from transformers' examples/pytorch/language-modeling/run_mlm.py
    from itertools import chain

    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // seq_len) * seq_len
    result = {
        k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)]
        for k, t in concatenated_examples.items()
    }
    return result


def _hf_collate_and_write(grouped, tokenizer, seq_len: int, out: str) -> int:
    """DataCollatorForLanguageModeling (15%) over batches of DOC_BATCH rows, the masked
    input_ids/labels written to Parquet (zstd); returns the rows written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    fixed = pa.list_(pa.int32(), seq_len)
    schema = pa.schema([("input_ids", fixed), ("labels", fixed)])
    rows = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for batch in grouped.iter(batch_size=DOC_BATCH):
            keys = list(batch)
            features = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
            collated = collator(features)
            ids, labels = (np.ascontiguousarray(collated[k].numpy(), np.int32) for k in ("input_ids", "labels"))
            writer.write_table(pa.table({
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len),
                "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), seq_len),
            }, schema=schema))
            rows += len(ids)
    return rows


# --------------------------------------------------------------------------- the benchmark


def _env(run_dir: Path, ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM"):
        env.pop(key, None)
    env.update({
        "MLM_HOME": str(run_dir / "mlm-home"),  # a fresh work folder: prepare starts its own local Ray
        "RAY_TMPDIR": ray_tmp,  # its own Ray session folder, away from any other local cluster
        "MLM_PROGRESS": "0",
        "HF_DATASETS_CACHE": str(run_dir / "hf-cache"),
        "HF_HOME": str(run_dir / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6 if Path(path).exists() else 0.0


def _prepare_numbers(out_dir: Path) -> dict[str, Any]:
    """Documents and tokens from prepare's manifest. In packed datasets (the default,
    `data.packing=pack`) every kept document adds one [SEP] to the token stream and every
    row a [CLS] and a final [SEP], so the content tokens follow exactly."""
    from mlm import shards

    m = shards.Manifest.read(out_dir)
    rows = sum(s.rows for s in m.splits.values())
    tokens = sum(s.tokens for s in m.splits.values())
    docs = m.documents.kept
    copies = m.masking.get("train", {}).get("duplication", 1)  # static copies multiply train rows
    exact = m.packing == "pack" and copies == 1
    return {"documents": docs, "content_tokens": tokens - docs - 2 * rows if exact else None,
            "output_tokens": tokens, "rows": rows, "packing": m.packing,
            "dropped_documents": m.documents.dropped, "phases_s": {"inside_prepare": m.seconds}}


def bench_data(inputs: list[str] | None, size_mb: float, scale: int, seq_len: int, work: Path,
               skip_hf: bool = False, *, raw_method: str = "encode_batch", keep_outputs: bool = False,
               echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run raw tokenizers, `mlm prepare` and the HF datasets way on one corpus; returns
    the numbers (and prints the table through `echo` unless it is None).

    The corpus is `inputs` (files, dirs, globs, builtin:NAME; .txt/.jsonl[.gz]) or, when
    none are given, `size_mb` MB built from the builtin python-docs corpus in `work`;
    `scale` > 1 repeats it as that many separate copies of every file. The tokenizer
    (the tiny preset's: WordPiece, 4,096) is trained once in `work`, untimed. Each run
    gets a folder under `work` (logs and results.json stay; shards, HF caches and the
    run's MLM_HOME are removed unless `keep_outputs`). `raw_method` picks the raw
    contender's call: `encode_batch` (Encodings with offsets) or, where tokenizers has
    it, `encode_batch_fast` (no offsets; what prepare calls)."""
    _check_args(inputs, size_mb, scale)
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if echo is not None else (lambda s: None)
    files, source = _corpus_files(inputs, size_mb, work, say)
    run_dir = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    files = scale_files(files, scale, run_dir / "scaled")
    say(f"bench data: training the shared tokenizer (not timed) on {len(files)} file(s)")
    tokenizer = train_shared_tokenizer(files, work / "tokenizer")
    bench = _Bench(run_dir, files, tokenizer, seq_len, say)
    try:
        bench.raw(raw_method)
        bench.prepare()
        if not skip_hf:
            bench.hf()
    finally:
        bench.clean(keep_outputs)
    runs = _with_rates(bench.runs)
    result = {
        "corpus": {"source": source, "files": len(files), "bytes": bench.corpus_bytes, "scale": scale},
        "seq_len": seq_len,
        "cores": bench.cores,
        "tokenizer": tokenizer,
        "runs": runs,
        "ratios": _ratios(runs),
        "memory": "peak of the summed PSS of each subprocess and all its descendants, sampled every 0.25 s",
        "run_dir": str(run_dir),
    }
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if echo is not None:
        echo(format_report(result))
    return result


def _check_args(inputs, size_mb: float, scale: int) -> None:
    from mlm.corpus import InputError

    if scale < 1:
        raise InputError("scale must be >= 1")
    if inputs and size_mb > 0:
        raise InputError("give inputs or a corpus size, not both")
    if not inputs and size_mb <= 0:
        raise InputError("give inputs or a corpus size in MB")


def _corpus_files(inputs, size_mb: float, work: Path, say) -> tuple[list[Path], Any]:
    """(corpus files, how the report names the source)."""
    if inputs:
        return resolve_files(list(inputs), work), list(inputs)
    say(f"bench data: building a {size_mb:g} MB corpus from builtin:python-docs in {work}")
    return build_corpus(size_mb, work / f"corpus-{size_mb:g}mb"), f"builtin:python-docs, {size_mb:g} MB"


class _Bench:
    """The three contenders on one corpus, one subprocess tree each, in turn; `runs`
    holds what each measured (and `partial.json` what is done so far, which survives an
    interrupted benchmark)."""

    def __init__(self, run_dir: Path, files: list[Path], tokenizer: dict[str, Any], seq_len: int, say):
        self.run_dir, self.tokenizer, self.seq_len, self.say = run_dir, tokenizer, seq_len, say
        self.files = [str(f) for f in files]
        self.corpus_bytes = sum(f.stat().st_size for f in files)
        self.cores = os.cpu_count() or 1
        self.ray_tmp = tempfile.mkdtemp(prefix="mlmbd-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.env = _env(run_dir, self.ray_tmp)
        self.runs: dict[str, dict[str, Any]] = {}

    def _measure(self, name: str, cmd: list[str]) -> dict[str, Any]:
        return run_measured(cmd, self.env, self.run_dir / "logs", name)

    def _partial(self) -> None:
        (self.run_dir / "partial.json").write_text(json.dumps(
            {"corpus_bytes": self.corpus_bytes, "files": len(self.files), "tokenizer": self.tokenizer, "runs": self.runs},
            indent=2, default=str))

    def raw(self, method: str) -> None:
        self.say(f"bench data: raw tokenizers {method} ...")
        result = self.run_dir / "raw.json"
        measured = self._measure("raw", _child_entry("_run_raw") + [json.dumps(
            {"files": self.files, "tokenizer": self.tokenizer["dir"], "method": method, "result": str(result)})])
        self.runs["raw"] = json.loads(result.read_text()) | measured
        self._partial()

    def prepare(self) -> None:
        self.say("bench data: mlm prepare ...")
        out_dir = self.run_dir / "prepare-out"
        measured = self._measure("prepare", [
            sys.executable, "-m", "mlm.cli", "prepare", *self.files, "--out", str(out_dir), "--preset", "tiny",
            "--set", f"tokenizer.path={self.tokenizer['dir']}", "--set", f"data.seq_len={self.seq_len}", "--overwrite"])
        self.runs["prepare"] = _prepare_numbers(out_dir) | measured | {"output_mb": round(_dir_mb(out_dir), 1)}
        self._partial()

    def hf(self) -> None:
        self.say("bench data: HF datasets (run_mlm.py way) ...")
        hf_out, result = self.run_dir / "hf.parquet", self.run_dir / "hf.json"
        measured = self._measure("hf", _child_entry("_run_hf") + [json.dumps(
            {"files": self.files, "tokenizer": self.tokenizer["dir"], "seq_len": self.seq_len, "num_proc": self.cores,
             "out": str(hf_out), "result": str(result)})])
        self.runs["hf"] = json.loads(result.read_text()) | measured | {
            "output_mb": round(hf_out.stat().st_size / 1e6, 1), "cache_mb": round(_dir_mb(self.run_dir / "hf-cache"), 1)}

    def clean(self, keep_outputs: bool) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if keep_outputs:
            return
        for p in ("prepare-out", "hf-cache", "hf-home", "hf.parquet", "mlm-home", "scaled"):
            target = self.run_dir / p
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def _with_rates(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """tokens/s and tokens per CPU-second of each run (content tokens: the same work)."""
    for r in runs.values():
        if r["content_tokens"] is None:  # a layout whose specials we cannot subtract: count raw's
            r["content_tokens"], r["content_tokens_from"] = runs["raw"]["content_tokens"], "raw"
        r["tokens_per_s"] = r["content_tokens"] / r["wall_s"]
        r["tokens_per_cpu_s"] = r["content_tokens"] / r["cpu_s"] if r["cpu_s"] else None
        r["wall_s"] = round(r["wall_s"], 2)
        r["peak_mib"] = round(r["peak_mib"], 1)
    return runs


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for ref in ("raw", "hf"):
        if ref in runs:
            ratios[f"prepare_over_{ref}_tokens_per_s"] = runs["prepare"]["tokens_per_s"] / runs[ref]["tokens_per_s"]
            ratios[f"prepare_over_{ref}_peak_mib"] = runs["prepare"]["peak_mib"] / runs[ref]["peak_mib"]
            if runs["prepare"]["tokens_per_cpu_s"] and runs[ref]["tokens_per_cpu_s"]:
                ratios[f"prepare_over_{ref}_tokens_per_cpu_s"] = (runs["prepare"]["tokens_per_cpu_s"]
                                                                  / runs[ref]["tokens_per_cpu_s"])
    return ratios


def format_report(r: dict[str, Any]) -> str:
    c, tok = r["corpus"], r["tokenizer"]
    size = f"{c['bytes'] / 1e6:,.1f} MB, " if c.get("bytes") else ""
    lines = [
        f"mlm bench data: {size}{c['files']} file(s), scale {c['scale']}x, seq_len {r['seq_len']}, {r['cores']} cores",
        f"tokenizer ({tok['kind']}, {tok['vocab_size']:,} tokens) trained once beforehand in {tok['train_s']:.1f} s "
        "and shared: not timed",
        f"  {'':<22} {'wall s':>8} {'documents':>11} {'content tokens':>15} {'tokens/s':>11} {'tok/CPU-s':>10} "
        f"{'peak MiB':>9} {'procs':>6}",
    ]
    for key, label in CONTENDERS.items():
        if key in r["runs"]:
            x = r["runs"][key]
            label = f"raw {x['method']}" if key == "raw" and "method" in x else label
            per_cpu = f"{x['tokens_per_cpu_s']:>10,.0f}" if x.get("tokens_per_cpu_s") else f"{'-':>10}"
            lines.append(f"  {label:<22} {x['wall_s']:>8.1f} {x['documents']:>11,} {x['content_tokens']:>15,} "
                         f"{x['tokens_per_s']:>11,.0f} {per_cpu} {x['peak_mib']:>9,.0f} {x['max_processes']:>6}")
    for ref, label in (("raw", "raw"), ("hf", "HF")):
        if f"prepare_over_{ref}_tokens_per_s" in r["ratios"]:
            per_cpu = r["ratios"].get(f"prepare_over_{ref}_tokens_per_cpu_s")
            lines.append(f"  prepare/{label:<4} {r['ratios'][f'prepare_over_{ref}_tokens_per_s']:.2f}x tokens/s, "
                         + (f"{per_cpu:.2f}x tokens per CPU-second, " if per_cpu else "")
                         + f"{r['ratios'][f'prepare_over_{ref}_peak_mib']:.2f}x peak memory")
    busy = {CONTENDERS[k]: x["other_cpu_share"] for k, x in r["runs"].items() if x.get("other_cpu_share", 0) > 0.1}
    if busy:
        lines.append("  warning: other processes used " + ", ".join(f"{v:.0%} of the CPU during {k}" for k, v in busy.items())
                     + ": those timings are not clean")
    counts = {CONTENDERS[k]: x["content_tokens"] for k, x in r["runs"].items()}
    if max(counts.values()) > 1.01 * min(counts.values()):
        lines.append("  warning: the contenders split or clean this corpus differently (content tokens "
                     + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + "): tokens/s compare unequal work")
    lines += [
        "  wall: subprocess start to exit (imports, Ray start-up included); tokens/s: content tokens (no [CLS]/[SEP]/",
        "  [PAD]) per wall second; tok/CPU-s: per CPU-second of the process tree (less sensitive to a busy machine);",
        "  peak: summed PSS of the process tree (Ray's /dev/shm object store shared proportionally), sampled every 0.25 s",
    ]
    return "\n".join(lines)
