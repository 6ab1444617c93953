"""``python sample.py``: images for prompts from a trained transformer.

    python sample.py --checkpoint runs/demo --prompt "a big red circle in the top left" --num 4 --out grid.png
    python sample.py --checkpoint runs/demo --prompts prompts.txt --out-dir samples/
    python sample.py --checkpoint you/vqgen-shapes --prompt "a small blue square" --out grid.png   # a Hub repo
    python sample.py --checkpoint runs/photos_target --draft runs/photos_draft --speculative 4 --prompts p.txt --out-dir s/
    accelerate launch --num_processes 8 sample.py --checkpoint runs/demo --prompts prompts.jsonl --out-dir samples/

Settings: the sampling section saved with the run (guidance, temperature, top-k/top-p, images
per prompt, seed, speculative window, prior and draft: the fields of vqgen.config.SamplingSettings)
unless a flag sets one; a JSONL prompt line may set its own under the field's name ("seed",
"cfg_scale", "num_images", ...). The effective settings are printed and saved with the images.

Seeds: image i of prompt number p (0-based) uses the seed image_seed(seed, p, i), a hash of the
three, so every (prompt, image) pair has its own noise; a JSONL line's own "seed" S gives its
image i the seed S + i. The images do not depend on the number of processes.

``--out-dir`` writes one PNG per image and ``index.jsonl`` (see ``vqgen.sampling.jobs``),
resumes a killed job, and under ``accelerate launch`` splits the work without gathering
images. ``--out`` tiles the images into one captioned grid (for small jobs). An empty prompt,
or ``--unconditional``, samples the learned null caption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image

from vqgen.checkpoint import CheckpointError
from vqgen.config import SETTINGS, ConfigError, SamplingSettings
from vqgen.files import atomic_write_text
from vqgen.images import save_grid
from vqgen.progress import progress_bar
from vqgen.sampling.jobs import Prompt, blocks, plan, read_prompt_file, run_job, sample_block
from vqgen.sampling.pipeline import Pipeline
from vqgen.sampling.quantize import MODES
from vqgen.text import PromptError


def setting_type(name: str):
    """An argparse type for sampling setting ``name``: the flag's text read as YAML (as in a
    ``sampling.<name>=...`` config override), checked by ``SamplingSettings``."""

    text_valued = typing.get_type_hints(SamplingSettings)[name] is str  # a path stays the text it is

    def parse(text: str) -> Any:
        try:
            return getattr(SamplingSettings(**{name: text if text_valued else yaml.safe_load(text)}), name)
        except (ConfigError, yaml.YAMLError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_setting_arguments(p: argparse.ArgumentParser, skip: Collection[str] = ()) -> None:
    """One flag per field of ``SamplingSettings`` but those in ``skip``: ``--{name}`` (or the
    field's own flag), its help, its choices; left unset, a flag keeps the checkpoint's value."""
    group = p.add_argument_group("sampling settings", "each left unset keeps the checkpoint's value")
    hints = typing.get_type_hints(SamplingSettings)
    for f in dataclasses.fields(SamplingSettings):
        if f.name in skip:
            continue
        flag = "--" + (f.metadata["flag"] or f.name).replace("_", "-")
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        metavar = "{" + ",".join(choices) + "}" if choices else f.metadata["metavar"]
        group.add_argument(flag, dest=f.name, type=setting_type(f.name), metavar=metavar, help=f.metadata["help"])


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line sets (flags left unset keep the checkpoint's)."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}


def describe(pipeline: Pipeline, settings: SamplingSettings, flagged: dict[str, Any]) -> str:
    """One line per fact: checkpoint, weights, settings (a * marks a value set by a flag)."""
    shown = " ".join(f"{k}={v}{'*' if k in flagged else ''}" for k, v in dataclasses.asdict(settings).items())
    lines = [f"checkpoint: {pipeline.checkpoint} (weights: {pipeline.weights})",
             f"sampling:   {shown}  (the checkpoint's; * = set on the command line)"]
    if settings.lossy:
        lines.append(f"LOSSY:      {settings.lossy}: the images do not follow the model's distribution")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="transformer checkpoint dir, a run dir, or a Hugging Face Hub repo id (owner/name[@revision])")
    p.add_argument("--tokenizer", help="tokenizer dir or Hub repo id (default: the one the transformer was trained with)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable); \"\" = unconditional")
    src.add_argument("--prompts", type=Path, help="text file (one prompt per line) or .jsonl (see above)")
    src.add_argument("--unconditional", action="store_true", help="sample the learned null caption")
    add_setting_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="images sampled and decoded at once (default 32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--quantize", choices=MODES, help="sample with int8 linear layers (see vqgen.sampling.quantize)")
    p.add_argument("--out", type=Path, help="captioned grid PNG")
    p.add_argument("--out-dir", type=Path, help="one PNG per image + index.jsonl; resumable")
    return p


def _grid(images: list, entries: list, out: Path, ncol: int, pipeline: Pipeline) -> None:
    """The captioned grid, with its tiles' prompts, seeds and settings beside it (``out.jsonl``)."""
    save_grid(images, [e.prompt or "(unconditional)" for e in entries], out, ncol=ncol)
    lines = [json.dumps({**e.record(pipeline.checkpoint, pipeline.weights), "file": out.name, "tile": k})
             for k, e in enumerate(entries)]
    atomic_write_text(out.with_suffix(".jsonl"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.out is None and args.out_dir is None:
        p.error("give --out grid.png, --out-dir DIR, or both")
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        if args.prompts:
            prompts = read_prompt_file(args.prompts)
        else:
            prompts = [Prompt(text) for text in (args.prompt or [""])]
        pipeline = Pipeline.from_pretrained(args.checkpoint, args.tokenizer, device=state.device,
                                            quantize=args.quantize)
        texts = sorted({p.text for p in prompts})
        for k in range(0, len(texts), 256):  # every prompt checked (length) before any sampling, memory flat
            pipeline.encode(texts[k : k + 256])
        flagged = overrides(args)
        entries = plan(prompts, pipeline, flagged)
        for draft in sorted({dict(e.settings)["speculative_draft"] for e in entries} - {""}):
            pipeline.draft(draft)  # loaded and checked against the transformer before any sampling
        runtime = {"compile": True} if args.compile else {}
        if state.is_main_process:
            print(describe(pipeline, pipeline.settings(**flagged), flagged))
            own = sum(bool(p.settings or p.seed is not None) for p in prompts)
            if own:
                print(f"            {own} of {len(prompts)} prompts set their own seed or settings ({args.prompts})")
            print(f"{len(entries)} images for {len(prompts)} prompts", flush=True)
        if args.out_dir:
            def progress(total: int):
                return progress_bar(total=total, unit="img", desc=f"sampling (process {state.process_index})",
                                    disable=not state.is_main_process)

            run_job(pipeline, entries, args.out_dir, args.batch_size, state, progress=progress, **runtime)
            if state.is_main_process and args.out:
                images = [Image.open(args.out_dir / e.file).convert("RGB") for e in entries]
        else:
            with state.split_between_processes(blocks(entries, args.batch_size)) as mine:
                images = []
                for block in progress_bar(mine, unit="block", desc="sampling", disable=not state.is_main_process):
                    images += sample_block(pipeline, block, **runtime)
            images = gather_object(images) if state.num_processes > 1 else images  # rank order = prompt-major
    except (CheckpointError, PromptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.is_main_process:
        if args.out:
            _grid(images, entries, args.out, max(e.image for e in entries) + 1, pipeline)
        where = " and ".join(str(x) for x in (args.out, args.out_dir) if x)
        print(f"wrote {len(entries)} images for {len(prompts)} prompts: {where}")
    return 0
