"""The end-to-end demo on the built-in shapes set: ``python train.py demo [--out runs/demo]``.

Stages, each timed, each resumable (run the command again after an interruption):

1. ``tokenizer``   train the VQ tokenizer, evaluate it on held-out scenes;
2. ``transformer`` encode the training scenes into codes, cache their caption embeddings,
                   train the transformer;
3. ``adherence``   sample images for fresh prompts (never training captions): single-object,
                   two-object, and held-out attribute combinations, with the sampling settings
                   saved in the transformer's checkpoint; score them with the scene checker;
                   sample and score the same scenes again, worded in the caption family
                   training never sees (``other``), with the same seeds: the wording gap;
                   measure the tokenizer on held-out scenes too, to say which model limits
                   the held-out figure;
4. ``fid``         FID of those samples against real renders of the same prompts, per set and
                   pooled, beside its ``floor`` (the renders against renders of as many other
                   scenes from the same sampler: what an independent draw of real scenes scores
                   at this set size) and ``mismatched`` (the samples against the renders of a set
                   with other object counts, ``MISMATCHED``: a generator drawing the wrong scenes);
                   skipped, with a note, without ``pip install 'vqgen[metrics]'``;
5. ``samples``     a captioned grid for a few prompts, held-out combinations included.

Everything lands under the run directory: ``tokenizer/``, ``transformer/`` (both loadable by
``sample.py`` and ``python -m vqgen.eval``), ``prompts/{single,two,heldout}.txt`` (the
evaluation prompts: ``python -m vqgen.eval adherence --checkpoint <run> --prompts
<run>/prompts/two.txt`` repeats a figure), ``samples.png`` and ``report.json``.

The tokenizer is trained on every attribute combination (it sees no captions; ``data.holdout``
holds combinations out of the transformer's training only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import vqgen
from vqgen.config import Config, ConfigError
from vqgen.data.codes import CodeShards
from vqgen.data.shapes import ShapesDataset
from vqgen.eval.fid import MetricsError, shapes_fid
from vqgen.eval.scene import image_scores, summarise
from vqgen.eval.tokenizer import evaluate_tokenizer
from vqgen.eval.wording import GAP_HEADER, compare_families, gap_line, reword
from vqgen.files import atomic_write_text
from vqgen.images import save_grid
from vqgen.sampling.pipeline import Pipeline
from vqgen.train.tokenizer import train_tokenizer
from vqgen.train.transformer import TrainingCaptions, train_transformer

DEMO_CONFIG = Path("configs") / "shapes.yaml"  # the demo's CPU settings, in the repository
EVAL_SEED = 10_000  # scenes for evaluation prompts come from a seed training never uses
EVAL_PROMPTS = 200  # per prompt set
FLOOR_SEED = 20_000  # scenes of the FID floor: the evaluation sets' samplers, drawn again from another seed
# FID's mismatched reference: each set's samples against the real renders of a set with other object counts
MISMATCHED = {"single": "two", "two": "single", "heldout": "two"}


def demo_config_path(config: Path | None = None) -> Path:
    """A shipped config (default ``configs/shapes.yaml``, the demo's) of the checkout this
    package runs from, else of the working directory."""
    what = "config" if config else "the demo's config"
    config = config or DEMO_CONFIG
    candidates = [Path(vqgen.__file__).resolve().parent.parent / config, Path.cwd() / config]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        f"{what} {config} was not found (looked in {', '.join(str(p.parent) for p in candidates)}); "
        "run from a checkout of the repository, or pass --config PATH"
    )


# evaluation set -> (fewest objects, most objects, split, seed offset); ``None`` objects: the
# config's. The demo scores the first three; ``heldout_two`` (two objects, at least one of them a
# held-out combination) is the binding table's (``python -m vqgen.bench binding``).
EVAL_SETS = {"single": (1, 1, "train", 0), "two": (2, 2, "train", 1), "heldout": (None, None, "holdout", 2),
             "heldout_two": (2, 2, "holdout", 3)}
DEMO_SETS = ("single", "two", "heldout")


def evaluation_scenes(
    cfg: Config, seed: int = EVAL_SEED, num: int = 10**9, sets: Sequence[str] = DEMO_SETS
) -> dict[str, ShapesDataset]:
    """The scene sampler of each evaluation set of ``sets`` (``EVAL_SETS``): ``single`` and ``two``
    objects from the training split; with ``data.holdout``, ``heldout`` (the config's object
    counts) and ``heldout_two`` (two objects), each scene holding a held-out combination. A set
    draws from ``seed`` plus its own offset, whichever others are asked for."""
    unknown = [name for name in sets if name not in EVAL_SETS]
    if unknown:
        raise ValueError(f"no evaluation set {', '.join(map(repr, unknown))}; choose from {', '.join(EVAL_SETS)}")
    out = {}
    for name in sets:
        lo, hi, split, offset = EVAL_SETS[name]
        if split == "holdout" and not cfg.data.holdout:
            continue
        out[name] = ShapesDataset(num=num, seed=seed + offset, resolution=cfg.data.resolution,
                                  min_objects=lo or cfg.data.min_objects, max_objects=hi or cfg.data.max_objects,
                                  holdout=cfg.data.holdout, split=split)
    return out


def evaluation_prompts(
    cfg: Config, training_captions: set[str], num: int = EVAL_PROMPTS, family: str = "train", fits=None,
    sets: Sequence[str] = DEMO_SETS,
) -> dict[str, list[str]]:
    """Fresh prompts per evaluation set of ``sets`` (``evaluation_scenes``), none of them a
    training caption, in caption family ``family``: ``train`` (the dataset's wording) or
    ``other`` (the same scenes reworded as ``python -m vqgen.eval adherence`` rewords a prompt
    file; ``fits``, a text encoder's length check, as there)."""
    if family != "train":
        train = evaluation_prompts(cfg, training_captions, num, sets=sets)
        return {name: reword(prompts, family, fits=fits) for name, prompts in train.items()}
    prompts: dict[str, list[str]] = {}
    for name, data in evaluation_scenes(cfg, sets=sets).items():
        chosen: list[str] = []
        i = 0
        while len(chosen) < num:
            _, caption = data.scene_and_caption(i)
            if caption not in training_captions and caption not in chosen:
                chosen.append(caption)
            i += 1
        prompts[name] = chosen
    return prompts


def grid_prompts(cfg: Config) -> list[str]:
    """The showcase grid: the config's prompts, or two of each evaluation set."""
    if cfg.sampling.prompts:
        return list(cfg.sampling.prompts)
    sets = evaluation_prompts(cfg, set(), num=2)
    return [p for prompts in sets.values() for p in prompts]


def heldout_limit(cfg: Config, tokenizer, generator_exact: float, num: int = EVAL_PROMPTS) -> dict:
    """Which of the two models limits the held-out adherence figure: the tokenizer's exact
    match on reconstructions of held-out scenes (``num`` of them, from the held-out prompt
    set's seed) beside the generator's exact match on held-out prompts; the lower one is the limit."""
    scenes = evaluation_scenes(cfg, num=num)["heldout"]
    tokenizer_exact = evaluate_tokenizer(tokenizer, scenes)["exact"]
    limited_by = "tokenizer" if tokenizer_exact <= generator_exact else "generator"
    verdict = (f"heldout: generator {generator_exact:.1%} exact; the tokenizer reconstructs {tokenizer_exact:.1%} of "
               f"held-out scenes exactly, so the {limited_by} limits the held-out figure")
    return {"tokenizer_exact": tokenizer_exact, "generator_exact": generator_exact, "limited_by": limited_by,
            "verdict": verdict}


def fid_line(name: str, fid: dict) -> str:
    """One printed line of the report's ``fid`` entry for a prompt set (or ``all``)."""
    line = f"FID {name:>8}: samples {fid['samples']:.1f}, floor {fid['floor']:.1f}"
    if "mismatched" in fid:
        line += f", mismatched {fid['mismatched']:.1f} (against {fid['mismatched_against']} renders)"
    return line


@contextlib.contextmanager
def stage(name: str, seconds: dict[str, float]):
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {seconds[name]:.0f} s ==", flush=True)


def run_demo(cfg: Config, out: Path) -> dict:
    """Run every stage into ``out``; returns (and writes) ``out/report.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    seconds: dict[str, float] = {}
    report: dict = {}
    print(f"vqgen demo: everything goes to {out.resolve()}")

    with stage("tokenizer", seconds):
        tok = train_tokenizer(cfg, out / "tokenizer")
    report["tokenizer"] = {k.removeprefix("eval_"): v for k, v in tok.items() if k.startswith("eval_")}
    report["tokenizer"]["training_state"] = tok["training_state"]

    with stage("transformer", seconds):
        tr = train_transformer(cfg, out / "transformer")
    report["transformer"] = {k: tr[k] for k in ("final_loss", "unigram_loss", "step", "tokens_per_s", "training_state") if k in tr}

    pipeline = Pipeline.from_pretrained(out / "transformer")  # samples with the run's sampling settings
    with stage("adherence", seconds):
        # every caption training read, augmented wordings included: no evaluation prompt is one of them
        training = set(TrainingCaptions.from_config(cfg, CodeShards(out / "transformer" / "codes")).all())
        report["adherence"], report["wording"] = {}, {}
        generated = {}  # set -> (prompts, images), for FID
        families = {"train": evaluation_prompts(cfg, training),
                    "other": evaluation_prompts(cfg, training, family="other", fits=pipeline.encoder.fits)}
        for name, prompts in families["train"].items():
            # saved, so that `python -m vqgen.eval adherence --checkpoint <out> --prompts <file>` repeats it
            atomic_write_text(out / "prompts" / f"{name}.txt", "\n".join(prompts) + "\n")
            results = {}
            for family, sets in families.items():  # the same scenes and seeds, worded both ways
                _, images = pipeline(sets[name], num_images=1, progress=True)
                targets, results[family] = image_scores(images, sets[name])
                if family == "train":
                    generated[name] = (prompts, images)
            report["adherence"][name] = summarise(targets, results["train"])
            report["wording"][name] = compare_families(targets, results)
            print(f"{name:>8}: exact {report['adherence'][name]['exact']:.1%} over {len(prompts)} prompts")
        print("wording (exact match ± s.e.; the same scenes and seeds in both caption families)")
        print(GAP_HEADER)
        for name, comparison in report["wording"].items():
            print(gap_line(name, comparison))
        two = report["wording"]["two"]
        report["wording_gap_two"] = {"gap": two["gap"], "gap_se": two["gap_se"]}
        report["sampling"] = dataclasses.asdict(pipeline.settings(num_images=1))
        if "heldout" in report["adherence"]:
            report["heldout"] = heldout_limit(cfg, pipeline.tokenizer, report["adherence"]["heldout"]["exact"])
            print(report["heldout"]["verdict"])

    with stage("fid", seconds):  # samples vs renders of their prompts, beside a floor and a mismatched reference
        others = {
            name: [data.scene_and_caption(i)[0] for i in range(len(generated[name][0]))]
            for name, data in evaluation_scenes(cfg, FLOOR_SEED).items()
        }
        partners = {name: MISMATCHED[name] for name in generated}
        try:
            report["fid"] = shapes_fid(generated, others, partners, cfg.data.resolution)
        except MetricsError as e:
            print(f"FID skipped: {e}")
        else:
            for name, fid in report["fid"].items():
                if name in partners:
                    fid["mismatched_against"] = partners[name]
                print(fid_line(name, fid))

    with stage("samples", seconds):
        prompts = grid_prompts(cfg)
        _, images = pipeline(prompts, num_images=4)
        captions = [p for p in prompts for _ in range(4)]
        save_grid(images, captions, out / "samples.png", ncol=4)

    report["seconds"] = seconds | {"total": round(sum(seconds.values()), 1)}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    for name in ("tokenizer", "transformer"):
        state = report[name]["training_state"]
        if not state["complete"]:
            print(f"\n{name}: stopped at step {state['step']} of {state['steps']} (training.{name}.max_minutes reached)")
    print("\nadherence exact: " + ", ".join(f"{k} {v['exact']:.1%}" for k, v in report["adherence"].items()))
    gap = report["wording_gap_two"]
    print(f"wording gap, two-object (other - train): {100 * gap['gap']:+.1f} ± {100 * gap['gap_se']:.1f} points")
    print(f"samples: {out / 'samples.png'}\nreport:  {out / 'report.json'}\ntotal:   {report['seconds']['total']:.0f} s")
    return report
