"""A small regression task for testing the shared training loop, also runnable as a script
under ``accelerate launch``: ``python tests/toy_task.py OUT STEPS BATCH [key=value ...]``, where
the keys are ``TrainConfig`` fields, or ``kill_step`` (the process sends itself SIGTERM then)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

from vqgen.checkpoint import save_pretrained
from vqgen.config import Config, TrainConfig, from_dict
from vqgen.train.batches import IndexedBatches
from vqgen.train.loop import Task, fit, setup_accelerator
from vqgen.train.optim import OptimizerSpec


class Regression(nn.Module):
    def __init__(self, dropout: float = 0.1, poison_step: int = -1, kill_step: int = -1, grad_poison_step: int = -1,
                 poison_micro: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 1))
        self.poison_step = poison_step  # forward returns NaN at this step,
        self.poison_micro = poison_micro  # from this micro-batch of the step on
        self.step, self.micro = -1, 0  # which forward of which step this is
        self.grad_poison_step = grad_poison_step  # the loss stays finite, its gradient is NaN at this step
        self.kill_step = kill_step  # the process sends itself SIGTERM during this step's first forward

    def forward(self, batch: dict, step: int):
        pred = self.net(batch["x"]).squeeze(-1)
        loss = (pred - batch["y"]).pow(2).mean()
        self.micro = self.micro + 1 if step == self.step else 0
        self.step = step
        if step == self.poison_step and self.micro >= self.poison_micro:
            loss = loss * float("nan")
        if step == self.grad_poison_step:  # adds 0 to the loss; d sqrt(x)/dx at 0 is inf, times 0: NaN
            loss = loss + (pred * 0).sqrt().sum()
        if step == self.kill_step:
            self.kill_step = -1  # once: with gradient accumulation the step has several forwards
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, {"tokens": batch["x"].shape[0], "mae": (pred - batch["y"]).abs().mean()}


def toy_dataset(n: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x.sum(-1))
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def two_sets(model: Regression, cfg: TrainConfig) -> list[OptimizerSpec]:
    """The two layers as parameter sets with settings of their own (as a GAN's two networks)."""
    return [
        OptimizerSpec("first", [{"params": list(model.net[0].parameters()), "weight_decay": 0.0}], cfg.lr,
                      tuple(cfg.betas), cfg.grad_clip),
        OptimizerSpec("head", [{"params": list(model.net[3].parameters()), "weight_decay": 0.0}], cfg.lr / 2,
                      (0.5, 0.9), 0.01),
    ]


def train_toy(out_dir: Path, overrides: dict, optimizers=None, preview=None, **model_kwargs) -> dict:
    cfg = from_dict(TrainConfig, {"warmup_steps": 2, "lr": 1e-2, "checkpoint_every": 1000, "log_every": 2,
                                  "mixed_precision": "no", **overrides})
    accelerator = setup_accelerator(cfg, out_dir)
    model = Regression(**model_kwargs)
    task = Task(
        kind="toy",
        model=model,
        batches=IndexedBatches(toy_dataset(), cfg.batch_size, seed=cfg.seed),
        export=lambda state, d: save_pretrained(d, "toy", {}, state),
        preview=preview,
        optimizers=optimizers,
    )
    return fit(accelerator, task, cfg, Config(name="toy"), out_dir)


if __name__ == "__main__":
    out, steps, batch, *rest = sys.argv[1:]
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in rest)}
    kill_step = extra.pop("kill_step", -1)
    result = train_toy(Path(out), {"steps": int(steps), "batch_size": int(batch), **extra}, dropout=0.0, kill_step=kill_step)
    if PartialState().is_main_process:
        (Path(out) / "result.json").write_text(json.dumps(result))
