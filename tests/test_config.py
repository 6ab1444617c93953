"""Typed config: YAML + overrides, unknown keys named with a suggestion, values checked against
the choices declared on the fields, neutral defaults, the resolved-config CLI, the resume check."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vqgen.config import (
    SETTINGS,
    SIZES,
    Config,
    ConfigError,
    SamplingConfig,
    SamplingSettings,
    TokenizerConfig,
    TransformerConfig,
    check_resume,
    load_config,
    main as config_main,
    resume_changes,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes.yaml"


def test_yaml_and_overrides_resolve_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ndata:\n  resolution: 64\ntraining:\n  transformer:\n    lr: 1.0e-3\n")
    cfg = load_config(path, ["training.transformer.lr=2e-4", "data.holdout=[green triangle, center]"])
    assert cfg.name == "exp" and cfg.data.resolution == 64
    assert cfg.training.transformer.lr == 2e-4  # the override wins; "2e-4" read as a float
    assert cfg.data.holdout == ["green triangle", "center"]
    assert cfg.training.tokenizer == Config().training.tokenizer  # untouched sections keep the defaults


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
        ("training.transformer.cond_dropout=[1]", "config key 'training.transformer.cond_dropout' expects float"),
        ("training.transformer.cond_dropout=1", "'training.transformer.cond_dropout' must lie in [0, 1), got 1.0"),
        ("model.kv_heads=5", "model config: heads (12) must be a multiple of kv_heads (5)"),
        ("model.grid=[4]", "config key 'model.grid' expects a list of 2 values, got [4]"),
        ("tokenizer.l1_weight=1", "unknown config key 'tokenizer.l1_weight'; did you mean 'training.tokenizer.l1_weight'?"),
        ("tokenizer.quantizer=lfq", "config key 'tokenizer.quantizer' is 'lfq'; choose one of ['fsq', 'vq']"),
        ("tokenizer.downsample=6", "config key 'tokenizer.downsample' is 6; choose one of [4, 8, 16]"),
        ("tokenizer.downsample=8.0", "config key 'tokenizer.downsample' is 8.0; choose one of [4, 8, 16]"),
        ("model.size=huge", "config key 'model.size' is 'huge'; choose one of ['mini', 'tiny', 'B', 'L', 'XL']"),
        ("training.transformer.on_nan=ignore", "config key 'training.transformer.on_nan' is 'ignore'"),
        ("data.kind=lmdb", "config key 'data.kind' is 'lmdb'; choose one of ['shapes', 'folder', 'webdataset']"),
        ("sampling.top_p=1.5", "config key 'sampling.top_p' must be a finite number in (0, 1], got 1.5"),
        ("sampling.speculative_prior=left", "config key 'sampling.speculative_prior' is 'left'; choose one of ['above', 'uniform']"),
        ("sampling.top_k=2.5", "config key 'sampling.top_k' expects int, got 2.5"),
        ("sampling.prompts=a fox", "config key 'sampling.prompts' expects a list, got 'a fox'"),
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


def test_choices_are_declared_once_on_the_fields(monkeypatch):
    # the model sizes are the names of SIZES: a new entry is a choice, with its own values
    with pytest.raises(ConfigError, match=re.escape(f"'model.size' is 'huge'; choose one of {list(SIZES)}")):
        load_config(None, ["model.size=huge"])
    monkeypatch.setitem(SIZES, "huge", SIZES["XL"] | {"depth": 48})
    assert load_config(None, ["model.size=huge"]).model == TransformerConfig(**SIZES["XL"] | {"depth": 48})
    # YAML 1.1 reads a bare `no` as false: it still means the choice "no"
    cfg = load_config(None, ["training.tokenizer.mixed_precision=no", "training.transformer.mixed_precision=bf16"])
    assert (cfg.training.tokenizer.mixed_precision, cfg.training.transformer.mixed_precision) == ("no", "bf16")
    # a config built in code is checked against the same declaration
    with pytest.raises(ConfigError, match=r"config key 'tokenizer.quantizer' is 'lfq'; choose one of \['fsq', 'vq'\]"):
        validate(Config(tokenizer=TokenizerConfig(quantizer="lfq")))


def test_defaults_are_neutral_not_the_demo():
    """The CPU demo's settings live in configs/shapes.yaml only: a config that leaves a key
    out never inherits the demo's value for it."""
    default, demo = Config(), load_config(SHAPES)
    for stage in ("tokenizer", "transformer"):
        neutral, cpu = getattr(default.training, stage), getattr(demo.training, stage)
        assert neutral.max_minutes == 0 and cpu.max_minutes > 0
        assert neutral.steps != cpu.steps and neutral.mixed_precision == "auto" != cpu.mixed_precision
    assert default.model == TransformerConfig.from_size("B") != demo.model
    assert demo.model == TransformerConfig.from_size("mini", max_text_len=32)
    assert (default.data.kind, default.data.resolution, default.data.holdout) == ("folder", 256, [])
    assert (default.tokenizer.downsample, default.tokenizer.quantizer, default.tokenizer.codebook_size) == (16, "vq", 16384)
    validate(default)


def shipped_configs() -> list[Path]:
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert SHAPES in configs and len(configs) > 1, "configs/ holds no experiment besides the demo"
    return [p for p in configs if p != SHAPES]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_shipped_config_resolves_to_what_it_says(path, capsys):
    """`python -m vqgen.config FILE`: no wall-clock limit, the architecture of the model size the
    file names (under the keys it sets), and no key holding the demo's value unless the file sets it."""
    assert config_main([str(path)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    raw = yaml.safe_load(path.read_text())
    for stage in ("tokenizer", "transformer"):
        assert resolved["training"][stage]["max_minutes"] == 0
    size = raw.get("model", {}).get("size")
    if size is not None:
        given = {k: v for k, v in raw["model"].items() if k in SIZES[size]}
        assert {k: resolved["model"][k] for k in SIZES[size]} == SIZES[size] | given
    demo, default = flatten(load_config(SHAPES).to_dict()), flatten(Config().to_dict())
    given = flatten(raw)
    inherited = [k for k, v in flatten(resolved).items() if k not in given and v == demo[k] != default[k]]
    assert not inherited


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_config_cli_prints_what_train_py_runs(tmp_path):
    from vqgen.train.cli import _parser, resolve

    args = ["configs/natural_t2i_B.yaml", "training.transformer.steps=7", "--out", str(tmp_path), "--report-to", "none"]
    proc = subprocess.run([sys.executable, "-m", "vqgen.config", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["training"]["transformer"]["steps"] == 7 and printed["out_dir"] == str(tmp_path)
    assert printed == resolve(_parser().parse_args(["transformer", "--config", *args])).to_dict()
    bad = subprocess.run([sys.executable, "-m", "vqgen.config", "configs/shapes.yaml", "model.sise=B"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "did you mean 'model.size'?" in bad.stderr


def test_a_bad_sampling_setting_fails_at_config_load_before_any_training():
    proc = subprocess.run([sys.executable, "-m", "vqgen.config", "configs/photos.yaml", "sampling.temperature=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr == ("error: config key 'sampling.temperature' must be a finite number > 0, got 0.0 (softmax "
                           "temperature; for greedy decoding use top_k=1) (in configs/photos.yaml)\n")


def test_sampling_settings_are_frozen_checked_when_built_and_round_trip():
    settings = SamplingSettings(cfg_scale=2, seed=7)
    assert settings.cfg_scale == 2.0 and isinstance(settings.cfg_scale, float)  # ints widen to floats
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 8
    assert dataclasses.replace(settings, top_k=5) == SamplingSettings(cfg_scale=2.0, seed=7, top_k=5)
    with pytest.raises(ConfigError, match=r"config key 'sampling.seed' must be an integer in \[0, 4611686018427387903\], got -1"):
        dataclasses.replace(settings, seed=-1)
    with pytest.raises(ConfigError, match=r"config key 'sampling.cfg_scale' must be a finite number >= 0, got inf"):
        SamplingSettings(cfg_scale=float("inf"))
    with pytest.raises(ConfigError, match=r"config key 'sampling.compile' expects true/false, got 1"):
        SamplingConfig(compile=1)
    # the run config's section is the settings plus the training-time grids' own keys
    assert SETTINGS == ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "num_images", "seed",
                        "speculative", "speculative_prior", "speculative_draft", "speculative_tolerance",
                        "speculative_neighbours")
    assert [f.name for f in dataclasses.fields(SamplingConfig)] == [*SETTINGS, "compile", "prompts"]
    cfg = load_config(SHAPES, ["sampling.speculative=8", "sampling.speculative_prior=uniform", "sampling.prompts=[a, b]"])
    assert cfg.sampling.prompts == ("a", "b") and cfg.to_dict()["sampling"]["prompts"] == ["a", "b"]
    assert load_config(None, [f"sampling.{k}={v}" for k, v in cfg.to_dict()["sampling"].items()]).sampling == cfg.sampling


def test_demo_reads_shapes_yaml_and_the_stages_need_a_config(monkeypatch, capsys):
    from vqgen.train import demo
    from vqgen.train.cli import _parser, main, resolve

    assert resolve(_parser().parse_args(["demo"])) == load_config(SHAPES, ["out_dir=runs/demo"])
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "training.tokenizer.steps=1"])
    assert exit_.value.code == 2 and "--config" in capsys.readouterr().err
    monkeypatch.setattr(demo, "DEMO_CONFIG", Path("configs") / "absent.yaml")
    monkeypatch.chdir(ROOT / "tests")
    with pytest.raises(ConfigError, match=r"the demo's config configs/absent.yaml was not found .* pass --config PATH"):
        demo.demo_config_path()


def test_resume_refuses_changes_that_alter_the_run_and_allows_the_rest():
    saved = load_config(SHAPES).to_dict()
    changed = load_config(SHAPES, ["training.tokenizer.batch_size=32", "tokenizer.channels=8",
                                   "training.tokenizer.steps=5000", "training.tokenizer.max_minutes=0",
                                   "training.tokenizer.report_to=wandb", "model.size=tiny",
                                   "training.transformer.text_cache=/elsewhere"]).to_dict()
    refused, allowed = resume_changes(saved, changed, "tokenizer")
    assert refused == ["tokenizer.channels: 16 -> 8", "training.tokenizer.batch_size: 16 -> 32"]
    assert allowed == ["training.tokenizer.steps: 2400 -> 5000", "training.tokenizer.max_minutes: 3.5 -> 0.0",
                       "training.tokenizer.report_to: 'none' -> 'wandb'"]  # model.*: not the tokenizer's
    refused, allowed = resume_changes(saved, changed, "transformer")
    assert refused == ["model.dim: 128 -> 256", "model.text_depth: 2 -> 0"]  # the transformer reads no tokenizer section
    assert allowed == ["training.transformer.text_cache: '' -> '/elsewhere'"]
    # a key only one of the two has (a config of another layout) is refused, even one that may change
    del saved["data"]["num_workers"], saved["tokenizer"]["channels"]
    saved["model"]["cond_dropout"] = 0.1
    refused, allowed = resume_changes(saved, changed, "tokenizer")
    assert refused == ["data.num_workers: (absent) -> 0", "tokenizer.channels: (absent) -> 8",
                       "training.tokenizer.batch_size: 16 -> 32"]
    refused, _ = resume_changes(saved, changed, "transformer")
    assert refused == ["data.num_workers: (absent) -> 0", "model.dim: 128 -> 256", "model.text_depth: 2 -> 0",
                       "model.cond_dropout: 0.1 -> (absent)"]


def test_check_resume_names_the_keys_in_its_error(tmp_path):
    saved = tmp_path / "checkpoints" / "step_00000010" / "config.json"
    saved.parent.mkdir(parents=True)
    load_config(SHAPES).save(saved)
    assert check_resume(saved, load_config(SHAPES, ["training.transformer.log_every=5"]), "transformer") == [
        "training.transformer.log_every: 20 -> 5"]
    with pytest.raises(ConfigError) as err:
        check_resume(saved, load_config(SHAPES, ["training.transformer.batch_size=8"]), "transformer")
    assert f"resuming from {saved.parent} would change the run" in str(err.value)
    assert "training.transformer.batch_size: 64 -> 8" in str(err.value) and "--out DIR" in str(err.value)
    assert check_resume(tmp_path / "absent.json", load_config(SHAPES), "transformer") == []
