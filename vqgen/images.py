"""Tensors to PIL images, and captioned image grids: one home below the training previews,
sampling and evaluation, which all write images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PAD = 4  # pixels around every tile


def to_pil(images: torch.Tensor | Sequence[Image.Image | torch.Tensor]) -> list[Image.Image]:
    """[B, 3, H, W] tensor in [-1, 1] (or a sequence of PIL images / [3, H, W] tensors) -> PIL RGB."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image batches must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu", torch.uint8)
        return [Image.fromarray(a) for a in rearrange(pixels, "b c h w -> b h w c").numpy()]
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
        elif isinstance(image, torch.Tensor):
            out.append(to_pil(image[None])[0])
        else:
            raise TypeError(f"image {i} is a {type(image).__name__}; pass PIL images or [3, H, W] tensors in [-1, 1]")
    return out


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def grid_image(
    images: torch.Tensor | Sequence[Image.Image | torch.Tensor],
    captions: Sequence[str] | None = None,
    ncol: int = 8,
    min_size: int = 128,
    font_size: int = 11,
) -> Image.Image:
    """Images as one grid image with each caption wrapped under its image.

    Tiny images are upscaled by an integer factor (nearest neighbour, so pixels stay
    visible) to at least ``min_size`` pixels wide, which keeps captions readable.
    """
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("a grid needs at least one image")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"a grid got {len(tiles)} images but {len(captions)} captions")
    scale = max(1, math.ceil(min_size / max(t.width for t in tiles)))
    tiles = [t.resize((t.width * scale, t.height * scale), Image.Resampling.NEAREST) for t in tiles]
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    lines = [_wrap(c, font, tile_w) for c in captions] if captions is not None else [[] for _ in tiles]
    text_h = line_h * max(map(len, lines)) + (PAD if captions is not None else 0)
    ncol = max(1, min(ncol, len(tiles)))
    nrow = math.ceil(len(tiles) / ncol)
    cell_w, cell_h = tile_w + PAD, tile_h + text_h + PAD
    grid = Image.new("RGB", (ncol * cell_w + PAD, nrow * cell_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (tile, tile_lines) in enumerate(zip(tiles, lines)):
        x, y = PAD + (i % ncol) * cell_w, PAD + (i // ncol) * cell_h
        grid.paste(tile, (x, y))
        for j, line in enumerate(tile_lines):
            draw.text((x, y + tile_h + PAD // 2 + j * line_h), line, fill=TEXT, font=font)
    return grid


def save_grid(
    images: torch.Tensor | Sequence[Image.Image | torch.Tensor],
    captions: Sequence[str] | None,
    path: str | Path,
    ncol: int = 8,
    **kwargs,
) -> Path:
    """Write ``grid_image(images, captions, ncol, **kwargs)`` as a PNG (parents created)."""
    try:
        grid = grid_image(images, captions, ncol, **kwargs)
    except ValueError as e:
        raise ValueError(f"cannot write grid {path}: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
