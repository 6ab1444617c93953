"""One typed config per run, read top to bottom.

An experiment is a YAML file in ``configs/`` with the sections below. Every key can be
overridden from the command line as ``section.key=value`` (YAML syntax for the value), and
an unknown or mistyped key fails fast with the closest valid key. The resolved config is
saved as JSON beside every run and checkpoint, so any result can be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images and captions come from."""

    kind: str = "shapes"  # shapes | folder | webdataset
    resolution: int = 24  # square side in pixels; images are resized + center-cropped
    # -- the built-in captioned-shapes set: fresh, deterministic scenes per (seed, index)
    seed: int = 0
    num: int = 20000  # scenes in the fixed training set (indices 0..num-1) when pre-tokenizing
    min_objects: int = 1
    max_objects: int = 2
    # attribute combinations removed from the training split and kept for the holdout
    # split, e.g. "green triangle", "big circle", "red top left" (see vqgen.data.shapes)
    holdout: list[str] = field(default_factory=lambda: ["green triangle", "white square"])
    # -- real data
    path: str = ""  # image folder, or a glob / brace pattern of WebDataset tar shards
    missing_caption: str = "skip"  # skip | error | empty (empty = unconditional sample)
    on_bad_sample: str = "skip"  # skip | error: an unreadable image or a damaged shard
    # held-out images for every held-out metric, never trained on: a separate folder or shard
    # pattern, or a share of data.path's files (its shards, for a WebDataset) chosen by path hash
    eval_path: str = ""
    eval_fraction: float = 0.0
    codes: str = ""  # pre-tokenized code shards (python -m vqgen.data encode); empty = encode here
    shuffle_buffer: int = 1000  # webdataset: samples held to shuffle the stream (0 = shard order)
    num_workers: int = 0  # DataLoader processes decoding images (0 = in the training process)


@dataclass
class TokenizerConfig:
    """VQ tokenizer: encoder/decoder architecture, quantizer and losses."""

    encoder: str = "patch"  # patch (each code sees only its patch) | conv (VQGAN-style)
    downsample: int = 4  # 4 | 8 | 16
    channels: int = 16  # base width of the conv stacks
    # width multiplier per resolution level, input resolution first: log2(downsample) + 1 entries
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 1
    attention: bool = False  # self-attention at the lowest resolution (conv encoder)
    latent_dim: int = 4  # channels entering the quantizer
    quantizer: str = "fsq"  # fsq | vq
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    codebook_size: int = 1024  # vq only
    codebook_dim: int = 8  # vq only: low-dimensional, l2-normalised codes
    commitment_weight: float = 0.25  # vq only
    kmeans_init: bool = True  # vq only
    dead_code_threshold: float = 2.0  # vq only: EMA count under which a code is restarted
    # losses
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual_weight: float = 0.0  # LPIPS; needs local weights (lpips_path)
    lpips_path: str = ""
    gan_weight: float = 0.0  # PatchGAN hinge loss with adaptive weight; 0 = off
    gan_start_step: int = 0


@dataclass
class ModelConfig:
    """Decoder-only transformer over image codes with cross-attention to text."""

    size: str = "mini"  # a name from vqgen.model.SIZES; the fields below override it when set
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    kv_heads: int | None = None  # grouped-query attention when < heads
    mlp_ratio: float | None = None  # SwiGLU hidden = mlp_ratio * dim (rounded up to 64)
    text_depth: int | None = None  # trainable self-attention blocks over the projected caption
    rope_base: float = 10000.0  # 2-D rotary embeddings over the code grid
    dropout: float = 0.0
    text_encoder: str = "all-minilm-l6-v2"  # hub name, local path, or a packaged alias
    max_text_len: int = 32
    cond_dropout: float = 0.1  # caption dropout probability, for classifier-free guidance
    tokenizer: str = ""  # tokenizer checkpoint dir; default <run>/tokenizer
    text_cache: str = ""  # embedding cache dir; default <transformer dir>/text_cache


@dataclass
class TrainConfig:
    """One training loop (the tokenizer's or the transformer's)."""

    steps: int = 1000
    max_minutes: float = 0.0  # stop early at this wall time (0 = no limit); step count rules resume
    batch_size: int = 64  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    ema_decay: float = 0.0  # 0 = no EMA weights
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # sample/reconstruction grid every N steps (0 = only at the end)
    seed: int = 0
    on_nan: str = "stop"  # stop | skip
    report_to: str = "none"  # none | wandb (offline unless WANDB_MODE says otherwise)


@dataclass
class TrainingConfig:
    """The defaults are the demo's: each stage fits its share of ~15 minutes on 2 CPU cores."""

    tokenizer: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2400, max_minutes=3.5, batch_size=16, lr=5e-3, warmup_steps=50, weight_decay=0.0,
        betas=[0.9, 0.99], grad_clip=0.0, mixed_precision="no", log_every=50, checkpoint_every=500,
    ))
    transformer: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1300, max_minutes=8.0, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.05,
        mixed_precision="no", log_every=20, checkpoint_every=250,
    ))


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.5
    temperature: float = 0.5
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_schedule: str = "constant"  # constant | linear (guidance ramps from 1 to cfg_scale)
    num_images: int = 1  # per prompt
    seed: int = 0  # image i of every prompt uses seed + i
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    prompts: list[str] = field(default_factory=list)  # fixed prompts for training-time grids


@dataclass
class Config:
    name: str = "default"
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON, atomically."""
        from vqgen.checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Building a dataclass from plain dicts, with errors that name the key
# --------------------------------------------------------------------------------------


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        t = _resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _valid_keys(t, key + ".")
    return keys


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, root: type) -> ConfigError:
    valid = _valid_keys(root)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t`` (ints widen to floats)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        (item_t,) = typing.get_args(t)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if t is str and isinstance(value, bool):  # YAML 1.1 reads a bare no/off as false
        return "no" if not value else "yes"
    if t is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if t in (int, float, str) and (not isinstance(value, t) or isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {t.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", root: type | None = None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by full name."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + key, root)
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    kwargs = {}
    for name, value in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config section '{prefix + name}' must be a mapping")
            # keys not given keep this section's own defaults (e.g. training.tokenizer's)
            base = dataclasses.asdict(defaults[name]) if name in defaults else {}
            kwargs[name] = from_dict(t, _merge(base, value or {}), prefix + name + ".", root)
        else:
            kwargs[name] = _coerce(value, t, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["training.transformer.lr=1e-3", "data.holdout=[green triangle]"]`` -> nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. data.resolution=64)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML (or saved JSON) config and apply ``key=value`` overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
    data = _merge(data, parse_overrides(overrides or []))
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None
    validate(cfg)
    return cfg


_CHOICES = {
    "data.kind": ("shapes", "folder", "webdataset"),
    "data.missing_caption": ("error", "skip", "empty"),
    "tokenizer.encoder": ("patch", "conv"),
    "tokenizer.quantizer": ("fsq", "vq"),
    "tokenizer.downsample": (4, 8, 16),
    "training.tokenizer.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "training.transformer.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "training.tokenizer.on_nan": ("stop", "skip"),
    "training.transformer.on_nan": ("stop", "skip"),
    "training.tokenizer.report_to": ("none", "wandb"),
    "training.transformer.report_to": ("none", "wandb"),
    "sampling.cfg_schedule": ("constant", "linear"),
}


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {list(choices)}")
    if not 1 <= cfg.data.min_objects <= cfg.data.max_objects:
        raise ConfigError("config keys 'data.min_objects' <= 'data.max_objects' must hold, both >= 1")
    if not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError(f"config key 'sampling.top_p' must lie in (0, 1], got {cfg.sampling.top_p}")
    if cfg.data.resolution % cfg.tokenizer.downsample:
        raise ConfigError(
            f"config key 'data.resolution' ({cfg.data.resolution}) must be a multiple of "
            f"'tokenizer.downsample' ({cfg.tokenizer.downsample})"
        )
