"""A run's training checkpoints under Accelerate: save, resume, and the export of its weights.

``<out_dir>/checkpoints/step_XXXXXXXX/`` (its files: ``vqgen.checkpoint``) is written to a
temporary directory and renamed into place once every process has written its part, so a crash
never leaves a half-written checkpoint; the newest ``KEEP_CHECKPOINTS`` are kept. Resume holds
exactly because nothing the loop does depends on history it does not save: the data position
and the learning rate are functions of the step, and the RNG states, optimizer moments and EMA
weights are restored from the checkpoint.

Under FSDP every process holds only shards: the EMA follows each process's shards, checkpoints
hold one EMA file per process, and the export gathers the full weights with
``accelerator.get_state_dict``, a collective every process takes part in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from vqgen.checkpoint import (
    CHECKPOINTS,
    EMA_FILE,
    TRAINER_STATE,
    ema_shard_file,
    latest_checkpoint,
    load_weights,
    read_trainer_state,
    record_training_state,
    save_weights,
    step_dir,
)
from vqgen.config import Config, check_resume
from vqgen.files import atomic_write_text
from vqgen.train import TrainingError
from vqgen.train.backends import layout
from vqgen.train.ema import EMA

KEEP_CHECKPOINTS = 2


class Checkpointer:
    """The training checkpoints of the ``kind`` run in ``out_dir`` with config ``run_cfg``.

    Every method is called on every process (each saves and loads its own part)."""

    def __init__(self, accelerator, out_dir: Path, run_cfg: Config, kind: str):
        self.accelerator, self.out_dir, self.run_cfg, self.kind = accelerator, Path(out_dir), run_cfg, kind

    def check_config(self) -> None:
        """Refuse to resume with a config that would change the run; print the changes allowed."""
        previous = latest_checkpoint(self.out_dir)
        if previous is not None:
            for change in check_resume(previous / "config.json", self.run_cfg, self.kind):
                self.accelerator.print(f"resuming with {change}")

    def resume(self, ema: EMA | None) -> int:
        """Load the newest checkpoint, if any, into the prepared model, optimizer, RNGs and
        ``ema``; returns the step to go on from (0 without one)."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return 0
        accelerator, state = self.accelerator, read_trainer_state(path)
        if state["kind"] != self.kind:
            raise TrainingError(f"{path} is a {state['kind']!r} checkpoint; this run trains a {self.kind!r}")
        # each process of a sharded run (FSDP, DeepSpeed) holds its own part of the state: the same
        # layout and number of processes must read it back
        here, world, saved = layout(accelerator), accelerator.num_processes, state["layout"]
        if saved != here or (here != "replicated" and state["processes"] != world):
            raise TrainingError(
                f"{path} was written by {_describe_run(saved, state['processes'])}, but this is "
                f"{_describe_run(here, world)}; resume with the Accelerate config and number of processes it was "
                "written with"
            )
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # a key/shape mismatch from a checkpoint of another model
            raise TrainingError(
                f"cannot resume from {path}: {e}\nIt was written for a differently configured model; "
                "use a new output directory or restore the config saved beside it (config.json)."
            ) from e
        if ema is not None:
            ema_file = path / (ema_shard_file(accelerator.process_index) if here == "fsdp" else EMA_FILE)
            if not ema_file.is_file():
                raise TrainingError(f"{path} has no {ema_file.name} but EMA is enabled (ema_decay > 0)")
            ema.load_state_dict(load_weights(ema_file), ema_file, int(state["ema_updates"]))
        accelerator.print(f"resumed from {path} at step {state['step']}")
        return int(state["step"])

    def save(self, step: int, ema: EMA | None) -> Path:
        """Write the checkpoint of ``step`` (a collective) and drop all but the newest ones."""
        accelerator = self.accelerator
        final = step_dir(self.out_dir, step)
        tmp = final.with_name(f".{final.name}.tmp")
        sharded = layout(accelerator) == "fsdp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # model and optimizer (safetensors; per-process shards under FSDP; DeepSpeed's own files under
        # DeepSpeed) and every process's RNG states; all loaded weights_only
        accelerator.save_state(str(tmp), safe_serialization=True)
        if ema is not None and sharded:
            save_weights(tmp / ema_shard_file(accelerator.process_index), ema.state_dict())
        accelerator.wait_for_everyone()  # every process's files are in tmp before it is renamed
        if accelerator.is_main_process:
            if ema is not None and not sharded:
                save_weights(tmp / EMA_FILE, ema.state_dict())
            self.run_cfg.save(tmp / "config.json")
            state = {"kind": self.kind, "step": step, "processes": accelerator.num_processes, "layout": layout(accelerator)}
            if ema is not None:
                state["ema_updates"] = int(ema.num_updates)  # the EMA's warm-up position
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted((self.out_dir / CHECKPOINTS).glob("step_*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


def _describe_run(run_layout: str, processes: int) -> str:
    if run_layout == "replicated":
        return "an unsharded run (single process or DDP)"
    return f"{'an FSDP' if run_layout == 'fsdp' else 'a DeepSpeed'} run of {processes} processes"


@contextlib.contextmanager
def full_state(accelerator, model: nn.Module, ema: EMA | None) -> Iterator[dict[str, torch.Tensor]]:
    """The full state dict of the prepared ``model``, with the EMA weights in place of the
    trained ones, valid inside the block (under DDP its tensors are the live parameters).

    Under FSDP this gathers the shards: every process must enter, and only the main process
    receives the tensors (full-size, on CPU).
    """
    with ema.applied(accelerator.unwrap_model(model)) if ema is not None else contextlib.nullcontext():
        yield accelerator.get_state_dict(model)


def export(accelerator, model: nn.Module, ema: EMA | None, write: Callable[[dict[str, torch.Tensor], Path], None],
           out_dir: Path, step: int, steps: int) -> None:
    """``write`` the loadable checkpoint of the (EMA) weights at ``step`` of ``steps`` into
    ``out_dir`` (its config records how far the run got). Every process calls it."""
    with full_state(accelerator, model, ema) as state:  # a collective under FSDP
        if accelerator.is_main_process:
            write(state, out_dir)
            record_training_state(out_dir, step, steps)  # a run cut short says so in its export
    accelerator.wait_for_everyone()
