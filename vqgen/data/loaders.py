"""Real image-caption data: an image folder, or WebDataset tar shards as img2dataset writes them.

Every dataset yields ``{"image": FloatTensor [3, R, R] in [-1, 1], "caption": str}``, the
same samples as the built-in shapes set, so the training loops never ask where data came from.

Images are made RGB (transparent pixels composited onto white, EXIF rotation applied), the
centred square of side ``min(w, h)`` is resampled to ``R x R`` with an antialiased bicubic
filter in one step (no rounding between a resize and a crop).

Bad data never stops a long run silently or loudly without a name:

* a corrupt or unreadable image is skipped with a :class:`SkippedSampleWarning` naming the file,
  and counted in ``dataset.skipped["corrupt"]``;
* an image without a caption follows ``missing_caption``: ``"error"`` (raise, naming the file
  and the fix), ``"skip"`` (drop it, counted in ``dataset.skipped["no_caption"]``) or
  ``"empty"`` (an empty caption, for unconditional training).

Counters live in the process that iterates: with DataLoader workers each worker counts (and
warns about) the files it read.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
import warnings
from collections import Counter
from functools import partial
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from vqgen.config import ConfigError, DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MISSING_CAPTION_POLICIES = ("error", "skip", "empty")
# what PIL raises on truncated, garbage or hostile files (it uses SyntaxError for broken PNGs)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file and what to do."""


class SkippedSampleWarning(UserWarning):
    """A sample was dropped (corrupt image, unreadable shard); the message names it."""


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (plain ``convert`` would expose whatever
    colour the transparent pixels happen to store, often black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image of any mode and shape -> FloatTensor [3, R, R] in [-1, 1], centre-cropped."""
    image = _to_rgb(ImageOps.exif_transpose(image))
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # resampling the centred square directly is resize-shorter-side + centre-crop in one step
    image = image.resize(
        (resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [R, R, 3]
    return rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0  # [3, R, R]


def decode_image(source: str | Path | bytes, resolution: int, name: str | None = None) -> torch.Tensor:
    """Read an image file (path or encoded bytes) -> [3, R, R]; :class:`DataError` if unreadable."""
    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decode now: Image.open only parses the header
            return image_to_tensor(image, resolution)
    except _DECODE_ERRORS as e:
        reason = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise DataError(f"cannot read image {name}: {reason}") from e


def _check_policy(missing_caption: str) -> None:
    if missing_caption not in MISSING_CAPTION_POLICIES:
        raise DataError(
            f"missing_caption is {missing_caption!r}; choose one of {list(MISSING_CAPTION_POLICIES)}"
        )


def _skip_warning(message: str) -> None:
    warnings.warn(message, SkippedSampleWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------


def _first_key(record: dict[str, Any], keys: tuple[str, str]) -> Any:
    return next((record[k] for k in keys if k in record), None)


def _read_caption_table(root: Path) -> tuple[Path | None, dict[str, str]]:
    """``captions.jsonl`` or ``captions.csv`` in ``root`` -> (table file, {normalised path: caption})."""
    tables = [p for p in (root / "captions.jsonl", root / "captions.csv") if p.is_file()]
    if len(tables) > 1:
        raise DataError(f"{root} holds both captions.jsonl and captions.csv; keep one of them")
    if not tables:
        return None, {}
    table = tables[0]
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(table, newline="", encoding="utf-8") as f:
        if table.suffix == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{table} line {lineno} is not valid JSON: {e}") from e
        else:
            rows = list(enumerate(csv.DictReader(f), 2))  # line 1 is the header
    captions = {}
    for lineno, row in rows:
        if not (isinstance(row, dict) and {"file", "image"} & row.keys() and {"caption", "text"} & row.keys()):
            raise DataError(
                f"{table} line {lineno}: expected the fields 'file' (or 'image') and 'caption' "
                f"(or 'text'), found {list(row) if isinstance(row, dict) else row!r}"
            )
        file, caption = _first_key(row, ("file", "image")), _first_key(row, ("caption", "text"))
        captions[os.path.normpath(root / str(file))] = str(caption or "").strip()
    return table, captions


class ImageFolderDataset(Dataset):
    """Map-style dataset over every image below ``root`` (recursive, sorted, hidden paths ignored).

    A caption comes from a same-stem ``.txt`` next to the image, else from one ``captions.jsonl``
    (``{"file": ..., "caption": ...}`` per line, or ``image``/``text``) or ``captions.csv``
    (header ``file,caption``) in ``root``, whose paths are relative to ``root``. An empty caption
    counts as missing.

    Images are validated lazily, because decoding a whole folder up front costs as much as an
    epoch: ``dataset[i]`` of a corrupt file warns once, remembers it, and returns the next
    readable index instead (deterministically, so a seed still fixes an epoch). ``len`` counts
    every captioned file; ``skipped`` says how many were dropped so far, and why.
    """

    def __init__(self, root: str | Path, resolution: int, missing_caption: str = "error"):
        _check_policy(missing_caption)
        self.root, self.resolution = Path(root), resolution
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} not found")
        images = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.is_file()
        )
        if not images:
            raise DataError(
                f"no images found under {self.root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        table, table_captions = _read_caption_table(self.root)
        self.samples: list[tuple[Path, str]] = []
        uncaptioned: list[Path] = []
        for path in images:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
            caption = caption or table_captions.get(os.path.normpath(path), "")
            if caption or missing_caption == "empty":
                self.samples.append((path, caption))
            else:
                uncaptioned.append(path)
        if table is not None:
            orphans = set(table_captions) - {os.path.normpath(p) for p in images}
            if orphans:
                _skip_warning(
                    f"{len(orphans)} entries of {table} name no image under {self.root}, "
                    f"e.g. {min(orphans)}"
                )
        if uncaptioned and missing_caption == "error":
            where = f"{uncaptioned[0].stem}.txt next to it" + (f" or an entry in {table.name}" if table else "")
            raise DataError(
                f"{uncaptioned[0]} has no caption ({len(uncaptioned)} of {len(images)} images under "
                f"{self.root} lack one): add {where}, or set data.missing_caption=skip (drop them) or "
                "data.missing_caption=empty (train them unconditionally)"
            )
        if not self.samples:
            raise DataError(f"all {len(images)} images under {self.root} lack a caption; nothing to train on")
        self._uncaptioned = len(uncaptioned)
        self._corrupt: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> Counter[str]:
        """Files dropped so far in this process: ``{"no_caption": n, "corrupt": m}``."""
        return Counter(no_caption=self._uncaptioned, corrupt=len(self._corrupt))

    @property
    def corrupt_files(self) -> list[Path]:
        return sorted(self._corrupt)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images under {self.root}")
        for offset in range(n):
            path, caption = self.samples[(index + offset) % n]
            if path in self._corrupt:
                continue
            try:
                image = decode_image(path, self.resolution)
            except DataError as e:
                self._corrupt.add(path)
                _skip_warning(f"skipping: {e}")
                continue
            return {"image": image, "caption": caption}
        raise DataError(f"none of the {n} images under {self.root} can be read")


# --------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------

_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Brace patterns (``shards/{00000..00099}.tar``), globs and lists -> a list of shards.

    Local shards must exist; remote URLs (``https://``, ``s3://``, ``pipe:``) pass through.
    """
    patterns = [str(urls)] if isinstance(urls, (str, Path)) else [str(u) for u in urls]
    shards: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(pattern):  # braces, and '::' between lists
            if _is_remote(url):
                shards.append(url)
            elif glob.has_magic(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise DataError(f"shard pattern {url!r} matches no file")
                shards += matches
            elif not os.path.isfile(url):
                raise DataError(f"shard {url} not found (from the pattern {pattern!r})")
            else:
                shards.append(url)
    if not shards:
        raise DataError(f"no shards given by {urls!r}")
    return shards


class WebDatasetSamples(IterableDataset):
    """Streamed samples from tar shards in img2dataset's layout.

    Each key ``KEY`` holds an image (``KEY.jpg``/``.jpeg``/``.png``/``.webp``/``.bmp``) and a caption,
    ``KEY.txt`` or the ``caption``/``text`` field of ``KEY.json``. Shards are split across
    processes (``RANK``/``WORLD_SIZE`` or ``torch.distributed``, as Accelerate sets them) and then
    across DataLoader workers, so every sample is read once per epoch across the whole job.

    ``shuffle`` > 0 shuffles the shard order (per epoch) and the samples within a buffer of that
    many. The epoch advances on every iteration in this process; with non-persistent DataLoader
    workers call :meth:`set_epoch` each epoch, as with ``DistributedSampler``.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        resolution: int,
        missing_caption: str = "error",
        shuffle: int = 0,
        seed: int = 0,
    ):
        _check_policy(missing_caption)
        if shuffle < 0:
            raise DataError(f"shuffle (data.shuffle_buffer) is {shuffle}; use 0 (off) or a buffer size in samples")
        self.shards = expand_shards(urls)
        self.resolution, self.missing_caption = resolution, missing_caption
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped: Counter[str] = Counter()  # reason -> samples (or shards) dropped in this process
        self._damaged: set[str] = set()
        self._shard = ""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        rank, world_size, worker, _ = wds.utils.pytorch_worker_info()
        if rank >= len(self.shards):
            warnings.warn(
                f"process {rank} of {world_size} gets no shard ({len(self.shards)} shards in all); "
                "write at least as many shards as processes so every process has data",
                stacklevel=2,
            )
        stages = [
            # every process shuffles the shard list alike, so the split by rank stays a partition
            wds.SimpleShardList(self.shards, seed=f"{self.seed}-{epoch}" if self.shuffle else None),
            wds.split_by_node,
            wds.split_by_worker,
            self._open_shards,
            partial(wds.tariterators.tar_file_expander, handler=self._on_shard_error),
            partial(wds.tariterators.group_by_keys, handler=self._on_shard_error),
        ]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, rng=random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")))
        for raw in wds.DataPipeline(*stages):
            sample = self._decode(raw)
            if sample is not None:
                yield sample

    def _open_shards(self, sources: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        # the stages downstream are lazy generators, so while they read a shard, it is the
        # last one opened here: that is how a tar error is pinned to its shard
        for source in sources:
            self._shard = source["url"]
            try:
                stream = wds.gopen(self._shard)
            except OSError as e:
                self._on_shard_error(e)
                continue
            try:
                yield {"url": self._shard, "stream": stream}
            finally:
                stream.close()

    def _on_shard_error(self, exn: Exception) -> bool:
        """A shard that cannot be opened or is damaged (truncated, empty, not a tar): warn once,
        keep the samples read before the damage, and go on with the next shard."""
        if self._shard not in self._damaged:
            self._damaged.add(self._shard)
            self.skipped["damaged_shard"] += 1
            _skip_warning(f"skipping the rest of shard {self._shard}: {type(exn).__name__}: {exn.args[0]}")
        return True

    def _caption(self, raw: dict[str, Any], where: str) -> str:
        if "txt" in raw:
            return raw["txt"].decode("utf-8").strip()
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                _skip_warning(f"{where}.json is not valid JSON; treating the sample as uncaptioned")
                return ""
            caption = _first_key(meta, ("caption", "text")) if isinstance(meta, dict) else None
            return str(caption or "").strip()
        return ""

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        where = f"{raw['__url__']}:{raw['__key__']}"
        ext = next((e for e in _IMAGE_KEYS if e in raw), None)
        caption = self._caption(raw, where)
        if raw["__url__"] in self._damaged and (ext is None or not caption):
            self.skipped["truncated"] += 1  # the last sample of a damaged shard, cut mid-way
            return None
        if ext is None:
            self.skipped["no_image"] += 1
            _skip_warning(f"skipping {where}: no image (.{', .'.join(_IMAGE_KEYS)}) under this key")
            return None
        if not caption and self.missing_caption != "empty":
            if self.missing_caption == "error":
                raise DataError(
                    f"{where}.{ext} has no caption (no {raw['__key__']}.txt, and no 'caption' or 'text' "
                    "in its .json): fix the shard, or set data.missing_caption=skip (drop such samples) "
                    "or data.missing_caption=empty (train them unconditionally)"
                )
            self.skipped["no_caption"] += 1
            return None
        try:
            image = decode_image(raw[ext], self.resolution, name=f"{where}.{ext}")
        except DataError as e:
            self.skipped["corrupt"] += 1
            _skip_warning(f"skipping: {e}")
            return None
        return {"image": image, "caption": caption}


def webdataset_samples(
    urls: str | Path | Sequence[str | Path],
    resolution: int,
    missing_caption: str = "error",
    shuffle: int = 0,
    seed: int = 0,
) -> WebDatasetSamples:
    """An IterableDataset over WebDataset shards; see :class:`WebDatasetSamples`."""
    return WebDatasetSamples(urls, resolution, missing_caption, shuffle, seed)


# --------------------------------------------------------------------------------------
# From the config
# --------------------------------------------------------------------------------------


def build_dataset(data_cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset ``data.kind`` names: ``shapes``, ``folder`` or ``webdataset``."""
    if data_cfg.kind == "shapes":
        from vqgen.data.shapes import ShapesDataset

        return ShapesDataset.from_config(data_cfg, split=split)
    if data_cfg.kind not in ("folder", "webdataset"):
        raise ConfigError(f"config key 'data.kind' is {data_cfg.kind!r}; choose one of shapes, folder, webdataset")
    if split != "train":
        raise ConfigError(
            f"data.kind={data_cfg.kind} has only a 'train' split, not {split!r} "
            "(held-out splits come with data.kind=shapes)"
        )
    if not data_cfg.path:
        raise ConfigError(
            "config key 'data.path' is empty; set it to an image folder (data.kind=folder) or to "
            "tar shards such as 'shards/{00000..00099}.tar' (data.kind=webdataset)"
        )
    if data_cfg.kind == "folder":
        root = Path(data_cfg.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"config key 'data.path': image folder {root} not found")
        return ImageFolderDataset(root, data_cfg.resolution, data_cfg.missing_caption)
    try:
        shards = expand_shards(os.path.expanduser(data_cfg.path))
    except DataError as e:
        raise ConfigError(f"config key 'data.path': {e}") from e
    return WebDatasetSamples(
        shards, data_cfg.resolution, data_cfg.missing_caption, data_cfg.shuffle_buffer, data_cfg.seed
    )
