"""Which images train and which are held out, for every kind of data.

The shapes set holds out whole scenes: held-out scenes come from the seed ``data.seed +
HELDOUT_SEED_OFFSET`` (training reads ``data.seed`` itself). Real data holds out files or
shards: ``data.eval_path`` names separate ones, or ``data.eval_fraction`` splits those of
``data.path`` by a hash of each path (see :func:`vqgen.data.loaders.heldout_names`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.utils.data import Dataset

from vqgen.config import DataConfig
from vqgen.data.loaders import DataError, build_dataset, readable_samples
from vqgen.data.shapes import ShapesDataset

# held-out shapes scenes come from this seed offset (training streams use data.seed itself)
HELDOUT_SEED_OFFSET = 1


def heldout_dataset(data_cfg: DataConfig, num: int) -> Dataset | list[dict[str, Any]]:
    """``num`` images never trained on: shapes scenes from another seed, or the held-out split
    of real data (``data.eval_path`` or ``data.eval_fraction``; a
    :class:`~vqgen.config.ConfigError` naming them when neither is set). Unreadable held-out
    images are skipped with a warning."""
    if data_cfg.kind == "shapes":
        shifted = dataclasses.replace(data_cfg, seed=data_cfg.seed + HELDOUT_SEED_OFFSET)
        return ShapesDataset.from_config(shifted, split="train", num=num)
    return _first_images(data_cfg, "eval", num)


def training_images(data_cfg: DataConfig, num: int) -> Dataset | list[dict[str, Any]]:
    """The first ``num`` training images, to set training PSNR beside held-out PSNR: shapes
    scenes ``0..num-1`` (the start of the tokenizer's stream), the first files of a folder's
    training split, or the first samples of the training shards."""
    if data_cfg.kind == "shapes":
        return ShapesDataset.from_config(data_cfg, split="train", num=num)
    return _first_images(dataclasses.replace(data_cfg, shuffle_buffer=0), "train", num)


def describe_heldout(data_cfg: DataConfig) -> str:
    """Where the held-out images come from, in words (for reports)."""
    if data_cfg.kind == "shapes":
        return f"shapes scenes of seed {data_cfg.seed + HELDOUT_SEED_OFFSET} (training reads seed {data_cfg.seed})"
    if data_cfg.eval_path:
        return f"data.eval_path={data_cfg.eval_path}"
    if data_cfg.eval_fraction:
        unit = "files" if data_cfg.kind == "folder" else "shards"
        return f"data.eval_fraction={data_cfg.eval_fraction} of the {unit} of data.path, chosen by path hash"
    return "none: set data.eval_fraction or data.eval_path for held-out metrics"


def _first_images(data_cfg: DataConfig, split: str, num: int) -> list[dict[str, Any]]:
    samples, _ = readable_samples(build_dataset(data_cfg, split), num, data_cfg.on_bad_sample)
    if not samples:
        raise DataError(f"the {split} split of data.path={data_cfg.path!r} holds no readable image")
    return samples
