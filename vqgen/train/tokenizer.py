"""Train the VQ tokenizer with the shared loop: ``train_tokenizer(cfg, out_dir)``.

On the built-in shapes set every step sees fresh procedural scenes (the batch of step ``s``
on rank ``r`` is scenes ``(s * world + r) * B ... + B - 1`` of a practically endless
``ShapesDataset``), so the tokenizer cannot overfit and needs no epochs; evaluation uses a
different seed. An image folder is read as epochs of seeded permutations, WebDataset shards as
a stream; both are decoded in ``data.num_workers`` DataLoader workers (``vqgen.train.batches``).

``out_dir`` becomes the tokenizer's own directory: checkpoints/, samples/, log.jsonl while
training, then ``config.json`` + ``model.safetensors`` (loadable with
``VQTokenizer.from_pretrained(out_dir)``) and ``report.json``: metrics on held-out images
(shapes of another seed, or ``data.eval_path`` / ``data.eval_fraction``), the PSNR on training
images beside them, the samples skipped as unusable, and the training time. Both record
``training_state`` (step reached, steps asked for, complete): a run cut short by ``max_minutes``
exports the weights of the step it reached and says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate import PartialState
from einops import rearrange
from PIL import Image
from torch import nn

from vqgen.checkpoint import substate, training_state
from vqgen.config import Config, TokenizerTrainConfig
from vqgen.data.loaders import WebDatasetSamples, build_dataset, has_heldout
from vqgen.data.shapes import ShapesDataset
from vqgen.data.splits import describe_heldout, heldout_dataset, training_images
from vqgen.eval.tokenizer import evaluate_tokenizer
from vqgen.files import atomic_write_text
from vqgen.tokenizer import TokenizerTrainer, VQTokenizer
from vqgen.train.batches import FolderBatches, LoaderBatches, ShardBatches, collate
from vqgen.train.loop import Task, fit, setup_accelerator
from vqgen.train.optim import OptimizerSpec, param_groups

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
        every_combination = dataclasses.replace(cfg.data, holdout=[])
        self.dataset = ShapesDataset.from_config(every_combination, split="train", num=ENDLESS)
        self.batch_size = batch_size

    def __call__(self, step: int, rank: int, world: int) -> dict:
        start = (step * world + rank) * self.batch_size
        return collate([self.dataset[i] for i in range(start, start + self.batch_size)])


def training_batches(cfg: Config, device: torch.device | str | None = None):
    """``(micro-step, rank, world) -> {"image": [B, 3, R, R], "caption": [B]}``; real data is
    decoded in DataLoader workers and copied to ``device`` (default: Accelerate's) without blocking."""
    batch_size = cfg.training.tokenizer.batch_size
    if cfg.data.kind == "shapes":
        return FreshShapes(cfg, batch_size)
    if device is None:
        device = PartialState().device
    dataset = build_dataset(cfg.data, "train")
    if isinstance(dataset, WebDatasetSamples):
        return ShardBatches(dataset, batch_size, cfg.data.num_workers, device)
    return FolderBatches(
        dataset, batch_size, cfg.training.tokenizer.seed, cfg.data.num_workers, device, cfg.data.on_bad_sample
    )


def comparison_grid(originals: torch.Tensor, recons: torch.Tensor, scale: int = 1) -> Image.Image:
    """Originals (top row) over reconstructions (bottom row): [N, 3, H, W] x2 in [-1, 1] -> PIL."""
    rows = torch.stack([originals, recons.clamp(-1, 1)])  # [2, N, 3, H, W]
    pixels = rearrange(rows, "r n c h w -> (r h) (n w) c")
    pixels = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    image = Image.fromarray(pixels.cpu().numpy())
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def make_preview(cfg: Config):
    """Fixed held-out images (``reconstructions``), or training images where the data have no
    held-out split (``train_reconstructions``), reconstructed by the current weights."""
    heldout = has_heldout(cfg.data)
    dataset = (heldout_dataset if heldout else training_images)(cfg.data, num=PREVIEW_IMAGES)
    originals = torch.stack([dataset[i]["image"] for i in range(min(PREVIEW_IMAGES, len(dataset)))])
    scale = max(1, 128 // cfg.data.resolution)  # small scenes (24-32 px) are unreadable at 1:1
    name = "reconstructions" if heldout else "train_reconstructions"

    def preview(model: nn.Module, step: int) -> dict[str, Image.Image]:
        tokenizer: VQTokenizer = model.tokenizer
        device = next(tokenizer.parameters()).device
        recons = tokenizer.decode(tokenizer.encode(originals.to(device))).cpu()
        return {name: comparison_grid(originals, recons, scale)}

    return preview


def tokenizer_optimizers(model: TokenizerTrainer, train: TokenizerTrainConfig) -> list[OptimizerSpec]:
    """The tokenizer (encoder, quantizer, decoder) and the discriminator as two parameter sets:
    GAN training wants its own learning rate and betas for the discriminator, and a clip by its
    own gradient norm, which a joint norm would let the other network's gradients dominate."""
    sets = [OptimizerSpec("tokenizer", param_groups(model.tokenizer, train.weight_decay), train.lr,
                          tuple(train.betas), train.grad_clip)]
    if model.discriminator is not None:
        sets.append(OptimizerSpec(
            "discriminator",
            param_groups(model.discriminator, train.weight_decay),
            lr=train.lr if train.disc_lr is None else train.disc_lr,
            betas=tuple(train.betas if train.disc_betas is None else train.disc_betas),
            grad_clip=train.grad_clip if train.disc_grad_clip is None else train.disc_grad_clip,
        ))  # fmt: skip
    return sets


def build_task(cfg: Config) -> Task:
    """The tokenizer as a ``Task`` for the shared loop (build after ``setup_accelerator``)."""
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    return Task(
        kind="tokenizer",
        model=TokenizerTrainer(tokenizer, cfg.training.tokenizer),
        batches=training_batches(cfg),
        export=lambda state, directory: tokenizer.save_pretrained(directory, substate(state, "tokenizer")),
        preview=make_preview(cfg),
        optimizers=tokenizer_optimizers,
    )


def train_tokenizer(cfg: Config, out_dir: Path, eval_num: int = 512) -> dict:
    """Train (or resume) the tokenizer into ``out_dir``; returns final training metrics plus
    held-out ``eval_*`` metrics on ``eval_num`` images and ``train_psnr`` on as many training
    images (all also written to ``report.json``, with the samples skipped and the wall time)."""
    out_dir = Path(out_dir)
    train_cfg = cfg.training.tokenizer
    accelerator = setup_accelerator(train_cfg, out_dir)
    task = build_task(cfg)
    metrics = fit(accelerator, task, train_cfg, cfg, out_dir)
    metrics["training_state"] = training_state(metrics["step"], train_cfg.steps)
    if isinstance(task.batches, LoaderBatches):
        task.batches.close()
    if accelerator.is_main_process and eval_num > 0:
        tokenizer = VQTokenizer.from_pretrained(out_dir, device=accelerator.device)
        report: dict = {"heldout": describe_heldout(cfg.data), "training_state": metrics["training_state"]}
        if has_heldout(cfg.data):
            heldout = evaluate_tokenizer(tokenizer, heldout_dataset(cfg.data, num=eval_num), train_cfg.batch_size)
            report |= heldout
            metrics |= {f"eval_{k}": v for k, v in heldout.items()}
        else:
            print(f"tokenizer: {report['heldout']}; only training images are measured")
        train = evaluate_tokenizer(tokenizer, training_images(cfg.data, num=eval_num), train_cfg.batch_size)
        report["train"] = {k: train[k] for k in ("num_images", "psnr", "usage", "perplexity")}
        report["skipped_samples"] = metrics.get("skipped_samples", {})
        report |= {k: metrics[k] for k in ("step", "seconds", "stopped_early") if k in metrics}
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
        metrics["train_psnr"] = train["psnr"]
    # no barrier here: fit() has ended training (and the process group); other ranks just return
    return metrics
