"""Prompts in, images out: the transformer, its tokenizer and its text encoder, loaded together.

``Pipeline.from_pretrained(transformer_dir)`` finds the tokenizer the transformer was trained
with (recorded in its config) and the text encoder named there; ``pipeline(prompts, ...)``
encodes the prompts, samples codes with :func:`vqgen.sampling.generate`, and decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vqgen.checkpoint import CheckpointError, load_config_json
from vqgen.model import Transformer
from vqgen.sampling.generate import generate
from vqgen.sampling.quantize import quantize as quantize_model


@dataclass
class Pipeline:
    transformer: Transformer
    tokenizer: torch.nn.Module  # vqgen.tokenizer.VQTokenizer
    encoder: object  # vqgen.text.TextEncoder

    @classmethod
    def from_pretrained(
        cls, transformer_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
        ema: bool = False, quantize: str | None = None,
    ) -> Pipeline:
        """Load a transformer checkpoint with its tokenizer (``tokenizer_dir`` overrides the one
        recorded at training time) and text encoder; checks that the three fit together.
        ``quantize`` (``int8``, ``int8-dynamic``, ``int8-weight``) swaps the transformer for a
        sampling-only int8 copy (:func:`vqgen.sampling.quantize.quantize`)."""
        from vqgen.text import TextEncoder
        from vqgen.tokenizer import VQTokenizer

        transformer_dir = Path(transformer_dir)
        config = load_config_json(transformer_dir, "transformer")
        if tokenizer_dir is None:
            recorded = config.get("tokenizer")
            if not recorded:
                raise CheckpointError(f"{transformer_dir}/config.json names no tokenizer; pass tokenizer_dir")
            tokenizer_dir = Path(recorded)
            if not tokenizer_dir.is_dir():  # the run directory moved: look beside the transformer
                tokenizer_dir = transformer_dir.parent / "tokenizer"
        transformer = Transformer.from_pretrained(transformer_dir, ema=ema, device=device).eval()
        tokenizer = VQTokenizer.from_pretrained(tokenizer_dir, device=device).eval()
        transformer.check_compatible(tokenizer.codebook_size, tokenizer.grid)
        if quantize:
            transformer = quantize_model(transformer, quantize)
        encoder = TextEncoder(transformer.cfg.text_encoder, max_length=transformer.cfg.max_text_len, device=device)
        if encoder.dim != transformer.cfg.text_dim:
            raise CheckpointError(
                f"text encoder {transformer.cfg.text_encoder!r} gives {encoder.dim}-dim embeddings, "
                f"but {transformer_dir} was trained on {transformer.cfg.text_dim}-dim ones"
            )
        return cls(transformer, tokenizer, encoder)

    @property
    def device(self) -> torch.device:
        return self.transformer.bos.device

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], num_images: int = 1, seed: int = 0, batch_size: int = 64, progress: bool = False,
        **options,
    ) -> tuple[Tensor, Tensor]:
        """``prompts`` -> (codes [P * num_images, h, w], images [P * num_images, 3, H, W] in [-1, 1]).

        Image ``i`` of every prompt uses seed ``seed + i``, so a prompt gives the same images
        alone or in any batch; prompts are sampled ``batch_size`` at a time. ``options`` go to
        :func:`generate` (cfg_scale, temperature, top_k, top_p, cfg_schedule, compile). An empty
        prompt or one longer than the text encoder takes raises ``PromptError`` before any work.
        """
        from tqdm.auto import tqdm

        prompts = list(prompts)
        text, mask = self.encoder.encode(prompts)  # [P, L, d], [P, L]: validates every prompt first
        codes = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
            chunk = slice(start, start + batch_size)
            valid = mask[chunk].any(0)  # drop padding columns that no prompt in the chunk uses
            codes.append(generate(self.transformer, text[chunk][:, valid].to(self.device),
                                  mask[chunk][:, valid].to(self.device), num_images=num_images, seeds=seed, **options))
        codes = torch.cat(codes)
        return codes, self.tokenizer.decode(codes).clamp(-1, 1)
