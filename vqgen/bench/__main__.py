"""Benchmarks: ``python -m vqgen.bench <command> ...``.

    python -m vqgen.bench sampling --size tiny --batch 8 --tokens 256 --cfg 1.5 --dtype fp32 --json tiny.json
        times the cached sampler, the full-recompute baseline and HF ``generate()`` on a GPT-2 twin,
        interleaved; ``--quantize int8`` and ``--speculative W`` add contestants
    python -m vqgen.bench speculative --checkpoint runs/demo/transformer --prompts runs/demo/prompts/two.txt --json spec.json
        speculative against plain decoding on a trained model and prompt sets: forwards, wall clock, adherence
    python -m vqgen.bench serve --checkpoint runs/demo --json serve.json
        vqgen serve under 16 concurrent clients against offline sampling at batch 32 and a sequential
        server; overload, and one client with and without speculative windows
    python -m vqgen.bench compress --out runs/compress [--quick] [--tokenizer runs/demo/tokenizer] [--demo runs/demo]
        trains the shapes teacher, prunes and distils it, and measures every row (size, tokens/s at
        batch 1 and 32, adherence, FID) into DIR/compress.json, with the targets' verdicts
    python -m vqgen.bench binding --out runs/binding [--tokenizer runs/demo/tokenizer] [--quick]
        trains the demo's transformer stage per variant (code heads, caption augmentation, ...)
        and seed, and scores each on single, two-object, held-out and reworded prompts into
        DIR/binding.json: mean and spread across seeds
    python -m vqgen.bench gpu [--checkpoint runs/demo/transformer] [--device cpu --quick]
        the GPU check: correctness, training, decode speed and serving on an accelerator,
        section by section, into gpu_check.json and gpu_check.md (see vqgen/bench/gpu.py)

Progress goes to stderr, the table to stdout, and ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from vqgen.bench import binding, compress, gpu, speculative

try:  # the serving benchmark needs the [serve] extra (fastapi, uvicorn, httpx)
    from vqgen.bench import serve
except ImportError as missing:
    serve = None
    SERVE_MISSING = f"needs the serve extra (pip install -e '.[serve]'): {missing}"
from vqgen.bench.sampling import DTYPES, FULL_RECOMPUTE_PREFIX, HF_CACHES, BenchSpec, format_table, run_sampling_bench
from vqgen.files import atomic_write_text
from vqgen.model import SIZES
from vqgen.sampling.quantize import MODES as QUANTIZE_MODES


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="model size (default tiny)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation (default 8)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image, a square grid (default 256 = 16x16)")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale; > 1 doubles the streams (default 1.5)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations, both sides")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per contestant; median reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations per contestant first")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--vocab", type=int, help="codebook size (default 1000 at tiny, 16384 otherwise)")
    parser.add_argument("--text-len", type=int, default=16, help="caption tokens (default 16)")
    parser.add_argument(
        "--no-cache-tokens", type=int, metavar="N",
        help=f"raster prefix for the full-recompute baseline (default: all tokens at tiny, {FULL_RECOMPUTE_PREFIX} above)",
    )
    parser.add_argument("--compile", action="store_true", help="also time vqgen with a torch.compile'd decode step")
    parser.add_argument(
        "--quantize", choices=list(QUANTIZE_MODES),
        help="also time an int8 copy of the vqgen model (vqgen_int8); int8 picks the device's faster kind",
    )
    parser.add_argument("--speculative", type=int, metavar="W", help="also time speculative decoding with W draft codes (vqgen_spec)")
    parser.add_argument("--skip-no-cache", dest="no_cache", action="store_false",
                        help="leave out the full-recompute baseline (no_cache, vqgen_prefix)")
    parser.add_argument("--hf-cache", choices=list(HF_CACHES), default="dynamic",
                        help="HF generate()'s cache: dynamic (default) or static (its forward compiled on GPU)")
    parser.add_argument("--dim", type=int, help="override the size's width (e.g. micro models for tests)")
    parser.add_argument("--depth", type=int, help="override the size's depth")
    parser.add_argument("--heads", type=int, help="override the size's heads")
    parser.add_argument("--seed", type=int, default=0)


def run_sampling(args: argparse.Namespace) -> None:
    fields = {f.name for f in dataclasses.fields(BenchSpec)}
    spec = BenchSpec(**{k: v for k, v in vars(args).items() if k in fields})
    result = run_sampling_bench(spec)
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


COMMANDS = {
    "sampling": ("cached sampler (fp32, int8, speculative) vs no cache vs HF generate()", add_sampling_arguments, run_sampling),
    "speculative": ("speculative vs plain decoding on a trained model", speculative.add_arguments, speculative.run),
    "serve": ("the serving load benchmark: vqgen serve under concurrent clients vs offline sampling",
              serve.add_arguments if serve else lambda p: None,
              serve.run if serve else lambda args: sys.exit(f"python -m vqgen.bench serve: {SERVE_MISSING}")),
    "compress": ("the compression table: teacher, int8, pruned, distilled students, draft speculation",
                 compress.add_arguments, compress.run),
    "binding": ("the attribute-binding table: code heads and other variants x training seeds, held-out "
                "combinations and the wording gap", binding.add_arguments, binding.run),
    "gpu": ("the GPU check: every fast path on an accelerator, section by section", gpu.add_arguments, gpu.run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqgen.bench", description="vqgen benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (description, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=description, description=description))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except ValueError as e:  # bad settings: one clear line, not a traceback
        parser.exit(2, f"python -m vqgen.bench {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
