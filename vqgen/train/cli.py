"""``python train.py {tokenizer,transformer,demo}`` (also under ``accelerate launch``).

    python train.py tokenizer   --config configs/shapes.yaml [key=value ...] [--out DIR]
    python train.py transformer --config configs/shapes.yaml [key=value ...] [--out DIR]
    python train.py demo [--out runs/demo] [--config ...] [key=value ...]

Without ``--config`` the built-in defaults apply (the tiny CPU setup on the shapes set).
Every run resumes from its latest checkpoint when started again with the same output dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqgen.checkpoint import CheckpointError
from vqgen.config import Config, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("tokenizer", "train the VQ tokenizer (out: <out_dir>/tokenizer)"),
        ("transformer", "train the transformer on the tokenizer's codes (out: <out_dir>/transformer)"),
        ("demo", "tokenizer + transformer + samples + adherence report on the shapes set"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, help="experiment YAML (default: built-in tiny shapes config)")
        p.add_argument("--out", type=Path, help="output directory (default: the config's out_dir, or runs/demo)")
        p.add_argument("--report-to", choices=["none", "wandb"], help="experiment tracking (wandb runs offline by default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.transformer.lr=1e-3")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.report_to:
        overrides += [f"training.tokenizer.report_to={args.report_to}", f"training.transformer.report_to={args.report_to}"]
    if args.out:
        overrides.append(f"out_dir={args.out}")
    elif args.command == "demo" and args.config is None:
        overrides.append("out_dir=runs/demo")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vqgen.train.loop import TrainingError

    try:
        cfg = resolve(args)
        out = Path(cfg.out_dir)
        if args.command == "tokenizer":
            from vqgen.train.tokenizer import train_tokenizer

            metrics = train_tokenizer(cfg, out / "tokenizer")
        elif args.command == "transformer":
            from vqgen.train.transformer import train_transformer

            metrics = train_transformer(cfg, out / "transformer")
        else:
            from vqgen.train.demo import run_demo

            run_demo(cfg, out)
            return 0
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        return 130
    from accelerate import PartialState

    if PartialState().is_main_process:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{args.command} done: {summary}")
    return 0
