"""The compression table: ``python -m vqgen.bench compress --out DIR [--quick] [--rows ROW ...]``.

One table of the shapes teacher (``configs/shapes_teacher.yaml``) and what compression makes
of it, each row measured the same way in one process:

    teacher            the teacher, trained with its config
    int8               the teacher, its linear layers int8 at load (``vqgen.sampling.quantize``)
    pruned             the teacher with half of every block's heads and SwiGLU channels removed
                       (``vqgen.compress.prune``), before recovery
    pruned_recovered   the pruned teacher distilled from the teacher (``train.py distill``, student = pruned)
    student            a student of size ``mini`` (the demo's) distilled from the teacher
    student_scratch    the same student trained from scratch (``train.py transformer``) with the
                       distillation's loop settings and steps: what distillation adds
    student_int8       the student, int8 at load
    draft_speculative  the teacher sampling by draft speculation with the student as draft
                       (``generate(..., speculative=W, draft=student)``), beside Jacobi windows
                       on the same teacher

Stages, each skipped when its output is there and complete, in this order: ``tokenizer``
(``train.py tokenizer``, or ``--tokenizer DIR``), ``teacher``, ``pruned``, ``pruned_recovered``,
``student``, ``student_scratch``; only those the requested rows need run. Each runs in this
process through the stage's own function (``train_tokenizer``, ``train_transformer``,
``prune_checkpoint``, ``train_distill``): ``setup_accelerator`` resets Accelerate's state
between them, as between the demo's stages, so none needs a fresh process. An interrupted
stage resumes through its own checkpoints when the command is run again; a stage stopped by its
``max_minutes`` ends the run (the rows are not built on a model that has not finished), and the
same command continues it. ``DIR/compress.json`` keeps each row's figures with the digests of
the weights and the settings they were measured with: a row is measured again only when
those change or ``--rows`` names it.

Per row: ``params`` (non-embedding: the blocks and text blocks, ``vqgen.compress.prune.block_params``;
the draft row counts both models), ``bytes`` (the ``model.safetensors`` files; an int8 row: its
state dict with every linear weight as int8 plus one float32 scale per output channel, the
rest as in the float file, serialised with safetensors: what it would take on disk, since
vqgen keeps no int8 checkpoint format), ``tok_s_b1`` and ``tok_s_b32`` (image tokens per second
of the transformer's decoding, text encoding and the VQ decoder left out: every row's sampler
with the checkpoint's sampling settings, one prompt at batch 1 and 32 prompts at batch 32,
interleaved rounds in this process, the median; ``timed_rounds``), ``exact_single`` and
``exact_two`` with ``_se`` (the demo's adherence: its fresh evaluation prompts, one image each,
the scene checker, ``summarise``), and ``fid_two`` with ``fid_two_floor`` (the demo's FID of the
two-object samples against real renders of their prompts, and of those renders against renders
of as many other scenes: the Inception features of the renders are computed once for all rows).
``verdicts`` holds every target with its numbers, met or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from vqgen.bench.sampling import Contestant, cpu_info, timed_rounds
from vqgen.bench.speculative import WINDOW as JACOBI_WINDOW
from vqgen.compress.prune import PruneSpec, block_params, prune_checkpoint
from vqgen.config import SIZES, Config, TransformerTrainConfig, load_config, resolve_run
from vqgen.data.codes import CodeShards
from vqgen.data.shapes import render_scene
from vqgen.eval.fid import frechet_distance, inception_features, load_inception
from vqgen.eval.scene import image_scores, parse_caption, summarise
from vqgen.files import atomic_write_text, file_digest
from vqgen.images import to_pil
from vqgen.model import Transformer
from vqgen.sampling import generate, sampling_options
from vqgen.sampling.pipeline import Pipeline
from vqgen.sampling.quantize import int8_per_channel
from vqgen.train.demo import EVAL_PROMPTS, FLOOR_SEED, demo_config_path, evaluation_prompts, evaluation_scenes
from vqgen.train.demo import stage as timed_stage
from vqgen.train.distill import train_distill
from vqgen.train.tokenizer import train_tokenizer
from vqgen.train.transformer import TrainingCaptions, train_transformer

TEACHER_CONFIG = Path("configs") / "shapes_teacher.yaml"
ROWS = ("teacher", "int8", "pruned", "pruned_recovered", "student", "student_scratch", "student_int8",
        "draft_speculative")
STAGES = ("tokenizer", "teacher", "pruned", "pruned_recovered", "student", "student_scratch")
# row -> (the stage whose export it samples, quantized at load?, the stage whose export drafts)
ROW_MODELS = {
    "teacher": ("teacher", False, None), "int8": ("teacher", True, None), "pruned": ("pruned", False, None),
    "pruned_recovered": ("pruned_recovered", False, None), "student": ("student", False, None),
    "student_scratch": ("student_scratch", False, None), "student_int8": ("student", True, None),
    "draft_speculative": ("teacher", False, "student"),
}  # fmt: skip
STUDENT_SIZE = "mini"  # the demo's
PRUNING = PruneSpec(heads=0.5, mlp=0.5)
BATCHES = (1, 32)
DRAFT_WINDOW = 4  # the draft row's W unless --window says otherwise

# --quick: the same stages and measurements on tiny settings, a smoke test of well under a minute
QUICK = [
    "data.num=96",
    "model.dim=64", "model.depth=2", "model.heads=4", "model.kv_heads=4", "model.text_depth=1",
    *(f"training.tokenizer.{k}={v}" for k, v in
      (("steps", 6), ("batch_size", 8), ("warmup_steps", 2), ("log_every", 3), ("checkpoint_every", 3))),
    *(f"training.{stage}.{k}={v}" for stage in ("transformer", "distill") for k, v in
      (("steps", 6), ("batch_size", 8), ("warmup_steps", 2), ("log_every", 3), ("checkpoint_every", 3))),
    "training.distill.eval_num=8",
]  # fmt: skip
QUICK_STUDENT = dict(dim=32, depth=1, heads=2, kv_heads=2, mlp_ratio=2.0, text_depth=0)
QUICK_PROMPTS = 3  # per set
QUICK_CALIBRATION = (2, 8)  # pruning's calibration batches and their size


@dataclass
class CompressSpec:
    """What ``python -m vqgen.bench compress`` does; ``None`` fields take their defaults (``resolve``)."""

    out: Path
    quick: bool = False
    rows: tuple[str, ...] = ()  # measure these again, fresh or not (the rest: when missing or stale)
    tokenizer: Path | None = None  # a trained shapes tokenizer to reuse (e.g. runs/demo/tokenizer)
    demo: Path | None = None  # a demo run (its report.json): the teacher's adherence target
    config: Path | None = None  # default configs/shapes_teacher.yaml
    prompts: int | None = None  # per evaluation set; default 200 (the demo's), 3 with --quick
    window: int = DRAFT_WINDOW  # the draft row's W
    jacobi_window: int = JACOBI_WINDOW  # W of the Jacobi windows it is compared with
    repeats: int | None = None  # timed rounds; default 7, 1 with --quick
    warmup: int | None = None  # untimed rounds first; default 1, 0 with --quick
    fid: bool = True  # False: FID skipped (fid_two, fid_two_floor null)
    threads: int | None = None  # torch threads while measuring; default all cores available

    def resolve(self) -> CompressSpec:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"--rows {' '.join(unknown)}: no such row; choose from {' '.join(ROWS)}")
        for name in ("window", "jacobi_window", "repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokenizer is not None and not (Path(self.tokenizer) / "config.json").is_file():
            raise ValueError(f"--tokenizer {self.tokenizer}: no tokenizer checkpoint there (config.json)")
        if self.demo is not None and not (Path(self.demo) / "report.json").is_file():
            raise ValueError(f"--demo {self.demo}: no report.json there; give a run of `python train.py demo`")
        prompts = self.prompts or (QUICK_PROMPTS if self.quick else EVAL_PROMPTS)
        if prompts < 2:
            raise ValueError(f"--prompts {prompts}: FID needs at least 2 images per set")
        return dataclasses.replace(
            self, out=Path(self.out), config=Path(self.config) if self.config else demo_config_path(TEACHER_CONFIG),
            prompts=prompts, repeats=self.repeats or (1 if self.quick else 7), 
            warmup=self.warmup if self.warmup is not None else (0 if self.quick else 1),
            threads=self.threads or len(os.sched_getaffinity(0)),
        )

    @property
    def overrides(self) -> list[str]:
        """What every stage adds to the config file: the quick settings, or nothing."""
        return list(QUICK) if self.quick else []

    @property
    def student_overrides(self) -> list[str]:
        """The student's architecture, written over the teacher's ``model`` section."""
        fields = QUICK_STUDENT if self.quick else {"size": STUDENT_SIZE, **SIZES[STUDENT_SIZE]}
        return [f"model.{k}={v}" for k, v in fields.items()]


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One training (or pruning) stage: the command it equals, the export it leaves, how to run it."""

    name: str
    command: list[str]
    export: Path
    run: Callable[[], Any]

    def done(self) -> bool:
        """Its export is there and complete (a training run: its report written, every step trained)."""
        config = self.export / "config.json"
        if not config.is_file():
            return False
        if self.name == "pruned":  # written atomically: there means complete
            return True
        state = json.loads(config.read_text()).get("training_state") or {}
        return bool(state.get("complete")) and (self.export / "report.json").is_file()


def train_command(kind: str, config: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["python", "train.py", kind, "--config", str(config), "--out", str(out), *overrides]


def stages(spec: CompressSpec) -> dict[str, Stage]:
    """Every stage of the table, with its command and export, under ``spec.out``."""
    out, config = spec.out, spec.config
    tokenizer = Path(spec.tokenizer) if spec.tokenizer else out / "tokenizer"
    teacher = out / "teacher" / "transformer"
    text_cache = out / "text_cache"  # every caption embedded once, for every stage
    shared = [f"data.codes={teacher / 'codes'}"]  # the teacher's code shards, encoded once by its stage

    def trainer(name: str, kind: str, run_dir: Path, export: Path, extra: list[str], train) -> Stage:
        overrides = [*spec.overrides, *extra]
        command = train_command(kind, config, run_dir, overrides)
        return Stage(name, command, export, lambda: train(resolve_run(config, overrides, run_dir), export))

    def distill(name: str, extra: list[str]) -> Stage:
        teach = [f"training.distill.teacher={teacher}", f"training.distill.text_cache={text_cache}", *shared]
        return trainer(name, "distill", out / name, out / name / "student", [*teach, *extra], train_distill)

    # the student from scratch: the transformer's stage with the distillation's loop (steps included)
    training = load_config(config, spec.overrides).training
    loop = [f"training.transformer.{f.name}={json.dumps(getattr(training.distill, f.name))}"
            for f in dataclasses.fields(TransformerTrainConfig) if f.name not in ("tokenizer", "text_cache")
            and getattr(training.distill, f.name) != getattr(training.transformer, f.name)]
    transformer_keys = [f"training.transformer.tokenizer={tokenizer}", f"training.transformer.text_cache={text_cache}"]
    calibration, batch = QUICK_CALIBRATION if spec.quick else (16, 16)
    pruned = out / "pruned" / "transformer"
    prune_command = ["python", "-m", "vqgen.compress", "prune", "--checkpoint", str(teacher), "--out", str(pruned),
                     "--heads", str(PRUNING.heads), "--mlp", str(PRUNING.mlp), "--calibration-batches",
                     str(calibration), "--batch-size", str(batch)]
    found = {
        "tokenizer": trainer("tokenizer", "tokenizer", out, tokenizer, [], train_tokenizer),
        "teacher": trainer("teacher", "transformer", out / "teacher", teacher, transformer_keys, train_transformer),
        "pruned": Stage("pruned", prune_command, pruned, lambda: prune_checkpoint(
            teacher, pruned, PRUNING, calibration=calibration, batch_size=batch)),
        "pruned_recovered": distill("pruned_recovered", [f"training.distill.student={pruned}"]),
        "student": distill("student", spec.student_overrides),
        "student_scratch": trainer("student_scratch", "transformer", out / "student_scratch",
                                   out / "student_scratch" / "transformer",
                                   [*spec.student_overrides, *loop, *transformer_keys, *shared], train_transformer),
    }
    if spec.tokenizer:  # reused, not trained
        found["tokenizer"] = Stage("tokenizer", [], tokenizer, lambda: None)
    return found


def run_stages(found: dict[str, Stage]) -> dict[str, float]:
    """Run, in order, the stages that are not done -> the seconds of those it ran. A training stage
    stopped by its ``max_minutes`` ends the run: nothing is built on a model that has not finished."""
    ran: dict[str, float] = {}
    for name in STAGES:
        stage = found[name]
        if stage.done() or (name == "tokenizer" and not stage.command):
            continue
        with timed_stage(name, ran):
            print(shlex.join(stage.command), flush=True)
            stage.run()
        if not stage.done():
            state = json.loads((stage.export / "config.json").read_text()).get("training_state", {})
            raise StageIncomplete(f"stage {name} stopped at step {state.get('step')} of {state.get('steps')} (its "
                                  "max_minutes); run the same command again to continue it")
    return ran


class StageIncomplete(RuntimeError):
    """A training stage stopped before its last step; the message says where and what to do."""


# --------------------------------------------------------------------------------------
# What a row is: its models, their size
# --------------------------------------------------------------------------------------


def int8_bytes(model: Transformer) -> int:
    """Bytes of ``model``'s state dict with every ``nn.Linear`` weight int8 and a float32 scale per
    output channel (``vqgen.sampling.quantize.int8_per_channel``), the rest as is, as safetensors."""
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    state: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in linears and leaf == "weight":
            state[key], state[f"{key}_scale"] = int8_per_channel(tensor)
        else:
            state[key] = tensor.detach().contiguous().clone()
    return len(safetensors.torch.save(state, metadata={"kind": "transformer"}))


@dataclass
class Row:
    """A row's sampler: its pipeline, what generate() gets beyond the settings, its size."""

    name: str
    pipeline: Pipeline
    options: dict[str, Any]  # generate() keywords: the checkpoint's settings, the row's speculation
    overrides: dict[str, Any]  # Pipeline call overrides for the adherence samples
    params: int
    bytes: int
    models: dict[str, str]  # the weights it samples with: path -> sha256


def load_row(name: str, found: dict[str, Stage], spec: CompressSpec) -> Row:
    stage, quantized, draft_stage = ROW_MODELS[name]
    export = found[stage].export
    pipeline = Pipeline.from_pretrained(export, quantize="int8" if quantized else None)
    float_model = Transformer.from_pretrained(export).eval() if quantized else pipeline.transformer
    params = block_params(float_model)
    size = int8_bytes(float_model) if quantized else (export / "model.safetensors").stat().st_size
    models = {str(export): file_digest(export / "model.safetensors")}
    overrides: dict[str, Any] = {}
    options = sampling_options(pipeline.settings(num_images=1))
    if draft_stage:
        draft_dir = found[draft_stage].export
        draft = pipeline.draft(str(draft_dir))
        params += block_params(draft)
        size += (draft_dir / "model.safetensors").stat().st_size
        models[str(draft_dir)] = file_digest(draft_dir / "model.safetensors")
        overrides = {"speculative": spec.window, "speculative_draft": str(draft_dir)}
        options |= {"speculative": spec.window, "draft": draft}
    return Row(name, pipeline, options, overrides, params, size, models)


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def evaluation_sets(cfg: Config, found: dict[str, Stage], num: int) -> dict[str, list[str]]:
    """The demo's fresh single- and two-object prompts (none a caption the teacher trained on)."""
    shards = CodeShards(found["teacher"].export / "codes")
    training = set(TrainingCaptions.from_config(cfg, shards).all())
    sets = evaluation_prompts(cfg, training, num)
    return {name: sets[name] for name in ("single", "two")}


def fid_references(cfg: Config, prompts: list[str], inception) -> tuple[Tensor, Tensor]:
    """Inception features of the real renders of the two-object ``prompts`` and of as many other
    two-object scenes (the floor's), as the demo's FID computes them."""
    resolution = cfg.data.resolution
    real = [render_scene(parse_caption(p), resolution) for p in prompts]
    others = evaluation_scenes(cfg, FLOOR_SEED)["two"]
    other = [render_scene(others.scene_and_caption(i)[0], resolution) for i in range(len(prompts))]
    features = inception_features(real + other, inception)
    return features[: len(prompts)], features[len(prompts) :]


def two_object_fids(cfg: Config, prompts: list[str], samples: list[list], inception) -> dict[int, dict[str, Any]]:
    """Per set of samples k (PIL images of the two-object ``prompts``): ``fid_two`` and ``fid_two_floor``,
    both None without ``inception``. One Inception pass over every row's samples."""
    if inception is None:
        return {k: {"fid_two": None, "fid_two_floor": None} for k in range(len(samples))}
    real, other = fid_references(cfg, prompts, inception)
    print("FID: Inception features of every row's two-object samples", file=sys.stderr, flush=True)
    features = inception_features([im for images in samples for im in images], inception)  # [rows * N, 2048]
    floor, n = frechet_distance(real, other), len(prompts)
    return {k: {"fid_two": frechet_distance(real, features[k * n : (k + 1) * n]), "fid_two_floor": floor}
            for k in range(len(samples))}


def adherence_and_samples(row: Row, sets: dict[str, list[str]]) -> tuple[dict[str, float], Tensor]:
    """exact_single/exact_two with standard errors, and the two-object images [N, 3, H, W]."""
    figures, images_two = {}, None
    for name, prompts in sets.items():
        _, images = row.pipeline(prompts, num_images=1, **row.overrides)
        report = summarise(*image_scores(images, prompts))
        figures |= {f"exact_{name}": report["exact"], f"exact_{name}_se": report["exact_se"]}
        if name == "two":
            images_two = images
    return figures, images_two


def speeds(rows: list[Row], prompts: list[str], spec: CompressSpec, jacobi: Row | None) -> dict[str, dict[str, float]]:
    """Image tokens/s of every row's decoding at each of ``BATCHES`` (and of Jacobi windows on the
    teacher, ``jacobi``), all contestants interleaved -> {contestant: {"tok_s_b1", "tok_s_b32"}}."""
    contestants = []
    for row in rows + ([jacobi] if jacobi else []):
        text, mask = row.pipeline.encode(prompts[: max(BATCHES)])  # [P, L, d], [P, L]
        device = row.pipeline.device
        for b in BATCHES:
            valid = mask[:b].any(0)
            t, m = text[:b, valid].to(device), mask[:b, valid].to(device)

            def sample(model: Transformer = row.pipeline.transformer, t: Tensor = t, m: Tensor = m,
                       options: dict = row.options) -> Tensor:  # bound now: each contestant its own model
                return generate(model, t, m, **options)

            contestants.append(Contestant(f"{row.name}@b{b}", sample, lambda codes: codes[0].numel()))
    seconds, tokens = timed_rounds(contestants, spec.warmup, spec.repeats, str(rows[0].pipeline.device))
    out: dict[str, dict[str, float]] = {}
    for c in contestants:
        name, b = c.name.rsplit("@b", 1)
        out.setdefault(name, {})[f"tok_s_b{b}"] = int(b) * tokens[c.name] / statistics.median(seconds[c.name])
        out[name][f"seconds_b{b}"] = seconds[c.name]
    return out


def measurement_settings(spec: CompressSpec, row: str) -> dict[str, Any]:
    """What a row's figures depend on besides its weights: a cached row measured otherwise is stale."""
    settings: dict[str, Any] = {"prompts": spec.prompts, "batches": list(BATCHES), "fid": spec.fid}
    if row == "draft_speculative":
        settings |= {"window": spec.window, "jacobi_window": spec.jacobi_window}
    return settings


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


def demo_params(cfg: Config, teacher: Transformer) -> int:
    """Non-embedding parameters of the demo's transformer (configs/shapes.yaml) over the teacher's codes and text."""
    t = teacher.cfg
    with torch.device("meta"):
        model = Transformer(load_config(demo_config_path()).model.complete(t.vocab_size, t.grid, t.text_dim,
                                                                           t.code_levels))
    return block_params(model)


def verdict(target: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": target, "met": met, "detail": detail}


def verdicts(rows: dict[str, dict], demo_params_: int | None, demo: dict | None) -> list[dict[str, Any]]:
    """Every target of the table with its numbers: met, not met, or None (a row or reference missing)."""
    out = []
    teacher = rows.get("teacher")

    def pts(x: float) -> str:
        return f"{100 * x:.1f}%"

    if teacher and demo_params_:
        ratio = teacher["params"] / demo_params_
        out.append(verdict("teacher: >= 4x the demo's non-embedding parameters", ratio >= 4,
                           f"{teacher['params']:,} vs {demo_params_:,}: {ratio:.2f}x"))
    if teacher:
        if demo is None:
            out.append(verdict("teacher: adherence >= the demo's", None, "no demo run given (--demo DIR)"))
        else:
            ours, theirs = (teacher["exact_single"], teacher["exact_two"]), (demo["single"], demo["two"])
            out.append(verdict("teacher: adherence >= the demo's", all(a >= b for a, b in zip(ours, theirs)),
                               f"single {pts(ours[0])} vs {pts(theirs[0])}, two-object {pts(ours[1])} vs {pts(theirs[1])}"))

    def close(name: str) -> None:
        row = rows.get(name)
        if teacher and row:
            gap = teacher["exact_two"] - row["exact_two"]
            out.append(verdict(f"{name}: two-object exact within 5 points of the teacher", gap <= 0.05,
                               f"{pts(row['exact_two'])} vs {pts(teacher['exact_two'])}: {100 * gap:+.1f} points behind"))

    def faster(name: str, batch: int, factor: float, against: str = "teacher", key: str | None = None) -> None:
        row, base = rows.get(name), rows.get(against)
        key = key or f"tok_s_b{batch}"
        if row and base and key in base:
            ratio = row[f"tok_s_b{batch}"] / base[key]
            what = "the teacher's" if against == "teacher" else "Jacobi windows'"
            detail = f"{row[f'tok_s_b{batch}']:.0f} vs {base[key]:.0f} tokens/s: {ratio:.2f}x"
            if against not in row.get("timed_with", [against]):
                detail += f" (timed in separate runs: measure both again with --rows {name} {against})"
            out.append(verdict(f"{name}: >= {factor}x {what} image tokens/s at batch {batch}", ratio >= factor,
                               detail))

    student, scratch = rows.get("student"), rows.get("student_scratch")
    if teacher and student:
        out.append(verdict("student: <= 1/4 of the teacher's non-embedding parameters",
                           4 * student["params"] <= teacher["params"],
                           f"{student['params']:,} vs {teacher['params']:,}: 1/{teacher['params'] / student['params']:.2f}"))
    close("student")
    faster("student", 32, 2.5)
    if student and scratch:
        gain = student["exact_two"] - scratch["exact_two"]
        detail = f"distilled {pts(student['exact_two'])} vs from scratch {pts(scratch['exact_two'])}: {100 * gain:+.1f} points"
        if gain <= 0:
            detail += "; distillation does not beat training from scratch"
        out.append(verdict("student: two-object exact > 3 points above the student from scratch", gain > 0.03, detail))
    close("pruned_recovered")
    faster("pruned_recovered", 32, 1.6)
    faster("draft_speculative", 1, 1.0, against="draft_speculative", key="jacobi_tok_s_b1")
    return out


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def read_table(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_compress_bench(spec: CompressSpec) -> dict[str, Any]:
    """Train what is missing, measure the rows that are missing or stale (or named by ``spec.rows``)
    -> the table (also ``spec.out/compress.json``), with ``trained`` and ``measured``: the stages
    and rows this call ran."""
    spec = spec.resolve()
    spec.out.mkdir(parents=True, exist_ok=True)
    table_path = spec.out / "compress.json"
    table = read_table(table_path)
    cached: dict[str, dict] = table.get("rows", {})
    found = stages(spec)
    trained = run_stages(found)

    cfg = resolve_run(spec.config, spec.overrides, spec.out)
    teacher_model = Transformer.from_pretrained(found["teacher"].export)
    digests = {str(s.export): file_digest(s.export / "model.safetensors") for name, s in found.items()
               if name != "tokenizer"}

    def fresh(name: str) -> bool:
        row = cached.get(name)
        if row is None or name in spec.rows:
            return False
        current = {str(found[s].export): digests[str(found[s].export)] for s in ROW_MODELS[name][::2] if s}
        return row.get("models") == current and row.get("settings") == measurement_settings(spec, name)

    todo = [name for name in ROWS if not fresh(name)]
    rows = dict(cached)
    if todo:
        rows |= measure(todo, found, spec, cfg)
    rows = {name: rows[name] for name in ROWS}
    demo = None
    if spec.demo:
        adherence = json.loads((Path(spec.demo) / "report.json").read_text())["adherence"]
        demo = {"single": adherence["single"]["exact"], "two": adherence["two"]["exact"], "run": str(spec.demo)}
    result = {
        "rows": rows,
        "verdicts": verdicts(rows, demo_params(cfg, teacher_model), demo),
        "demo": demo,
        "machine": cpu_info() | {"threads": spec.threads, "torch": torch.__version__,
                                 "python": platform.python_version()} if todo else table.get("machine"),
        "commands": {"bench": shlex.join(bench_command(spec))}
        | {name: shlex.join(s.command) for name, s in found.items() if s.command},
        "settings": {"quick": spec.quick, "fid": spec.fid, "prompts": spec.prompts, "window": spec.window,
                     "jacobi_window": spec.jacobi_window, "repeats": spec.repeats, "warmup": spec.warmup,
                     "batches": list(BATCHES), "pruning": dataclasses.asdict(PRUNING)},
    }
    if todo or result != {k: table.get(k) for k in result}:
        atomic_write_text(table_path, json.dumps(result, indent=2) + "\n")
    return result | {"trained": trained, "measured": todo}


def measure(names: list[str], found: dict[str, Stage], spec: CompressSpec, cfg: Config) -> dict[str, dict]:
    """Every figure of rows ``names``; their speeds interleaved in one set of rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        with torch.inference_mode():
            sets = evaluation_sets(cfg, found, spec.prompts)
            rows = [load_row(name, found, spec) for name in names]
            inception = load_inception(device="cpu") if spec.fid else None  # first: missing weights fail early
            figures: dict[str, dict[str, Any]] = {}
            samples = []
            for row in rows:
                print(f"adherence: {row.name}", file=sys.stderr, flush=True)
                figures[row.name], images = adherence_and_samples(row, sets)
                samples.append(to_pil(images))
            for k, fids in two_object_fids(cfg, sets["two"], samples, inception).items():
                figures[rows[k].name] |= fids
            jacobi = None
            if "draft_speculative" in names:  # Jacobi windows on the same teacher, timed beside the draft
                teacher = next(r for r in rows if r.name == "draft_speculative")
                options = {k: v for k, v in teacher.options.items() if k != "draft"}
                jacobi = dataclasses.replace(teacher, name="jacobi", options=options | {"speculative": spec.jacobi_window})
            print(f"tokens/s: {spec.warmup} warm-up and {spec.repeats} timed rounds", file=sys.stderr, flush=True)
            timing = speeds(rows, sets["two"], spec, jacobi)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for row in rows:
        t = timing[row.name]
        out[row.name] = {
            "params": row.params, "bytes": row.bytes, "tok_s_b1": t["tok_s_b1"], "tok_s_b32": t["tok_s_b32"],
            **figures[row.name], "timed_runs_s": {f"b{b}": t[f"seconds_b{b}"] for b in BATCHES},
            "models": row.models, "settings": measurement_settings(spec, row.name),
            "timed_with": names,  # the rows of the same interleaved rounds: their speeds compare directly
        }  # fmt: skip
        if row.name == "draft_speculative":
            out[row.name] |= {"window": spec.window, "jacobi_window": spec.jacobi_window,
                              **{f"jacobi_{k}": v for k, v in timing["jacobi"].items() if k.startswith("tok_s")}}
    return out


def bench_command(spec: CompressSpec) -> list[str]:
    command = ["python", "-m", "vqgen.bench", "compress", "--out", str(spec.out)]
    if spec.quick:
        command.append("--quick")
    for flag in ("tokenizer", "demo"):
        if getattr(spec, flag):
            command += [f"--{flag}", str(getattr(spec, flag))]
    if not spec.fid:
        command.append("--no-fid")
    if spec.window != DRAFT_WINDOW:
        command += ["--window", str(spec.window)]
    if spec.jacobi_window != JACOBI_WINDOW:
        command += ["--jacobi-window", str(spec.jacobi_window)]
    return command


def format_table(result: dict[str, Any]) -> str:
    def se(row: dict, key: str) -> str:
        return f"{100 * row[key]:5.1f} ± {100 * row[key + '_se']:.1f}"

    def fid(row: dict) -> str:
        return "skipped" if row["fid_two"] is None else f"{row['fid_two']:.1f} ({row['fid_two_floor']:.1f})"

    lines = [f"{'row':<18} {'params':>11} {'bytes':>11} {'tok/s b1':>9} {'tok/s b32':>10} "
             f"{'exact single %':>14} {'exact two %':>12} {'FID two (floor)':>16}"]
    for name, row in result["rows"].items():
        lines.append(f"{name:<18} {row['params']:>11,} {row['bytes']:>11,} {row['tok_s_b1']:>9.0f} "
                     f"{row['tok_s_b32']:>10.0f} {se(row, 'exact_single'):>14} {se(row, 'exact_two'):>12} "
                     f"{fid(row):>16}")
    draft = result["rows"]["draft_speculative"]
    lines.append(f"draft_speculative: W = {draft['window']}; Jacobi windows (W = {draft['jacobi_window']}) on the "
                 f"teacher: {draft['jacobi_tok_s_b1']:.0f} tok/s at batch 1, {draft['jacobi_tok_s_b32']:.0f} at 32")
    lines.append("targets:")
    for v in result["verdicts"]:
        mark = {True: "met", False: "NOT MET", None: "not measured"}[v["met"]]
        lines.append(f"  [{mark}] {v['target']}: {v['detail']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run directory of the table's models and compress.json")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of well under a minute")
    parser.add_argument("--rows", nargs="+", default=(), choices=ROWS, metavar="ROW",
                        help=f"measure these rows again (default: every missing one); {', '.join(ROWS)}")
    parser.add_argument("--tokenizer", type=Path, help="reuse a trained shapes tokenizer, e.g. runs/demo/tokenizer")
    parser.add_argument("--demo", type=Path, help="a demo run (runs/demo): its adherence is the teacher's target")
    parser.add_argument("--config", type=Path, help=f"the teacher's config (default {TEACHER_CONFIG})")
    parser.add_argument("--prompts", type=int, help=f"prompts per evaluation set (default {EVAL_PROMPTS}; --quick {QUICK_PROMPTS})")
    parser.add_argument("--window", type=int, default=DRAFT_WINDOW, help=f"the draft row's W (default {DRAFT_WINDOW})")
    parser.add_argument("--jacobi-window", type=int, default=JACOBI_WINDOW,
                        help=f"W of the Jacobi windows the draft row is compared with (default {JACOBI_WINDOW})")
    parser.add_argument("--repeats", type=int, help="timed rounds, the median reported (default 7; --quick 1)")
    parser.add_argument("--threads", type=int, help="torch threads while measuring (default: all cores available)")
    parser.add_argument("--no-fid", dest="fid", action="store_false",
                        help="skip FID (fid_two and fid_two_floor null): it needs the metrics extra, and each "
                        "Fréchet distance takes seconds on a CPU")


def run(args: argparse.Namespace) -> None:
    spec = CompressSpec(out=args.out, quick=args.quick, rows=tuple(args.rows), tokenizer=args.tokenizer,
                        demo=args.demo, config=args.config, prompts=args.prompts, window=args.window,
                        jacobi_window=args.jacobi_window, repeats=args.repeats, threads=args.threads, fid=args.fid)
    try:
        result = run_compress_bench(spec)
    except StageIncomplete as e:
        sys.exit(f"python -m vqgen.bench compress: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"python -m vqgen.bench compress: {e or 'interrupted'}; run the same command again to resume")
    print(format_table(result))
    print(f"trained: {', '.join(result['trained']) or 'nothing'}; measured: {', '.join(result['measured']) or 'nothing'}"
          f"\ntable: {spec.out / 'compress.json'}", file=sys.stderr)
