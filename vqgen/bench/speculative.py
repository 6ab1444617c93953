"""Speculative against plain decoding on a trained model: forwards, wall clock, adherence.

    python -m vqgen.bench speculative --checkpoint runs/demo/transformer \
        --prompts runs/demo/prompts/single.txt runs/demo/prompts/two.txt --speculative 16 --json spec.json
    python -m vqgen.bench speculative --checkpoint runs/photos_target/transformer --draft runs/photos_draft/transformer --speculative 4 ...

With ``--draft DIR`` a third sampler joins: the draft model proposes each window of W codes
(``generate(..., draft=)``), beside plain decoding and Jacobi self-drafting at the same W;
the report gives each one's forwards per image (the target's; the draft takes W steps per
window) and wall clock, and the ratios plain / Jacobi, plain / draft and Jacobi / draft.

Each prompts file is a set, named by its stem (the demo writes its evaluation sets, fresh
captions none of which it trained on, to ``<run>/prompts/``). Both samplers use the
checkpoint's sampling settings, or the flags' (speculative: W = 16 unless ``--speculative``
says otherwise), one image per prompt at the same seed. Both generate every prompt's image,
at batch 1 and at batch 8, chunk by chunk in alternating order, so a slower stretch of a
shared machine slows both. Only the transformer's decoding is timed (text encoding and the
VQ decoder cost the same for both). Images do not depend on the batch, so adherence is scored
once per sampler and set, with its standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgen.bench.sampling import device_name
from vqgen.data.prompts import read_prompt_sets
from vqgen.eval.scene import adherence
from vqgen.files import atomic_write_text
from vqgen.sampling import generate, sampling_options
from vqgen.sampling.cli import add_setting_arguments, overrides, positive_int
from vqgen.sampling.pipeline import Pipeline

BATCHES = (1, 8)
WINDOW = 16  # the bench's speculative window unless --speculative sets one
LABELS = {"plain": "plain", "spec": "speculative", "draft": "draft"}  # the samplers; "draft" with --draft


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def run_speculative_bench(
    checkpoint: Path, prompt_sets: dict[str, list[str]], changes: dict[str, Any] | None = None,
    threads: int | None = None, device: str | None = None,
) -> dict[str, Any]:
    """Plain decoding against ``speculative=W`` on ``prompt_sets`` (name -> prompts) -> the
    JSON-ready result. ``changes`` replace some of the checkpoint's sampling settings; W is
    the resulting ``speculative``, which must be >= 1; a ``speculative_draft`` adds the draft
    sampler at the same W."""
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint} holds no config.json; give a transformer checkpoint directory")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        return _run(checkpoint, prompt_sets, changes or {}, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def _run(checkpoint: Path, sets: dict[str, list[str]], changes: dict[str, Any], device: str) -> dict[str, Any]:
    pipeline = Pipeline.from_pretrained(checkpoint, device=device)
    model = pipeline.transformer
    settings = pipeline.settings(**changes, num_images=1)
    if settings.speculative < 1:
        raise ValueError(f"--speculative must be >= 1 (the window compared with plain decoding), got {settings.speculative}")
    options = sampling_options(settings)
    if settings.lossy:
        options["neighbours"] = pipeline.code_neighbours(settings.speculative_neighbours)
    samplers = {"plain": dict(speculative=0), "spec": dict(speculative=settings.speculative)}
    if settings.speculative_draft:
        samplers["draft"] = dict(speculative=settings.speculative, draft=pipeline.draft(settings.speculative_draft))
    names = tuple(samplers)

    result: dict[str, Any] = {
        "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "checkpoint": str(checkpoint), "window": settings.speculative,
        "prior": settings.speculative_prior, "grid": list(model.cfg.grid), "vocab": model.cfg.vocab_size,
        "draft": settings.speculative_draft, "lossy": settings.lossy,
        "settings": dataclasses.asdict(settings), "num_prompts": {name: len(prompts) for name, prompts in sets.items()},
        "sets": {},
    }
    seconds = {(b, name): 0.0 for b in BATCHES for name in names}
    forwards = {name: [] for name in names}
    for set_name, prompts in sets.items():
        text, mask = pipeline.encoder.encode(prompts)  # [P, L, d], [P, L]

        def run(name: str, chunk: slice) -> tuple[Tensor, Tensor]:
            valid = mask[chunk].any(0)  # the chunk's own text length, as Pipeline does
            return generate(model, text[chunk][:, valid].to(device), mask[chunk][:, valid].to(device),
                            return_forwards=True, **(options | samplers[name]))

        for name in names:  # warm-up (first calls allocate caches)
            run(name, slice(0, max(BATCHES)))
        per_set: dict[str, dict[str, Any]] = {name: {} for name in names}
        for b in BATCHES:
            codes: dict[str, list[Tensor]] = {name: [] for name in names}
            for i, start in enumerate(range(0, len(prompts), b)):
                chunk = slice(start, start + b)
                for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
                    elapsed, (c, f) = _timed(lambda: run(name, chunk), model.bos.device)
                    seconds[b, name] += elapsed
                    per_set[name][f"seconds_b{b}"] = per_set[name].get(f"seconds_b{b}", 0.0) + elapsed
                    codes[name].append(c)
                    if b == BATCHES[0]:
                        forwards[name].append(f)
                        per_set[name].setdefault("forwards", []).append(f)
            if b == BATCHES[0]:
                first_codes = {name: torch.cat(codes[name]) for name in names}
            else:  # each image is the same at every batch size
                per_set["batch_independent"] = all(torch.equal(first_codes[n], torch.cat(codes[n])) for n in names)
            times = ", ".join(f"{LABELS[name]} {per_set[name][f'seconds_b{b}']:.1f} s" for name in names)
            print(f"  {set_name} batch {b}: {times}", file=sys.stderr, flush=True)
        for name in names:
            images = pipeline.tokenizer.decode(first_codes[name]).clamp(-1, 1)
            exact = adherence(images, prompts)["exact"]
            f = torch.cat(per_set[name].pop("forwards")).double()
            per_set[name] |= {"exact": exact, "exact_se": _standard_error(exact, len(prompts)),
                              "forwards_per_image": float(f.mean())}
            result[f"exact_{set_name}_{name}"] = exact
            result[f"exact_{set_name}_{name}_se"] = _standard_error(exact, len(prompts))
        result["sets"][set_name] = per_set

    mean_forwards = {name: float(torch.cat(forwards[name]).double().mean()) for name in names}
    result["forwards_per_image"] = mean_forwards
    result["passes_ratio_b1"] = mean_forwards["plain"] / mean_forwards["spec"]
    if "draft" in names:  # draft against plain, and against Jacobi at the same W
        result["passes_ratio_b1_draft"] = mean_forwards["plain"] / mean_forwards["draft"]
        result["passes_ratio_b1_draft_vs_jacobi"] = mean_forwards["spec"] / mean_forwards["draft"]
    for b in BATCHES:
        result[f"seconds_b{b}"] = {name: seconds[b, name] for name in names}
        result[f"wall_ratio_b{b}"] = seconds[b, "plain"] / seconds[b, "spec"]
        if "draft" in names:
            result[f"wall_ratio_b{b}_draft"] = seconds[b, "plain"] / seconds[b, "draft"]
            result[f"wall_ratio_b{b}_draft_vs_jacobi"] = seconds[b, "spec"] / seconds[b, "draft"]
    return result


def format_report(r: dict[str, Any]) -> str:
    sizes = ", ".join(f"{n} {name}" for name, n in r["num_prompts"].items())
    names = tuple(r["forwards_per_image"])
    fw = r["forwards_per_image"]
    lines = [
        f"{r['device']}, {r['threads']} threads, torch {r['torch']}; grid {r['grid'][0]}x{r['grid'][1]}, "
        f"vocab {r['vocab']}, window {r['window']} ({r['prior']} prior), prompts: {sizes}",
        *([f"draft model: {r['draft']}"] if r.get("draft") else []),
        *([f"LOSSY: {r['lossy']}: the speculative samplers leave the model's distribution"] if r.get("lossy") else []),
        f"forwards per image: plain {fw['plain']:.1f}, speculative {fw['spec']:.2f} ({r['passes_ratio_b1']:.2f}x fewer)"
        + (f", draft {fw['draft']:.2f} ({r['passes_ratio_b1_draft']:.2f}x fewer; "
           f"{r['passes_ratio_b1_draft_vs_jacobi']:.2f}x Jacobi's)" if "draft" in names else ""),
    ]
    for b in BATCHES:
        sec = r[f"seconds_b{b}"]
        line = f"batch {b}: plain {sec['plain']:.1f} s, speculative {sec['spec']:.1f} s ({r[f'wall_ratio_b{b}']:.2f}x)"
        if "draft" in names:
            line += (f", draft {sec['draft']:.1f} s ({r[f'wall_ratio_b{b}_draft']:.2f}x; "
                     f"{r[f'wall_ratio_b{b}_draft_vs_jacobi']:.2f}x Jacobi's)")
        lines.append(line)
    for name in r["sets"]:
        shown = ", ".join(f"{LABELS[s]} {r[f'exact_{name}_{s}']:.1%} ± {r[f'exact_{name}_{s}_se']:.1%}" for s in names)
        lines.append(f"exact match, {name}: {shown}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained transformer checkpoint directory")
    parser.add_argument("--prompts", type=Path, nargs="+", required=True, metavar="FILE",
                        help="prompt sets, one text file each (one prompt per line), named by the file's stem; "
                        "their prompts must be scene captions (adherence is scored with the scene checker)")
    parser.add_argument("--num-prompts", type=positive_int, help="the first N prompts of each set (default: all)")
    add_setting_arguments(parser, skip=("num_images",))  # one image per prompt
    parser.set_defaults(speculative=WINDOW)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here as JSON")


def run(args: argparse.Namespace) -> None:
    sets = read_prompt_sets(args.prompts, args.num_prompts)
    result = run_speculative_bench(args.checkpoint, sets, overrides(args), args.threads, args.device)
    print(format_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
