"""``python -m vqgen.compress prune --checkpoint DIR --out DIR [--heads F] [--mlp F] [--blocks N]``.

    python -m vqgen.compress prune --checkpoint runs/shapes --out runs/shapes_pruned --heads 0.5 --mlp 0.5
    python train.py distill --config configs/shapes.yaml \\
        training.distill.teacher=runs/shapes/transformer training.distill.student=runs/shapes_pruned/transformer

What is measured and removed: ``vqgen.compress.prune``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vqgen.checkpoint import CheckpointError
from vqgen.compress.prune import PruneError, PruneSpec, prune_checkpoint, summary


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="transformer export, or a run dir holding transformer/")
    p.add_argument("--out", type=Path, required=True,
                   help="new directory for the pruned export (a run dir in, a run layout out: OUT/transformer)")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of each block's heads to remove (default 0)")
    p.add_argument("--mlp", type=float, default=0.0, help="fraction of each block's SwiGLU channels to remove (default 0)")
    p.add_argument("--blocks", type=int, default=0, help="whole blocks to remove (default 0)")
    p.add_argument("--codes", type=Path, help="calibration code shards (default: those the checkpoint trained on)")
    p.add_argument("--calibration-batches", type=int, default=16, help="batches that measure importance (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="images per calibration batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="which calibration batches, which captions dropped (default 0)")
    p.add_argument("--device", help="default cuda when available, else cpu")


def run_prune(args: argparse.Namespace) -> None:
    spec = PruneSpec(heads=args.heads, mlp=args.mlp, blocks=args.blocks)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = prune_checkpoint(args.checkpoint, args.out, spec, codes=args.codes, calibration=args.calibration_batches,
                              batch_size=args.batch_size, seed=args.seed, device=device)
    print(summary(record))
    export = record["export"]
    print(f"sample it:  python sample.py --checkpoint {args.out} --prompt ... --out grid.png\n"
          f"recover it: python train.py distill --config CFG training.distill.teacher={record['source']} "
          f"training.distill.student={export}")


COMMANDS = {"prune": ("remove attention heads, SwiGLU channels and blocks by measured importance",
                      add_prune_arguments, run_prune)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqgen.compress", description="compress a trained transformer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (description, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=description, description=description))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except (PruneError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
