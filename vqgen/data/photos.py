"""Real colour photographs that ship with scikit-image, as a captioned dataset that runs offline.

    python -m vqgen.data photos --out data/photos [--shards] [--crops 1200] [--heldout-crops 128]

Training and held-out images are cut from *different* photographs, so held-out figures
measure how a tokenizer does on photographs it never saw, not on other crops of the ones it
trained on. Each image is a random square crop (side 30-100% of the photograph's shorter
side, anywhere, mirrored half of the time) resampled to ``--size`` pixels, captioned with the
photograph's subject, the zoom and the crop's place, e.g. "a close-up of an astronaut in a
spacesuit, top left, mirrored". Layout of ``--out``::

    train/000000.png + 000000.txt, ...        crops of the training photographs
    heldout/000000.png + 000000.txt, ...      crops of the held-out photographs
    shards/train-00000.tar, ...               with --shards: the same images as img2dataset shards
    shards/heldout-00000.tar, ...             (KEY.png, KEY.txt, KEY.json)
    photos.json                               which photograph each image was cut from

With only a few photographs, the held-out figure is limited by how many distinct scenes the
training set has, not by how many crops are cut from them: more crops mostly repeat content.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vqgen.files import atomic_write_text

# name -> (subject for captions, split); scikit-image's colour photographs that ship in its wheel
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("an astronaut in a spacesuit", "train"),
    "rocket": ("a rocket on its launch pad", "train"),
    "motorcycle": ("a motorcycle in a workshop", "train"),
    "hubble_deep_field": ("galaxies in deep space", "train"),
    "immunohistochemistry": ("stained tissue under a microscope", "train"),
    "retina": ("the retina of an eye", "train"),
    "chelsea": ("a tabby cat", "heldout"),
    "coffee": ("a cup of coffee", "heldout"),
}
SPLITS = ("train", "heldout")
MIN_SCALE = 0.3  # smallest crop side, as a share of the photograph's shorter side
PLACES = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))


def load_photo(name: str) -> Image.Image:
    """The photograph ``name`` of :data:`PHOTOS` as an RGB image (scikit-image must be installed)."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("the photos come with scikit-image: pip install 'vqgen[photos]'") from e
    # the motorcycle is the left view of a stereo pair
    load: Callable[[], np.ndarray] = (lambda: data.stereo_motorcycle()[0]) if name == "motorcycle" else getattr(data, name)
    pixels = load()  # [H, W, 3] uint8
    return Image.fromarray(pixels).convert("RGB")


def random_crop(photo: Image.Image, subject: str, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """A random square crop of ``photo`` resampled to ``size`` px, and its caption."""
    w, h = photo.size
    scale = rng.uniform(MIN_SCALE, 1.0)
    side = scale * min(w, h)
    left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
    image = photo.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    mirrored = rng.random() < 0.5
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scale >= 0.8:
        return image, f"a wide view of {subject}" + (", mirrored" if mirrored else "")
    # the crop's centre on a 3 x 3 grid of the photograph, as the (mirrored) image shows it
    col = min(2, int(3 * (left + side / 2) / w))
    row = min(2, int(3 * (top + side / 2) / h))
    place = PLACES[row][2 - col if mirrored else col]
    zoom = "a close-up" if scale < 0.55 else "a medium view"
    return image, f"{zoom} of {subject}, {place}" + (", mirrored" if mirrored else "")


def make_split(split: str, num: int, size: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    """``num`` crops (image, caption, photograph) spread evenly over the photographs of ``split``."""
    names = [name for name, (_, where) in PHOTOS.items() if where == split]
    rng = random.Random(f"{seed}-{split}")
    crops = []
    for k, name in enumerate(names):
        photo, subject = load_photo(name), PHOTOS[name][0]
        count = num // len(names) + (k < num % len(names))
        crops += [(*random_crop(photo, subject, size, rng), name) for _ in range(count)]
    rng.shuffle(crops)  # every shard mixes the photographs
    return crops


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_folder(directory: Path, crops: list[tuple[Image.Image, str, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (image, caption, _) in enumerate(crops):
        image.save(directory / f"{i:06d}.png")
        (directory / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")


def write_shards(directory: Path, prefix: str, crops: list[tuple[Image.Image, str, str]], shard_size: int) -> list[Path]:
    """img2dataset's layout: ``KEY.png``, ``KEY.txt`` and ``KEY.json`` per sample."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, len(crops), shard_size)):
        path = directory / f"{prefix}-{k:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (image, caption, photo) in enumerate(crops[start : start + shard_size], start):
                members = {
                    "png": _png(image),
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps({"caption": caption, "photo": photo}).encode("utf-8"),
                }
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--crops", type=int, default=1200, help="training images, cut evenly from the training photos")
    parser.add_argument("--heldout-crops", type=int, default=128, help="held-out images, from the other photos")
    parser.add_argument("--size", type=int, default=64, help="side of every image in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", action="store_true", help="also write the images as WebDataset tar shards")
    parser.add_argument("--shard-size", type=int, default=200, help="images per tar shard (default 200)")


def run(args: argparse.Namespace) -> None:
    if min(args.crops, args.heldout_crops, args.size, args.shard_size) < 1:
        raise ValueError("--crops, --heldout-crops, --size and --shard-size must be >= 1")
    manifest: dict[str, Any] = {"size": args.size, "seed": args.seed}
    for split, num in zip(SPLITS, (args.crops, args.heldout_crops)):
        crops = make_split(split, num, args.size, args.seed)
        write_folder(args.out / split, crops)
        manifest[split] = {"photos": sorted({photo for _, _, photo in crops}), "images": [p for _, _, p in crops]}
        line = f"{split}: {len(crops)} images from {', '.join(manifest[split]['photos'])} -> {args.out / split}"
        if args.shards:
            shards = write_shards(args.out / "shards", split, crops, args.shard_size)
            pattern = args.out / "shards" / f"{split}-{{00000..{len(shards) - 1:05d}}}.tar"
            manifest[split]["shards"] = str(pattern)
            line += f" and {pattern}"
        print(line)
    atomic_write_text(args.out / "photos.json", json.dumps(manifest, indent=1) + "\n")
