"""The stage progress line: stderr only, in place on a terminal, sparse lines elsewhere."""

from __future__ import annotations

import io

from mlm.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_have_share_eta_and_a_last_line(monkeypatch, capsys):
    monkeypatch.setenv("MLM_PROGRESS", "1")
    out = io.StringIO()
    with Progress("train", total=10, unit="steps", every_s=0, file=out) as p:
        for i in range(10):
            p.update(1, f"loss {5 - i / 10:.1f}")
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("train: 20% (2/10 steps), eta ") and lines[1].endswith("loss 4.9")
    assert lines[-1].startswith("train: done in ") and lines[-1].endswith("loss 4.1")
    assert capsys.readouterr().out == ""  # stdout carries results only


def test_plain_lines_are_sparse_and_a_failure_adds_none(monkeypatch):
    monkeypatch.setenv("MLM_PROGRESS", "1")
    out = io.StringIO()
    with Progress("prepare", total=5e6, nbytes=True, every_s=3600, file=out) as p:
        p.update(2.5e6, "100 docs")
        p.close("200 docs")
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the last line
    assert " MB" not in out.getvalue() and "200 docs" in out.getvalue()
    failed = io.StringIO()
    try:
        with Progress("evaluate", total=3, every_s=3600, file=failed) as p:
            p.update(1)
            raise ValueError("bad data")
    except ValueError:
        pass
    assert failed.getvalue() == ""  # the error message says it all


def test_terminal_line_updates_in_place(monkeypatch):
    monkeypatch.setenv("MLM_PROGRESS", "1")
    out = _Terminal()
    with Progress("evaluate", total=3, unit="batches", file=out) as p:
        for _ in range(3):
            p.update(1, "top-1 0.1")
        p.close("top-1 0.2")
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r" in text  # redrawn in place, one line left
    assert "evaluate" in text and "100%" in text and "top-1 0.2" in text


def test_off(monkeypatch):
    monkeypatch.setenv("MLM_PROGRESS", "0")
    out = _Terminal()
    with Progress("train", total=3, file=out) as p:
        p.update(3)
    assert out.getvalue() == ""
