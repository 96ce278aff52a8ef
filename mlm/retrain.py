"""Scheduled retraining: safe to trigger again and again (cron, RayCronJob, `mlm submit`).

One trigger:
1. takes the model's retrain lock (a non-blocking `flock` in MLM_HOME/retrain); when
   another trigger holds it, it says so and ends with nothing done;
2. compares the corpus with the retrain dataset's manifest: when no file is new and the
   last completed retrain already used this data, it ends with nothing done;
3. prepares only the new files (appended shards; a changed or removed file rebuilds the
   dataset, and its tokenizer, from scratch);
4. warm-starts from the champion when its tokenizer is the dataset's (else, or with
   `from_scratch`, trains from scratch);
5. evaluates on the dataset's fixed evaluation set, registers, and lets the gate decide:
   a worse model becomes `challenger` and the champion stays. A failure in any step
   moves no alias (aliases move last, in `registry.register`).

The lock is a file lock on the machine that runs the trigger: give every trigger the same
MLM_HOME on one machine (on a Ray cluster, jobs' drivers run on the head node).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from mlm import corpus, shards, storage
from mlm.config import Config, config_from_dict

STATE = "state.json"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[str | None]:
    """Yields None while holding the lock, or a description of the holder when another
    process holds it. The kernel drops the lock when its holder dies: no stale locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            yield holder
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode(), 0)
        try:
            yield None
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def dataset_dir(work: Path, cfg: Config) -> str:
    """One growing dataset per model and data settings (not per input list), under
    `paths.data` (a folder or URI)."""
    from mlm.pipeline import data_key, data_root

    return storage.join(data_root(cfg, work), f"retrain-{cfg.registry.model_name}-{data_key([], cfg)}")


def changes(files: list[corpus.InputFile], since: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new files, changed or removed files) against `since`: path -> content hash of the
    inputs of the last completed retrain."""
    now = {f.path: f.fingerprint for f in files}
    return [p for p in now if p not in since], [p for p, fp in since.items() if now.get(p) != fp]


def _champion(name: str):
    from mlm.registry import CHAMPION, _alias_version, _client

    return _alias_version(_client(), name, CHAMPION)


DEFAULT_PRESET = "tiny"  # the CLI's default, for a model that has no champion yet


def retrain_config(preset: str | None, overrides: list[str] | tuple[str, ...] = (),
                   model: str | None = None) -> tuple[Config, str]:
    """(config, where it came from) of a retrain: a retrain trains what is in production.

    With `preset`, that preset (+ `overrides`): said explicitly. Otherwise the registered
    model `model` (default: `registry.model_name` of the overrides, else the default
    preset's) is retrained with the config its champion was trained with (the
    `config.yaml` of the run that logged it) + `overrides`; with no champion yet, the
    default preset under that name."""
    from mlm.config import load_config

    if preset:
        return load_config(preset, overrides), f"preset {preset}"
    name = model or load_config(DEFAULT_PRESET, overrides).registry.model_name
    naming = [f"registry.model_name={name}"]
    champion = _champion(name)
    if champion is None:
        return load_config(DEFAULT_PRESET, [*overrides, *naming]), f"preset {DEFAULT_PRESET} ({name} has no champion yet)"
    base = champion_config(champion)
    base.setdefault("model", {})["init_from"] = None  # the retrain decides its own warm start
    return load_config(None, [*overrides, *naming], base=base), f"the config of {name} v{champion.version} (champion)"


def champion_config(version) -> dict[str, Any]:
    """The resolved config a registered version was trained with: `config.yaml` of the
    run that logged it (every stage run logs it), as a dict."""
    import tempfile

    import yaml

    from mlm.registry import RegistryError, _client

    client = _client()
    with tempfile.TemporaryDirectory(prefix="mlm-champion-config-") as tmp:
        try:
            path = client.download_artifacts(version.run_id, "config.yaml", tmp)
        except Exception as e:  # noqa: BLE001 - no such artifact, or the run is gone
            raise RegistryError(f"cannot read the config of {version.name} v{version.version} (run "
                                    f"{version.run_id}): {e}; give --preset") from None
        return yaml.safe_load(Path(path).read_text())


def retrain(inputs: list[str], cfg: Config, *, from_scratch: bool = False, work: Path | None = None) -> dict[str, Any]:
    from mlm.pipeline import pretrain
    from mlm.runtime import work_dir

    work = Path(work) if work else work_dir()
    name = cfg.registry.model_name
    state_dir = work / "retrain" / name
    with exclusive(state_dir / "lock") as holder:
        if holder is not None:
            return {"status": "busy", "reason": f"another retrain of {name} is running ({holder}); nothing done"}
        files, _ = corpus.resolve_inputs(list(inputs), work)
        data_dir = dataset_dir(work, cfg)
        state_file = state_dir / STATE
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        new, changed = changes(files, state.get("inputs", {}))
        if not new and not changed and storage.exists(storage.join(data_dir, shards.MANIFEST)) \
                and state.get("data_fingerprint") == shards.Manifest.read(data_dir).fingerprint:
            return {"status": "nothing_new", "reason": f"no new corpus files since retrain of {state.get('finished')}; "
                    f"{name} v{state.get('version')} was trained on this data; nothing done", "data_dir": str(data_dir)}

        init, why = None, "from scratch (requested)" if from_scratch else "from scratch (no champion yet)"
        champion = None if from_scratch else _champion(name)
        if champion is not None:
            if changed and state:
                why = f"from scratch (changed or removed inputs rebuild the tokenizer: {', '.join(changed[:3])})"
            elif storage.exists(storage.join(data_dir, shards.MANIFEST)) and champion.tags.get("tokenizer_fingerprint") == \
                    shards.Manifest.read(data_dir).tokenizer.fingerprint:
                init, why = f"models:/{name}/{champion.version}", f"warm start from champion v{champion.version}"
            else:
                why = f"from scratch (champion v{champion.version} has another tokenizer than the retrain dataset)"
        if init:
            cfg = config_from_dict(cfg.to_dict() | {"model": cfg.to_dict()["model"] | {"init_from": init}})
        result = pretrain(list(inputs), cfg, work, data_dir=data_dir, stage="retrain")
        manifest = shards.Manifest.read(data_dir)
        state = {"data_fingerprint": manifest.fingerprint, "inputs": {f.path: f.fingerprint for f in files},
                 "version": result["registered"]["version"],
                 "alias": result["registered"]["alias"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "pipeline_run_id": result["pipeline_run_id"]}
        storage.write_bytes(state_file, json.dumps(state, indent=2).encode())
        return result | {"status": "registered", "new_files": new, "changed_files": changed, "init": init or "scratch",
                         "init_reason": why}


def summary_text(result: dict[str, Any]) -> str:
    from mlm.pipeline import summary_text as pipeline_summary

    if result["status"] != "registered":
        return f"retrain: {result['reason']}\n" + json.dumps({"summary": result})
    origin = f", config: {result['config_from']}" if result.get("config_from") else ""
    head = f"retrain: {len(result['new_files'])} new file(s), {result['init_reason']}{origin}"
    return head + "\n" + pipeline_summary(result)
