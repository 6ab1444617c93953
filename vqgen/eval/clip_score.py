"""CLIP score of images against their prompts: ``clip_scores``, ``clip_score_folder``, ``load_clip``.

The score of one (image, prompt) pair is ``100 * max(cos(image embedding, text embedding), 0)``
with the projected embeddings of a ``transformers`` CLIP model (the convention of torchmetrics'
``CLIPScore`` and of text-to-image papers; Hessel et al. 2021 scale by 2.5 instead of 100).
A folder is scored through its ``index.jsonl``, one JSON object per image with at least
``"file"`` (relative to the folder) and ``"prompt"``, as ``sample.py --out-dir`` writes it.

The model is a hub name (``openai/clip-vit-large-patch14``, read from the local Hugging Face
cache when offline) or a directory written by ``CLIPModel.save_pretrained`` and
``CLIPProcessor.save_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vqgen.eval.fid import MetricsError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
INDEX_FILE = "index.jsonl"


def load_clip(name_or_path: str | Path, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local directory or a hub name, in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor  # seconds to import: only for a CLIP score

    name = str(name_or_path)
    local = Path(name).expanduser()
    looks_local = local.is_absolute() or name.startswith(".") or name.startswith("~") or name.count("/") > 1
    if looks_local and not local.is_dir():
        raise MetricsError(
            f"CLIP model directory not found: {name}; pass a directory written by CLIPModel.save_pretrained and "
            f"CLIPProcessor.save_pretrained, or a hub name such as {DEFAULT_CLIP}"
        )
    source = str(local) if local.is_dir() else name
    try:
        model = CLIPModel.from_pretrained(source)
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:  # not found locally or on the hub, or not a valid repo id
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it once where the hub is "
            f"reachable (`huggingface-cli download {name}`)"
            if offline
            else "check the name"
        )
        raise MetricsError(
            f"cannot load CLIP model {name!r}: {hint}, or pass a local directory written by save_pretrained ({e})"
        ) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval().to(device), processor


@torch.no_grad()
def clip_scores(
    images: Sequence[Image.Image], prompts: Sequence[str], model: Any, processor: Any, batch_size: int = 64
) -> torch.Tensor:
    """Per-pair CLIP scores, ``100 * max(cos, 0)``: N images and N prompts -> [N] on the CPU.

    Prompts longer than the model's text context are truncated to it.
    """
    if len(images) != len(prompts):
        raise MetricsError(f"{len(images)} images but {len(prompts)} prompts; they pair up one to one")
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(images), batch_size):
        inputs = processor(
            text=list(prompts[start : start + batch_size]),
            images=[im.convert("RGB") for im in images[start : start + batch_size]],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        out = model(**inputs)  # image_embeds, text_embeds: [b, projection_dim], unit length
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)  # [b]
        scores.append(100 * cosine.clamp_min(0).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def read_index(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder/index.jsonl``; each has ``"file"`` (made absolute) and ``"prompt"``."""
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        raise MetricsError(f"{index} not found: clip-score reads a folder written by `sample.py --out-dir`")
    records = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{index} line {number}: not JSON ({e})") from e
        missing = [key for key in ("file", "prompt") if key not in record]
        if missing:
            raise MetricsError(f"{index} line {number}: missing {', '.join(map(repr, missing))}")
        path = Path(folder) / record["file"]
        if not path.is_file():
            raise MetricsError(f"{index} line {number}: image {path} not found")
        records.append(record | {"file": path})
    if not records:
        raise MetricsError(f"{index} lists no images")
    return records


def clip_score_folder(folder: Path, model: Any, processor: Any, batch_size: int = 64) -> dict[str, Any]:
    """Mean and spread of the CLIP score over the images listed in ``folder/index.jsonl``."""
    records = read_index(folder)
    images = []
    for record in records:
        with Image.open(record["file"]) as image:
            images.append(image.convert("RGB"))
    scores = clip_scores(images, [r["prompt"] for r in records], model, processor, batch_size)
    return {
        "clip_score": scores.mean().item(),
        "clip_score_std": scores.std().item() if len(scores) > 1 else 0.0,
        "num_images": len(scores),
    }
