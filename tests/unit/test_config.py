import pytest

from mlm.config import Config, ConfigError, load_config, preset_names


def test_defaults_and_every_preset_are_valid():
    assert Config().model.hidden_size == 768  # the class defaults are BERT-base
    assert {"tiny", "mini", "small", "base", "large"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_resolution_order_and_types():
    cfg = load_config("tiny", ["train.max_steps=7", "masking.rate=0.2", "train.use_gpu=false", "registry.model_name=x"])
    assert cfg.train.max_steps == 7 and cfg.masking.rate == 0.2 and cfg.train.use_gpu is False
    assert cfg.model.hidden_size == 128  # from the preset
    assert cfg.train.weight_decay == 0.0 and cfg.train.adam_beta2 == 0.98  # from the class defaults
    assert cfg.config_hash() != load_config("tiny").config_hash()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.nope=1", "unknown config key 'train.nope'; allowed: num_workers"),
        ("nope.x=1", "unknown config section 'nope'"),
        ("masking.strategy=zigzag", "masking.strategy: Input should be 'random'"),
        ("train.max_steps=-3", "train.max_steps"),
        ("model.num_heads=3", "must divide model.hidden_size"),
        ("data.seq_len=4096", "exceeds model.max_position_embeddings"),
        ("train.global_batch_size=33", "multiple of train.micro_batch_size"),
        ("trainmax_steps=3", "use section.key"),
        ("train.max_steps", "use key=value"),
    ],
)
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_frozen():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("gigantic")
    cfg = load_config("tiny")
    with pytest.raises(Exception):
        cfg.train.max_steps = 3  # type: ignore[misc]


def test_every_field_is_described():
    for section in Config.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, f"{section.annotation.__name__}.{name} lacks a description"
