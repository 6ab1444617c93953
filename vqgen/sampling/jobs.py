"""Sampling at evaluation scale: a prompt list becomes one PNG per image plus ``index.jsonl``.

A job is a list of images, each a pure function of (prompt, seed, settings): ``plan`` turns
prompts (text lines or JSONL with per-prompt seeds and settings) into that list, in
prompt-major order, and ``run_job`` samples it into a folder::

    DIR/000000_000.png ...   image i of prompt p is "{p:06d}_{i:03d}.png"
    DIR/index.jsonl          one line per image, in file order:
                             {"file", "prompt", "prompt_index", "image", "seed", "settings",
                              "checkpoint", "weights"} (+ "lossy": why, for a lossy setting)
    DIR/job.json             what the folder holds (checkpoint, batch size, a fingerprint of the
                             image list): a restart with other settings is refused

The images are cut into blocks of ``batch_size`` in that order; a block is sampled and
decoded at once, so memory stays flat whatever the job's size. Every PNG is written
atomically, so a killed job leaves only whole files, and a restart samples only the blocks
that still miss a file. Under ``accelerate launch`` the missing blocks are dealt round-robin
to the processes, each writing its own files (nothing is gathered); the main process writes
``index.jsonl`` once every process is done. A block always holds the same images, so a job
gives the same bytes whatever the number of processes or restarts (a different
``batch_size`` changes float rounding, and with it an occasional code).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vqgen.config import SETTINGS, ConfigError, SamplingSettings
from vqgen.data.prompts import read_prompts
from vqgen.files import atomic_write, atomic_write_text
from vqgen.images import to_pil
from vqgen.sampling.pipeline import Pipeline, image_seed

INDEX = "index.jsonl"
MANIFEST = "job.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt of a job: its text ("" = the null caption), its own seed (image i then
    uses ``seed + i``) and settings, each overriding the command line's."""

    text: str
    seed: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ImageEntry:
    """One image of a job: everything it depends on, and its file name."""

    file: str
    prompt: str
    prompt_index: int
    image: int
    seed: int
    settings: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs, hashable: groups a block's calls

    def record(self, checkpoint: str, weights: str) -> dict[str, Any]:
        """This image's ``index.jsonl`` line; with ``"lossy"`` saying why when its settings leave
        the model's distribution (a relaxed speculative acceptance)."""
        lossy = SamplingSettings(**dict(self.settings)).lossy
        return {**asdict(self), "settings": dict(self.settings), "checkpoint": checkpoint, "weights": weights,
                **({"lossy": lossy} if lossy else {})}


def read_prompt_file(path: Path) -> list[Prompt]:
    """Prompts of a ``.jsonl`` file (one object per line: ``"prompt"``, and optionally any field
    of ``SamplingSettings``: ``"seed"``, ``"cfg_scale"``, ``"num_images"``, ...) or of a text file
    (one prompt per line)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [Prompt(text) for text in read_prompts(path)]
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    keys = ("prompt", *SETTINGS)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}: "
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}not JSON ({e})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f'{where}give an object with a "prompt" string ("" = unconditional), got {line.strip()[:80]}')
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"{where}unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
        text = entry.pop("prompt")
        try:
            checked = SamplingSettings(**entry)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        seed = checked.seed if "seed" in entry else None
        settings = tuple((key, getattr(checked, key)) for key in sorted(entry) if key != "seed")
        prompts.append(Prompt(text, seed, settings))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def plan(prompts: list[Prompt], pipeline: Pipeline, overrides: dict[str, Any]) -> list[ImageEntry]:
    """Every image of a job, prompt-major. Settings: the checkpoint's, then ``overrides`` (the
    command line's), then the prompt's own. Seeds: image i of prompt number p uses
    ``image_seed(seed, p, i)``, or ``prompt.seed + i`` when the prompt gives its own seed."""
    images = []
    for p, prompt in enumerate(prompts):
        settings = pipeline.settings(**{**overrides, **dict(prompt.settings)})
        drawn = tuple(sorted(settings.image_settings().items()))
        for i in range(settings.num_images):
            s = prompt.seed + i if prompt.seed is not None else image_seed(settings.seed, p, i)
            images.append(ImageEntry(f"{p:06d}_{i:03d}.png", prompt.text, p, i, s, drawn))
    return images


def blocks(images: list[ImageEntry], batch_size: int) -> list[list[ImageEntry]]:
    """The job cut into consecutive blocks of ``batch_size`` images (the last may be shorter)."""
    return [images[k : k + batch_size] for k in range(0, len(images), batch_size)]


def sample_block(pipeline: Pipeline, block: list[ImageEntry], **runtime: Any) -> list:
    """A block's images as PIL, in order; one ``generate`` call per distinct settings.
    ``runtime`` options (e.g. ``compile``) go to ``generate`` beside each image's settings."""
    out: list = [None] * len(block)
    for settings in dict.fromkeys(image.settings for image in block):
        rows = [k for k, image in enumerate(block) if image.settings == settings]
        _, tensors = pipeline.sample([block[k].prompt for k in rows], [block[k].seed for k in rows],
                                     **dict(settings), **runtime)
        for k, pil in zip(rows, to_pil(tensors)):
            out[k] = pil
    return out


def fingerprint(images: list[ImageEntry], checkpoint: str, batch_size: int) -> str:
    """A hash of everything a job's files depend on."""
    text = json.dumps([checkpoint, batch_size, [asdict(image) for image in images]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _claim(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``job.json``, or check that the folder's job is this one (a resume)."""
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [("prompts, seeds or settings" if k == "fingerprint" else f"{k}: {old.get(k)!r} there, {manifest[k]!r} now")
                   for k in manifest if old.get(k) != manifest[k]]
        if changed:
            raise ValueError(
                f"{out_dir} holds images of another job (differing: {'; '.join(changed)}); resume with the same "
                "prompts, settings, checkpoint and --batch-size, or use another --out-dir"
            )
        return
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


def run_job(
    pipeline: Pipeline, images: list[ImageEntry], out_dir: Path, batch_size: int, state,
    progress: Callable[[int], Any] | None = None, **runtime: Any,
) -> int:
    """Sample the ``images`` still missing in ``out_dir`` (this process's share of the blocks)
    and, on the main process, write ``index.jsonl``; returns how many images this process
    wrote. ``state`` is Accelerate's ``PartialState``; ``progress(total)`` makes a progress
    bar (``update(n)``, ``close()``)."""
    out_dir = Path(out_dir)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _claim(out_dir, {"checkpoint": pipeline.checkpoint, "weights": pipeline.weights, "batch_size": batch_size,
                         "images": len(images), "fingerprint": fingerprint(images, pipeline.checkpoint, batch_size)})
        for stale in out_dir.glob(".*.tmp"):  # left by a killed process mid-write
            stale.unlink()
    state.wait_for_everyone()
    # every process lists the same missing blocks before any of them writes a file
    todo = [block for block in blocks(images, batch_size) if not all((out_dir / im.file).is_file() for im in block)]
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    bar = progress(sum(len(block) for block in mine)) if progress else None
    for block in mine:
        for image, pil in zip(block, sample_block(pipeline, block, **runtime)):
            atomic_write(out_dir / image.file, lambda tmp, pil=pil: pil.save(tmp, format="PNG"))
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [im.file for im in images if not (out_dir / im.file).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing in {out_dir} after sampling (first: {missing[0]}); run again to resume")
        lines = [json.dumps(im.record(pipeline.checkpoint, pipeline.weights)) for im in images]
        atomic_write_text(out_dir / INDEX, "\n".join(lines) + "\n")
    return sum(len(block) for block in mine)
