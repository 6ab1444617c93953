"""Real image-caption data: an image folder, or WebDataset tar shards as img2dataset writes them.

Every dataset yields ``{"image": FloatTensor [3, R, R] in [-1, 1], "caption": str}``, the
same samples as the built-in shapes set, so the training loops never ask where data came from.

Images are made RGB (transparent pixels composited onto white, EXIF rotation applied), the
centred square of side ``min(w, h)`` is resampled to ``R x R`` with an antialiased bicubic
filter in one step (no rounding between a resize and a crop).

Held-out data never trains: ``data.eval_path`` names a separate folder or shards, or
``data.eval_fraction`` holds out a deterministic share of the files of a folder (of the shards
of a WebDataset), chosen by a hash of each file's path, so the split is the same on every
machine and in every process (:func:`heldout_names`).

Bad data is dropped, never replaced by a neighbour (which would train on it twice), and
counted under the reasons of :data:`SKIP_REASONS`:

* an unreadable image (``corrupt``), a key of a shard without an image (``no_image``), a
  damaged shard (``damaged_shard``, keeping the samples before the damage, and ``truncated``
  for the one cut mid-way) follow ``on_bad_sample``: ``"skip"`` or ``"error"`` (raise,
  naming the file); a sample that cannot be used raises :class:`BadSample` with its reason,
  which its reader turns into a :class:`Skipped` marker, counted by a :class:`SkipCounter`;
* an image without a caption (``no_caption``) follows ``missing_caption``: ``"skip"``,
  ``"error"`` (raise, naming the file and the fix) or ``"empty"`` (an empty caption, for
  unconditional training).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from vqgen.config import ConfigError, DataConfig, field_choices
from vqgen.data.shapes import ShapesDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# the choices of data.missing_caption and data.on_bad_sample, as DataConfig declares them
POLICIES = {key: field_choices(DataConfig, key) for key in ("missing_caption", "on_bad_sample")}
SKIP_REASONS = ("corrupt", "no_caption", "no_image", "damaged_shard", "truncated")
# what PIL raises on truncated, garbage or hostile files (it uses SyntaxError for broken PNGs)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file and what to do."""


class BadSample(DataError):
    """One sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkippedSampleWarning(UserWarning):
    """A sample was dropped (corrupt image, unreadable shard); the message names it."""


class Skipped(NamedTuple):
    """Stands where a dropped sample would have been: why (one of :data:`SKIP_REASONS`) and which."""

    reason: str
    message: str


class SkipCounter(Counter):
    """Samples dropped, by reason. :meth:`record` counts :class:`Skipped` markers and names in a
    :class:`SkippedSampleWarning` the first sample of each reason and every damaged shard (few,
    and each loses the rest of a shard): a dataset with many bad samples does not flood the log."""

    def record(self, skipped: Iterable[Skipped]) -> None:
        for item in skipped:
            if item.reason == "damaged_shard":
                warnings.warn(f"skipping {item.message}", SkippedSampleWarning, stacklevel=2)
            elif not self[item.reason]:
                warnings.warn(f"skipping {item.message} (further '{item.reason}' samples are counted, not named)",
                              SkippedSampleWarning, stacklevel=2)  # fmt: skip
            self[item.reason] += 1


def skip_or_raise(bad: BadSample, on_bad_sample: str) -> Skipped:
    """A :class:`BadSample` under the policy: :class:`Skipped` for ``"skip"``, a
    :class:`DataError` naming the sample and the fix for ``"error"``. An uncaptioned sample
    reaches here only under ``missing_caption="skip"``, which decided its fate already."""
    if on_bad_sample == "error" and bad.reason != "no_caption":
        raise DataError(f"{bad}; fix or remove it, or set data.on_bad_sample=skip to drop such samples") from bad
    return Skipped(bad.reason, str(bad))


def collate_usable(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Samples and :class:`Skipped` markers -> ``{"image": [n, 3, R, R] or None when n == 0,
    "caption": [n], "skipped": [Skipped, ...]}``: the dropped samples leave the batch smaller,
    never filled with a neighbour (which would train on it twice)."""
    usable = [item for item in items if not isinstance(item, Skipped)]
    return {
        "image": torch.stack([s["image"] for s in usable]) if usable else None,
        "caption": [s["caption"] for s in usable],
        "skipped": [item for item in items if isinstance(item, Skipped)],
    }


class Tolerant(Dataset):
    """``dataset[i]``, or :class:`Skipped` for a sample that cannot be used (see :func:`skip_or_raise`)."""

    def __init__(self, dataset: Dataset, on_bad_sample: str = "skip"):
        _check_policy("on_bad_sample", on_bad_sample)
        self.dataset, self.on_bad_sample = dataset, on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        try:
            return self.dataset[index]
        except BadSample as bad:
            return skip_or_raise(bad, self.on_bad_sample)


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


def _check_policy(key: str, value: str) -> None:
    """``value`` is one of :data:`POLICIES` ``[key]``; the datasets check it, since they are built
    without a config too."""
    if value not in POLICIES[key]:
        raise DataError(f"{key} is {value!r}; choose one of {list(POLICIES[key])}")


def _skip_warning(message: str) -> None:
    warnings.warn(message, SkippedSampleWarning, stacklevel=3)


def heldout_names(names: Sequence[str], fraction: float) -> set[str]:
    """The ``round(fraction * n)`` names (at least 1, at most ``n - 1``) whose SHA-1 sorts first.

    A pure function of the names themselves: the same split on any machine, in any process and
    in any listing order; a file added later joins one side without moving the others much.
    """
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction is {fraction}; use a share in (0, 1), e.g. 0.05")
    if len(names) < 2:
        raise DataError(f"cannot hold out a share of {len(names)} file(s); give data.eval_path instead")
    count = min(len(names) - 1, max(1, round(fraction * len(names))))
    ranked = sorted(names, key=lambda name: hashlib.sha1(name.encode("utf-8")).hexdigest())
    return set(ranked[:count])


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
    """Map-style dataset over the images below ``root`` (recursive, sorted, hidden paths ignored).

    A caption comes from a same-stem ``.txt`` next to the image, else from one ``captions.jsonl``
    (``{"file": ..., "caption": ...}`` per line, or ``image``/``text``) or ``captions.csv``
    (header ``file,caption``) in ``root``, whose paths are relative to ``root``. An empty caption
    counts as missing.

    ``eval_fraction`` > 0 splits the files (see :func:`heldout_names`): ``split="train"`` lists
    the rest, ``split="eval"`` the held-out ones. Images are decoded lazily, because decoding a
    whole folder up front costs as much as an epoch: ``dataset[i]`` of an unreadable file raises
    :class:`BadSample` (reason ``corrupt``) naming it. ``skipped`` counts the uncaptioned files
    dropped by ``missing_caption="skip"``.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        missing_caption: str = "skip",
        eval_fraction: float = 0.0,
        split: str = "train",
    ):
        _check_policy("missing_caption", missing_caption)
        if split not in ("train", "eval"):
            raise DataError(f"split is {split!r}; an image folder has the splits 'train' and 'eval'")
        if split == "eval" and not eval_fraction:
            raise DataError(f"the image folder {root} has no held-out split: set data.eval_fraction or data.eval_path")
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
        if table is not None:
            orphans = set(table_captions) - {os.path.normpath(p) for p in images}
            if orphans:
                _skip_warning(
                    f"{len(orphans)} entries of {table} name no image under {self.root}, "
                    f"e.g. {min(orphans)}"
                )
        if eval_fraction:
            held = heldout_names([p.relative_to(self.root).as_posix() for p in images], eval_fraction)
            images = [p for p in images if (p.relative_to(self.root).as_posix() in held) == (split == "eval")]
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
        if uncaptioned and missing_caption == "error":
            where = f"{uncaptioned[0].stem}.txt next to it" + (f" or an entry in {table.name}" if table else "")
            raise DataError(
                f"{uncaptioned[0]} has no caption ({len(uncaptioned)} of {len(images)} images under "
                f"{self.root} lack one): add {where}, or set data.missing_caption=skip (drop them) or "
                "data.missing_caption=empty (train them unconditionally)"
            )
        if not self.samples:
            raise DataError(f"all {len(images)} images under {self.root} lack a caption; nothing to train on")
        self.skipped: Counter[str] = Counter(no_caption=len(uncaptioned))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images under {self.root}")
        path, caption = self.samples[index]
        try:
            image = decode_image(path, self.resolution)
        except DataError as e:
            raise BadSample("corrupt", str(e)) from e
        return {"image": image, "caption": caption}


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


def shards_of(shards: Sequence[str], rank: int, world: int, slot: int, slots: int) -> list[str]:
    """The shards that reader ``slot`` of ``slots`` (DataLoader workers) on process ``rank`` of
    ``world`` reads: every ``world * slots``-th, from ``rank + world * slot``. Over all ranks and
    slots this is a partition: every shard is read by exactly one reader."""
    return list(shards[rank + world * slot :: world * slots])


class WebDatasetSamples:
    """Tar shards in img2dataset's layout, read as undecoded records and decoded one by one.

    Each key ``KEY`` holds an image (``KEY.jpg``/``.jpeg``/``.png``/``.webp``/``.bmp``) and a caption,
    ``KEY.txt`` or the ``caption``/``text`` field of ``KEY.json``. Training reads it through
    :meth:`stream`, a reproducible record stream per reader (``vqgen.train.batches``); held-out
    sets and encoding read shards in order through :class:`ShardSamples`. Both decode with
    :meth:`decode_or_skip` and collect :meth:`newly_damaged` shards.

    ``shuffle`` > 0 shuffles the shard order (per epoch) and the samples within a buffer of that
    many.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        resolution: int,
        missing_caption: str = "skip",
        shuffle: int = 0,
        seed: int = 0,
        on_bad_sample: str = "skip",
    ):
        _check_policy("missing_caption", missing_caption)
        _check_policy("on_bad_sample", on_bad_sample)
        if shuffle < 0:
            raise DataError(f"shuffle (data.shuffle_buffer) is {shuffle}; use 0 (off) or a buffer size in samples")
        self.shards = expand_shards(urls)
        self.resolution, self.missing_caption, self.on_bad_sample = resolution, missing_caption, on_bad_sample
        self.shuffle, self.seed = shuffle, seed
        self._damaged: set[str] = set()  # shards found damaged in this process
        self._unreported: list[Skipped] = []  # ... and not yet handed out by newly_damaged()
        self._shard = ""

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shard order of ``epoch``: shuffled alike in every process when ``shuffle`` > 0,
        so that splitting it by rank stays a partition."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(shards)
        return shards

    def records(self, shards: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Undecoded samples (``{"__key__", "__url__", "jpg", "txt", ...}``) of ``shards``, in order."""
        opened = self._open_shards({"url": url} for url in shards)
        files = wds.tariterators.tar_file_expander(opened, handler=self._on_shard_error)
        return wds.tariterators.group_by_keys(files, handler=self._on_shard_error)

    def stream(self, rank: int, world: int, slot: int, slots: int, epoch: int) -> Iterator[dict[str, Any]]:
        """The undecoded samples reader ``slot`` of ``slots`` on process ``rank`` of ``world``
        reads in ``epoch`` (see :func:`shards_of`), shuffled within the buffer: a pure function
        of its arguments and the shards' contents."""
        records = self.records(shards_of(self.epoch_shards(epoch), rank, world, slot, slots))
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{epoch}-{rank}-{slot}")
            records = wds.shuffle(self.shuffle, rng=rng)(records)
        return records

    def newly_damaged(self) -> list[Skipped]:
        """A ``damaged_shard`` marker for each shard found damaged since the last call, to go
        with the samples read (in DataLoader workers, this process's copy knows its own)."""
        markers, self._unreported = self._unreported, []
        return markers

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
        """A shard that cannot be opened or is damaged (truncated, empty, not a tar): under
        ``on_bad_sample="skip"`` keep the samples read before the damage, mark the shard once for
        :meth:`newly_damaged`, and go on with the next shard."""
        cause = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        if self.on_bad_sample == "error":
            raise DataError(f"shard {self._shard} is damaged: {cause}; replace it, or set data.on_bad_sample=skip "
                            "to skip its rest") from exn  # fmt: skip
        if self._shard not in self._damaged:
            self._damaged.add(self._shard)
            self._unreported.append(Skipped("damaged_shard", f"the rest of shard {self._shard}: {cause}"))
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

    def decode_or_skip(self, raw: dict[str, Any]) -> dict[str, Any] | Skipped:
        """:meth:`decode` under ``on_bad_sample`` (see :func:`skip_or_raise`)."""
        try:
            return self.decode(raw)
        except BadSample as bad:
            return skip_or_raise(bad, self.on_bad_sample)

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """An undecoded sample -> ``{"image", "caption"}``; :class:`BadSample` if it cannot be used
        (and :class:`DataError` for a missing caption under ``missing_caption="error"``)."""
        where = f"{raw['__url__']}:{raw['__key__']}"
        ext = next((e for e in _IMAGE_KEYS if e in raw), None)
        caption = self._caption(raw, where)
        if raw["__url__"] in self._damaged and (ext is None or not caption):
            raise BadSample("truncated", f"{where}: the last sample of a damaged shard, cut mid-way")
        if ext is None:
            raise BadSample("no_image", f"{where}: no image (.{', .'.join(_IMAGE_KEYS)}) under this key")
        if not caption and self.missing_caption != "empty":
            if self.missing_caption == "error":
                raise DataError(
                    f"{where}.{ext} has no caption (no {raw['__key__']}.txt, and no 'caption' or 'text' "
                    "in its .json): fix the shard, or set data.missing_caption=skip (drop such samples) "
                    "or data.missing_caption=empty (train them unconditionally)"
                )
            raise BadSample("no_caption", f"{where}.{ext} has no caption")
        try:
            image = decode_image(raw[ext], self.resolution, name=f"{where}.{ext}")
        except DataError as e:
            raise BadSample("corrupt", str(e)) from e
        return {"image": image, "caption": caption}


class ShardSamples(IterableDataset):
    """The samples of ``shards`` in order (no split by rank or worker), :class:`Skipped` for
    the dropped ones: what encoding one shard at a time and reading a held-out set read."""

    def __init__(self, samples: WebDatasetSamples, shards: Sequence[str]):
        self.samples, self.shards = samples, list(shards)

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        self.samples.newly_damaged()  # damage found before (in an earlier read) is not this read's
        for raw in self.samples.records(self.shards):
            yield self.samples.decode_or_skip(raw)
        yield from self.samples.newly_damaged()


def readable_samples(
    dataset: Dataset | WebDatasetSamples, num: int, on_bad_sample: str = "skip"
) -> tuple[list[dict[str, Any]], SkipCounter]:
    """The first ``num`` usable samples of a map-style dataset or of every shard of a
    :class:`WebDatasetSamples` (in order, not split by process), and the counts of those dropped
    on the way by reason: for small held-out sets, read once and kept."""
    if isinstance(dataset, WebDatasetSamples):
        items: Iterator[dict[str, Any] | Skipped] = iter(ShardSamples(dataset, dataset.shards))
    else:
        tolerant = Tolerant(dataset, on_bad_sample)
        items = (tolerant[i] for i in range(len(dataset)))
    samples: list[dict[str, Any]] = []
    skipped = SkipCounter()
    for item in items:
        if len(samples) == num:
            break
        if isinstance(item, Skipped):
            skipped.record([item])
        else:
            samples.append(item)
    return samples, skipped


# --------------------------------------------------------------------------------------
# From the config
# --------------------------------------------------------------------------------------


def has_heldout(data_cfg: DataConfig) -> bool:
    """Whether ``data_cfg`` has a held-out split (always for shapes: scenes of another seed)."""
    return data_cfg.kind == "shapes" or bool(data_cfg.eval_path or data_cfg.eval_fraction)


def _config_shards(data_cfg: DataConfig, split: str) -> list[str]:
    """The shards of ``split`` ('train' or 'eval') of a WebDataset config."""
    try:
        shards = expand_shards(os.path.expanduser(data_cfg.path))
    except DataError as e:
        raise ConfigError(f"config key 'data.path': {e}") from e
    if not data_cfg.eval_fraction:
        return shards
    try:
        held = heldout_names(shards, data_cfg.eval_fraction)
    except DataError as e:
        raise ConfigError(f"config key 'data.eval_fraction' over the shards of data.path: {e}") from e
    return [s for s in shards if (s in held) == (split == "eval")]


def _eval_path_dataset(data_cfg: DataConfig) -> Dataset | WebDatasetSamples:
    """``data.eval_path``: an image folder if it is a directory, else WebDataset shards."""
    path = os.path.expanduser(data_cfg.eval_path)
    try:
        if os.path.isdir(path):
            return ImageFolderDataset(path, data_cfg.resolution, data_cfg.missing_caption)
        return WebDatasetSamples(path, data_cfg.resolution, data_cfg.missing_caption, 0, data_cfg.seed, data_cfg.on_bad_sample)
    except DataError as e:
        raise ConfigError(f"config key 'data.eval_path': {e}") from e


def build_dataset(data_cfg: DataConfig, split: str = "train") -> Dataset | WebDatasetSamples:
    """The dataset ``data.kind`` names: ``shapes``, ``folder`` or ``webdataset``.

    Real data has the splits ``train`` and ``eval`` (held out: ``data.eval_path``, or the
    ``data.eval_fraction`` of files or shards that ``train`` then leaves out).
    """
    if data_cfg.kind == "shapes":
        return ShapesDataset.from_config(data_cfg, split=split)
    if data_cfg.kind not in ("folder", "webdataset"):
        raise ConfigError(f"config key 'data.kind' is {data_cfg.kind!r}; choose one of shapes, folder, webdataset")
    if split not in ("train", "eval"):
        raise ConfigError(
            f"data.kind={data_cfg.kind} has the splits 'train' and 'eval', not {split!r} "
            "(attribute hold-outs come with data.kind=shapes)"
        )
    if not data_cfg.path:
        raise ConfigError(
            "config key 'data.path' is empty; set it to an image folder (data.kind=folder) or to "
            "tar shards such as 'shards/{00000..00099}.tar' (data.kind=webdataset)"
        )
    if data_cfg.eval_path and data_cfg.eval_fraction:
        raise ConfigError("config keys 'data.eval_path' and 'data.eval_fraction' are both set; keep one of them")
    if split == "eval" and not has_heldout(data_cfg):
        raise ConfigError(
            f"data.kind={data_cfg.kind} has no held-out split: set data.eval_fraction (e.g. 0.05, a share of the "
            f"{'files' if data_cfg.kind == 'folder' else 'shards'}) or data.eval_path (a separate folder or shards)"
        )
    if split == "eval" and data_cfg.eval_path:
        return _eval_path_dataset(data_cfg)
    if data_cfg.kind == "folder":
        root = Path(data_cfg.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"config key 'data.path': image folder {root} not found")
        return ImageFolderDataset(root, data_cfg.resolution, data_cfg.missing_caption, data_cfg.eval_fraction, split)
    return WebDatasetSamples(
        _config_shards(data_cfg, split),
        data_cfg.resolution,
        data_cfg.missing_caption,
        data_cfg.shuffle_buffer if split == "train" else 0,
        data_cfg.seed,
        data_cfg.on_bad_sample,
    )
