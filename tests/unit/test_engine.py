"""The local engine's session without a loop: checkpoints committed under its folder,
the newest `keep` kept, an incomplete one never offered for resuming; a GPU asked for
where there is none is one configuration error."""

from __future__ import annotations

import os

import pytest
import torch

from mlm import engine
from mlm.config import ConfigError, load_config


def _report(session, tmp_path, step: int) -> None:
    src = tmp_path / f"src-{step}"
    (src / engine.CHECKPOINT_MODEL).mkdir(parents=True)
    (src / engine.CHECKPOINT_MODEL / "weights").write_text(str(step))
    torch.save({"step": step}, src / engine.CHECKPOINT_STATE)
    session.report({"step": step, "train_loss": 1.0 / step}, str(src))


def test_local_session_keeps_the_newest_checkpoints_and_resumes_from_the_last(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "train"
    s = engine.LocalSession(folder=str(folder), keep=2, device=torch.device("cpu"))
    with s.checkpoint() as d:
        assert d is None  # nothing yet: a fresh start
    for step in (4, 8, 12):
        _report(s, tmp_path, step)
    assert sorted(os.listdir(folder)) == ["checkpoint_000000008", "checkpoint_000000012"]
    assert s.last.path == str(folder / "checkpoint_000000012") and s.metrics["step"] == 12
    (folder / "checkpoint_000000016" / engine.CHECKPOINT_MODEL).mkdir(parents=True)  # cut off before its state file
    with s.checkpoint() as d:
        assert open(os.path.join(d, engine.CHECKPOINT_MODEL, "weights")).read() == "12"
    s.report({"step": 13}, None)  # metrics only: no folder
    assert s.metrics == {"step": 13} and s.last.path.endswith("checkpoint_000000012")


def test_local_engine_on_gpu_needs_a_gpu():
    cfg = load_config("tiny", ["train.engine=local", "train.use_gpu=true"])
    if torch.cuda.is_available():
        assert engine.local_device(cfg).type == "cuda"
    else:
        with pytest.raises(ConfigError, match="needs a GPU"):
            engine.local_device(cfg)
    assert engine.local_device(load_config("tiny", ["train.engine=local"])).type == "cpu"
