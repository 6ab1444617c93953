"""Pre-tokenized datasets: encode images once into code shards, read them back memory-mapped.

    python -m vqgen.data encode --tokenizer runs/shapes/tokenizer --data configs/shapes.yaml --out runs/shapes/codes
    accelerate launch -m vqgen.data encode ...        # rank r encodes shards r, r + world, ...

Layout of ``--out``::

    meta.json             grid, codebook size, dtype, sources, count, tokenizer path + sha256, data config
    codes-00000.npy       [n, h, w] uint16 (int32 for codebooks over 65,536 codes), memory-mappable
    captions-00000.json   the n captions of that shard, in order
    skipped-00000.json    samples of that shard dropped as unusable, by reason (only if any)
    ...

Code shard ``k`` holds the usable images among source images ``[k * shard_size, (k + 1) *
shard_size)`` of a map-style dataset (shapes, an image folder), or of tar shard ``k`` of a
WebDataset (in the shard's order); an unreadable image or a missing caption (under
``data.missing_caption=skip``) is dropped, never replaced, so ``count`` (the images encoded)
is known once every shard is written. A shard is finished when its ``.npy`` exists (it is
renamed into place after its captions), so an interrupted run resumes by skipping finished
shards. ``meta.json`` is rewritten with ``"complete": true``, the count and the skipped totals
once every shard exists; ``CodeShards`` refuses an incomplete directory. Transformer training
reads ``CodeShards`` and never runs the tokenizer encoder.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vqgen.config import ConfigError, DataConfig, load_config
from vqgen.data.loaders import (
    ShardSamples,
    SkipCounter,
    Tolerant,
    WebDatasetSamples,
    build_dataset,
    collate_usable,
)
from vqgen.files import atomic_write, atomic_write_text, file_digest
from vqgen.progress import progress_bar

FORMAT = "vqgen-codes/1"
META = "meta.json"
# the data settings that decide which images (and captions) get encoded, in which order
IMAGE_KEYS = (
    "kind", "resolution", "seed", "num", "min_objects", "max_objects", "holdout", "path", "missing_caption",
    "eval_path", "eval_fraction",
)  # fmt: skip


class CodeShardsError(RuntimeError):
    """A code-shard directory that is missing, incomplete, or made by another tokenizer/data."""


def codes_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"codes-{shard:05d}.npy"


def captions_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"captions-{shard:05d}.json"


def code_dtype(codebook_size: int) -> np.dtype:
    """The narrowest array dtype that holds every code: uint16 up to 65,536 codes."""
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save``, written to a temporary name and renamed into place."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def skipped_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"skipped-{shard:05d}.json"


def source_dataset(data_cfg: DataConfig) -> Dataset:
    """The training images to pre-tokenize: shapes scenes ``0..data.num-1``, an image folder's
    training split, or the training shards of a WebDataset (a ``WebDatasetSamples``)."""
    return build_dataset(dataclasses.replace(data_cfg, shuffle_buffer=0), "train")


def _shard_loader(dataset: Dataset, shard: int, shard_size: int, batch_size: int, data_cfg: DataConfig) -> DataLoader:
    """Batches (``collate_usable``) of the source images of code shard ``shard``."""
    if isinstance(dataset, WebDatasetSamples):  # one tar shard: one reader, decoding ahead in a worker
        source, workers = ShardSamples(dataset, [dataset.shards[shard]]), min(1, data_cfg.num_workers)
    else:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        source, workers = Subset(Tolerant(dataset, data_cfg.on_bad_sample), indices), data_cfg.num_workers
    return DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=collate_usable)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _check_meta(out_dir: Path, expected: dict[str, Any]) -> None:
    """Refuse to mix shards of another tokenizer, dataset or shard size into ``out_dir``."""
    existing = json.loads((out_dir / META).read_text())
    keys = ("format", "grid", "codebook_size", "tokenizer_sha256", "sources", "shard_size", "data")
    differ = [k for k in keys if existing.get(k) != expected[k]]
    if differ:
        raise CodeShardsError(
            f"{out_dir} already holds codes made with different {', '.join(differ)} "
            f"(e.g. {differ[0]}: {existing.get(differ[0])!r} there vs {expected[differ[0]]!r} now); "
            "pick another --out or delete that directory"
        )


def encode_dataset(
    tokenizer_dir: str | Path,
    data_cfg: DataConfig,
    out_dir: str | Path,
    shard_size: int = 4096,
    batch_size: int = 256,
    accelerator=None,
) -> dict[str, Any]:
    """Encode ``data_cfg``'s training images into code shards under ``out_dir``.

    With an ``accelerate`` Accelerator of ``world`` processes, rank ``r`` encodes shards
    ``r, r + world, ...``. Finished shards are skipped. Returns this process's counts of
    ``encoded`` and ``skipped`` shards, ``num_shards``, and (from the main process) the
    ``count`` of images encoded and the ``skipped_samples`` by reason.
    """
    # only encoding needs these: `python -m vqgen.data shapes` and readers of code shards need not load them
    from accelerate import Accelerator

    from vqgen.tokenizer import VQTokenizer

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    accelerator = accelerator or Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tokenizer = VQTokenizer.from_pretrained(tokenizer_dir, device=accelerator.device)
    if data_cfg.resolution != tokenizer.resolution:
        raise ConfigError(
            f"data.resolution is {data_cfg.resolution} but the tokenizer in {tokenizer_dir} encodes "
            f"{tokenizer.resolution}px images; pass data.resolution={tokenizer.resolution}"
        )
    dataset = source_dataset(data_cfg)
    streamed = isinstance(dataset, WebDatasetSamples)
    sources: int | list[str] = dataset.shards if streamed else len(dataset)
    if not sources:
        raise ValueError(f"the dataset (data.kind={data_cfg.kind}) is empty; nothing to encode")
    num_shards = len(sources) if streamed else -(-sources // shard_size)
    dtype = code_dtype(tokenizer.codebook_size)
    meta = {
        "format": FORMAT,
        "grid": list(tokenizer.grid),
        "codebook_size": tokenizer.codebook_size,
        "dtype": dtype.name,
        "sources": sources,  # source images, or the tar shards (one code shard each)
        "shard_size": None if streamed else shard_size,
        "num_shards": num_shards,
        "count": None,  # images encoded: known once every shard is written
        "tokenizer": str(tokenizer_dir.resolve()),
        "tokenizer_sha256": file_digest(tokenizer_dir / "model.safetensors"),
        "data": {k: getattr(data_cfg, k) for k in IMAGE_KEYS},
        "complete": False,
    }
    if accelerator.is_main_process:
        if (out_dir / META).is_file():
            _check_meta(out_dir, meta)
        else:
            atomic_write_text(out_dir / META, json.dumps(meta, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        _check_meta(out_dir, meta)

    mine = range(rank, num_shards, world)
    todo = [k for k in mine if not codes_path(out_dir, k).is_file()]
    total = None if streamed else sum(min(shard_size, sources - k * shard_size) for k in todo)
    bar = progress_bar(total=total, unit="img", desc=f"encode -> {out_dir}", disable=not accelerator.is_main_process)
    empty = np.zeros((0, *tokenizer.grid), dtype)
    for shard in todo:
        codes, captions, skipped = [empty], [], SkipCounter()  # meta.json sums every shard's counts
        for batch in _shard_loader(dataset, shard, shard_size, batch_size, data_cfg):
            skipped.record(batch["skipped"])
            if batch["image"] is not None:
                codes.append(tokenizer.encode(batch["image"].to(accelerator.device)).cpu().numpy().astype(dtype))
                captions += batch["caption"]
            bar.update(len(batch["caption"]) + len(batch["skipped"]))
        if skipped:
            atomic_write_text(skipped_path(out_dir, shard), json.dumps(skipped) + "\n")
        atomic_write_text(captions_path(out_dir, shard), json.dumps(captions) + "\n")
        save_array(codes_path(out_dir, shard), np.concatenate(codes))  # last: marks the shard done
    bar.close()

    accelerator.wait_for_everyone()
    stats: dict[str, Any] = {"encoded": len(todo), "skipped": len(mine) - len(todo), "num_shards": num_shards}
    if accelerator.is_main_process:
        missing = [k for k in range(num_shards) if not codes_path(out_dir, k).is_file()]
        if missing:
            raise CodeShardsError(f"{out_dir}: shards {missing[:10]} were not written; run the command again")
        count = sum(len(np.load(codes_path(out_dir, k), mmap_mode="r")) for k in range(num_shards))
        if count == 0:
            raise CodeShardsError(f"no image of data.path={data_cfg.path!r} could be encoded; every sample was skipped")
        skipped_samples: Counter[str] = Counter()
        for k in range(num_shards):
            if skipped_path(out_dir, k).is_file():
                skipped_samples.update(json.loads(skipped_path(out_dir, k).read_text()))
        stats |= {"count": count, "skipped_samples": dict(skipped_samples)}
        done = {**meta, "count": count, "skipped_samples": dict(skipped_samples), "complete": True}
        atomic_write_text(out_dir / META, json.dumps(done, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return stats


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


class CodeShards(Dataset):
    """Map-style view of a code-shard directory: ``ds[i] -> {"codes": LongTensor [h, w], "caption": str}``.

    Shards are memory-mapped, so opening a directory of millions of images costs only their
    captions; ``.grid``, ``.codebook_size`` and ``.captions`` (all captions, in order) describe it.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise CodeShardsError(
                f"{self.directory} has no {META}; create it with `python -m vqgen.data encode --out {self.directory} ...`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise CodeShardsError(f"{meta_path}: format {self.meta.get('format')!r} is not {FORMAT!r}")
        if not self.meta["complete"]:
            raise CodeShardsError(f"{self.directory} is incomplete; run the same encode command again to finish it")
        self.grid: tuple[int, int] = tuple(self.meta["grid"])
        self.codebook_size: int = self.meta["codebook_size"]
        self.shards: list[np.ndarray] = []
        self.captions: list[str] = []
        for k in range(self.meta["num_shards"]):
            codes = np.load(codes_path(self.directory, k), mmap_mode="r")  # [n, h, w]
            captions = json.loads(captions_path(self.directory, k).read_text())
            if codes.shape[1:] != self.grid or len(captions) != len(codes):
                raise CodeShardsError(
                    f"{codes_path(self.directory, k)} holds {codes.shape} codes and {len(captions)} captions; "
                    f"expected [n, {self.grid[0]}, {self.grid[1]}] with one caption each. Delete it and re-run encode."
                )
            self.shards.append(codes)
            self.captions += captions
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        if self.offsets[-1] != self.meta["count"]:
            raise CodeShardsError(f"{self.directory}: shards hold {self.offsets[-1]} items, meta.json says {self.meta['count']}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"CodeShards index {index} out of range for {len(self)} items")
        shard = bisect.bisect_right(self.offsets, index) - 1
        codes = torch.from_numpy(self.shards[shard][index - self.offsets[shard]].astype(np.int64))  # [h, w]
        return {"codes": codes, "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"CodeShards({str(self.directory)!r}, n={len(self)}, grid={self.grid}, codebook_size={self.codebook_size})"


# --------------------------------------------------------------------------------------
# CLI: python -m vqgen.data encode --tokenizer DIR --data CONFIG [overrides] --out DIR
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory (config.json + model.safetensors)")
    parser.add_argument("--data", type=Path, required=True, help="config file whose data section names the images")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the code shards")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.num=50000")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.data, args.overrides)
    stats = encode_dataset(args.tokenizer, cfg.data, args.out, args.shard_size, args.batch_size)
    dropped = ", ".join(f"{n} {reason}" for reason, n in stats.get("skipped_samples", {}).items())
    print(
        f"{args.out}: {stats['encoded']} shards encoded, {stats['skipped']} already done, {stats['num_shards']} in all"
        + (f"; {stats['count']} images" if "count" in stats else "")
        + (f" (skipped: {dropped})" if dropped else "")
    )
