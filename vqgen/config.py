"""One typed config per run, read top to bottom.

An experiment is a YAML file in ``configs/`` with the sections below. Every key can be
overridden from the command line as ``section.key=value`` (YAML syntax for the value), and
an unknown or mistyped key fails fast with the closest valid key. The defaults here are
neutral (a 256 px natural-image setup, no wall-clock limit); an experiment's own settings,
the CPU demo's included, live in its file. The resolved config is saved as JSON beside every
run and checkpoint, so any result can be traced to its settings, and a resumed run is checked
against it (``check_resume``). See what a config resolves to before running it:

    python -m vqgen.config configs/natural_f16_vq.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from vqgen.files import atomic_write_text


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images and captions come from."""

    kind: Literal["shapes", "folder", "webdataset"] = "folder"
    resolution: int = 256  # square side in pixels; images are resized + center-cropped
    # -- the built-in captioned-shapes set: fresh, deterministic scenes per (seed, index)
    seed: int = 0
    num: int = 20000  # scenes in the fixed training set (indices 0..num-1) when pre-tokenizing
    min_objects: int = 1
    max_objects: int = 2
    # attribute combinations removed from the training split and kept for the holdout
    # split, e.g. "green triangle", "big circle", "red top left" (see vqgen.data.shapes)
    holdout: list[str] = field(default_factory=list)
    # transformer training reads each scene under one of 1 + this many training-family wordings
    # (its caption and others of the same scene, fixed per (seed, index)), chosen per epoch
    caption_augmentation: int = 0
    # those extra wordings also place the size and colour words in every order around the shape
    # (vqgen.data.shapes.ORDER_TEMPLATES); needs caption_augmentation >= 1
    caption_attribute_orders: bool = False
    # -- real data
    path: str = ""  # image folder, or a glob / brace pattern of WebDataset tar shards
    missing_caption: Literal["skip", "error", "empty"] = "skip"  # empty = unconditional sample
    on_bad_sample: Literal["skip", "error"] = "skip"  # an unreadable image or a damaged shard
    # held-out images for every held-out metric, never trained on: a separate folder or shard
    # pattern, or a share of data.path's files (its shards, for a WebDataset) chosen by path hash
    eval_path: str = ""
    eval_fraction: float = 0.0
    codes: str = ""  # pre-tokenized code shards (python -m vqgen.data encode); empty = encode here
    shuffle_buffer: int = 1000  # webdataset: samples held to shuffle the stream (0 = shard order)
    num_workers: int = 0  # DataLoader processes decoding images (0 = in the training process)


@dataclass
class TokenizerConfig:
    """The VQ tokenizer's architecture (``tokenizer:``): encoder/decoder and quantizer. With the
    input resolution (``data.resolution``) it is what ``VQTokenizer`` is built from and what its
    checkpoint holds; the losses it trains with are ``training.tokenizer``'s. The defaults are
    LlamaGen's f16 recipe: 256 px -> 16 x 16 codes of a 16,384-code, 8-dim l2-normalised VQ."""

    encoder: Literal["patch", "conv"] = "conv"  # patch: each code sees only its patch; conv: VQGAN-style
    downsample: Literal[4, 8, 16] = 16
    channels: int = 128  # base width of the conv stacks
    # width multiplier per resolution level, input resolution first: log2(downsample) + 1 entries
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attention: bool = True  # self-attention at the lowest resolution (conv encoder)
    latent_dim: int = 256  # channels entering the quantizer
    quantizer: Literal["fsq", "vq"] = "vq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq only
    codebook_size: int = 16384  # vq only
    codebook_dim: int = 8  # vq only: low-dimensional, l2-normalised codes
    # vq only: vector-quantize-pytorch builds its module with these (its forward adds the
    # commitment loss and restarts dead codes), so a checkpoint rebuilds the same module
    commitment_weight: float = 0.25
    kmeans_init: bool = True
    dead_code_threshold: float = 2.0  # EMA count under which a code is restarted


# Named transformer sizes, as data: their names are the choices of `model.size`. B, L and XL
# mirror LlamaGen's GPT-B/L/XL (dim, depth, heads). Our blocks add cross-attention (4 * dim^2
# parameters per block) that LlamaGen's lack; a SwiGLU MLP ratio of 1.5 instead of LlamaGen's 8/3
# pays for it, so each size keeps LlamaGen's parameter count (a test holds them within 3%).
# `mini` is the CPU demo's: narrow enough to train in minutes on two cores, with two text blocks,
# which bind each object's attributes in two-object captions (docs/benchmarks.md has the runs).
# `tiny` is the sampling benchmark's.
SIZES: dict[str, dict[str, Any]] = {
    "mini": dict(dim=128, depth=4, heads=4, kv_heads=4, mlp_ratio=2.0, text_depth=2),
    "tiny": dict(dim=256, depth=4, heads=4, kv_heads=4, mlp_ratio=2.0, text_depth=0),
    "B": dict(dim=768, depth=12, heads=12, kv_heads=12, mlp_ratio=1.5, text_depth=0),
    "L": dict(dim=1024, depth=24, heads=16, kv_heads=16, mlp_ratio=1.5, text_depth=0),
    "XL": dict(dim=1280, depth=36, heads=20, kv_heads=20, mlp_ratio=1.5, text_depth=0),
}
DEFAULT_SIZE = "B"


def sized(size: Any, fields: dict[str, Any], key: str = "model.size") -> dict[str, Any]:
    """The fields of the named size ``SIZES[size]`` with ``fields`` set on top. A new head count
    gives every head its own keys and values unless ``kv_heads`` is set too."""
    _choice(size, tuple(SIZES), key)
    base = dict(SIZES[size])
    if "heads" in fields and "kv_heads" not in fields:
        base["kv_heads"] = fields["heads"]
    return base | fields


@dataclass
class TransformerConfig:
    """The transformer's architecture, all of it: ``Transformer(cfg)`` builds it and its
    checkpoint's config.json holds it.

    A run config's ``model:`` section is one, written as a named size (``model.size``, a key of
    ``SIZES``; default B) with the fields it sets on top; the size's values fill the rest, so
    the resolved config shows the architecture the run builds. ``vocab_size``, ``grid`` and
    ``text_dim`` belong to the tokenizer and the text encoder, as do ``code_levels`` (an FSQ
    tokenizer's levels): a run config leaves them unset, and ``complete`` fills them in when the
    transformer is built.

    ``code_head`` says how a code enters and leaves the model (``vqgen.model.code_head``):
    ``softmax`` gives every code id its own embedding and logit; ``fsq_digits`` and
    ``fsq_autoregressive`` read an FSQ code as its per-dimension digits (embedding = sum of
    digit embeddings; p(code) = prod over digits of p(digit), independent or each given the
    digits before it), so a code never seen in training is built from digits that were.
    """

    dim: int
    depth: int
    heads: int
    kv_heads: int  # grouped-query attention when < heads
    mlp_ratio: float  # SwiGLU hidden width = mlp_ratio * dim, rounded up to a multiple of 64 (unless mlp_width)
    text_depth: int  # trainable bidirectional self-attention blocks over the projected caption
    rope_base: float = 10000.0  # rotary embeddings: 2-D over the code grid, 1-D along the text
    dropout: float = 0.0
    text_encoder: str = "all-minilm-l6-v2"  # hub name, local path, or a packaged alias (works offline)
    max_text_len: int = 77  # captions are truncated to this many text tokens
    vocab_size: int | None = None  # the tokenizer's codebook size
    grid: tuple[int, int] | None = None  # the tokenizer's (h, w) code grid: h * w codes in raster order
    text_dim: int | None = None  # the width of the text encoder's embeddings
    code_head: Literal["softmax", "fsq_digits", "fsq_autoregressive"] = "softmax"
    # an FSQ tokenizer's levels: code id = sum_d digit_d * prod(code_levels[:d]); None for a VQ codebook
    code_levels: tuple[int, ...] | None = None
    # explicit widths, independent of dim: what a structurally pruned model (vqgen.compress) keeps.
    # None derives them: head_width = dim // heads, mlp_width from mlp_ratio (the properties
    # head_dim and mlp_hidden are the widths in effect)
    head_width: int | None = None  # the width of each attention head's queries, keys and values
    mlp_width: int | None = None  # the SwiGLU hidden width, overriding mlp_ratio's

    # fields added after checkpoints were first written, with the value that computes what a
    # checkpoint without them was trained to compute: such a checkpoint loads and resumes as it was
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {
        "code_head": "softmax", "code_levels": None, "head_width": None, "mlp_width": None,
    }

    def __post_init__(self) -> None:
        if self.grid is not None:
            self.grid = tuple(self.grid)
        if self.code_levels is not None:
            self.code_levels = tuple(self.code_levels)
        self._check_code_head()
        width = "head_width" if self.head_width is not None else "dim/heads"
        checks = [
            (self.head_width is not None or self.dim % self.heads == 0,
             f"dim ({self.dim}) must be divisible by heads ({self.heads}), or head_width set"),
            (self.heads % self.kv_heads == 0, f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"),
            (self.head_dim > 0 and self.head_dim % 4 == 0,
             f"head dim {width} ({self.head_dim}) must be a positive multiple of 4 for 2-D rotary"),
            (self.mlp_width is None or self.mlp_width > 0, f"mlp_width must be positive, got {self.mlp_width}"),
            (self.grid is None or (len(self.grid) == 2 and min(self.grid) > 0), f"grid must be (h, w) > 0: {self.grid}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"model config: {message}")

    def _check_code_head(self) -> None:
        """A digit head needs the tokenizer's FSQ levels, and they must make up its codebook."""
        levels = self.code_levels
        if levels is not None and (min(levels, default=0) < 2 or self.vocab_size not in (None, math.prod(levels))):
            raise ConfigError(
                f"model config: code_levels {list(levels)} must each be >= 2, with the codebook size "
                f"vocab_size ({self.vocab_size}) as their product"
            )
        if self.code_head != "softmax" and self.vocab_size is not None and levels is None:
            raise ConfigError(
                f"config key 'model.code_head' is {self.code_head!r}, which reads each code as FSQ digits, but the "
                f"tokenizer's {self.vocab_size} codes have none (it is not an FSQ tokenizer); use model.code_head=softmax, "
                "or train the transformer over a tokenizer with tokenizer.quantizer=fsq"
            )

    @classmethod
    def from_size(cls, size: str, **fields: Any) -> TransformerConfig:
        """The named size ``SIZES[size]`` with ``fields`` set on top (see ``sized``)."""
        return cls(**sized(size, fields))

    def complete(
        self, vocab_size: int, grid: tuple[int, int], text_dim: int, code_levels: Sequence[int] | None = None
    ) -> TransformerConfig:
        """This architecture for a tokenizer's codebook, grid and FSQ levels (None for a VQ
        codebook: ``VQTokenizer.code_levels``) and a text encoder's width; a field the config
        already sets must agree with them."""
        levels = None if code_levels is None else tuple(code_levels)
        given = {"vocab_size": vocab_size, "grid": tuple(grid), "text_dim": text_dim, "code_levels": levels}
        for name, value in given.items():
            if getattr(self, name) not in (None, value):
                raise ConfigError(
                    f"config key 'model.{name}' is {getattr(self, name)!r}, but the tokenizer and text encoder give "
                    f"{value!r}; leave it unset"
                )
        return dataclasses.replace(self, **given)

    @property
    def head_dim(self) -> int:
        """The width of each attention head: ``head_width``, or dim // heads."""
        return self.dim // self.heads if self.head_width is None else self.head_width

    @property
    def attn_dim(self) -> int:
        """The width of all heads together (queries, and each attention's output projection input)."""
        return self.heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        """The SwiGLU hidden width: ``mlp_width``, or mlp_ratio * dim rounded up to a multiple of 64."""
        return math.ceil(self.mlp_ratio * self.dim / 64) * 64 if self.mlp_width is None else self.mlp_width

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class TrainConfig:
    """One training loop (the tokenizer's or the transformer's)."""

    steps: int = 100_000
    max_minutes: float = 0.0  # stop early at this wall time (0 = no limit); step count rules resume
    batch_size: int = 64  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    ema_decay: float = 0.0  # 0 = no EMA weights
    checkpoint_every: int = 1000
    log_every: int = 50
    sample_every: int = 0  # sample/reconstruction grid every N steps (0 = only at the end)
    seed: int = 0
    on_nan: Literal["stop", "skip"] = "stop"
    report_to: Literal["none", "wandb"] = "none"  # wandb runs offline unless WANDB_MODE says otherwise


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """The tokenizer's loop, and the losses it trains with."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0  # LPIPS; needs local weights (lpips_path)
    lpips_path: str = ""
    gan_weight: float = 0.0  # PatchGAN hinge loss with adaptive weight; 0 = off
    gan_start_step: int = 0
    # the discriminator's own AdamW settings and gradient clip (unset = this section's lr, betas,
    # grad_clip); its learning rate follows the same warm-up + cosine schedule
    disc_lr: float | None = None
    disc_betas: list[float] | None = None
    disc_grad_clip: float | None = None


@dataclass
class TransformerTrainConfig(TrainConfig):
    """The transformer's loop, and what it trains over."""

    cond_dropout: float = 0.1  # caption dropout probability, for classifier-free guidance
    tokenizer: str = ""  # tokenizer checkpoint dir; default <run>/tokenizer
    text_cache: str = ""  # embedding cache dir; default <transformer dir>/text_cache


GuidanceSchedule = Literal["constant", "linear"]  # linear: guidance ramps from 1 to cfg_scale over the codes
DraftPrior = Literal["above", "uniform"]  # speculative drafts for positions entering a window
MAX_SEED = 2**62 - 1  # a base seed plus an image index stays within torch.Generator's 64 bits


@dataclass
class TeacherSampling:
    """How the teacher samples the sequences a student also learns on (``training.distill.sampling``):
    each setting unset (null) takes the teacher checkpoint's own sampling setting (``SamplingSettings``)."""

    cfg_scale: float | None = None
    cfg_schedule: GuidanceSchedule | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # sequence k is drawn with the seed image_seed(seed, k, stream)
    speculative: int | None = None  # the same distribution, fewer forwards (other draws)

    def given(self) -> dict[str, Any]:
        """The settings this section sets, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DistillTrainConfig(TransformerTrainConfig):
    """Knowledge distillation into a student transformer (``python train.py distill``): the
    transformer's loop and keys, plus the teacher and the loss.

    The loss per code is ``kl_weight * temperature**2 * KL(teacher_T || student_T) + (1 - kl_weight)
    * CE(student, data code)``, where ``p_T = softmax(logits / temperature)``; the tau^2 keeps the
    KL's gradients at the CE's scale whatever the temperature (Hinton et al., 2015). ``tokenizer``
    defaults to the teacher's; ``cond_dropout`` drops the same captions for teacher and student.
    """

    teacher: str = ""  # the teacher: a transformer export, or a run directory holding transformer/ (required)
    # a transformer export (or run directory) whose architecture and weights start the student,
    # instead of a fresh model.* (e.g. a pruned checkpoint, recovered by distillation)
    student: str = ""
    temperature: float = 1.0  # tau: the softmax temperature of both distributions in the KL term
    kl_weight: float = 1.0  # share of the KL term in the loss; 1 - kl_weight goes to cross-entropy on the data codes
    teacher_samples: int = 0  # sequences the teacher samples for training captions, mixed into batches (0 = off)
    sampling: TeacherSampling = field(default_factory=TeacherSampling)
    eval_num: int = 256  # held-out sequences (the code shards' last ones, never trained on) for the KL metric


@dataclass
class TrainingConfig:
    """The training loops; each section starts from the same neutral ``TrainConfig``."""

    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    transformer: TransformerTrainConfig = field(default_factory=TransformerTrainConfig)
    distill: DistillTrainConfig = field(default_factory=DistillTrainConfig)


@dataclass(frozen=True)
class Bounds:
    """The finite numbers a setting accepts: ``>= low`` (``> low`` when ``open_low``), ``<= high`` when set."""

    low: float
    high: float | None = None
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return math.isfinite(value) and above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"


def setting(default: Any, help: str, bounds: Bounds | None = None, flag: str = "", metavar: str | None = None) -> Any:
    """A sampling setting's field: its default, what it means (the CLI help and error messages
    quote it), its range, and its command-line flag when not ``--{name}``."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "flag": flag, "metavar": metavar})


@dataclass(frozen=True)
class SamplingSettings:
    """How images are drawn from a trained transformer: each setting declared once, here.

    The run config's ``sampling`` section holds them (``SamplingConfig``), every checkpoint
    carries them as its samplers' defaults, and everything that samples builds one of these:
    config loading, ``sample.py`` / ``python -m vqgen.eval adherence`` / bench flags (derived
    from these fields), JSONL prompt lines, ``Pipeline(...)`` overrides and ``generate(...)``.
    Building checks every value, so a bad one fails the same way (``ConfigError`` naming
    ``sampling.<name>``) wherever it comes from. Change one with ``dataclasses.replace``.
    """

    cfg_scale: float = setting(1.5, "classifier-free guidance scale; 1 = off, 0 = unconditional", Bounds(0), flag="cfg")
    cfg_schedule: GuidanceSchedule = setting("constant", "guidance over the codes: constant, or linear from 1 to cfg_scale")
    temperature: float = setting(0.5, "softmax temperature; for greedy decoding use top_k=1", Bounds(0, open_low=True))
    top_k: int = setting(0, "sample among the k likeliest codes; 0 = off", Bounds(0))
    top_p: float = setting(
        1.0, "nucleus: the likeliest codes holding this probability mass; 1 = off", Bounds(0, 1, open_low=True)
    )
    num_images: int = setting(1, "images per prompt", Bounds(1), flag="num")
    seed: int = setting(0, "image i of prompt number p uses the seed image_seed(seed, p, i)", Bounds(0, MAX_SEED))
    speculative: int = setting(
        0, "speculative decoding in windows of W draft codes: the same distribution, other draws, fewer forwards; "
        "0 = off", Bounds(0), metavar="W",
    )
    speculative_prior: DraftPrior = setting(
        "above", "drafts for positions entering a window: the code above, or uniform noise"
    )
    speculative_draft: str = setting(
        "", "a draft model's checkpoint dir (same tokenizer and text encoder; train.py distill) that proposes each "
        "window, exact like the Jacobi drafts; \"\" = Jacobi self-drafting", flag="draft", metavar="DIR",
    )
    speculative_tolerance: float = setting(
        0.0, "LOSSY: relaxed speculative acceptance (LANTERN): the target's mass of a draft's nearest codes, up to "
        "this total-variation budget, counts for it; the images leave the model's distribution; 0 = exact",
        Bounds(0, 1), metavar="DELTA",
    )
    speculative_neighbours: int = setting(
        8, "the nearest codes (tokenizer latent space) a relaxed acceptance may count for a draft", Bounds(1),
        metavar="K",
    )

    def __post_init__(self) -> None:
        hints = _resolved_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"sampling.{f.name}"
            value = _coerce(getattr(self, f.name), hints[f.name], key)  # type and choices, as for every config key
            bounds = f.metadata.get("bounds")
            if bounds is not None and value not in bounds:
                kind = "an integer" if isinstance(value, int) else "a finite number"
                raise ConfigError(f"config key '{key}' must be {kind} {bounds}, got {value!r} ({f.metadata['help']})")
            object.__setattr__(self, f.name, value)  # ints widened to floats

    @property
    def lossy(self) -> str:
        """Why images drawn with these settings do not follow the model's distribution ("" when they do)."""
        if self.speculative and self.speculative_tolerance:
            return (f"lossy: relaxed speculative acceptance (speculative_tolerance={self.speculative_tolerance}, "
                    f"speculative_neighbours={self.speculative_neighbours})")
        return ""

    def image_settings(self) -> dict[str, Any]:
        """What an image's draws depend on besides its seed: every setting but ``num_images`` and
        ``seed`` (the ``settings`` of an ``index.jsonl`` line; ``generate`` keywords but
        ``speculative_draft``, a checkpoint, which ``generate`` takes loaded, as ``draft=``)."""
        return {name: getattr(self, name) for name in SETTINGS if name not in ("num_images", "seed")}


SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


@dataclass(frozen=True)
class SamplingConfig(SamplingSettings):
    """The run config's ``sampling`` section: the settings the run's checkpoints carry, and the
    training-time sample grids' prompts and compilation."""

    compile: bool = False  # torch.compile the grids' decode step (CUDA graphs on GPU)
    prompts: tuple[str, ...] = ()  # fixed prompts for training-time grids


@dataclass
class Config:
    name: str = "default"
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig.from_size(DEFAULT_SIZE))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON reads it back (tuples as lists), so a saved config compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON, atomically."""
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
        if t is TransformerConfig:
            keys.append(key + ".size")
    return keys


@functools.cache
def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_key(key: str, root: type) -> ConfigError:
    """The error for ``key``, which dataclass ``root`` lacks, naming the closest valid key."""
    valid = _valid_keys(root)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t`` (ints widen to floats)."""
    origin = typing.get_origin(t)
    if origin is Literal:
        return _choice(value, typing.get_args(t), key)
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
    if origin is tuple:  # a list in YAML and JSON: tuple[T, ...] of any length, else one value per type
        item_ts = typing.get_args(t)
        if item_ts[-1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
            item_ts = item_ts[:1] * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_ts):
            raise ConfigError(f"config key '{key}' expects a list of {len(item_ts)} values, got {value!r}")
        return tuple(_coerce(v, item_t, f"{key}[{i}]") for i, (v, item_t) in enumerate(zip(value, item_ts)))
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
            raise unknown_key(prefix + key, root)
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    kwargs = {}
    for name, value in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config section '{prefix + name}' must be a mapping")
            if t is TransformerConfig:  # the named size fills the fields the section leaves out
                given = {k: v for k, v in (value or {}).items() if k != "size"}
                value = sized((value or {}).get("size", DEFAULT_SIZE), given, f"{prefix}{name}.size")
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


def _choice(value: Any, choices: tuple, key: str) -> Any:
    """``value`` if it is one of a ``Literal``'s ``choices`` (of the same type: 4.0 is not 4)."""
    if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
        value = "yes" if value else "no"  # YAML 1.1 reads a bare no/off as false
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ConfigError(f"config key '{key}' is {value!r}; choose one of {list(choices)}")
    return value


def field_choices(cls: type, name: str) -> tuple:
    """The choices a ``Literal`` field of dataclass ``cls`` declares, e.g. for a CLI flag."""
    return typing.get_args(_resolved_hints(cls)[name])


def _check_choices(obj: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of dataclass ``obj`` (and of its sections) holds one of its choices."""
    for name, t in _resolved_hints(type(obj)).items():
        value = getattr(obj, name)
        if typing.get_origin(t) is Literal:
            _choice(value, typing.get_args(t), prefix + name)
        elif dataclasses.is_dataclass(t):
            _check_choices(value, prefix + name + ".")


def validate(cfg: Config) -> None:
    """The choices of every ``Literal`` field (also for a config built in code), then the value
    checks that types alone cannot express (the ``sampling`` section checks itself when built)."""
    _check_choices(cfg)
    if not 1 <= cfg.data.min_objects <= cfg.data.max_objects:
        raise ConfigError("config keys 'data.min_objects' <= 'data.max_objects' must hold, both >= 1")
    augmentation = cfg.data.caption_augmentation
    if augmentation < 0 or (augmentation and cfg.data.kind != "shapes"):
        raise ConfigError(
            f"config key 'data.caption_augmentation' is {augmentation}; use 0 (each caption as written) or, "
            f"for data.kind=shapes only (this is {cfg.data.kind!r}), the number of extra wordings per scene"
        )
    if cfg.data.caption_attribute_orders and not augmentation:
        raise ConfigError(
            "config key 'data.caption_attribute_orders' is true, but 'data.caption_augmentation' is 0: the attribute "
            "orders apply to the extra wordings, so set data.caption_augmentation to 1 or more"
        )
    for stage in ("transformer", "distill"):
        cond_dropout = getattr(cfg.training, stage).cond_dropout
        if not 0 <= cond_dropout < 1:
            raise ConfigError(f"config key 'training.{stage}.cond_dropout' must lie in [0, 1), got {cond_dropout}")
    _check_distill(cfg.training.distill)
    if cfg.data.resolution % cfg.tokenizer.downsample:
        raise ConfigError(
            f"config key 'data.resolution' ({cfg.data.resolution}) must be a multiple of "
            f"'tokenizer.downsample' ({cfg.tokenizer.downsample})"
        )


def _check_distill(distill: DistillTrainConfig) -> None:
    """The distillation settings that types alone cannot check (the teacher is checked when the run starts)."""
    checks = [
        ("temperature", distill.temperature > 0 and math.isfinite(distill.temperature), "a finite number > 0"),
        ("kl_weight", 0 <= distill.kl_weight <= 1, "in [0, 1]"),
        ("teacher_samples", distill.teacher_samples >= 0, "an integer >= 0"),
        ("eval_num", distill.eval_num >= 1, "an integer >= 1"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise ConfigError(f"config key 'training.distill.{name}' must be {what}, got {getattr(distill, name)!r}")
    try:
        SamplingSettings(**distill.sampling.given())  # each given setting within its range
    except ConfigError as e:
        raise ConfigError(str(e).replace("'sampling.", "'training.distill.sampling.")) from None


def resolve_run(
    path: str | Path | None, overrides: list[str] | None = None, out: str | Path | None = None,
    report_to: str | None = None,
) -> Config:
    """The config ``train.py`` runs: the file, its ``key=value`` overrides, then ``--report-to``
    (both training stages) and ``--out`` (``out_dir``)."""
    overrides = list(overrides or [])
    if report_to:
        overrides += [f"training.{stage}.report_to={report_to}" for stage in ("tokenizer", "transformer", "distill")]
    if out:
        overrides.append(f"out_dir={out}")
    return load_config(path, overrides)


# --------------------------------------------------------------------------------------
# Resume: the saved config against the one a restarted run resolves to
# --------------------------------------------------------------------------------------

# keys that may differ when a run resumes: how long it runs, how often it logs and saves, where
# it reports, what it does after a NaN, where caches live, what previews show (fnmatch patterns)
MAY_CHANGE_ON_RESUME = (
    "name",
    "out_dir",
    "data.num_workers",
    "training.transformer.text_cache",
    "training.distill.text_cache",
    "sampling.*",
    "training.*.steps",
    "training.*.max_minutes",
    "training.*.checkpoint_every",
    "training.*.log_every",
    "training.*.sample_every",
    "training.*.report_to",
    "training.*.on_nan",
)
# sections a stage does not read: the transformer loads a trained tokenizer from its checkpoint,
# distillation the teacher's (a checkpoint written before a section existed lacks it: also not read)
NOT_READ_BY = {
    "tokenizer": ("model.*", "training.transformer.*", "training.distill.*", "data.caption_augmentation",
                  "data.caption_attribute_orders"),
    "transformer": ("tokenizer.*", "training.tokenizer.*", "training.distill.*"),
    "distill": ("tokenizer.*", "training.tokenizer.*", "training.transformer.*"),
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, prefix + key + ".")
        else:
            out[prefix + key] = value
    return out


class _Absent:
    """The value of a key one of two configs lacks."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


# run-config keys of fields added later (``TransformerConfig.ADDED_FIELDS``, and data keys): absent = that
# value, which computes what a run saved without them did
ADDED_KEYS = {f"model.{name}": value for name, value in TransformerConfig.ADDED_FIELDS.items()} | {
    "data.caption_augmentation": 0,
    "data.caption_attribute_orders": False,
}


def resume_changes(saved: dict[str, Any], current: dict[str, Any], kind: str) -> tuple[list[str], list[str]]:
    """Compare the config a run was started with (``saved``, as ``Config.to_dict()`` wrote it)
    with the one it resumes with, for stage ``kind`` ("tokenizer", "transformer", or another
    task, which reads every section). Returns ``(refused, allowed)``: one ``"key: old -> new"``
    line per changed key, those that would change what the run computes (data, model,
    optimizer, batch size, ...) and those listed in ``MAY_CHANGE_ON_RESUME``. A key only one of
    the two has (a config of another layout) is refused, shown as ``(absent)`` on the other side."""
    ignored = NOT_READ_BY.get(kind, ())
    before, after = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key in [*after, *(k for k in before if k not in after)]:
        old, new = before.get(key, ADDED_KEYS.get(key, ABSENT)), after.get(key, ABSENT)
        if old == new or any(fnmatch.fnmatchcase(key, p) for p in ignored):
            continue
        known = old is not ABSENT and new is not ABSENT
        may_change = known and any(fnmatch.fnmatchcase(key, p) for p in MAY_CHANGE_ON_RESUME)
        (allowed if may_change else refused).append(f"{key}: {old!r} -> {new!r}")
    return refused, allowed


def check_resume(saved_path: str | Path, cfg: Config, kind: str) -> list[str]:
    """Refuse to resume from a checkpoint whose saved config (``saved_path``) differs from
    ``cfg`` in a key that changes the run, naming every such key; returns the allowed changes
    (``"key: old -> new"``) for the log. A checkpoint without a saved config passes."""
    saved_path = Path(saved_path)
    if not saved_path.is_file():
        return []
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot parse {saved_path}: {e}") from e
    refused, allowed = resume_changes(saved, cfg.to_dict(), kind)
    if refused:
        changes = "\n  ".join(refused)
        raise ConfigError(
            f"resuming from {saved_path.parent} would change the run it holds (its config: {saved_path}):\n"
            f"  {changes}\nRestore these values to resume, or give the new config its own output directory "
            f"(--out DIR). Only these keys may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}"
        )
    return allowed


# --------------------------------------------------------------------------------------
# python -m vqgen.config CONFIG [key=value ...]
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Print the config a run resolves to, as JSON (what ``train.py`` would run)."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.config",
        description="Print the resolved config as JSON: the file, then the overrides, exactly as train.py resolves it.",
    )
    parser.add_argument("config", type=Path, help="experiment YAML (or a saved config.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.transformer.lr=1e-3")
    parser.add_argument("--out", type=Path, help="output directory, as train.py --out sets it")
    parser.add_argument("--report-to", choices=field_choices(TrainConfig, "report_to"),
                        help="as train.py --report-to sets it")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_run(args.config, args.overrides, args.out, args.report_to)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
