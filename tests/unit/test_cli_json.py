"""The command line for scripts (issue 22, item 6): every command takes `--json` and then
prints exactly one JSON document on stdout; `mlm config show` prints the resolved config
and `mlm config keys` every key with its description and default; exit codes 0 ok, 1
failure, 2 usage or bad input; MLFLOW_EXPERIMENT_NAME is honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import yaml

from mlm.cli import cli
from mlm.config import Config, describe_keys, load_config


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _mlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlm", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_every_command_takes_json():
    commands = dict(_commands(cli))
    assert len(commands) >= 25
    missing = [" ".join(path) for path, cmd in commands.items() if not any("--json" in p.opts for p in cmd.params)]
    assert not missing, missing


def test_config_show_prints_the_resolved_config():
    yaml_out = _mlm("config", "show", "--preset", "tiny", "--set", "train.max_steps=7")
    json_out = _mlm("config", "show", "--preset", "tiny", "--set", "train.max_steps=7", "--json")
    assert yaml_out.returncode == 0 and json_out.returncode == 0, (yaml_out.stderr, json_out.stderr)
    as_yaml, as_json = yaml.safe_load(yaml_out.stdout), json.loads(json_out.stdout)
    assert as_yaml == as_json == load_config("tiny", ["train.max_steps=7"]).to_dict()
    assert as_json["train"]["max_steps"] == 7 and as_json["model"]["hidden_size"] == 128


def test_config_keys_lists_every_key_with_its_default():
    out = _mlm("config", "keys", "--json")
    assert out.returncode == 0, out.stderr
    keys = json.loads(out.stdout)
    assert keys == json.loads(json.dumps(describe_keys()))
    fields = sum(len(f.annotation.model_fields) for f in Config.model_fields.values())
    assert len(keys) == fields
    by = {k["key"]: k for k in keys}
    assert by["train.micro_batch_size"]["default"] == 32 and "auto" in by["train.micro_batch_size"]["type"]
    assert by["masking.rate"]["type"] == "float" and all(k["description"] for k in keys)
    human = _mlm("config", "keys")
    assert human.returncode == 0 and "train.max_steps = 1000  (int)" in human.stdout


def test_mlflow_experiment_name_is_honoured():
    env = {"MLFLOW_EXPERIMENT_NAME": "from-the-environment"}
    shown = json.loads(_mlm("config", "show", "--json", env=env).stdout)
    assert shown["registry"]["experiment"] == "from-the-environment"
    named = json.loads(_mlm("config", "show", "--json", "--set", "registry.experiment=named", env=env).stdout)
    assert named["registry"]["experiment"] == "named"  # an explicit setting wins


def test_exit_codes():
    bad_key = _mlm("config", "show", "--set", "train.bogus=1")
    assert bad_key.returncode == 2 and bad_key.stderr.startswith("mlm: error: unknown config key 'train.bogus'")
    usage = _mlm("config", "show", "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
    missing = _mlm("data", "verify", "/no/such/dataset", "--json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1
