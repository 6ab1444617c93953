"""Knowledge distillation: a student transformer learns a teacher's predictions, ``train_distill(cfg, out_dir)``.

    python train.py distill --config configs/shapes.yaml training.distill.teacher=runs/shapes [model.dim=64 ...]

The student (a fresh ``model.*`` of any size, or the checkpoint ``training.distill.student``,
e.g. a pruned one) trains with the transformer's loop (Accelerate, exact resume, EMA, NaN
policy, wandb) on the teacher's logits, teacher-forced on the same batch with the same dropped
captions (both see the null caption on a dropped row, so the student also learns the
unconditional stream guidance needs). Per code the loss is

    kl_weight * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) + (1 - kl_weight) * CE(student, code)

The teacher is frozen, in eval mode, outside the trained module (so neither the optimizer, the
EMA nor a checkpoint holds it), and runs under the student's autocast. The student inherits the
teacher's tokenizer and text encoder: codebook, grid, FSQ levels, text encoder and text length
must agree, and a mismatch names both sides.

Data: the code shards (``data.codes``, or the data encoded with the teacher's tokenizer), less
their last ``eval_num`` sequences, held out; with ``teacher_samples = n > 0`` also n sequences
the teacher samples (``vqgen.sampling.generate``) for training captions, drawn once into code
shards (``<out_dir>/teacher_codes/train``, the format of ``vqgen.data.codes``; a restarted run
samples only the shards it lacks) and mixed into the batches uniformly with the data's.

Metric: the KL(teacher || student) at temperature 1 per code, teacher-forced on the held-out
sequences (``eval_kl``), and on sequences the teacher samples for their captions
(``eval_kl_teacher_samples``; ``<out_dir>/teacher_codes/heldout``): students trained on the
teacher's own contexts are expected to transfer better, so both are measured. Both are logged
at log steps and measured on the export for ``report.json``.

``out_dir`` (``<run>/student``) ends up an ordinary transformer export (``Transformer.from_pretrained``,
``sample.py --checkpoint``, ``Pipeline``, ``python -m vqgen.eval``) whose ``config.json`` also
records the teacher (path, parameter count) and the distillation settings under ``"distill"``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset

from vqgen.checkpoint import (
    CheckpointError,
    find_export,
    latest_checkpoint,
    load_config_json,
    substate,
    trained_tokenizer,
    training_state,
)
from vqgen.config import Config, ConfigError, DistillTrainConfig, SamplingSettings, TransformerConfig, check_resume
from vqgen.data.codes import (
    FORMAT,
    META,
    CodeShards,
    CodeShardsError,
    captions_path,
    code_dtype,
    codes_path,
    save_array,
)
from vqgen.files import atomic_write_text, file_digest
from vqgen.model import Transformer
from vqgen.progress import progress_bar
from vqgen.sampling import generate
from vqgen.sampling.pipeline import checkpoint_settings, image_seed
from vqgen.tokenizer import VQTokenizer
from vqgen.train.backends import input_autocast
from vqgen.train.loop import Task, setup_accelerator
from vqgen.train.optim import OptimizerSpec, param_groups
from vqgen.train.transformer import (
    CodeTextBatches,
    NextCodeLoss,
    TrainingCaptions,
    build_text,
    check_codes,
    fit_or_report,
    make_preview,
    next_code_loss,
    prepare_codes,
)

SHARD_SIZE = 4096  # teacher-sampled sequences per code shard
# what the student must share with its teacher: the tokenizer's codes and the text it reads
SHARED_FIELDS = ("vocab_size", "grid", "code_levels", "text_encoder", "text_dim", "max_text_len")


def distill_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over codes of KL(softmax(teacher / T) || softmax(student / T)), logits [B, N, V] -> 0-dim (nats)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)  # [B, N, V]
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()


class DistillLoss(NextCodeLoss):
    """The student for the loop: ``forward(batch, step) -> (loss, {"kl", "ce", "tokens"})``, the
    loss of the module docstring; ``transformer`` is the student, as in ``NextCodeLoss``."""

    def __init__(self, student: Transformer, teacher: Transformer, cond_dropout: float, temperature: float,
                 kl_weight: float):
        super().__init__(student, cond_dropout)
        self.temperature, self.kl_weight = temperature, kl_weight
        # not a submodule: the optimizer, the EMA, checkpoints and train() never see the teacher
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict]:
        codes = rearrange(batch["codes"], "b h w -> b (h w)")  # [B, N]
        text, mask = batch["text"], batch["text_mask"]
        drop = self.dropped_captions(batch)  # one draw for both: the same conditioning, null caption included
        logits = self.transformer(codes, text, mask, drop_cond=drop)  # [B, N, V]
        with torch.no_grad():
            target = self.teacher(codes, text, mask, drop_cond=drop)  # [B, N, V]
        kl, ce = distill_kl(logits, target, self.temperature), next_code_loss(logits, codes)
        loss = self.kl_weight * self.temperature**2 * kl + (1 - self.kl_weight) * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach(), "tokens": codes.numel()}


@torch.no_grad()
def heldout_kl(student: Transformer, teacher: Transformer, batches: list[dict]) -> float:
    """KL(teacher || student) at temperature 1 per code, teacher-forced over ``batches`` (each
    ``{"codes" [B, h, w], "text", "text_mask"}``), weighted by their codes (nats)."""
    total, count = 0.0, 0
    for batch in batches:
        codes = rearrange(batch["codes"], "b h w -> b (h w)")
        args = (codes, batch["text"], batch["text_mask"])
        total += float(distill_kl(student(*args), teacher(*args))) * codes.numel()
        count += codes.numel()
    return total / count


class CodeSet(Dataset):
    """Ranges of code datasets (``CodeShards``) as one: ``[(dataset, range), ...]`` in order ->
    ``ds[k] = {"codes", "caption"}``, with every caption in ``captions``."""

    def __init__(self, parts: list[tuple[Any, range]]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(r) for _, r in parts]).tolist()
        self.captions = [dataset.captions[i] for dataset, indices in parts for i in indices]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, k: int) -> dict[str, Any]:
        part = bisect.bisect_right(self.offsets, k) - 1
        dataset, indices = self.parts[part]
        return dataset[indices[k - self.offsets[part]]]


# --------------------------------------------------------------------------------------
# The teacher, the student, and what they must share
# --------------------------------------------------------------------------------------


def load_transformer(given: str, key: str) -> tuple[Path, dict[str, Any], Transformer]:
    """The transformer export named by config key ``key`` (an export, or a run directory holding
    ``transformer/``) -> (its directory, its config.json, the model on CPU)."""
    if not given:
        raise ConfigError(f"config key '{key}' is not set: give a transformer checkpoint, e.g. {key}=runs/shapes "
                          "(a run directory) or runs/shapes/transformer (its export)")
    path = Path(given)
    if not path.is_dir():
        raise ConfigError(f"config key '{key}' is {given!r}: no such directory")
    directory = find_export(path, "transformer")
    try:
        config = load_config_json(directory, "transformer")
        with torch.random.fork_rng():  # loading must not move the RNG a fresh student is drawn from
            model = Transformer.from_pretrained(directory)
    except CheckpointError as e:
        raise ConfigError(f"config key '{key}' ({given}) is not a readable transformer checkpoint: {e}") from None
    return directory, config, model


def check_shared(student: TransformerConfig, teacher: TransformerConfig, student_source: str,
                 teacher_dir: Path) -> None:
    """The student must read the teacher's codes and text: refuse a field of ``SHARED_FIELDS`` that differs."""
    differ = [f"{name}: {getattr(student, name)!r} (student) vs {getattr(teacher, name)!r} (teacher)"
              for name in SHARED_FIELDS if getattr(student, name) not in (None, getattr(teacher, name))]
    if differ:
        raise ConfigError(
            f"the student ({student_source}) must use the tokenizer and text encoder of its teacher {teacher_dir}, but "
            f"{'; '.join(differ)}. Set them as the teacher has them (or leave vocab_size, grid, text_dim, "
            "code_levels unset)"
        )


def build_student(cfg: Config, teacher: Transformer, teacher_dir: Path) -> tuple[Transformer, str]:
    """A fresh ``model.*`` completed with the teacher's codebook, grid, text width and FSQ levels,
    or the checkpoint ``training.distill.student`` -> (student, where it came from)."""
    given = cfg.training.distill.student
    if given:
        directory, _, student = load_transformer(given, "training.distill.student")
        check_shared(student.cfg, teacher.cfg, f"training.distill.student={given}", teacher_dir)
        return student, str(directory)
    check_shared(cfg.model, teacher.cfg, "model.*", teacher_dir)
    t = teacher.cfg
    return Transformer(cfg.model.complete(t.vocab_size, t.grid, t.text_dim, t.code_levels)), "model.*"


def teacher_tokenizer(distill: DistillTrainConfig, teacher_config: dict, teacher_dir: Path) -> Path:
    """``training.distill.tokenizer``, else the tokenizer the teacher was trained with."""
    if distill.tokenizer:
        path = Path(distill.tokenizer)
    else:
        try:
            path = trained_tokenizer(teacher_config, teacher_dir)
        except CheckpointError as e:
            raise ConfigError(f"{e}: set training.distill.tokenizer=DIR") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"no tokenizer checkpoint at {path} (the teacher's, or training.distill.tokenizer)")
    return path


# --------------------------------------------------------------------------------------
# Teacher-sampled sequences, as code shards
# --------------------------------------------------------------------------------------


def sample_codes(teacher: Transformer, teacher_dir: Path, cache, captions: list[str], directory: Path,
                 settings: SamplingSettings, stream: int, batch_size: int, accelerator) -> CodeShards:
    """The teacher's samples for ``captions`` (one each) as code shards in ``directory``: sequence
    k is drawn with the seed ``image_seed(settings.seed, k, stream)``, so it depends on neither the
    batch nor the number of processes. Resumable: rank r samples the missing shards r, r + world, ...;
    each shard is written atomically, its codes last (what marks it done). A directory holding
    samples of another teacher, captions or settings is refused."""
    directory, device = Path(directory), accelerator.device
    num_shards = -(-len(captions) // SHARD_SIZE)
    meta = {
        "format": FORMAT, "grid": list(teacher.cfg.grid), "codebook_size": teacher.cfg.vocab_size,
        "dtype": code_dtype(teacher.cfg.vocab_size).name, "shard_size": SHARD_SIZE, "num_shards": num_shards,
        "count": None, "teacher": str(teacher_dir.resolve()),
        "teacher_sha256": file_digest(teacher_dir / "model.safetensors"),
        "sampling": dataclasses.asdict(settings), "stream": stream,
        "captions_sha256": hashlib.sha256(json.dumps(captions).encode()).hexdigest(), "complete": False,
    }  # fmt: skip
    if accelerator.is_main_process:
        if (directory / META).is_file():
            existing = json.loads((directory / META).read_text())
            differ = [k for k in meta if k not in ("count", "complete") and existing.get(k) != meta[k]]
            if differ:
                raise CodeShardsError(
                    f"{directory} holds teacher samples made with other {', '.join(differ)} (e.g. {differ[0]}: "
                    f"{existing.get(differ[0])!r} there vs {meta[differ[0]]!r} now); delete it to sample again"
                )
        else:
            atomic_write_text(directory / META, json.dumps(meta, indent=2) + "\n")
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [k for k in range(rank, num_shards, world) if not codes_path(directory, k).is_file()]
    total = sum(min(SHARD_SIZE, len(captions) - k * SHARD_SIZE) for k in todo)
    bar = progress_bar(total=total, unit="seq", desc=f"teacher samples -> {directory}",
                       disable=not accelerator.is_main_process)
    teacher.to(device)
    # exact draft speculation draws what plain sampling draws: the teacher samples without its draft
    options = {k: v for k, v in settings.image_settings().items() if k != "speculative_draft"}
    for shard in todo:
        first, last = shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(captions))
        codes = []
        for start in range(first, last, batch_size):
            end = min(start + batch_size, last)
            text, mask = cache.lookup(captions[start:end])  # [b, L, d], [b, L]
            seeds = torch.tensor([image_seed(settings.seed, k, stream) for k in range(start, end)])
            drawn = generate(teacher, text.to(device), mask.to(device), seeds=seeds, **options)  # [b, h, w]
            codes.append(drawn.cpu().numpy().astype(meta["dtype"]))
            bar.update(end - start)
        atomic_write_text(captions_path(directory, shard), json.dumps(captions[first:last]) + "\n")
        save_array(codes_path(directory, shard), np.concatenate(codes))  # last: marks the shard done
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not json.loads((directory / META).read_text())["complete"]:
        done = {**meta, "count": len(captions), "complete": True}
        atomic_write_text(directory / META, json.dumps(done, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return CodeShards(directory)


def training_captions(captions: list[str], num: int, seed: int) -> list[str]:
    """``num`` captions to sample for: the training captions in a seeded order, cycled."""
    order = np.random.default_rng([seed, len(captions)]).permutation(len(captions))
    return [captions[order[k % len(captions)]] for k in range(num)]


def eval_batches(codes: CodeSet, cache, batch_size: int, device: torch.device) -> list[dict]:
    """The held-out ``codes`` in fixed batches, on ``device``."""
    batches = []
    for start in range(0, len(codes), batch_size):
        items = [codes[k] for k in range(start, min(start + batch_size, len(codes)))]
        text, mask = cache.lookup([item["caption"] for item in items])
        batches.append({"codes": torch.stack([item["codes"] for item in items]).to(device),
                        "text": text.to(device), "text_mask": mask.to(device)})
    return batches


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def train_distill(cfg: Config, out_dir: Path) -> dict:
    """Distil ``training.distill.teacher`` into a student in ``out_dir`` (or resume); returns the
    final training metrics with the held-out KLs of the export (also in ``<out_dir>/report.json``)."""
    out_dir, train_cfg = Path(out_dir), cfg.training.distill
    if cfg.data.caption_augmentation:
        raise ConfigError(f"config key 'data.caption_augmentation' is {cfg.data.caption_augmentation}, but distillation "
                          "reads each caption as its code shards store it (teacher and student alike); set it to 0")
    teacher_dir, teacher_config, teacher = load_transformer(train_cfg.teacher, "training.distill.teacher")
    if teacher_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"the student's directory {out_dir} is its teacher's (training.distill.teacher); give the "
                          "student its own output directory (--out DIR)")
    previous = latest_checkpoint(out_dir)
    if previous is not None:  # before any sampling: a resume the loop would refuse costs nothing
        check_resume(previous / "config.json", cfg, "distill")
    accelerator = setup_accelerator(train_cfg, out_dir)
    student, student_source = build_student(cfg, teacher, teacher_dir)  # checks what they must share first
    tokenizer_path = teacher_tokenizer(train_cfg, teacher_config, teacher_dir)
    tokenizer = VQTokenizer.from_pretrained(tokenizer_path).eval()
    teacher.check_compatible(tokenizer.codebook_size, tokenizer.grid, tokenizer.code_levels)
    shards = prepare_codes(cfg, out_dir, accelerator, tokenizer_path)
    check_codes(shards, tokenizer, tokenizer_path)
    held = len(shards) - train_cfg.eval_num  # the shards' last eval_num sequences are held out
    if held < 1:
        raise ConfigError(f"config key 'training.distill.eval_num' ({train_cfg.eval_num}) holds out every one of the "
                          f"{len(shards)} sequences of {shards.directory}; hold out fewer")
    train_codes, heldout_codes = CodeSet([(shards, range(held))]), CodeSet([(shards, range(held, len(shards)))])
    encoder, cache = build_text(teacher.cfg, Path(train_cfg.text_cache or out_dir / "text_cache"), shards.captions,
                                accelerator)
    if encoder.dim != teacher.cfg.text_dim:
        raise ConfigError(f"text encoder {teacher.cfg.text_encoder!r} gives {encoder.dim}-dim embeddings, but the "
                          f"teacher {teacher_dir} was trained on {teacher.cfg.text_dim}-dim ones")

    # the student learns the teacher's distribution: its samples are exact even where the teacher's
    # checkpoint samples with the lossy relaxed acceptance
    settings = dataclasses.replace(checkpoint_settings(teacher_config, str(teacher_dir / "config.json")),
                                   **train_cfg.sampling.given(), speculative_tolerance=0.0)
    sampled = out_dir / "teacher_codes"

    def teacher_samples(captions: list[str], name: str, stream: int) -> CodeShards:
        return sample_codes(teacher, teacher_dir, cache, captions, sampled / name, settings, stream,
                            train_cfg.batch_size, accelerator)

    if train_cfg.teacher_samples:
        captions = training_captions(train_codes.captions, train_cfg.teacher_samples, settings.seed)
        extra = teacher_samples(captions, "train", 0)
        train_codes = CodeSet([(shards, range(held)), (extra, range(len(extra)))])
    heldout_samples = teacher_samples(heldout_codes.captions, "heldout", 1)
    teacher.to(accelerator.device)
    held_out = {
        "eval_kl": eval_batches(heldout_codes, cache, train_cfg.batch_size, accelerator.device),
        "eval_kl_teacher_samples": eval_batches(CodeSet([(heldout_samples, range(len(heldout_samples)))]), cache,
                                                train_cfg.batch_size, accelerator.device),
    }

    def evaluate(model: DistillLoss | Transformer, step: int) -> dict[str, float]:
        model = model.transformer if isinstance(model, DistillLoss) else model
        return {name: heldout_kl(model, teacher, batches) for name, batches in held_out.items()}

    accelerator.print(f"student: {student.num_params() / 1e6:.2f}M parameters ({student_source}); teacher "
                      f"{teacher_dir}: {teacher.num_params() / 1e6:.2f}M; {len(train_codes)} training sequences"
                      f" ({train_cfg.teacher_samples} sampled by the teacher), {len(heldout_codes)} held out")
    record = {
        "teacher": str(teacher_dir.resolve()), "teacher_params": teacher.num_params(), "student_init": student_source,
        "student_params": student.num_params(), "temperature": train_cfg.temperature, "kl_weight": train_cfg.kl_weight,
        "teacher_samples": train_cfg.teacher_samples, "sampling": dataclasses.asdict(settings),
        "eval_num": train_cfg.eval_num,
    }  # fmt: skip
    extra_config = {"tokenizer": str(tokenizer_path), "run": cfg.to_dict(), "distill": record}
    task = Task(
        kind="distill",
        model=DistillLoss(student, teacher, train_cfg.cond_dropout, train_cfg.temperature, train_cfg.kl_weight),
        batches=CodeTextBatches(train_codes, TrainingCaptions(train_codes.captions), cache, train_cfg.batch_size,
                                train_cfg.seed, accelerator.device),
        export=lambda state, directory: student.save_pretrained(
            directory, extra_config=extra_config, state=substate(state, "transformer")
        ),
        preview=make_preview(cfg, encoder, tokenizer),
        optimizers=lambda model, c: [
            OptimizerSpec("transformer", param_groups(model.transformer, c.weight_decay), c.lr, tuple(c.betas),
                          c.grad_clip)
        ],
        evaluate=evaluate,
    )
    metrics, ended = fit_or_report(accelerator, task, train_cfg, cfg, out_dir)
    if ended:
        return metrics
    metrics |= {"training_state": training_state(metrics["step"], train_cfg.steps), **record,
                "final_loss": metrics.get("loss", math.nan)}
    if accelerator.is_main_process:
        exported = Transformer.from_pretrained(out_dir, device=accelerator.device).eval()
        with input_autocast(accelerator):  # the figures of the weights users load, as training measured them
            metrics |= {f"heldout_{name.removeprefix('eval_')}": value for name, value in evaluate(exported, 0).items()}
        atomic_write_text(out_dir / "report.json", json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return metrics
