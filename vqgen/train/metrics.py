"""What the training steps record on the device, and what the host reads and logs at sync points.

A step never waits for the host: it adds its metrics and its skip verdicts to a
:class:`StepRecord` of 0-dim device tensors. At a sync point (a log, checkpoint or preview step,
the end) :class:`TrainingLog` reads the record in one gather, applies the NaN policy to what it
reads, and at a log step writes the window's means to ``log.jsonl`` and the trackers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqgen.checkpoint import latest_checkpoint
from vqgen.config import Config, TrainConfig
from vqgen.train import TrainingError
from vqgen.train.backends import layout
from vqgen.train.optim import lr_at
from vqgen.train.step import StepResult

NEVER = 2**62  # "no bad step yet", in the on-device record of the first one


@dataclass
class Reading:
    """What the host learns at a sync point (agreed by every process)."""

    skipped: int  # steps whose update was not applied, so far
    nonfinite: int  # ... of which had a non-finite loss or gradient (the NaN policy's; the rest: fp16 overflow)
    first_bad: int  # the first of those (NEVER: none)
    stop: bool  # some process wants to stop (signal, time limit)
    applied: int  # applied steps in the current window
    means: dict[str, float]  # the window's metrics: mean over its applied steps and the processes


class StepRecord:
    """What the training steps leave on the device for the host to read at sync points: metric
    sums over the window's applied steps, the counts of skipped and non-finite steps, and the
    first of the latter. Recording never waits for the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)
        self.new_window()

    def new_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.applied = torch.zeros((), device=self.device)
        self.steps, self.started = 0, time.perf_counter()

    def add(self, step: int, result: StepResult) -> None:
        """Record ``step``: its metrics, whether its update was skipped, and whether it had a
        non-finite loss or gradient."""
        applied = ~result.skip
        for k, v in result.metrics.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(applied, v, 0.0)  # where(): a skipped NaN stays out
        self.applied += applied
        self.skipped += result.skip
        self.nonfinite += result.bad
        self.first_bad = torch.where(result.bad & (self.first_bad == NEVER), step, self.first_bad)
        self.steps += 1

    def read(self, accelerator, wants_stop: bool) -> Reading:
        """One host sync; with several processes one gather, whose result every process agrees on."""
        names = sorted(self.sums)
        stop = torch.full((), float(wants_stop), device=self.device)
        values = torch.stack([self.skipped, self.nonfinite, stop, self.applied, *(self.sums[k] for k in names)])
        first, world = self.first_bad, accelerator.num_processes
        if world > 1:
            values, first = accelerator.gather(values[None]), accelerator.gather(first[None])
        rows = values.reshape(world, -1).tolist()
        applied = int(rows[0][3])  # the same on every process: they agree on each step's skip
        return Reading(
            skipped=int(max(r[0] for r in rows)),
            nonfinite=int(max(r[1] for r in rows)),
            first_bad=int(first.min()),
            stop=any(r[2] for r in rows),
            applied=applied,
            means={k: sum(r[4 + i] for r in rows) / (world * applied) for i, k in enumerate(names)} if applied else {},
        )


class TrainingLog:
    """The host's side of a run's metrics (``kind`` names it in messages and tracker keys).

    ``last`` holds the last log window's metrics, ``seen`` the last reading, ``data_skipped`` the
    samples the data dropped (reason -> count over every process).
    """

    def __init__(self, accelerator, kind: str, batches: Any, cfg: TrainConfig, out_dir: Path):
        self.accelerator, self.kind, self.batches, self.cfg, self.out_dir = accelerator, kind, batches, cfg, out_dir
        self.deepspeed = layout(accelerator) == "deepspeed"  # whose NaN policy is "stop" only
        self.record = StepRecord(accelerator.device)
        self.seen = Reading(0, 0, NEVER, False, 0, {})
        self.last: dict[str, float] = {}
        self.data_skipped: dict[str, int] = {}

    def add(self, step: int, result: StepResult) -> None:
        """Record step ``step`` on the device (no host sync)."""
        self.record.add(step, result)

    def sync(self, step: int, wants_stop: bool) -> Reading:
        """Read the record (one host sync; a collective) after ``step`` steps, stop under
        ``on_nan=stop`` if a step was non-finite since the last reading, report skipped steps."""
        now, seen = self.record.read(self.accelerator, wants_stop), self.seen
        if now.nonfinite > seen.nonfinite:
            if self.cfg.on_nan == "stop":
                skipping = "" if self.deepspeed else f", or set training.{self.kind}.on_nan=skip to skip such steps"
                raise TrainingError(
                    f"non-finite loss or gradient at step {now.first_bad} ({self.kind}), seen at step {step}; "
                    f"nothing after it was saved, the last good checkpoint is {latest_checkpoint(self.out_dir)}. "
                    f"Lower the learning rate{skipping}."
                )
            self.accelerator.print(f"step {step}: {now.nonfinite - seen.nonfinite} step(s) with a non-finite loss or "
                                   f"gradient skipped ({now.nonfinite} so far, the first at step {now.first_bad})")
        overflows = (now.skipped - now.nonfinite) - (seen.skipped - seen.nonfinite)
        if overflows:
            self.accelerator.print(f"step {step}: the fp16 loss scaler skipped {overflows} overflowing step(s)")
        self.seen = now
        return now

    def write(self, step: int, now: Reading, held_out: dict[str, float] | None = None) -> dict[str, float]:
        """Log the window that ``now`` closes (if any of its steps was applied) to ``log.jsonl`` and
        the trackers, with the ``held_out`` metrics measured at ``step``, and start a new window;
        returns the logged metrics (a collective)."""
        if not now.applied:
            return self.last
        world = self.accelerator.num_processes
        last = dict(now.means) | dict(held_out or {})
        self.data_skipped = skipped_samples(self.batches, self.accelerator)
        last |= {f"skipped_{k}": v for k, v in self.data_skipped.items() if v}
        elapsed = time.perf_counter() - self.record.started
        if "tokens" in last:  # a per-step count: report the global throughput
            last["tokens_per_s"] = last.pop("tokens") * now.applied * world / elapsed
        last.update(lr=lr_at(step - 1, self.cfg), steps_per_s=self.record.steps / elapsed, skipped_steps=now.skipped)
        self.record.new_window()
        if self.accelerator.is_main_process:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **last}) + "\n")
        self.accelerator.log({f"{self.kind}/{k}": v for k, v in last.items()}, step=step)
        self.last = last
        return last


def skipped_samples(batches: Any, accelerator) -> dict[str, int]:
    """The samples ``batches`` dropped (reason -> count), summed over processes (a collective)."""
    counts = getattr(batches, "skipped", None)
    if counts is None:
        return {}
    names = sorted(counts)  # every process's batches know every reason: the same keys everywhere
    totals = torch.tensor([float(counts[k]) for k in names], device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return {k: int(v) for k, v in zip(names, totals.tolist())}


def start_trackers(accelerator, cfg: TrainConfig, run_cfg: Config, kind: str, out_dir: Path) -> None:
    """wandb (offline unless configured otherwise) when ``report_to`` asks for it."""
    if cfg.report_to == "wandb":
        accelerator.init_trackers(
            "vqgen", config=run_cfg.to_dict(), init_kwargs={"wandb": {"name": f"{run_cfg.name}-{kind}", "dir": str(out_dir)}}
        )
