"""``python train.py {tokenizer,transformer,distill,demo}`` (also under ``accelerate launch``).

    python train.py tokenizer   --config configs/natural_f16_vq.yaml [key=value ...] [--out DIR]
    python train.py transformer --config configs/natural_t2i_B.yaml [key=value ...] [--out DIR]
    python train.py distill     --config configs/shapes.yaml training.distill.teacher=runs/shapes [model.dim=64 ...]
    python train.py demo [--out runs/demo] [--config configs/shapes.yaml] [key=value ...]

``distill`` trains a student transformer (``model.*``, or the checkpoint
``training.distill.student``) on a teacher's logits into ``<out_dir>/student``, an ordinary
transformer export (see ``vqgen.train.distill``).

``tokenizer``, ``transformer`` and ``distill`` need ``--config``: every experiment is a file (the defaults
behind it are neutral, see ``python -m vqgen.config FILE`` for what it resolves to). ``demo``
runs the CPU demo of ``configs/shapes.yaml`` unless given another config. Every run resumes
from its latest checkpoint when started again with the same output directory; a resumed run
refuses config changes that would alter it (only lengths, intervals and reporting may change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqgen.checkpoint import CheckpointError
from vqgen.config import Config, ConfigError, TrainConfig, field_choices, resolve_run
from vqgen.train import TrainingError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("tokenizer", "train the VQ tokenizer (out: <out_dir>/tokenizer)"),
        ("transformer", "train the transformer on the tokenizer's codes (out: <out_dir>/transformer)"),
        ("distill", "train a student transformer on a teacher's logits (out: <out_dir>/student)"),
        ("demo", "tokenizer + transformer + samples + adherence report on the shapes set"),
    ]:
        p = sub.add_parser(name, help=help_)
        if name == "demo":
            p.add_argument("--config", type=Path, help="experiment YAML (default: configs/shapes.yaml, the CPU demo)")
        else:
            p.add_argument("--config", type=Path, required=True,
                           help="experiment YAML, e.g. configs/shapes.yaml (print what it resolves to: python -m vqgen.config FILE)")
        p.add_argument("--out", type=Path, help="output directory (default: the config's out_dir, or runs/demo)")
        p.add_argument("--report-to", choices=field_choices(TrainConfig, "report_to"), help="experiment tracking (wandb runs offline by default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.transformer.lr=1e-3")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """The run's config; ``python -m vqgen.config`` prints the same resolution."""
    path, out = args.config, args.out
    if args.command == "demo" and path is None:
        from vqgen.train.demo import demo_config_path

        path, out = demo_config_path(), out or Path("runs/demo")
    return resolve_run(path, args.overrides, out, args.report_to)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = resolve(args)
        out = Path(cfg.out_dir)
        if args.command == "tokenizer":
            from vqgen.train.tokenizer import train_tokenizer

            metrics = train_tokenizer(cfg, out / "tokenizer")
        elif args.command == "transformer":
            from vqgen.train.transformer import train_transformer

            metrics = train_transformer(cfg, out / "transformer")
        elif args.command == "distill":
            from vqgen.train.distill import train_distill

            metrics = train_distill(cfg, out / "student")
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
        train_cfg = getattr(cfg.training, args.command)
        if metrics["stopped_early"]:
            print(f"{args.command} stopped early at step {metrics['step']} of {train_cfg.steps}: "
                  f"training.{args.command}.max_minutes={train_cfg.max_minutes} reached; the export holds step "
                  f"{metrics['step']} (run the same command again to continue): {summary}")
        else:
            print(f"{args.command} done: {summary}")
    return 0
