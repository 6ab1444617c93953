"""The attribute-binding table: ``python -m vqgen.bench binding --out DIR [--tokenizer DIR] [--quick]``.

Each variant of the demo's transformer stage (``configs/shapes.yaml`` plus the variant's
overrides) is trained with every seed of ``--seeds`` on one tokenizer and one set of code
shards, then scored on the demo's fresh evaluation prompts, 200 per set:

    single       one object, training split
    two          two objects, training split
    heldout      the config's object counts, each scene holding a held-out combination
                 (``data.holdout``: never in the transformer's training)
    heldout_two  two objects, at least one of them a held-out combination
    other_two    the two-object scenes worded in the caption family training never uses
                 (``vqgen.eval.wording``), with the same seeds
    gap_two      other_two - two, per prompt (the wording gap)

The table's columns are each set's exact match, and on the held-out set the share of objects
whose colour (``heldout_colour``) and shape (``heldout_shape``) are right: which attribute a
held-out combination loses.

A variant is a name and ``key=value`` overrides. The built-in ones are the code heads
(``model.code_head``: ``softmax``, ``fsq_digits``, ``fsq_autoregressive``) and caption
augmentation on the default head (``augment2``: ``data.caption_augmentation=2``; ``orders2``:
the same with ``data.caption_attribute_orders=true``; ``fsq_digits_orders2``: that on the
``fsq_digits`` head);
``--variant NAME KEY=VALUE ...`` adds any other. The table gives each figure's mean over the
seeds and its spread (the sample standard deviation across seeds; a single seed has none).

Every run trains the steps its config gives: ``max_minutes`` is lifted, since a time limit
would make the seeds differ by how busy the machine was. A run is ``DIR/<variant>/seed<k>``;
it resumes through its checkpoints when the command is run again, and a run whose weights and
evaluation settings are unchanged keeps its figures (``DIR/binding.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqgen.bench.sampling import cpu_info
from vqgen.config import Config, resolve_run
from vqgen.data.codes import CodeShards
from vqgen.eval.scene import image_scores, summarise
from vqgen.eval.wording import compare_families
from vqgen.files import atomic_write_text, file_digest
from vqgen.sampling.pipeline import Pipeline
from vqgen.train.demo import EVAL_PROMPTS, demo_config_path, evaluation_prompts
from vqgen.train.demo import stage as timed_stage
from vqgen.train.tokenizer import train_tokenizer
from vqgen.train.transformer import TrainingCaptions, train_transformer

VARIANTS: dict[str, tuple[str, ...]] = {
    "softmax": ("model.code_head=softmax",),
    "fsq_digits": ("model.code_head=fsq_digits",),
    "fsq_autoregressive": ("model.code_head=fsq_autoregressive",),
    "augment2": ("data.caption_augmentation=2",),
    "orders2": ("data.caption_augmentation=2", "data.caption_attribute_orders=true"),
    "fsq_digits_orders2": ("model.code_head=fsq_digits", "data.caption_augmentation=2",
                           "data.caption_attribute_orders=true"),
}
DEFAULT_VARIANTS = ("softmax", "fsq_digits", "fsq_autoregressive")
SEEDS = (0, 1, 2)
SETS = ("single", "two", "heldout", "heldout_two")
# column -> (set, figure of it)
COLUMNS: dict[str, tuple[str, str]] = {name: (name, "exact") for name in (*SETS, "other_two", "gap_two")} | {
    "heldout_colour": ("heldout", "colour"), "heldout_shape": ("heldout", "shape")}
RUN_LENGTH = ("training.transformer.max_minutes=0",)  # every seed trains its steps, however busy the machine

# --quick: the same runs and measurements on tiny settings, a smoke test of seconds
QUICK = [
    "data.num=64",
    "model.dim=32", "model.depth=1", "model.heads=2", "model.kv_heads=2", "model.text_depth=0",
    *(f"training.tokenizer.{k}={v}" for k, v in
      (("steps", 4), ("batch_size", 8), ("warmup_steps", 1), ("log_every", 2), ("checkpoint_every", 2))),
    *(f"training.transformer.{k}={v}" for k, v in
      (("steps", 4), ("batch_size", 8), ("warmup_steps", 1), ("log_every", 2), ("checkpoint_every", 2))),
]  # fmt: skip
QUICK_PROMPTS = 3


@dataclass
class BindingSpec:
    """What ``python -m vqgen.bench binding`` does; ``None`` fields take their defaults (``resolve``)."""

    out: Path
    variants: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {
        name: VARIANTS[name] for name in DEFAULT_VARIANTS})
    seeds: tuple[int, ...] = SEEDS
    tokenizer: Path | None = None  # a trained shapes tokenizer to reuse (e.g. runs/demo/tokenizer)
    config: Path | None = None  # default configs/shapes.yaml (the demo's)
    prompts: int | None = None  # per set; default 200 (the demo's), 3 with --quick
    quick: bool = False
    threads: int | None = None  # torch threads while sampling; default as torch has it

    def resolve(self) -> BindingSpec:
        if not self.variants:
            raise ValueError("no variants to train; give --variants NAME ... or --variant NAME KEY=VALUE ...")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds {' '.join(map(str, self.seeds))}: give distinct seeds >= 0")
        for name, overrides in self.variants.items():
            if not name.isidentifier():
                raise ValueError(f"variant name {name!r}: use letters, digits and underscores (it names a directory)")
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"variant {name}: {', '.join(map(repr, bad))} is not KEY=VALUE")
        if self.tokenizer is not None and not (Path(self.tokenizer) / "config.json").is_file():
            raise ValueError(f"--tokenizer {self.tokenizer}: no tokenizer checkpoint there (config.json)")
        prompts = self.prompts or (QUICK_PROMPTS if self.quick else EVAL_PROMPTS)
        if prompts < 2:
            raise ValueError(f"--prompts {prompts}: a standard error needs at least 2 prompts per set")
        return dataclasses.replace(self, out=Path(self.out), prompts=prompts,
                                   config=Path(self.config) if self.config else demo_config_path())

    def overrides(self, variant: str, seed: int) -> list[str]:
        """What one run adds to the config file: the quick settings, the run length, the variant, the seed."""
        return [*(QUICK if self.quick else []), *RUN_LENGTH, *self.variants[variant],
                f"training.transformer.seed={seed}"]


@dataclass
class Run:
    """One (variant, seed): its config, its command and where its transformer lands."""

    variant: str
    seed: int
    cfg: Config
    command: list[str]
    export: Path

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    def done(self) -> bool:
        """Its checkpoint is there, every step trained, its report written."""
        config = self.export / "config.json"
        if not config.is_file():
            return False
        state = json.loads(config.read_text()).get("training_state") or {}
        return bool(state.get("complete")) and (self.export / "report.json").is_file()


def plan(spec: BindingSpec, tokenizer: Path) -> list[Run]:
    """Every run of the table, variant-major. The first run encodes the code shards; the others
    read its shards (``data.codes``) and share one text-embedding cache."""
    runs: list[Run] = []
    codes = None
    for variant in spec.variants:
        for seed in spec.seeds:
            run_dir = spec.out / variant / f"seed{seed}"
            overrides = [*spec.overrides(variant, seed), f"training.transformer.tokenizer={tokenizer}",
                         f"training.transformer.text_cache={spec.out / 'text_cache'}"]
            if codes is not None:
                overrides.append(f"data.codes={codes}")
            export = run_dir / "transformer"
            command = ["python", "train.py", "transformer", "--config", str(spec.config), "--out", str(run_dir), *overrides]
            runs.append(Run(variant, seed, resolve_run(spec.config, overrides, run_dir), command, export))
            codes = codes or export / "codes"
    return runs


def train_runs(spec: BindingSpec, runs: list[Run], tokenizer: Path) -> dict[str, float]:
    """Train the tokenizer (unless reused) and every run that is not done -> seconds of each stage run."""
    ran: dict[str, float] = {}
    if spec.tokenizer is None and not (tokenizer / "report.json").is_file():
        with timed_stage("tokenizer", ran):
            train_tokenizer(resolve_run(spec.config, QUICK if spec.quick else [], spec.out), tokenizer)
    for run in runs:
        if run.done():
            continue
        with timed_stage(run.key, ran):
            print(shlex.join(run.command), flush=True)
            train_transformer(run.cfg, run.export)
    return ran


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def prompt_sets(spec: BindingSpec, runs: list[Run], fits) -> dict[str, list[str]]:
    """The evaluation prompts every run is scored on: none is a caption any run trained on
    (augmented wordings included), so every variant sees the same scenes."""
    shards = CodeShards(runs[0].export / "codes")
    training = set().union(*(TrainingCaptions.from_config(run.cfg, shards).all() for run in runs))
    cfg = runs[0].cfg
    sets = evaluation_prompts(cfg, training, spec.prompts, sets=SETS)
    sets["other_two"] = evaluation_prompts(cfg, training, spec.prompts, family="other", fits=fits, sets=("two",))["two"]
    return sets


def score_run(run: Run, sets: dict[str, list[str]]) -> dict[str, Any]:
    """A run's figures on every set: exact match with its standard error, colour and shape
    accuracy, and the wording gap of the two-object prompts."""
    pipeline = Pipeline.from_pretrained(run.export)
    figures: dict[str, Any] = {}
    results = {}
    for name, prompts in sets.items():
        _, images = pipeline(prompts, num_images=1)
        targets, results[name] = image_scores(images, prompts)
        report = summarise(targets, results[name])
        figures[name] = {k: report[k] for k in ("exact", "exact_se", "colour", "shape")}
        if name == "two":
            two_targets = targets
    gap = compare_families(two_targets, {"train": results["two"], "other": results["other_two"]})
    figures["gap_two"] = {"exact": gap["gap"], "exact_se": gap["gap_se"]}
    return figures


def aggregate(scored: dict[str, dict[str, Any]], variants: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and column: every seed's figure, their mean and spread (the sample standard
    deviation across seeds; None with one seed)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in variants:
        seeds = {key: figures for key, figures in scored.items() if key.split("/")[0] == variant}
        table[variant] = {}
        for column, (name, figure) in COLUMNS.items():
            values = [figures[name][figure] for figures in seeds.values()]
            table[variant][column] = {
                "mean": statistics.fmean(values), "spread": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": values,
            }
    return table


def evaluation_settings(spec: BindingSpec) -> dict[str, Any]:
    """What a run's figures depend on besides its weights: a run measured otherwise is stale."""
    return {"prompts": spec.prompts, "sets": list(SETS) + ["other_two"]}


def run_binding_bench(spec: BindingSpec) -> dict[str, Any]:
    """Train what is missing, score the runs that are missing or stale -> the table (also
    ``spec.out/binding.json``), with ``trained`` and ``measured``: what this call ran."""
    spec = spec.resolve()
    spec.out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(spec.tokenizer) if spec.tokenizer else spec.out / "tokenizer"
    runs = plan(spec, tokenizer)
    trained = train_runs(spec, runs, tokenizer)
    incomplete = [run.key for run in runs if not run.done()]
    if incomplete:
        raise RuntimeError(f"runs {', '.join(incomplete)} did not finish; run the same command again to continue")

    path = spec.out / "binding.json"
    cached = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    settings = evaluation_settings(spec)
    scored: dict[str, dict[str, Any]] = {}
    measured = []
    sets = None
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads or threads)
    try:
        with torch.inference_mode():
            for run in runs:
                digest = file_digest(run.export / "model.safetensors")
                old = cached.get(run.key)
                if old and old.get("model") == digest and old.get("settings") == settings:
                    scored[run.key] = old
                    continue
                if sets is None:
                    sets = prompt_sets(spec, runs, Pipeline.from_pretrained(runs[0].export).encoder.fits)
                print(f"scoring {run.key}", file=sys.stderr, flush=True)
                scored[run.key] = score_run(run, sets) | {"model": digest, "settings": settings}
                measured.append(run.key)
    finally:
        torch.set_num_threads(threads)

    result = {
        "table": aggregate(scored, list(spec.variants)),
        "runs": cached | scored,  # runs of other variants or seeds stay, for a later call that names them
        "variants": {name: list(overrides) for name, overrides in spec.variants.items()},
        "seeds": list(spec.seeds),
        "commands": {"bench": shlex.join(bench_command(spec))} | {run.key: shlex.join(run.command) for run in runs},
        "machine": cpu_info() | {"torch": torch.__version__, "python": platform.python_version()},
    }
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result | {"trained": trained, "measured": measured}


def bench_command(spec: BindingSpec) -> list[str]:
    command = ["python", "-m", "vqgen.bench", "binding", "--out", str(spec.out)]
    if spec.quick:
        command.append("--quick")
    if spec.tokenizer:
        command += ["--tokenizer", str(spec.tokenizer)]
    builtin = [name for name, overrides in spec.variants.items() if VARIANTS.get(name) == tuple(overrides)]
    if builtin != list(DEFAULT_VARIANTS) or len(builtin) != len(spec.variants):
        command += ["--variants", *builtin] if builtin else []
        for name, overrides in spec.variants.items():
            if name not in builtin:
                command += ["--variant", name, *overrides]
    if tuple(spec.seeds) != SEEDS:
        command += ["--seeds", *map(str, spec.seeds)]
    return command


def format_table(result: dict[str, Any]) -> str:
    """Each variant's row: every column's mean ± its spread across seeds, in percent."""
    def cell(figure: dict[str, Any], signed: bool) -> str:
        mean = f"{100 * figure['mean']:+.1f}" if signed else f"{100 * figure['mean']:.1f}"
        return mean + ("" if figure["spread"] is None else f" ± {100 * figure['spread']:.1f}")

    seeds = ", ".join(map(str, result["seeds"]))
    lines = [f"exact match (held-out colour, shape: objects right) % over seeds {seeds} (mean ± spread across seeds)",
             f"{'variant':<20}" + "".join(f"{c:>15}" for c in COLUMNS)]
    for variant, row in result["table"].items():
        lines.append(f"{variant:<20}" + "".join(f"{cell(row[c], c == 'gap_two'):>15}" for c in COLUMNS))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run directory of the table's models and binding.json")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                        help=f"built-in variants (default {' '.join(DEFAULT_VARIANTS)}); "
                        + "; ".join(f"{k}: {' '.join(v)}" for k, v in VARIANTS.items()))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="one more variant: a name and its config overrides (repeat for more)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                        help=f"training seeds (training.transformer.seed) of every variant (default {' '.join(map(str, SEEDS))})")
    parser.add_argument("--tokenizer", type=Path, help="reuse a trained shapes tokenizer, e.g. runs/demo/tokenizer")
    parser.add_argument("--config", type=Path, help="the base config (default configs/shapes.yaml, the demo's)")
    parser.add_argument("--prompts", type=int, help=f"prompts per set (default {EVAL_PROMPTS}; --quick {QUICK_PROMPTS})")
    parser.add_argument("--threads", type=int, help="torch threads while sampling (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of seconds")


def spec_from_args(args: argparse.Namespace) -> BindingSpec:
    variants = {name: VARIANTS[name] for name in (args.variants or ([] if args.variant else DEFAULT_VARIANTS))}
    for name, *overrides in args.variant:
        if name in variants:
            raise ValueError(f"--variant {name}: a variant of that name is already given")
        variants[name] = tuple(overrides)
    return BindingSpec(out=args.out, variants=variants, seeds=tuple(args.seeds), tokenizer=args.tokenizer,
                       config=args.config, prompts=args.prompts, quick=args.quick, threads=args.threads)


def run(args: argparse.Namespace) -> None:
    try:
        result = run_binding_bench(spec_from_args(args))
    except KeyboardInterrupt as e:
        sys.exit(f"python -m vqgen.bench binding: {e or 'interrupted'}; run the same command again to resume")
    except RuntimeError as e:
        sys.exit(f"python -m vqgen.bench binding: {e}")
    print(format_table(result))
    print(f"trained: {', '.join(result['trained']) or 'nothing'}; measured: {', '.join(result['measured']) or 'nothing'}"
          f"\ntable: {Path(args.out) / 'binding.json'}", file=sys.stderr)

