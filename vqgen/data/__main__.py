"""Data tools: ``python -m vqgen.data <command> ...``.

    python -m vqgen.data shapes --num 64 --seed 0 --resolution 32 --objects 2 --out samples/
        writes 000000.png, 000001.png, ... and prompts.txt (one caption per line, same order)
    python -m vqgen.data encode --tokenizer DIR --data CONFIG --out DIR [key=value ...]
        pre-tokenizes a dataset into code shards (see vqgen.data.codes)
    python -m vqgen.data photos --out DIR [--shards]
        scikit-image's colour photographs as captioned crops, train and held-out cut from
        different photographs (see vqgen.data.photos)

Each command is a ``Command(help, add_arguments, run)`` in ``COMMANDS``; adding one takes
an entry and two functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from vqgen.data import codes, photos
from vqgen.data.shapes import ShapesDataset, render_scene
from vqgen.files import atomic_write_text
from vqgen.progress import progress_bar


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32, help="square side in pixels (>= 24)")
    parser.add_argument("--objects", type=int, help="exactly this many objects per image")
    parser.add_argument("--min-objects", type=int, help="fewest objects per image (default 1)")
    parser.add_argument("--max-objects", type=int, help="most objects per image (default max(2, min))")
    parser.add_argument("--split", choices=("train", "holdout"), default="train")
    parser.add_argument(
        "--holdout", nargs="*", default=[], metavar="SPEC",
        help='attribute combinations kept out of the train split, e.g. "green triangle" "center"',
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def run_shapes(args: argparse.Namespace) -> None:
    if args.objects is not None:
        if args.min_objects is not None or args.max_objects is not None:
            raise ValueError("give either --objects or --min-objects/--max-objects, not both")
        lo = hi = args.objects
    else:
        lo = 1 if args.min_objects is None else args.min_objects
        hi = max(2, lo) if args.max_objects is None else args.max_objects
    dataset = ShapesDataset(args.num, args.seed, args.resolution, lo, hi, args.holdout, args.split)
    args.out.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in progress_bar(range(len(dataset)), desc=f"shapes -> {args.out}", unit="img"):
        scene, caption = dataset.scene_and_caption(i)
        render_scene(scene, args.resolution).save(args.out / f"{i:06d}.png")
        captions.append(caption)
    atomic_write_text(args.out / "prompts.txt", "".join(c + "\n" for c in captions))
    print(f"wrote {len(captions)} images and prompts.txt to {args.out}")


COMMANDS: dict[str, Command] = {
    "shapes": Command("render captioned-shapes images and prompts.txt", add_shapes_arguments, run_shapes),
    "encode": Command("pre-tokenize a dataset into code shards", codes.add_arguments, codes.run),
    "photos": Command(
        "scikit-image's photographs as a captioned image folder (and shards), held out by photograph",
        photos.add_arguments,
        photos.run,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqgen.data", description="vqgen data tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except ValueError as e:  # bad settings: one clear line, not a traceback
        parser.exit(2, f"python -m vqgen.data {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
