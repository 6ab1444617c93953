"""Train the text-conditioned transformer with the shared loop: ``train_transformer(cfg, out_dir)``.

It reads pre-tokenized code shards (``vqgen.data.codes``; encoded here from ``cfg.data`` with
the tokenizer if ``data.codes`` is not given) and cached text embeddings (``vqgen.text``;
built once for every caption), so a training step runs neither the tokenizer nor the text
encoder. ``out_dir`` ends up holding ``config.json`` + ``model.safetensors`` (loadable with
``Transformer.from_pretrained``), ``report.json``, ``checkpoints/``, ``samples/`` and ``log.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgen.checkpoint import substate, training_state
from vqgen.config import Config, ConfigError, TransformerConfig
from vqgen.data.codes import CodeShards, encode_dataset
from vqgen.data.shapes import wording
from vqgen.eval.scene import parse_caption
from vqgen.files import atomic_write_text
from vqgen.images import grid_image
from vqgen.model import Transformer
from vqgen.sampling import generate, sampling_options
from vqgen.text import EmbeddingCache, TextEncoder
from vqgen.tokenizer import VQTokenizer
from vqgen.train.batches import IndexedBatches
from vqgen.train.loop import Task, fit, setup_accelerator
from vqgen.train.optim import OptimizerSpec, param_groups


class NextCodeLoss(nn.Module):
    """Wraps the transformer for the loop: ``forward(batch, step) -> (cross-entropy, metrics)``.

    In training mode each caption is dropped with probability ``cond_dropout`` (the model then
    sees only its null token), which teaches the unconditional prediction classifier-free
    guidance needs; the draws come from the torch RNG, so a resumed run redraws the same."""

    def __init__(self, transformer: Transformer, cond_dropout: float):
        super().__init__()
        self.transformer, self.cond_dropout = transformer, cond_dropout

    def dropped_captions(self, batch: dict) -> Tensor | None:
        """Which rows train on the null caption [B] (None: none), drawn in training mode only."""
        if not (self.training and self.cond_dropout > 0):
            return None
        text = batch["text"]
        return torch.rand(text.shape[0], device=text.device) < self.cond_dropout

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict]:
        codes = rearrange(batch["codes"], "b h w -> b (h w)")  # [B, N]
        logits = self.transformer(codes, batch["text"], batch["text_mask"], drop_cond=self.dropped_captions(batch))
        return next_code_loss(logits, codes), {"tokens": codes.numel()}


def next_code_loss(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean cross-entropy (nats) of logits [B, N, V] against the codes [B, N] they predict."""
    return F.cross_entropy(rearrange(logits.float(), "b n v -> (b n) v"), rearrange(codes, "b n -> (b n)"))


class TrainingCaptions:
    """The caption sample ``j`` is read with in ``epoch``: ``captions(j, epoch) -> str``.

    With ``augmentation`` = K > 0 (``data.caption_augmentation``, shapes only) each sample has
    K + 1 training-family wordings of its scene: its stored caption and K more, wording k of
    sample j a pure function of ``(data_seed, j, k)`` (``vqgen.data.shapes.wording``; the scene
    is read back from the caption). Each epoch picks one of them per sample from a hash of
    ``(seed, epoch, j)``, so a resumed run reads what an uninterrupted one would, and every
    wording is known up front, to go into the embedding cache. With ``attribute_orders``
    (``data.caption_attribute_orders``) the K wordings also use ``ORDER_TEMPLATES``, the size
    and colour words in every place around the shape. The wordings never leave the training
    family: the ``other`` family's words stay unseen.
    """

    def __init__(
        self, captions: list[str], augmentation: int = 0, data_seed: int = 0, seed: int = 0, attribute_orders: bool = False
    ):
        self.seed = seed
        self.wordings: list[tuple[str, ...]] = [(c,) for c in captions]
        if augmentation:
            self.wordings = [
                (c, *(wording(parse_caption(c), "train", data_seed, j, k, attribute_orders) for k in range(1, augmentation + 1)))
                for j, c in enumerate(captions)
            ]

    @classmethod
    def from_config(cls, cfg: Config, shards) -> TrainingCaptions:
        """The captions of ``shards`` under ``data.caption_augmentation``."""
        data = cfg.data
        return cls(shards.captions, data.caption_augmentation, data.seed, cfg.training.transformer.seed,
                   data.caption_attribute_orders)

    def all(self) -> list[str]:
        """Every caption training can read, once each, sorted."""
        return sorted({c for wordings in self.wordings for c in wordings})

    def __call__(self, j: int, epoch: int) -> str:
        choices = self.wordings[j]
        if len(choices) == 1:
            return choices[0]
        digest = hashlib.blake2b(f"vqgen-wording/{self.seed}/{epoch}/{j}".encode(), digest_size=8).digest()
        return choices[int.from_bytes(digest, "little") % len(choices)]


class CodeTextBatches:
    """``(micro-step, rank, world) -> {"codes", "text", "text_mask"}``: codes from the shards,
    text embeddings of their captions (``TrainingCaptions``) from the cache; a pure function of
    its arguments (see ``IndexedBatches``)."""

    def __init__(self, shards, captions: TrainingCaptions, cache, batch_size: int, seed: int, device: torch.device):
        self.shards, self.captions, self.cache, self.device = shards, captions, cache, device
        self.order = IndexedBatches(shards, batch_size, seed=seed)

    def __call__(self, i: int, rank: int, world: int) -> dict:
        picked = self.order.epochs_and_indices(i, rank, world)
        codes = torch.stack([self.shards[j]["codes"] for _, j in picked])  # [B, h, w]
        text, mask = self.cache.lookup([self.captions(j, epoch) for epoch, j in picked])  # [B, L, d], [B, L]
        return {"codes": codes.to(self.device), "text": text.to(self.device), "text_mask": mask.to(self.device)}


def unigram_loss(shards) -> float:
    """Cross-entropy (nats) of predicting every code from the codes' overall frequencies:
    the loss a model that ignores both text and context reaches; training must beat it."""
    counts = sum(np.bincount(np.asarray(s).ravel(), minlength=shards.codebook_size) for s in shards.shards)
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def prepare_codes(cfg: Config, out_dir: Path, accelerator, tokenizer: Path | None = None):
    """Code shards for training: ``data.codes`` if given, else encode ``cfg.data`` once into
    ``<out_dir>/codes`` with the tokenizer at ``tokenizer`` (default: ``tokenizer_dir``; resumable,
    split across processes)."""
    if cfg.data.codes:
        return CodeShards(cfg.data.codes)
    codes_dir = Path(out_dir) / "codes"
    encode_dataset(tokenizer or tokenizer_dir(cfg, out_dir), cfg.data, codes_dir, accelerator=accelerator)
    return CodeShards(codes_dir)


def check_codes(shards, tokenizer: VQTokenizer, tokenizer_path: Path) -> None:
    """Refuse code shards of another codebook or grid than the tokenizer's."""
    if (shards.codebook_size, tuple(shards.grid)) != (tokenizer.codebook_size, tuple(tokenizer.grid)):
        raise ConfigError(
            f"code shards {shards.directory} hold codes of a codebook of {shards.codebook_size} on a {shards.grid} grid, "
            f"but tokenizer {tokenizer_path} has {tokenizer.codebook_size} codes on {tokenizer.grid}; "
            "re-encode the data with this tokenizer"
        )


def tokenizer_dir(cfg: Config, out_dir: Path) -> Path:
    """``training.transformer.tokenizer``, or the run's ``tokenizer/`` beside the transformer's directory."""
    given = cfg.training.transformer.tokenizer
    path = Path(given) if given else Path(out_dir).parent / "tokenizer"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"no tokenizer checkpoint at {path}: train one first (python train.py tokenizer) or set "
            "training.transformer.tokenizer=DIR"
        )
    return path


def build_text(model_cfg: TransformerConfig, cache_dir: Path, captions: list[str], accelerator):
    """The frozen text encoder of ``model_cfg`` (``text_encoder``, ``max_text_len``) and an
    embedding cache in ``cache_dir`` holding every caption."""
    encoder = TextEncoder(model_cfg.text_encoder, max_length=model_cfg.max_text_len)
    cache = EmbeddingCache(cache_dir, encoder)
    unique = sorted(set(captions))
    rank, world = accelerator.process_index, accelerator.num_processes
    cache.build(unique[rank::world])  # each process encodes its share, then all read all
    accelerator.wait_for_everyone()
    cache.refresh()
    return encoder, cache


def make_preview(cfg: Config, encoder, tokenizer):
    """A grid of samples for ``sampling.prompts`` (fixed seeds, so grids compare across steps)."""
    prompts = cfg.sampling.prompts
    if not prompts:
        return None
    text, mask = encoder.encode(prompts)

    def preview(model: nn.Module, step: int) -> dict:
        transformer = model.transformer
        device = transformer.bos.device
        codes = generate(transformer, text.to(device), mask.to(device), **sampling_options(cfg.sampling))
        images = tokenizer.to(device).decode(codes)
        captions = [p for p in prompts for _ in range(cfg.sampling.num_images)]
        return {"samples": grid_image(images.cpu(), captions, ncol=cfg.sampling.num_images)}

    return preview


def train_transformer(cfg: Config, out_dir: Path) -> dict:
    """Train (or resume) the transformer into ``out_dir``; returns the final training metrics
    plus ``unigram_loss`` and ``training_state`` (also written to ``<out_dir>/report.json``)."""
    out_dir = Path(out_dir)
    train_cfg = cfg.training.transformer
    accelerator = setup_accelerator(train_cfg, out_dir)
    shards = prepare_codes(cfg, out_dir, accelerator)
    tokenizer = VQTokenizer.from_pretrained(tokenizer_dir(cfg, out_dir)).eval()
    check_codes(shards, tokenizer, tokenizer_dir(cfg, out_dir))
    captions = TrainingCaptions.from_config(cfg, shards)
    encoder, cache = build_text(cfg.model, Path(train_cfg.text_cache or out_dir / "text_cache"), captions.all(), accelerator)

    model_cfg = cfg.model.complete(tokenizer.codebook_size, tokenizer.grid, encoder.dim, tokenizer.code_levels)
    transformer = Transformer(model_cfg)
    accelerator.print(f"transformer: {transformer.num_params() / 1e6:.2f}M parameters, {model_cfg.seq_len} codes per image")
    extra = {"tokenizer": str(tokenizer_dir(cfg, out_dir)), "run": cfg.to_dict()}
    task = Task(
        kind="transformer",
        model=NextCodeLoss(transformer, train_cfg.cond_dropout),
        batches=CodeTextBatches(shards, captions, cache, train_cfg.batch_size, train_cfg.seed, accelerator.device),
        export=lambda state, directory: transformer.save_pretrained(
            directory, extra_config=extra, state=substate(state, "transformer")
        ),
        preview=make_preview(cfg, encoder, tokenizer),
        optimizers=lambda model, c: [
            OptimizerSpec("transformer", param_groups(model.transformer, c.weight_decay), c.lr, tuple(c.betas), c.grad_clip)
        ],
    )
    metrics, ended = fit_or_report(accelerator, task, train_cfg, cfg, out_dir)
    if ended:
        return metrics
    metrics["training_state"] = training_state(metrics["step"], train_cfg.steps)
    metrics["unigram_loss"] = unigram_loss(shards)
    metrics["skipped_samples"] = shards.meta.get("skipped_samples", {})  # dropped when the codes were encoded
    metrics["final_loss"] = metrics.get("loss", math.nan)
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "report.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def fit_or_report(accelerator, task: Task, train_cfg, cfg: Config, out_dir: Path) -> tuple[dict, bool]:
    """``fit`` the stage -> (its metrics, False); or, when it had already finished and this call
    trained no step, (its ``report.json`` as written when it ended, True), else its last logged
    metrics (False: the report is still to be written)."""
    metrics = fit(accelerator, task, train_cfg, cfg, out_dir)
    if "loss" in metrics:
        return metrics, False
    report = Path(out_dir) / "report.json"
    if report.is_file():
        return json.loads(report.read_text()), True
    return last_logged(out_dir) | metrics, False


def last_logged(out_dir: Path) -> dict:
    """The last metrics line of ``<out_dir>/log.jsonl`` (without its step), or {}."""
    log = Path(out_dir) / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    last.pop("step", None)
    return last
