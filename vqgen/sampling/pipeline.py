"""Prompts in, images out: the transformer, its tokenizer and its text encoder, loaded together.

``Pipeline.from_pretrained(checkpoint)`` (a transformer export, a run directory, or a Hugging
Face Hub repo id) finds the tokenizer the transformer was trained with (recorded in its
config) and the text encoder named there, and reads the sampling settings the run was
trained and scored with (the ``sampling`` section of the run config saved
in the export's ``config.json``, as ``SamplingSettings``): they are the defaults of every call,
overridable one by one.
``pipeline(prompts, ...)`` encodes the prompts, samples codes with
:func:`vqgen.sampling.generate`, and decodes them.

Seeds. Image ``i`` of prompt number ``p`` (its 0-based position in the prompt list) is drawn
from its own stream, seeded with ``image_seed(seed, p, i)``: a hash of the three numbers, so
no two (prompt, image) pairs share noise, and the streams of one seed never overlap those of
the next. An image's noise depends on (seed, p, i) alone, not on the batch it is sampled in
nor on how many processes share the work; the batch can only change float rounding in the
model's matmuls, which moves a rare code (``vqgen.sampling.jobs`` keeps batches fixed, for
bit-identical files).

Unconditional samples. An empty prompt ("") is the learned null caption: a text mask that is
all False leaves the null token as the only text to attend to, which is exactly the stream
classifier-free guidance calls unconditional (``model.context(..., drop_cond=True)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgen.checkpoint import CheckpointError, find_export, load_config_json, resolve_checkpoint, trained_tokenizer
from vqgen.config import SETTINGS, ConfigError, SamplingSettings
from vqgen.model import Transformer
from vqgen.progress import progress_bar
from vqgen.sampling.draft import check_draft
from vqgen.sampling.generate import generate
from vqgen.sampling.quantize import quantize as quantize_model
from vqgen.sampling.quantize import resolve_mode
from vqgen.sampling.relaxed import nearest_codes
from vqgen.text import PromptError, TextEncoder
from vqgen.tokenizer import VQTokenizer


def image_seed(seed: int, prompt: int, image: int) -> int:
    """The seed of image ``image`` of prompt number ``prompt``: the first 63 bits of
    BLAKE2b("{seed}/{prompt}/{image}"), one independent stream per (seed, prompt, image)."""
    digest = hashlib.blake2b(f"{seed}/{prompt}/{image}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def checkpoint_settings(config: dict[str, Any], source: str) -> SamplingSettings:
    """The sampling settings saved with a run (``config["run"]["sampling"]``); the neutral
    defaults of ``SamplingSettings`` for what a checkpoint does not record."""
    saved = (config.get("run") or {}).get("sampling") or {}
    try:
        return SamplingSettings(**{key: value for key, value in saved.items() if key in SETTINGS})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass
class Pipeline:
    transformer: Transformer
    tokenizer: torch.nn.Module  # vqgen.tokenizer.VQTokenizer
    encoder: object  # vqgen.text.TextEncoder
    defaults: SamplingSettings = field(default_factory=SamplingSettings)  # the checkpoint's sampling settings
    checkpoint: str = ""  # where the transformer was loaded from
    weights: str = "raw"  # "ema (decay D)" when the export holds EMA weights
    drafts: dict[str, Transformer] = field(default_factory=dict)  # draft models by speculative_draft, loaded once
    neighbours: dict[int, Tensor] = field(default_factory=dict)  # relaxed acceptance's nearest codes, by k

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path, tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
        quantize: str | None = None, draft: str | Path | None = None,
    ) -> Pipeline:
        """Load a transformer checkpoint with its tokenizer (``tokenizer_dir`` overrides the one
        recorded at training time), its text encoder and its sampling settings; checks that
        the three models fit together. ``checkpoint`` (and ``tokenizer_dir``) is a transformer
        export, a run directory holding ``transformer/`` (and ``tokenizer/``), or a Hugging Face
        Hub repo id ``owner/name[@revision]`` of either (:func:`vqgen.checkpoint.resolve_checkpoint`);
        a Hub repo's transformer uses the tokenizer in the same snapshot.
        ``quantize`` (``int8``, ``int8-dynamic``, ``int8-weight``) swaps the transformer for a
        sampling-only int8 copy (:func:`vqgen.sampling.quantize.quantize`).
        ``draft`` (a checkpoint dir, as ``checkpoint``) becomes the default ``speculative_draft``;
        the draft a checkpoint's settings name is loaded here too, once, and checked against the
        transformer (:func:`vqgen.sampling.draft.check_draft`).

        The weights are the export's ``model.safetensors``: the EMA weights when the run
        trained with ``ema_decay > 0`` (the training loop exports those), the raw ones otherwise.
        """
        root = resolve_checkpoint(checkpoint)
        transformer_dir = find_export(root, "transformer")
        config = load_config_json(transformer_dir, "transformer")
        if tokenizer_dir is None:  # a name resolved to another path is a Hub snapshot
            tokenizer_dir = trained_tokenizer(config, transformer_dir, from_hub=root != Path(checkpoint))
        else:
            tokenizer_dir = find_export(resolve_checkpoint(tokenizer_dir), "tokenizer")
        defaults = checkpoint_settings(config, str(transformer_dir / "config.json"))
        transformer = Transformer.from_pretrained(transformer_dir, device=device).eval()
        tokenizer = VQTokenizer.from_pretrained(tokenizer_dir, device=device).eval()
        transformer.check_compatible(tokenizer.codebook_size, tokenizer.grid, tokenizer.code_levels)
        if quantize:
            transformer = quantize_model(transformer, quantize)
        encoder = TextEncoder(transformer.cfg.text_encoder, max_length=transformer.cfg.max_text_len, device=device)
        if encoder.dim != transformer.cfg.text_dim:
            raise CheckpointError(
                f"text encoder {transformer.cfg.text_encoder!r} gives {encoder.dim}-dim embeddings, "
                f"but {transformer_dir} was trained on {transformer.cfg.text_dim}-dim ones"
            )
        stage = "distill" if "distill" in config else "transformer"  # the loop that wrote it (train.py distill: a student)
        decay = (((config.get("run") or {}).get("training") or {}).get(stage) or {}).get("ema_decay", 0.0)
        weights = f"ema (decay {decay})" if decay else "raw"
        if quantize:
            weights += f", {resolve_mode(quantize, device)}"  # quantized images differ slightly: say so
        if draft is not None:
            defaults = dataclasses.replace(defaults, speculative_draft=str(draft))
        pipeline = cls(transformer, tokenizer, encoder, defaults, str(transformer_dir.resolve()), weights)
        if defaults.speculative_draft:
            pipeline.draft(defaults.speculative_draft)
        return pipeline

    def draft(self, checkpoint: str) -> Transformer:
        """The draft model of ``speculative_draft`` = ``checkpoint`` (a transformer export, a run
        directory or a Hub repo id), loaded on first use and checked against the transformer."""
        if checkpoint not in self.drafts:
            directory = find_export(resolve_checkpoint(checkpoint), "transformer")
            model = Transformer.from_pretrained(directory, device=self.device).eval()
            check_draft(self.transformer, model, self.checkpoint, str(directory))
            self.drafts[checkpoint] = model
        return self.drafts[checkpoint]

    def code_neighbours(self, k: int) -> Tensor:
        """Each code's k nearest codes in the tokenizer's latent space [V, k], for relaxed acceptance."""
        if k not in self.neighbours:
            self.neighbours[k] = nearest_codes(self.tokenizer.code_vectors().to(self.device), k)
        return self.neighbours[k]

    @property
    def device(self) -> torch.device:
        return self.transformer.bos.device

    def settings(self, **overrides: Any) -> SamplingSettings:
        """The checkpoint's sampling settings with ``overrides`` (None = keep) applied; a bad value
        raises the ``ConfigError`` that config loading and the command line raise for it."""
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (text [P, L, d], mask [P, L]); an empty prompt gets an all-False mask (the
        null caption). A prompt longer than the text encoder takes raises ``PromptError``.

        Each distinct prompt is encoded alone: the encoder's float rounding depends on the
        padded length of its batch, and an image must not depend on the prompts it is sampled
        with (a server's request has no batch mates; ``sample.py``'s do)."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {i} is a {type(prompt).__name__}, not text")
        encoded = {p: self.encoder.encode([p]) for p in dict.fromkeys(prompts) if p.strip()}  # [1, L_p, d], [1, L_p]
        L = max((mask.shape[1] for _, mask in encoded.values()), default=0)
        text = torch.zeros(len(prompts), L, self.encoder.dim)  # [P, L, d]
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # [P, L]
        for i, prompt in enumerate(prompts):
            if prompt in encoded:
                emb, emb_mask = encoded[prompt]
                text[i, : emb.shape[1]], mask[i, : emb.shape[1]] = emb[0].float().cpu(), emb_mask[0].cpu()
        return text, mask

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], **options: Any) -> tuple[Tensor, Tensor]:
        """One batch, one image per entry: ``prompts[k]`` drawn with seed ``seeds[k]`` ->
        (codes [P, h, w], images [P, 3, H, W] in [-1, 1]). ``options`` go to :func:`generate`, but
        ``speculative_draft`` (a checkpoint) becomes the loaded ``draft`` model and a relaxed
        acceptance gets the tokenizer's ``neighbours``."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
        text, mask = self.encode(prompts)
        valid = mask.any(0)  # drop padding columns that no prompt of the batch uses
        draft = options.pop("speculative_draft", "")
        if draft and options.get("speculative"):
            options["draft"] = self.draft(draft)
        if options.get("speculative_tolerance") and options.get("speculative"):
            k = options.get("speculative_neighbours", SamplingSettings.speculative_neighbours)
            options["neighbours"] = self.code_neighbours(k)
        codes = generate(self.transformer, text[:, valid].to(self.device), mask[:, valid].to(self.device),
                         num_images=1, seeds=torch.tensor(list(seeds), dtype=torch.long), **options)
        return codes, self.tokenizer.decode(codes).clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], batch_size: int = 64, progress: bool = False, compile: bool = False,
        **overrides: Any,
    ) -> tuple[Tensor, Tensor]:
        """``prompts`` -> (codes [P * num_images, h, w], images [P * num_images, 3, H, W] in [-1, 1]),
        prompt-major. ``overrides`` are sampling settings (``num_images``, ``seed``, ``cfg_scale``,
        ``temperature``, ...: any field of ``SamplingSettings``); unset or None ones are the
        checkpoint's. Image ``i`` of ``prompts[p]`` uses seed ``image_seed(seed, p, i)``;
        ``batch_size`` images are sampled and decoded at a time; ``compile`` compiles the decode
        step. "" is the null caption. A prompt too long for the text encoder raises
        ``PromptError`` before any work.
        """
        settings = self.settings(**overrides)
        options = settings.image_settings()
        prompts = list(prompts)
        self.encode(prompts)  # every prompt checked before any sampling
        jobs = [(p, i) for p in range(len(prompts)) for i in range(settings.num_images)]
        codes, images = [], []
        for start in progress_bar(range(0, len(jobs), batch_size), desc="sampling", disable=not progress):
            chunk = jobs[start : start + batch_size]
            seeds = [image_seed(settings.seed, p, i) for p, i in chunk]
            c, x = self.sample([prompts[p] for p, _ in chunk], seeds, compile=compile, **options)
            codes.append(c)
            images.append(x)
        return torch.cat(codes), torch.cat(images)
