"""One progress line per stage (prepare, train, evaluate, register), on stderr.

On a terminal the line updates in place (tqdm) with the share done, the rate and an ETA,
and stays as the stage's summary line when it ends. Elsewhere (a log file, a Ray job's
log, a test capturing output) a plain line is written at most every
`MLM_PROGRESS_EVERY` seconds (default 30) and once at the end (not when the stage
fails: the error says it). `MLM_PROGRESS=0` turns progress off. stdout is never written: it carries results only.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def enabled() -> bool:
    return os.environ.get("MLM_PROGRESS", "1") != "0"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """`with Progress("train", total=600, unit="step") as p: p.update(1, "loss 5.1")`.

    `total` may be None (unknown); with `nbytes` the counts are bytes (shown in MB)."""

    def __init__(self, stage: str, total: float | None, unit: str = "", *, nbytes: bool = False,
                 every_s: float | None = None, file: TextIO | None = None):
        self.stage, self.total, self.unit, self.nbytes = stage, total, ("MB" if nbytes else unit), nbytes
        self.file = file or sys.stderr
        self.enabled = enabled()
        self.every = every_s if every_s is not None else float(os.environ.get("MLM_PROGRESS_EVERY", "30"))
        self.started = self.last = time.monotonic()
        self.done, self.info, self.closed = 0.0, "", False
        self.first: tuple[float, float] | None = None  # (time, done) of the first update: the rate's origin
        self.bar = self._tqdm() if self.enabled and _isatty(self.file) else None

    def _tqdm(self):
        from tqdm import tqdm

        units = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if self.nbytes else \
            {"unit": f" {self.unit}" if self.unit else "it"}
        return tqdm(total=self.total, desc=self.stage, file=self.file, dynamic_ncols=True, mininterval=0.5,
                    leave=True, smoothing=0.1, **units)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failed=kind is not None)

    def update(self, n: float = 1, info: str | None = None) -> None:
        self.set(self.done + n, info)

    def set(self, done: float, info: str | None = None) -> None:
        """`done` so far and the stage's state (a short text shown after the counts)."""
        if not self.enabled or self.closed:
            return
        delta, self.done = done - self.done, done
        if self.first is None:
            self.first = (time.monotonic(), done)
        if info is not None:
            self.info = info
        if self.bar is not None:
            if info is not None:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(delta)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._print(self._line())

    def close(self, info: str | None = None, failed: bool = False) -> None:
        """The stage's last line: how long it took and `info` (default: its state)."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.set_postfix_str(self.info, refresh=False)
            self.bar.close()
            return
        if failed:  # the error message that follows says it all
            return
        self._print(f"{self.stage}: done in {_duration(time.monotonic() - self.started)}"
                    + (f", {self.info}" if self.info else ""))

    def _line(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = []
        if self.total:
            share = min(1.0, self.done / self.total)
            parts.append(f"{share:.0%} ({self._count(self.done)}/{self._count(self.total)}{self._unit()})")
            since, base = self.first or (self.started, 0.0)
            span = time.monotonic() - since
            rate = (self.done - base) / span if span > 0 else 0.0  # start-up time left out
            if rate > 0:
                parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"{self._count(self.done)}{self._unit()}")
        parts.append(f"{_duration(elapsed)} so far")
        return f"{self.stage}: " + ", ".join(parts) + (f", {self.info}" if self.info else "")

    def _count(self, n: float) -> str:
        v = n / 1e6 if self.nbytes else n
        return f"{v:,.0f}" if v >= 100 or float(v).is_integer() else f"{v:,.1f}"

    def _unit(self) -> str:
        return f" {self.unit}" if self.unit else ""

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)


def _isatty(f: Any) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False
