"""The one training loop behind both the tokenizer and the transformer: ``fit``.

A model family hands the loop a :class:`Task`: one ``nn.Module`` whose ``forward(batch, step)``
returns ``(loss, metrics)``, a pure function ``batches(i, rank, world)`` that says what each
process reads at micro-step ``i`` (``vqgen.train.batches``), and an ``export`` that writes a
loadable checkpoint from a full state dict; optionally its parameters split into
:class:`~vqgen.train.optim.OptimizerSpec` sets, each with its own learning rate, betas and
gradient clip (the tokenizer's discriminator). The loop does everything else, identically for
both, with Accelerate (DDP, FSDP, DeepSpeed ZeRO 1/2, mixed precision), from these pieces:

- ``step.TrainStep``: the forward/backward step (gradient accumulation, clipping, AdamW with
  warm-up + cosine, EMA weights), which never waits for the host;
- ``metrics.TrainingLog``: what the host reads at sync points (log, checkpoint and preview
  steps, the end): the NaN policy, ``log.jsonl``, wandb;
- ``checkpointing.Checkpointer``: atomic checkpoints every N steps and on SIGTERM/Ctrl-C, and
  exact resume; ``checkpointing.export`` at the end;
- ``preview.Previews``: sample grids every N steps, and at the end after the checkpoint and
  the export; a preview that fails is reported, and training goes on; the same weights give a
  task's held-out metrics (``Task.evaluate``) at log steps.

A step with a non-finite loss or gradient is skipped on the device; ``on_nan=stop`` stops at
the next sync point, naming the first bad step, before anything after it is saved;
``on_nan=skip`` reports the count there. What differs between Accelerate's backends lives in
``vqgen.train.backends``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from torch import nn

from vqgen.config import Config, TrainConfig
from vqgen.progress import progress_bar
from vqgen.train.backends import check_backend
from vqgen.train.checkpointing import Checkpointer, export
from vqgen.train.metrics import TrainingLog, start_trackers
from vqgen.train.optim import OptimizerSpec, default_optimizers
from vqgen.train.preview import Previews
from vqgen.train.step import TrainStep


@dataclass
class Task:
    """What the loop needs from a model family."""

    kind: str  # "tokenizer" | "transformer"
    model: nn.Module  # everything trainable; forward(batch, step) -> (loss, metrics)
    # (micro-step, rank, world) -> this process's batch; one with a ``skipped`` dict (reason ->
    # samples it dropped in this process) has the totals over processes logged as skipped_<reason>
    batches: Callable[[int, int, int], dict]
    export: Callable[[dict[str, torch.Tensor], Path], None]  # (model's full state dict, dir) -> loadable checkpoint
    preview: Callable[[nn.Module, int], dict[str, Any]] | None = None  # -> named PIL images
    # (model, config) -> its parameters in sets with their own AdamW settings; the first set's
    # gradient norm is logged as grad_norm, the others' as grad_norm_<name>. Default: one set
    # (``default_optimizers``).
    optimizers: Callable[[nn.Module, TrainConfig], list[OptimizerSpec]] | None = None
    # (model with the weights the export will hold, step) -> held-out metrics, measured at every
    # log step and at the end, and logged beside the training metrics (their names as given)
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None


def resolve_precision(mixed_precision: str) -> str:
    """``auto`` -> bf16 where the hardware computes in it (Ampere+ GPUs, CPUs with AMX or
    AVX512-BF16), fp16 on older GPUs, fp32 on other CPUs, where bf16 is emulated
    and slower than fp32."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AMX", "AVX512_BF16") else "no"


def setup_accelerator(train_cfg: TrainConfig, out_dir: Path):
    """Create the Accelerator and seed every RNG. Call before building models, so that
    ``torch.distributed`` is up when a quantizer decides whether to sync its codebook."""
    out_dir = Path(out_dir)
    # Without a GPU, say so: `accelerate launch --multi_gpu --num_processes N` then runs N CPU
    # processes over gloo instead of N independent single-process runs.
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if PartialState(cpu=no_gpu).num_processes == 1:
        # a second run in one process (the demo: tokenizer, then transformer) may use
        # another precision; a single process has no process group to keep
        AcceleratorState._reset_state()
    log_with = None
    if train_cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no network assumed; `wandb sync` later
        log_with = "wandb"
    accelerator = Accelerator(
        cpu=no_gpu,
        mixed_precision=resolve_precision(train_cfg.mixed_precision),
        gradient_accumulation_steps=train_cfg.grad_accum,  # backward() divides each micro-batch's loss by it
        log_with=log_with,
        project_dir=str(out_dir),
        step_scheduler_with_optimizer=False,
    )
    check_backend(accelerator, train_cfg)
    set_seed(train_cfg.seed)  # the same initial weights on every process
    return accelerator


def fit(accelerator, task: Task, cfg: TrainConfig, run_cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train ``task.model`` for ``cfg.steps`` optimizer steps (resuming if a checkpoint exists).

    Returns the last log window's mean metrics plus ``step``, ``skipped_steps``,
    ``skipped_samples``, ``seconds`` and ``stopped_early``.
    """
    out_dir = Path(out_dir)
    checkpoints = Checkpointer(accelerator, out_dir, run_cfg, task.kind)
    checkpoints.check_config()  # before anything is written: a config that would change the run is refused
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_cfg.save(out_dir / "run_config.json")
    previews = Previews(accelerator, task.preview, task.kind, task.model, out_dir, task.evaluate)  # before prepare() shards it
    specs = (task.optimizers or default_optimizers)(task.model, cfg)
    train_step = TrainStep(accelerator, task.model, specs, task.batches, cfg, task.kind)
    model, ema = train_step.model, train_step.ema
    step = first = checkpoints.resume(ema)
    start_trackers(accelerator, cfg, run_cfg, task.kind, out_dir)
    log = TrainingLog(accelerator, task.kind, task.batches, cfg, out_dir)

    t_start, alone = time.perf_counter(), accelerator.num_processes == 1
    bar = progress_bar(total=cfg.steps, initial=step, unit="step", desc=f"train {task.kind}",
                       disable=not accelerator.is_main_process)
    with StopSignal() as stop, bar:
        while step < cfg.steps:
            log.add(step, train_step(step))
            step += 1
            bar.update(1)
            over_time = cfg.max_minutes > 0 and time.perf_counter() - t_start > cfg.max_minutes * 60
            wants_stop = stop.requested or over_time
            log_due, save_due = step % cfg.log_every == 0, step % cfg.checkpoint_every == 0
            preview_due = bool(cfg.sample_every) and step % cfg.sample_every == 0
            # one process stops at once; several agree at the next sync point, saving a per-step collective
            if not (log_due or save_due or preview_due or step >= cfg.steps or (alone and wants_stop)):
                continue
            now = log.sync(step, wants_stop)  # the host reads the device's record; on_nan=stop raises here
            finishing = step >= cfg.steps or now.stop
            if log_due or finishing:
                held_out = previews.evaluate(model, ema, step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in log.write(step, now, held_out).items() if k != "lr"})
            if save_due or finishing:
                checkpoints.save(step, ema)
            if finishing:
                if now.stop:
                    why = f"time limit of {cfg.max_minutes} min reached" if over_time else "stop requested"
                    accelerator.print(f"{why}: checkpoint saved at step {step}")
                break
            if preview_due:
                previews(model, ema, step)

    export(accelerator, model, ema, task.export, out_dir, step, cfg.steps)
    if step > first:  # after the checkpoint and the export: a preview cannot cost the final step
        previews(model, ema, step)
    accelerator.end_training()
    if stop.requested:
        raise KeyboardInterrupt(f"training stopped at step {step}; run the same command again to resume")
    return {**log.last, "step": step, "skipped_steps": log.seen.skipped, "skipped_samples": log.data_skipped,
            "seconds": time.perf_counter() - t_start, "stopped_early": step < cfg.steps}


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step (one process)
    or at the next sync point (several, which agree there on the step to stop at)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
