"""Typed config: YAML + overrides, unknown keys named with a suggestion, values checked."""

import json

import pytest

from vqgen.config import Config, ConfigError, load_config


def test_yaml_and_overrides_resolve_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ndata:\n  resolution: 64\ntraining:\n  transformer:\n    lr: 1.0e-3\n")
    cfg = load_config(path, ["training.transformer.lr=2e-4", "data.holdout=[green triangle, center]"])
    assert cfg.name == "exp" and cfg.data.resolution == 64
    assert cfg.training.transformer.lr == 2e-4  # the override wins; "2e-4" read as a float
    assert cfg.data.holdout == ["green triangle", "center"]
    assert cfg.training.tokenizer.lr == Config().training.tokenizer.lr  # untouched sections keep defaults


def test_unknown_key_is_named_with_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'training\.transformer\.lrr'; did you mean 'training\.transformer\.lr'\?"):
        load_config(None, ["training.transformer.lrr=1"])
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match=rf"'data\.resolutoin'; did you mean 'data\.resolution'\? \(in {path}\)"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.resolution=big", "config key 'data.resolution' expects int, got 'big'"),
        ("model.cond_dropout=[1]", "config key 'model.cond_dropout' expects float"),
        ("tokenizer.quantizer=lfq", "config key 'tokenizer.quantizer' is 'lfq'; choose one of"),
        ("sampling.top_p=1.5", "'sampling.top_p' must lie in (0, 1]"),
        ("data.resolution=30", "'data.resolution' (30) must be a multiple of 'tokenizer.downsample'"),
        ("training=3", "config section 'training' must be a mapping"),
        ("no_equals_sign", "must look like key=value"),
    ],
)
def test_bad_values_fail_fast_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["name=roundtrip", "model.dim=96", "data.holdout=[red square]"])
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")  # JSON is YAML: a saved run config is a config file
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 96


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no experiment"
    for path in configs:
        load_config(path)


def test_shapes_config_spells_out_the_builtin_defaults():
    from pathlib import Path

    shipped = load_config(Path(__file__).parent.parent / "configs" / "shapes.yaml")
    assert shipped == load_config(None, ["name=shapes", "out_dir=runs/shapes"])


def test_overriding_one_key_keeps_the_rest_of_its_sections_defaults():
    cfg = load_config(None, ["training.tokenizer.steps=5", "training.transformer.lr=1e-4"])
    default = Config()
    assert cfg.training.tokenizer.steps == 5 and cfg.training.transformer.lr == 1e-4
    # the two training sections have different defaults; an override must not reset them
    assert cfg.training.tokenizer.lr == default.training.tokenizer.lr != default.training.transformer.lr
    assert cfg.training.transformer.max_minutes == default.training.transformer.max_minutes > 0
