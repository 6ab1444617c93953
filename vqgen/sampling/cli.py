"""``python sample.py``: images for prompts from a trained transformer, as a captioned grid.

    python sample.py --checkpoint runs/demo/transformer --prompt "a big red circle in the top left" --out grid.png
    python sample.py --checkpoint runs/demo --prompts prompts.txt --num 4 --cfg 1.5 --out grid.png --out-dir images/

Under ``accelerate launch`` the prompts are split across processes and the grid is assembled
by the main process. Image ``i`` of a prompt always uses seed ``--seed + i``, so the images do
not depend on the batch or the number of processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqgen.checkpoint import CheckpointError
from vqgen.data.prompts import read_prompts


def transformer_dir(path: Path) -> Path:
    """Accept a transformer checkpoint or a run directory holding ``transformer/``."""
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="transformer checkpoint dir (or a run dir)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the one the transformer was trained with)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", type=Path, help="file with one prompt per line")
    p.add_argument("--num", type=_positive(int), default=4, help="images per prompt (default 4)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-schedule", default="constant", help="guidance schedule over the tokens")
    p.add_argument("--temperature", type=_positive(float), default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive(int), default=32, help="prompts per sampling batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")
    p.add_argument("--out", type=Path, required=True, help="captioned grid PNG")
    p.add_argument("--out-dir", type=Path, help="also write every image as PNG here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from vqgen.eval.grid import save_grid, to_pil
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.text import PromptError

    state = PartialState()
    try:
        prompts = args.prompt if args.prompt else read_prompts(args.prompts)
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise PromptError(f"prompt {i + 1} is empty; give text to condition on")
        pipeline = Pipeline.from_pretrained(transformer_dir(args.checkpoint), args.tokenizer, device=state.device, ema=args.ema)
        pipeline.encoder.encode(prompts)  # every prompt checked (length, emptiness) before any sampling
        indices = list(range(len(prompts)))
        with state.split_between_processes(indices) as mine:
            images = []
            if mine:
                _, tensors = pipeline([prompts[i] for i in mine], num_images=args.num, seed=args.seed,
                                      batch_size=args.batch_size, progress=state.is_main_process,
                                      cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, compile=args.compile)
                images = to_pil(tensors)
        images = gather_object(images) if state.num_processes > 1 else images  # prompt-major order kept
    except (CheckpointError, PromptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.is_main_process:
        captions = [p for p in prompts for _ in range(args.num)]
        save_grid(images, captions, args.out, ncol=args.num)
        if args.out_dir:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(images):
                image.save(args.out_dir / f"{k // args.num:04d}_{k % args.num:02d}.png")
        print(f"wrote {len(images)} images for {len(prompts)} prompts: {args.out}"
              + (f" and {args.out_dir}/" if args.out_dir else ""))
    return 0
