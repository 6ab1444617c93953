"""Train the VQ tokenizer with the shared loop: ``train_tokenizer(cfg, out_dir)``.

On the built-in shapes set every step sees fresh procedural scenes (the batch of step ``s``
on rank ``r`` is scenes ``(s * world + r) * B ... + B - 1`` of a practically endless
``ShapesDataset``), so the tokenizer cannot overfit and needs no epochs; evaluation uses a
different seed. Other data (an image folder) is read as epochs of seeded permutations.

``out_dir`` becomes the tokenizer's own directory: checkpoints/, samples/, log.jsonl while
training, then ``config.json`` + ``model.safetensors`` (loadable with
``VQTokenizer.from_pretrained(out_dir)``) and ``report.json`` with held-out metrics.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import nn

from vqgen.checkpoint import atomic_write_text, substate
from vqgen.config import Config, ConfigError
from vqgen.data.loaders import build_dataset
from vqgen.eval.tokenizer import evaluate_tokenizer, heldout_dataset
from vqgen.tokenizer import TokenizerTrainer, VQTokenizer
from vqgen.train.loop import IndexedBatches, Task, collate, fit, setup_accelerator

# index space of the "endless" training stream of shapes scenes
ENDLESS = 2**62
PREVIEW_IMAGES = 8


class FreshShapes:
    """``(step, rank, world) -> batch`` of never-repeating shapes scenes (a pure function).

    ``data.holdout`` is not applied: it holds caption-level attribute combinations out of the
    transformer's training, and the tokenizer, which sees no captions, must reconstruct those
    scenes too for the held-out score to measure the transformer.
    """

    def __init__(self, cfg: Config, batch_size: int):
        from vqgen.data.shapes import ShapesDataset

        every_combination = dataclasses.replace(cfg.data, holdout=[])
        self.dataset = ShapesDataset.from_config(every_combination, split="train", num=ENDLESS)
        self.batch_size = batch_size

    def __call__(self, step: int, rank: int, world: int) -> dict:
        start = (step * world + rank) * self.batch_size
        return collate([self.dataset[i] for i in range(start, start + self.batch_size)])


def training_batches(cfg: Config):
    batch_size = cfg.training.tokenizer.batch_size
    if cfg.data.kind == "shapes":
        return FreshShapes(cfg, batch_size)
    if cfg.data.kind != "folder":
        raise ConfigError(
            f"tokenizer training reads map-style data (data.kind=shapes or folder), not data.kind={cfg.data.kind}; "
            "extract the tar shards into an image folder"
        )
    return IndexedBatches(build_dataset(cfg.data, "train"), batch_size, seed=cfg.training.tokenizer.seed)


def comparison_grid(originals: torch.Tensor, recons: torch.Tensor, scale: int = 1) -> Image.Image:
    """Originals (top row) over reconstructions (bottom row): [N, 3, H, W] x2 in [-1, 1] -> PIL."""
    rows = torch.stack([originals, recons.clamp(-1, 1)])  # [2, N, 3, H, W]
    pixels = rearrange(rows, "r n c h w -> (r h) (n w) c")
    pixels = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    image = Image.fromarray(pixels.cpu().numpy())
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def make_preview(cfg: Config):
    """Fixed held-out images, reconstructed by the current weights at every preview."""
    dataset = heldout_dataset(cfg.data, num=PREVIEW_IMAGES)
    originals = torch.stack([dataset[i]["image"] for i in range(min(PREVIEW_IMAGES, len(dataset)))])
    scale = max(1, 128 // cfg.data.resolution)  # small scenes (24-32 px) are unreadable at 1:1

    def preview(model: nn.Module, step: int) -> dict[str, Image.Image]:
        tokenizer: VQTokenizer = model.tokenizer
        device = next(tokenizer.parameters()).device
        recons = tokenizer.decode(tokenizer.encode(originals.to(device))).cpu()
        return {"reconstructions": comparison_grid(originals, recons, scale)}

    return preview


def build_task(cfg: Config) -> Task:
    """The tokenizer as a ``Task`` for the shared loop (build after ``setup_accelerator``)."""
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    return Task(
        kind="tokenizer",
        model=TokenizerTrainer(tokenizer, cfg.tokenizer),
        batches=training_batches(cfg),
        export=lambda state, directory: tokenizer.save_pretrained(directory, substate(state, "tokenizer")),
        preview=make_preview(cfg),
    )


def train_tokenizer(cfg: Config, out_dir: Path, eval_num: int = 512) -> dict:
    """Train (or resume) the tokenizer into ``out_dir``; returns final training metrics plus
    held-out ``eval_*`` metrics on ``eval_num`` images (also written to ``report.json``)."""
    out_dir = Path(out_dir)
    train_cfg = cfg.training.tokenizer
    accelerator = setup_accelerator(train_cfg, out_dir)
    task = build_task(cfg)
    metrics = fit(accelerator, task, train_cfg, cfg, out_dir)
    if accelerator.is_main_process and eval_num > 0:
        tokenizer = VQTokenizer.from_pretrained(out_dir, device=accelerator.device)
        report = evaluate_tokenizer(tokenizer, heldout_dataset(cfg.data, num=eval_num), train_cfg.batch_size)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
        metrics |= {f"eval_{k}": v for k, v in report.items()}
    # no barrier here: fit() has ended training (and the process group); other ranks just return
    return metrics
