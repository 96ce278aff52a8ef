"""The Hugging Face model card written next to the model and logged with it."""

import pytest

from mlm.config import ConfigError, load_config
from mlm.registry import hub_card

TAGS = {"data_fingerprint": "abc123", "code_version": "test", "config_hash": "h"}
METRICS = {"top1_accuracy": 0.25, "top5_accuracy": 0.4, "perplexity": 120.0}


def _metadata(cfg) -> dict:
    card = hub_card("# m\n", "m", METRICS, cfg, TAGS)
    return card.data.to_dict()


def test_card_carries_the_configured_license_and_the_evaluation():
    assert _metadata(load_config("tiny"))["license"] == "unknown"
    meta = _metadata(load_config("tiny", ["registry.license=apache-2.0"]))
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "fill-mask" and meta["library_name"] == "transformers"
    values = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert values == {"masked top-1 accuracy": 0.25, "masked top-5 accuracy": 0.4, "perplexity": 120.0}


@pytest.mark.parametrize("bad", ["", "apache 2.0", "mit\nlicense: x"])
def test_license_that_would_break_the_card_yaml_is_refused(bad):
    with pytest.raises(ConfigError, match="registry.license"):
        load_config("tiny", [f"registry.license={bad}"])
