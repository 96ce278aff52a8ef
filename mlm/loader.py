"""Deterministic, resumable training input: which rows each worker reads, in which order.

Ray Data's `streaming_split` hands blocks to whichever worker asks first, so the rows a
worker sees depend on timing; that rules out exact resume after a failure and the same
loss curve on one node and on two. This loader decides everything from the data, the
seed, the epoch and the worker count:

    epoch order = row groups of all shards in a seeded permutation, taken
                  `train.shuffle_window` groups at a time; the rows of each window in
                  a seeded permutation, the windows concatenated into one stream
    micro-batch k of the epoch = stream rows [k*B, (k+1)*B)
    worker w reads micro-batches w, w + W, w + 2W, ...

Every worker reads the same number of micro-batches per epoch (the remainder that does
not fill a micro-batch on every worker is left out of that epoch, as with drop_last), no
row is read twice in an epoch, and the position (epoch, micro-batches done) fully
defines where to continue: a resumed worker seeks there without reading what it skips.
Batches are read and turned into tensors by a background thread (`prefetch`), and the
time the training loop waits for them is measured.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    rows: int


def row_groups(paths: list[str]) -> list[RowGroup]:
    """The row groups of the shards, in shard order (from Parquet metadata only)."""
    from mlm.shards import open_shard

    out = []
    for path in paths:
        meta = open_shard(path).metadata
        out += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return out


def _rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x6C6F6164, *keys])


class EpochPlan:
    """The row order of one epoch and the micro-batches of one worker.

    The row groups are put in a seeded order and taken `window` at a time; the rows of
    the groups of one window are shuffled together. A shard's row groups hold
    consecutive documents of one input range (one topic, one file), so shuffling inside
    one group only would draw every batch from one place of the corpus for hundreds of
    steps; a window mixes `window` groups drawn from all over it (a shuffle buffer of
    `window` row groups, `window` x 8192 rows at most, per worker)."""

    def __init__(self, groups: list[RowGroup], seed: int, epoch: int, micro_batch: int, world: int,
                 shuffle: bool = True, window: int = 1):
        self.groups, self.seed, self.epoch, self.shuffle = groups, seed, epoch, shuffle
        self.micro_batch, self.world, self.window = micro_batch, world, max(1, window)
        self.order = _rng(seed, epoch).permutation(len(groups)) if shuffle else np.arange(len(groups))
        sizes = np.array([groups[g].rows for g in self.order], np.int64)
        cuts = np.arange(0, len(groups), self.window)
        self.window_sizes = np.add.reduceat(sizes, cuts) if len(sizes) else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.window_sizes)])  # stream offset of each window
        total = int(self.starts[-1])
        self.micro_batches_per_worker = total // (micro_batch * world)
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def rows_in_window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(group position in the epoch order, row in that group) of every row of window
        `w`, in stream order."""
        if self._cached is None or self._cached[0] != w:
            positions = range(w * self.window, min((w + 1) * self.window, len(self.order)))
            rows = [self.groups[int(self.order[p])].rows for p in positions]
            pos = np.repeat(np.array(list(positions), np.int64), rows)
            row = np.concatenate([np.arange(n) for n in rows]) if rows else np.zeros(0, np.int64)
            if self.shuffle:
                perm = _rng(self.seed, self.epoch, 1, w).permutation(len(pos))
                pos, row = pos[perm], row[perm]
            self._cached = (w, (pos, row))
        return self._cached[1]

    def batch_spans(self, rank: int, start: int = 0) -> Iterator[list[tuple[int, int, int]]]:
        """For this worker's micro-batches from number `start` on: the pieces
        (window, first, last) of the stream that make up each batch."""
        for i in range(start, self.micro_batches_per_worker):
            k = i * self.world + rank
            lo, hi = k * self.micro_batch, (k + 1) * self.micro_batch
            w = int(np.searchsorted(self.starts, lo, side="right")) - 1
            pieces = []
            while lo < hi:
                end = min(hi, int(self.starts[w + 1]))
                pieces.append((w, lo - int(self.starts[w]), end - int(self.starts[w])))
                lo, w = end, w + 1
            yield pieces


class GroupCache:
    """The last few decoded row groups of this worker (consecutive batches share them)."""

    def __init__(self, size: int = 4):
        self.size, self.tables = size, {}

    def get(self, group: RowGroup):
        from mlm.shards import read_shard

        key = (group.path, group.index)
        if key not in self.tables:
            if len(self.tables) >= self.size:
                self.tables.pop(next(iter(self.tables)))
            # a local path or an object-store URI: each worker reads its own row groups,
            # every page checked against its checksum (a corrupt one: DatasetError naming the shard)
            self.tables[key] = read_shard(group.path, group.index)
        return self.tables[key]


def worker_batches(plan: EpochPlan, rank: int, start: int = 0, cache: GroupCache | None = None):
    """pyarrow tables, one per micro-batch of this worker, from micro-batch `start` on."""
    import pyarrow as pa

    cache = cache or GroupCache(size=plan.window + 1)
    for pieces in plan.batch_spans(rank, start):
        parts = []
        for w, first, last in pieces:
            pos, row = (a[first:last] for a in plan.rows_in_window(w))
            by_group = np.argsort(pos, kind="stable")  # one take per group, then back to stream order
            taken = [cache.get(plan.groups[int(plan.order[p])]).take(pa.array(row[by_group][pos[by_group] == p]))
                     for p in np.unique(pos)]
            table = pa.concat_tables(taken) if len(taken) > 1 else taken[0]
            parts.append(table.take(pa.array(np.argsort(by_group, kind="stable"))) if len(taken) > 1 else table)
        yield pa.concat_tables(parts) if len(parts) > 1 else parts[0]


class Prefetcher:
    """Runs `make(batch)` for the next `depth` batches in a background thread; `wait_s`
    accumulates the time the consumer spent waiting (the data-wait metric)."""

    _DONE = object()

    def __init__(self, batches: Iterator[Any], make: Callable[[Any], Any], depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.wait_s, self.error = 0.0, None
        self.stop = threading.Event()

        def run() -> None:
            try:
                for b in batches:
                    if self.stop.is_set():
                        return
                    self.queue.put(make(b))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                self.error = e
            self.queue.put(self._DONE)

        self.thread = threading.Thread(target=run, daemon=True, name="mlm-prefetch")
        self.thread.start()

    def __iter__(self):
        while True:
            started = time.perf_counter()
            item = self.queue.get()
            self.wait_s += time.perf_counter() - started
            if item is self._DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self) -> None:
        self.stop.set()
        while not self.queue.empty():
            self.queue.get_nowait()
