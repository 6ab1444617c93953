"""The forward/backward step: micro-batches, clipping, the optimizer step and the EMA update.

A step never waits for the host. Its loss, metrics and the non-finite check stay on the
device, and a step with a non-finite loss or gradient is skipped there: the fused AdamW kernel
reads a ``found_inf`` flag, as under ``torch.amp.GradScaler``, and the EMA ignores the step too.
Under DeepSpeed the engine accumulates, clips and steps inside ``accelerator.backward()`` (the
optimizer's own ``step`` is then a no-op), so the code path is the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqgen.config import TrainConfig
from vqgen.train.backends import (
    check_grad_clips,
    clip_gradients,
    has_loss_scaler,
    input_autocast,
    layout,
    use_safe_deepspeed_checkpoints,
)
from vqgen.train.ema import EMA
from vqgen.train.optim import OptimizerSpec, build_optimizer, lr_at


@dataclass
class StepResult:
    """One optimizer step, as 0-dim device tensors."""

    metrics: dict[str, torch.Tensor]  # the loss, the model's metrics (means over micro-batches) and grad norms
    skip: torch.Tensor  # bool: its update was not applied
    bad: torch.Tensor  # bool: a non-finite loss or gradient (the NaN policy's; other skips are fp16 overflows)


class TrainStep:
    """``step(i)`` trains optimizer step ``i`` of ``model`` on ``batches``.

    Built once per run: it prepares the model and one fused AdamW over the parameter sets
    ``specs`` with Accelerate, then keeps the EMA of the prepared model's parameters (``ema``;
    ``None`` when ``cfg.ema_decay`` is 0). ``model`` is then the prepared model.
    """

    def __init__(self, accelerator, model: nn.Module, specs: list[OptimizerSpec],
                 batches: Callable[[int, int, int], dict], cfg: TrainConfig, kind: str):
        check_grad_clips(accelerator, {s.name: s.grad_clip for s in specs}, cfg, kind)
        self.accelerator, self.batches, self.cfg = accelerator, batches, cfg
        self.deepspeed = layout(accelerator) == "deepspeed"
        self.loss_scaler = has_loss_scaler(accelerator)
        self.model, self.optimizer = accelerator.prepare(model, build_optimizer(model, specs))
        if self.deepspeed:
            use_safe_deepspeed_checkpoints(self.model)  # ``model`` is DeepSpeed's engine
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.ema = EMA(self.unwrapped, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.peak_lr = {s.name: s.lr for s in specs}
        self.first_set = specs[0].name
        # each set's parameters as the optimizer holds them after prepare() (FSDP's shards), to clip
        held: dict[str, list] = {}
        for g in self.optimizer.param_groups:
            held.setdefault(g.get("name", self.first_set), []).extend(g["params"])
        self.clip_sets = [(held.get(s.name, []), s.grad_clip) for s in specs]
        self.norm_names = ["grad_norm"] + [f"grad_norm_{s.name}" for s in specs[1:]]

    def __call__(self, step: int) -> StepResult:
        accelerator, cfg, device = self.accelerator, self.cfg, self.accelerator.device
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, cfg, self.peak_lr[g.get("name", self.first_set)])
        self.model.train()
        sums, loss_finite = self._accumulate(step)
        norms = clip_gradients(accelerator, self.model, self.clip_sets)  # unscaled, each set by its own norm
        finite = loss_finite & _all_finite(norms, device)
        # the NaN policy's steps; with a loss scaler, a non-finite gradient alone is its fp16 overflow
        bad = ~loss_finite if self.loss_scaler else ~finite
        if self.deepspeed:
            self.optimizer.step()  # a no-op: the engine stepped inside backward(), unless its fp16 scaler overflowed
            skip = bad | torch.tensor(self.optimizer.step_was_skipped, device=device)
        else:
            skip = ~finite
            if accelerator.num_processes > 1:  # the same verdict on every process (one scalar, no host sync)
                skip = accelerator.reduce(skip.float(), reduction="sum") > 0
            if not self.loss_scaler:
                # the fused AdamW kernel leaves weights, moments and step count alone when this is 1;
                # a loss scaler sets its own in its step() (the same verdict on the gradients)
                self.optimizer.optimizer.found_inf = skip.float()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unwrapped, ~skip)
        sums |= {name: norm for name, norm in zip(self.norm_names, norms) if norm is not None}
        return StepResult(sums, skip, bad)

    def _accumulate(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward and backward over the step's ``grad_accum`` micro-batches: the metrics' means
        (``tokens``: their sum) and whether every micro-batch's loss was finite."""
        accelerator, accum, device = self.accelerator, self.cfg.grad_accum, self.accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
        sums: dict[str, torch.Tensor] = {}
        loss_finite = torch.ones((), dtype=torch.bool, device=device)
        for micro in range(accum):
            batch = self.batches(step * accum + micro, rank, world)
            sync = micro == accum - 1
            accelerator.sync_gradients = sync  # DeepSpeed's engine steps in the last micro-batch's backward()
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
                with input_autocast(accelerator):
                    loss, metrics = self.model(batch, step)
                # a non-finite loss is back-propagated too: its step is skipped, on the device
                accelerator.backward(loss)  # divides it by grad_accum
            loss = loss.detach().float()
            loss_finite &= torch.isfinite(loss)
            sums["loss"] = sums.get("loss", 0) + loss / accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + _on(device, v) / (1 if k == "tokens" else accum)
        # the micro-batches are over: zero_grad() and step() act only at a synced step
        accelerator.sync_gradients = True
        return sums, loss_finite


def _on(device: torch.device, v: Any) -> torch.Tensor:
    """A metric as a 0-dim fp32 tensor on ``device``: a tensor already there is not copied, a
    number is filled in on the device (no host-to-device copy)."""
    return v.detach().float().to(device) if isinstance(v, torch.Tensor) else torch.full((), float(v), device=device)


def _all_finite(norms: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """Whether every gradient norm is finite, as a 0-dim bool tensor (``None``: no norm yet)."""
    finite = [torch.isfinite(n) for n in norms if n is not None]
    return torch.stack(finite).all() if finite else torch.ones((), dtype=torch.bool, device=device)
