"""The one training loop behind both the tokenizer and the transformer.

A model family hands the loop a :class:`Task`: one ``nn.Module`` whose ``forward(batch, step)``
returns ``(loss, metrics)``, a pure function ``batches(i, rank, world)`` that says what each
process reads at micro-step ``i``, and an ``export`` that writes a loadable checkpoint from a
full state dict; optionally its parameters split into :class:`OptimizerSpec` sets, each with its
own learning rate, betas and gradient clip (the tokenizer's discriminator). The loop owns
everything else, identically for both: Accelerate (DDP, FSDP, DeepSpeed ZeRO 1/2, mixed
precision), AdamW with warm-up + cosine, gradient accumulation and clipping, EMA weights, NaN
handling, atomic checkpoints every N steps and on SIGTERM/Ctrl-C, exact resume, tqdm, wandb.
What differs between Accelerate's backends lives in ``vqgen.train.backends``.

A training step never waits for the host: losses, metrics and the non-finite check stay on
the device, and a step with a non-finite loss or gradient is skipped there (the fused AdamW
kernel reads a ``found_inf`` flag, as under ``torch.amp.GradScaler``; the EMA ignores the step
too). The host reads them at sync points only: log steps, checkpoints and the end of the run.
So ``on_nan=stop`` stops at the next sync point, naming the first bad step, before anything
after it is saved; ``on_nan=skip`` reports the count there.

Under FSDP every process holds only shards of the parameters: the EMA follows each process's
shards, checkpoints hold one EMA file per process, and the export and previews gather full
weights with ``accelerator.get_state_dict``, a collective every process takes part in. Under
DeepSpeed the engine accumulates, clips and steps inside ``accelerator.backward()`` (the
optimizer's own ``step`` is then a no-op), so the loop's code path is the same.

Exact resume holds because nothing the loop does depends on history it does not save: the
data position is a function of the step, the learning rate is a function of the step, and the
RNG states, optimizer moments and EMA weights are restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from vqgen.checkpoint import CheckpointError, atomic_write_text, load_weights, record_training_state, save_weights
from vqgen.config import Config, TrainConfig, check_resume
from vqgen.train.backends import (
    BackendError,
    check_backend,
    clip_gradients,
    has_loss_scaler,
    input_autocast,
    layout,
    use_safe_deepspeed_checkpoints,
)

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
EMA_FILE = "ema.safetensors"  # in a checkpoint of an unsharded run: the full EMA weights


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint); the message names the step."""


@dataclass
class OptimizerSpec:
    """One set of a task's parameters with its own AdamW settings: peak learning rate (following
    the run's warm-up + cosine shape), betas and gradient clip (by this set's own norm).

    All sets live in one fused AdamW as param groups: AdamW is per-parameter, so that equals one
    optimizer per set, while Accelerate's fp16 loss scaler, DeepSpeed and the on-device step skip
    see the single optimizer they support. Its checkpointed state holds every set's moments, and
    each param group carries its set's ``name``.
    """

    name: str
    param_groups: list[dict]  # torch param groups: {"params": [...], "weight_decay": float}
    lr: float
    betas: tuple[float, float]
    grad_clip: float = 0.0  # max global norm of this set's gradients; 0 = no clipping

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]


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


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def resolve_precision(mixed_precision: str) -> str:
    """``auto`` -> bf16 where the hardware computes in it (Ampere+ GPUs, CPUs with AMX or
    AVX512-BF16), fp16 on older GPUs, fp32 on other CPUs, where emulated bf16 runs 3-5x slower."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AMX", "AVX512_BF16") else "no"


def setup_accelerator(train_cfg: TrainConfig, out_dir: Path):
    """Create the Accelerator and seed every RNG. Call before building models, so that
    ``torch.distributed`` is up when a quantizer decides whether to sync its codebook."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import set_seed

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


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (>= 2-D weights) only; norms, biases and gains are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def default_optimizers(model: nn.Module, cfg: TrainConfig) -> list[OptimizerSpec]:
    """Every trainable parameter in one set with the run's lr, betas and clip."""
    return [OptimizerSpec("model", default_param_groups(model, cfg.weight_decay), cfg.lr, tuple(cfg.betas), cfg.grad_clip)]


def build_optimizer(model: nn.Module, specs: list[OptimizerSpec]) -> torch.optim.AdamW:
    """One fused AdamW over every set (its param groups tagged with the set's ``name``).

    Fused, because its kernel skips a step on the device when ``optimizer.found_inf`` is 1 (what
    ``GradScaler`` relies on too): a non-finite step costs no host sync to decide.
    """
    owner: dict[int, str] = {}
    for spec in specs:
        for p in spec.params:
            if id(p) in owner:
                raise ValueError(f"a parameter is in both optimizer sets {owner[id(p)]!r} and {spec.name!r}")
            owner[id(p)] = spec.name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"trainable parameters in no optimizer set: {missing[:5]}")
    groups = [{**g, "name": spec.name, "betas": tuple(spec.betas)} for spec in specs for g in spec.param_groups if g["params"]]
    return torch.optim.AdamW(groups, lr=specs[0].lr, fused=True)


def lr_at(step: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """Linear warm-up to ``peak`` (default ``cfg.lr``), then cosine decay to ``peak * min_lr_ratio``
    at ``cfg.steps``."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = peak * cfg.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds, as a plain tensor sharing its storage: the local
    shard (dim-0 slice, possibly empty) under FSDP2, whose parameters are ``DTensor``s; the full
    parameter itself in a single process or under DDP."""
    return param.to_local() if isinstance(param, DTensor) else param


class EMA:
    """Exponential moving average, in fp32, of the trainable parameters as this process holds
    them: full tensors in a single process or under DDP, this process's shards under FSDP. Build
    it after ``accelerator.prepare``, which is where FSDP shards the parameters.

    The decay warms up: the update after ``n`` earlier ones uses ``min(decay, (1 + n) / (10 + n))``,
    so early weights (the random init above all) fade within tens of steps instead of
    ``1 / (1 - decay)``. Skipped steps (non-finite, fp16 overflow) neither move it nor count.

    Buffers are used as trained, not averaged. The one learnt buffer here is the VQ codebook of
    vector-quantize-pytorch, already a running average (of the encoder outputs each code wins),
    with dead codes restarted at random encoder outputs; an average of it mixes a restarted
    code's old and new places into a shorter vector (the codes are l2-normalised), which
    nearest-code search by dot product then passes over. Measured with EMA weights on held-out
    photographs after 600 steps (a 64 px f8 tokenizer): averaged codebook 16.0 dB PSNR with 3% of
    the codes in use, the codebook as trained 17.5 dB with 82%. With the warm-up, the EMA weights
    trail the codebook by a short window only.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.shadow = [_local(p).detach().float().clone() for _, p in trainable]  # each of its local shape
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)

    def decay_now(self) -> torch.Tensor:
        """The decay of the next update (a 0-dim device tensor)."""
        n = self.num_updates.float()
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Move the averages towards ``model``'s weights; ``applied`` (0-dim bool tensor, default
        true) says whether this step's update was applied, without a host sync."""
        applied = torch.ones((), dtype=torch.bool, device=self.num_updates.device) if applied is None else applied
        weight = (1.0 - self.decay_now()) * applied  # 0 for a skipped step
        params = [_local(p).detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, [weight] * len(params))
        self.num_updates += applied

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor], source: Path, num_updates: int) -> None:
        """Load what ``state_dict`` returned (read from ``source``) onto the shadows' devices."""
        missing = set(self.names) - set(state)
        if missing:
            raise TrainingError(f"EMA weights in {source} lack {sorted(missing)[:5]}")
        wrong = [f"{n}: saved {tuple(state[n].shape)}, held here {tuple(s.shape)}"
                 for n, s in zip(self.names, self.shadow) if state[n].shape != s.shape]
        if wrong:
            raise TrainingError(f"EMA weights in {source} do not fit this model: {'; '.join(wrong[:5])}")
        self.shadow = [state[n].to(s.device, torch.float32).clone() for n, s in zip(self.names, self.shadow)]
        self.num_updates.fill_(num_updates)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model`` (for export and previews); each
        process swaps its own part, in place, so FSDP gathers the EMA weights meanwhile."""
        params = dict(model.named_parameters())
        local = [_local(params[n]) for n in self.names]
        backup = [t.detach().clone() for t in local]
        with torch.no_grad():
            for t, s in zip(local, self.shadow):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(local, backup):
                    t.copy_(b)


@contextlib.contextmanager
def _full_state(accelerator, model: nn.Module, ema: EMA | None) -> Iterator[dict[str, torch.Tensor]]:
    """The full state dict of the prepared ``model``, with the EMA weights in place of the
    trained ones, valid inside the block (under DDP its tensors are the live parameters).

    Under FSDP this gathers the shards: every process must enter, and only the main process
    receives the tensors (full-size, on CPU).
    """
    with ema.applied(accelerator.unwrap_model(model)) if ema is not None else contextlib.nullcontext():
        yield accelerator.get_state_dict(model)


def _is_sharded(accelerator) -> bool:
    """Whether each process holds only shards of the parameters (FSDP)."""
    return layout(accelerator) == "fsdp"


# --------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_XXXXXXXX/, written to a temp dir and renamed
# --------------------------------------------------------------------------------------


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (its ``trainer_state.json`` is written last)."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _ema_shard_file(rank: int) -> str:
    """Under FSDP each process saves the EMA of its own shards to a file of its own."""
    return f"ema.rank{rank:05d}.safetensors"


def _save_checkpoint(accelerator, out_dir: Path, step: int, ema: EMA | None, run_cfg: Config, kind: str) -> Path:
    root = Path(out_dir) / CHECKPOINTS
    final, tmp = _step_dir(root, step), root / f".step_{step:08d}.tmp"
    sharded = _is_sharded(accelerator)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # model and optimizer (safetensors; per-process shards under FSDP; DeepSpeed's own files under
    # DeepSpeed) and every process's RNG states; all loaded weights_only
    accelerator.save_state(str(tmp), safe_serialization=True)
    if ema is not None and sharded:
        save_weights(tmp / _ema_shard_file(accelerator.process_index), ema.state_dict())
    accelerator.wait_for_everyone()  # every process's files are in tmp before it is renamed
    if accelerator.is_main_process:
        if ema is not None and not sharded:
            save_weights(tmp / EMA_FILE, ema.state_dict())
        run_cfg.save(tmp / "config.json")
        state = {"kind": kind, "step": step, "processes": accelerator.num_processes, "layout": layout(accelerator)}
        if ema is not None:
            state["ema_updates"] = int(ema.num_updates)  # the EMA's warm-up position
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_state(path: str | Path, weights: Literal["raw", "ema"] = "raw") -> dict[str, torch.Tensor]:
    """The full state dict of the model in the training checkpoint ``path``
    (``<out_dir>/checkpoints/step_XXXXXXXX``): its trained weights (``weights="raw"``), or its
    EMA weights with the buffers as trained (``"ema"``: what the run's export holds).

    Reads checkpoints of unsharded runs (a single process or DDP); FSDP and DeepSpeed keep
    their weights in per-process shards."""
    path = Path(path)
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r}; use 'raw' or 'ema'")
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (it has no trainer_state.json)")
    trainer = json.loads(state_file.read_text())
    saved = trainer.get("layout") or ("fsdp" if trainer.get("sharded") else "replicated")  # "sharded": older checkpoints
    if saved != "replicated":
        raise CheckpointError(f"{path} holds the per-process shards of {'an FSDP' if saved == 'fsdp' else 'a DeepSpeed'} "
                              "run; resume that run to export its full weights")
    state = load_weights(path / "model.safetensors")  # Accelerate's name for the one prepared model
    if weights == "ema":
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} has no {EMA_FILE}: its run kept no EMA (ema_decay 0); use its raw weights")
        state |= load_weights(path / EMA_FILE)  # parameters only: buffers stay as trained, as in the export
    return state


def _describe_run(run_layout: str, processes: Any) -> str:
    if run_layout == "replicated":
        return "an unsharded run (single process or DDP)"
    return f"{'an FSDP' if run_layout == 'fsdp' else 'a DeepSpeed'} run of {processes} processes"


def _load_checkpoint(accelerator, path: Path, ema: EMA | None, kind: str) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("kind") != kind:
        raise TrainingError(f"{path} is a {state.get('kind')!r} checkpoint; this run trains a {kind!r}")
    # each process of a sharded run (FSDP, DeepSpeed) holds its own part of the state: the same
    # layout and number of processes must read it back
    here, world = layout(accelerator), accelerator.num_processes
    saved = state.get("layout") or ("fsdp" if state.get("sharded") else "replicated")  # "sharded": older checkpoints
    if saved != here or (here != "replicated" and state.get("processes") != world):
        raise TrainingError(
            f"{path} was written by {_describe_run(saved, state.get('processes'))}, but this is "
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
        ema_file = path / (_ema_shard_file(accelerator.process_index) if here == "fsdp" else EMA_FILE)
        if not ema_file.is_file():
            raise TrainingError(f"{path} has no {ema_file.name} but EMA is enabled (ema_decay > 0)")
        # checkpoints written before the warm-up counted updates: every step was one
        ema.load_state_dict(load_weights(ema_file), ema_file, int(state.get("ema_updates", state["step"])))
    return int(state["step"])


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _StopSignal:
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


NEVER = 2**62  # "no bad step yet", in the on-device record of the first one


def _on(device: torch.device, v: Any) -> torch.Tensor:
    """A metric as a 0-dim fp32 tensor on ``device``: a tensor already there is not copied, a
    number is filled in on the device (no host-to-device copy)."""
    return v.detach().float().to(device) if isinstance(v, torch.Tensor) else torch.full((), float(v), device=device)


def _all_finite(norms: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """Whether every gradient norm is finite, as a 0-dim bool tensor (``None``: no norm yet)."""
    finite = [torch.isfinite(n) for n in norms if n is not None]
    return torch.stack(finite).all() if finite else torch.ones((), dtype=torch.bool, device=device)


@dataclass
class _Reading:
    """What the host learns at a sync point (agreed by every process)."""

    skipped: int  # steps whose update was not applied, so far
    nonfinite: int  # ... of which had a non-finite loss or gradient (the NaN policy's; the rest: fp16 overflow)
    first_bad: int  # the first of those (NEVER: none)
    stop: bool  # some process wants to stop (signal, time limit)
    applied: int  # applied steps in the current window
    means: dict[str, float]  # the window's metrics: mean over its applied steps and the processes


class _StepRecord:
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

    def add(self, step: int, metrics: dict[str, torch.Tensor], skip: torch.Tensor, bad: torch.Tensor) -> None:
        """Record ``step``: its metrics (0-dim device tensors), whether its update was skipped, and
        whether it had a non-finite loss or gradient (0-dim bool tensors)."""
        applied = ~skip
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(applied, v, 0.0)  # where(): a skipped NaN stays out
        self.applied += applied
        self.skipped += skip
        self.nonfinite += bad
        self.first_bad = torch.where(bad & (self.first_bad == NEVER), step, self.first_bad)
        self.steps += 1

    def read(self, accelerator, wants_stop: bool) -> _Reading:
        """One host sync; with several processes one gather, whose result every process agrees on."""
        names = sorted(self.sums)
        stop = torch.full((), float(wants_stop), device=self.device)
        values = torch.stack([self.skipped, self.nonfinite, stop, self.applied, *(self.sums[k] for k in names)])
        first, world = self.first_bad, accelerator.num_processes
        if world > 1:
            values, first = accelerator.gather(values[None]), accelerator.gather(first[None])
        rows = values.reshape(world, -1).tolist()
        applied = int(rows[0][3])  # the same on every process: they agree on each step's skip
        return _Reading(
            skipped=int(max(r[0] for r in rows)),
            nonfinite=int(max(r[1] for r in rows)),
            first_bad=int(first.min()),
            stop=any(r[2] for r in rows),
            applied=applied,
            means={k: sum(r[4 + i] for r in rows) / (world * applied) for i, k in enumerate(names)} if applied else {},
        )


def fit(accelerator, task: Task, cfg: TrainConfig, run_cfg: Config, out_dir: Path) -> dict[str, float]:
    """Train ``task.model`` for ``cfg.steps`` optimizer steps (resuming if a checkpoint exists).

    Returns the last log window's mean metrics plus ``step``, ``skipped_steps``, ``seconds`` and
    ``stopped_early``.
    """
    out_dir = Path(out_dir)
    main = accelerator.is_main_process
    previous = latest_checkpoint(out_dir)
    if previous is not None:  # before anything is written: a config that would change the run is refused
        for change in check_resume(previous / "config.json", run_cfg, task.kind):
            accelerator.print(f"resuming with {change}")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_cfg.save(out_dir / "run_config.json")

    model = task.model
    # Under FSDP no process holds the full model after prepare(): the main process previews a
    # full copy made now, into which it loads the gathered weights (kept on CPU in between)
    replica = copy.deepcopy(model).cpu() if task.preview is not None and _is_sharded(accelerator) and main else None
    specs = (task.optimizers or default_optimizers)(model, cfg)
    deepspeed = layout(accelerator) == "deepspeed"
    if deepspeed and any(s.grad_clip != cfg.grad_clip for s in specs):
        odd = next(s for s in specs if s.grad_clip != cfg.grad_clip)
        raise BackendError(
            f"the {odd.name!r} parameters of the {task.kind} ask for their own gradient clip ({odd.grad_clip}), but "
            f"DeepSpeed's engine clips all gradients jointly by training.{task.kind}.grad_clip ({cfg.grad_clip}); "
            "make the two agree, or train under DDP or FSDP"
        )
    peak_lr = {s.name: s.lr for s in specs}
    model, optimizer = accelerator.prepare(model, build_optimizer(model, specs))
    if deepspeed:
        use_safe_deepspeed_checkpoints(model)  # ``model`` is DeepSpeed's engine
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # each set's parameters as the optimizer holds them after prepare() (FSDP's shards), to clip
    held: dict[str, list] = {}
    for g in optimizer.param_groups:
        held.setdefault(g.get("name", specs[0].name), []).extend(g["params"])
    clip_sets = [(held.get(s.name, []), s.grad_clip) for s in specs]
    norm_names = ["grad_norm"] + [f"grad_norm_{s.name}" for s in specs[1:]]

    step = 0
    resume_from = latest_checkpoint(out_dir)
    if resume_from is not None:
        step = _load_checkpoint(accelerator, resume_from, ema, task.kind)
        accelerator.print(f"resumed from {resume_from} at step {step}")

    if cfg.report_to == "wandb":
        accelerator.init_trackers(
            "vqgen", config=run_cfg.to_dict(), init_kwargs={"wandb": {"name": f"{run_cfg.name}-{task.kind}", "dir": str(out_dir)}}
        )

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    scaler = has_loss_scaler(accelerator)
    record = _StepRecord(device)  # on the device, read at sync points: log steps, checkpoints, the end
    seen = _Reading(0, 0, NEVER, False, 0, {})  # what the host has read and reported so far
    last: dict[str, float] = {}
    data_skipped: dict[str, int] = {}
    t_start = time.perf_counter()
    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=step, disable=not main, desc=f"train {task.kind}", dynamic_ncols=True)

    with _StopSignal() as stop:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, cfg, peak_lr[g.get("name", specs[0].name)])
            model.train()
            step_sums: dict[str, torch.Tensor] = {}
            loss_finite = torch.ones((), dtype=torch.bool, device=device)
            for micro in range(cfg.grad_accum):
                batch = task.batches(step * cfg.grad_accum + micro, rank, world)
                sync = micro == cfg.grad_accum - 1
                accelerator.sync_gradients = sync  # DeepSpeed's engine steps in the last micro-batch's backward()
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with input_autocast(accelerator):
                        loss, metrics = model(batch, step)
                    # a non-finite loss is back-propagated too: its step is skipped below, on the device
                    accelerator.backward(loss)  # divides it by grad_accum
                loss = loss.detach().float()
                loss_finite &= torch.isfinite(loss)
                step_sums["loss"] = step_sums.get("loss", 0) + loss / cfg.grad_accum
                for k, v in metrics.items():
                    step_sums[k] = step_sums.get(k, 0) + _on(device, v) / (1 if k == "tokens" else cfg.grad_accum)
            # the micro-batches are over: zero_grad() and step() act only at a synced step
            accelerator.sync_gradients = True

            norms = clip_gradients(accelerator, model, clip_sets)  # unscaled, each set by its own norm
            finite = loss_finite & _all_finite(norms, device)
            # the NaN policy's steps; with a loss scaler, a non-finite gradient alone is its fp16 overflow
            bad = ~loss_finite if scaler else ~finite
            if deepspeed:
                optimizer.step()  # a no-op: the engine stepped inside backward(), unless its fp16 scaler overflowed
                skip = bad | torch.tensor(optimizer.step_was_skipped, device=device)
            else:
                skip = ~finite
                if world > 1:  # the same verdict on every process (one scalar, no host sync)
                    skip = accelerator.reduce(skip.float(), reduction="sum") > 0
                if not scaler:
                    # the fused AdamW kernel leaves weights, moments and step count alone when this is 1;
                    # a loss scaler sets its own in its step() (the same verdict on the gradients)
                    optimizer.optimizer.found_inf = skip.float()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(unwrapped, ~skip)
            step_sums |= {name: norm for name, norm in zip(norm_names, norms) if norm is not None}
            record.add(step, step_sums, skip, bad)
            step += 1
            bar.update(1)

            over_time = cfg.max_minutes > 0 and time.perf_counter() - t_start > cfg.max_minutes * 60
            wants_stop = stop.requested or over_time
            # one process stops at once; several agree at the next sync point, saving a per-step collective
            sample_due = cfg.sample_every and step % cfg.sample_every == 0
            if not (step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step >= cfg.steps or sample_due
                    or (world == 1 and wants_stop)):
                continue

            now = record.read(accelerator, wants_stop)  # the sync point: the host reads the device's record
            finishing = step >= cfg.steps or now.stop
            if now.nonfinite > seen.nonfinite:
                if cfg.on_nan == "stop":
                    skipping = "" if deepspeed else f", or set training.{task.kind}.on_nan=skip to skip such steps"
                    raise TrainingError(
                        f"non-finite loss or gradient at step {now.first_bad} ({task.kind}), seen at step {step}; "
                        f"nothing after it was saved, the last good checkpoint is {latest_checkpoint(out_dir)}. "
                        f"Lower the learning rate{skipping}."
                    )
                accelerator.print(f"step {step}: {now.nonfinite - seen.nonfinite} step(s) with a non-finite loss or "
                                  f"gradient skipped ({now.nonfinite} so far, the first at step {now.first_bad})")
            overflows = (now.skipped - now.nonfinite) - (seen.skipped - seen.nonfinite)
            if overflows:
                accelerator.print(f"step {step}: the fp16 loss scaler skipped {overflows} overflowing step(s)")
            seen = now

            if now.applied and (step % cfg.log_every == 0 or finishing):
                last = dict(now.means)
                data_skipped = _skipped_samples(task.batches, accelerator)
                last |= {f"skipped_{k}": v for k, v in data_skipped.items() if v}
                elapsed = time.perf_counter() - record.started
                if "tokens" in last:  # a per-step count: report the global throughput
                    last["tokens_per_s"] = last.pop("tokens") * now.applied * world / elapsed
                last.update(lr=lr, steps_per_s=record.steps / elapsed, skipped_steps=now.skipped)
                record.new_window()
                if main:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "lr"})
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **last}) + "\n")
                accelerator.log({f"{task.kind}/{k}": v for k, v in last.items()}, step=step)

            if task.preview is not None and (finishing or sample_due):
                _preview(task, model, ema, replica, step, out_dir, accelerator)

            if step % cfg.checkpoint_every == 0 or finishing:
                _save_checkpoint(accelerator, out_dir, step, ema, run_cfg, task.kind)
            if now.stop:
                stopped_early = step < cfg.steps
                why = f"time limit of {cfg.max_minutes} min reached" if over_time else "stop requested"
                accelerator.print(f"{why}: checkpoint saved at step {step}")
                break
    bar.close()

    with _full_state(accelerator, model, ema) as state:  # every process: a collective under FSDP
        if main:
            task.export(state, out_dir)
            record_training_state(out_dir, step, cfg.steps)  # a run cut short says so in its export
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop.requested:
        raise KeyboardInterrupt(f"training stopped at step {step}; run the same command again to resume")
    return {**last, "step": step, "skipped_steps": seen.skipped, "skipped_samples": data_skipped,
            "seconds": time.perf_counter() - t_start, "stopped_early": stopped_early}


def _skipped_samples(batches: Any, accelerator) -> dict[str, int]:
    """The samples ``batches`` dropped (reason -> count), summed over processes (a collective)."""
    counts = getattr(batches, "skipped", None)
    if counts is None:
        return {}
    names = sorted(counts)  # every process's batches know every reason: the same keys everywhere
    totals = torch.tensor([float(counts[k]) for k in names], device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return {k: int(v) for k, v in zip(names, totals.tolist())}


@contextlib.contextmanager
def _preview_model(
    accelerator, model: nn.Module, ema: EMA | None, replica: nn.Module | None
) -> Iterator[nn.Module | None]:
    """The full model with the (EMA) weights on the main process, ``None`` on the others, for
    the block. Every process must enter: under FSDP they gather the full weights, which the main
    process loads into ``replica`` (its full copy of the model, on the accelerator only for the
    block); otherwise the main process swaps the EMA weights into its own model."""
    main = accelerator.is_main_process
    if _is_sharded(accelerator):
        with _full_state(accelerator, model, ema) as state:
            if main:
                replica.load_state_dict(state)
        if not main:
            yield None
            return
        replica.to(accelerator.device)
        try:
            yield replica
        finally:
            replica.cpu()  # leave the accelerator's memory to training
    elif not main:
        yield None
    else:
        target = accelerator.unwrap_model(model)
        with ema.applied(target) if ema is not None else contextlib.nullcontext():
            yield target


def _preview(task: Task, model: nn.Module, ema: EMA | None, replica: nn.Module | None, step: int, out_dir: Path,
             accelerator) -> None:
    """Sample/reconstruction grids from the (EMA) weights, made by the main process without
    touching the training RNG; called on every process (see ``_preview_model``)."""
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with _preview_model(accelerator, model, ema, replica) as target:
        if target is None:
            return
        was_training = target.training
        target.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), input_autocast(accelerator):
            images = task.preview(target, step)
        target.train(was_training)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out_dir / "samples" / f"{name}_{step:08d}.png")
    if images and any(t.name == "wandb" for t in accelerator.trackers):
        accelerator.get_tracker("wandb").log_images({f"{task.kind}/{k}": [v] for k, v in images.items()}, step=step)
