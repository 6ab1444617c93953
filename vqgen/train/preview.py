"""Previews of a run: sample or reconstruction grids from its (EMA) weights, saved under ``samples/``.

The main process makes them from a full model without touching the training RNG. Under FSDP
no process holds the full model after ``prepare()``: the main process keeps a full copy made
before it (on the CPU in between), into which it loads the gathered weights for each preview.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vqgen.train.backends import input_autocast, layout
from vqgen.train.checkpointing import full_state
from vqgen.train.ema import EMA


class Previews:
    """``previews(model, ema, step)`` saves what ``make(full_model, step)`` draws (named PIL
    images) from the (EMA) weights of the prepared ``model``; a no-op when ``make`` is ``None``.
    ``previews.evaluate(model, ema, step)`` returns what ``evaluate(full_model, step)`` measures
    on the same weights (on the main process; ``{}`` elsewhere or without ``evaluate``).
    Build it with the ``kind`` run's ``model`` before ``accelerator.prepare``."""

    def __init__(self, accelerator, make: Callable[[nn.Module, int], dict[str, Image.Image]] | None, kind: str,
                 model: nn.Module, out_dir: Path, evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None):
        self.accelerator, self.make, self.kind, self.out_dir = accelerator, make, kind, Path(out_dir)
        self.measure = evaluate
        self.sharded = layout(accelerator) == "fsdp"
        main = accelerator.is_main_process
        wanted = make is not None or evaluate is not None
        self.replica = copy.deepcopy(model).cpu() if wanted and self.sharded and main else None
        self.failed = 0

    def __call__(self, model: nn.Module, ema: EMA | None, step: int) -> None:
        """Called on every process (under FSDP they gather the weights together)."""
        if self.make is not None:
            self._run(model, ema, step, "preview", self._draw)

    def evaluate(self, model: nn.Module, ema: EMA | None, step: int) -> dict[str, float]:
        """Called on every process, like a preview (a measurement that fails is reported the same way)."""
        if self.measure is None:
            return {}
        return self._run(model, ema, step, "held-out evaluation", self._inference(self.measure)) or {}

    def _run(self, model: nn.Module, ema: EMA | None, step: int, what: str, work: Callable[[nn.Module, int], Any]):
        with self._full_model(model, ema) as target:
            if target is None:
                return None
            # A preview changes nothing that training or a checkpoint holds (the EMA weights it
            # swaps in are swapped back, the RNG is forked). Raising would stop the main process
            # alone, while the others wait in their next collective, and end a run whose
            # checkpoints and export are sound: so a preview that fails is reported and training
            # goes on.
            try:
                return work(target, step)
            except Exception as e:
                self.failed += 1
                detail = traceback.format_exc() if self.failed == 1 else f"{type(e).__name__}: {e}\n"
                print(f"{self.kind}: the {what} at step {step} failed; training goes on, its checkpoints and export "
                      f"are not affected:\n{detail}", file=sys.stderr, end="", flush=True)
                return None

    def _inference(self, fn: Callable[[nn.Module, int], Any]) -> Callable[[nn.Module, int], Any]:
        """``fn`` run in eval mode, without gradients, under the training autocast, on a forked RNG."""
        accelerator = self.accelerator
        devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []

        def run(target: nn.Module, step: int) -> Any:
            was_training = target.training
            target.eval()
            try:
                with torch.random.fork_rng(devices=devices), torch.no_grad(), input_autocast(accelerator):
                    return fn(target, step)
            finally:
                target.train(was_training)

        return run

    def _draw(self, target: nn.Module, step: int) -> None:
        accelerator = self.accelerator
        images: dict[str, Image.Image] = self._inference(self.make)(target, step)
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        for name, image in images.items():
            image.save(self.out_dir / "samples" / f"{name}_{step:08d}.png")
        if images and any(t.name == "wandb" for t in accelerator.trackers):
            accelerator.get_tracker("wandb").log_images({f"{self.kind}/{k}": [v] for k, v in images.items()}, step=step)

    @contextlib.contextmanager
    def _full_model(self, model: nn.Module, ema: EMA | None) -> Iterator[nn.Module | None]:
        """The full model with the (EMA) weights on the main process, ``None`` on the others, for
        the block. Every process must enter: under FSDP they gather the full weights, which the
        main process loads into its replica (on the accelerator only for the block); otherwise
        the main process swaps the EMA weights into its own model."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        if self.sharded:
            with full_state(accelerator, model, ema) as state:
                if main:
                    self.replica.load_state_dict(state)
            if not main:
                yield None
                return
            self.replica.to(accelerator.device)
            try:
                yield self.replica
            finally:
                self.replica.cpu()  # leave the accelerator's memory to training
        elif not main:
            yield None
        else:
            target = accelerator.unwrap_model(model)
            with ema.applied(target) if ema is not None else contextlib.nullcontext():
                yield target
