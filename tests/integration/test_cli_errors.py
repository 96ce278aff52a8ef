"""Bad input: one clear line on stderr, exit code 2, nothing registered."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest


@pytest.fixture()
def env(tmp_path):
    home = tmp_path / "home"
    return {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
            "MLM_HOME": str(home)}


def _run(args, env, cwd):
    return subprocess.run(["mlm", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _assert_one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mlm: error: ") and "Traceback" not in out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _registered_models(home) -> int:
    db = home / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from registered_models").fetchone()[0]


def test_bad_inputs(tmp_path, env):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n   \n\x00\n")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 64)
    cases = [
        (["prepare", str(tmp_path / "missing.txt"), "--out", "d1"], ["no such file or directory", "missing.txt"]),
        (["prepare", str(tmp_path / "empty.txt"), "--out", "d2"], ["empty corpus"]),
        (["prepare", str(tmp_path / "bin.txt"), "--out", "d3"], ["binary", "bin.txt"]),
        (["pipeline", "run", "--set", "train.bogus=1"], ["unknown config key 'train.bogus'"]),
        (["pipeline", "run", "--input", str(tmp_path / "missing")], ["no such file or directory"]),
        (["prepare", "x.txt", "--out", "d4", "--preset", "huge"], ["unknown preset 'huge'"]),
        (["train", "--data", str(tmp_path), "--out", "r"], ["is not a dataset"]),
        (["evaluate", str(tmp_path), "--data", str(tmp_path)], ["not a dataset"]),
    ]
    for args, fragments in cases:
        _assert_one_line_error(_run(args, env, tmp_path), *fragments)
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("d1", "d2", "d3", "d4"))
    assert _registered_models(tmp_path / "home") == 0


def test_whitespace_only_corpus_is_empty(ray_cluster, tmp_path):
    """Passes resolution (the file is not empty) but has no document after cleaning."""
    from mlm.config import load_config
    from mlm.corpus import InputError
    from mlm.prepare import prepare

    (tmp_path / "blank.txt").write_text("\n\n   \n\t\n" * 50 + "\x01\n")
    with pytest.raises(InputError, match="empty corpus"):
        prepare([str(tmp_path / "blank.txt")], tmp_path / "out", load_config("tiny"))
    assert not (tmp_path / "out" / "manifest.json").exists()
