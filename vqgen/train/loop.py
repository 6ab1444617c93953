"""The one training loop behind both the tokenizer and the transformer.

A model family hands the loop a :class:`Task`: one ``nn.Module`` whose ``forward(batch, step)``
returns ``(loss, metrics)``, a pure function ``batches(i, rank, world)`` that says what each
process reads at micro-step ``i``, and an ``export`` that writes a loadable checkpoint from a
full state dict. The loop owns everything else, identically for both: Accelerate (DDP, FSDP,
DeepSpeed ZeRO 1/2, mixed precision), AdamW with warm-up + cosine, gradient accumulation and
clipping, EMA weights, NaN handling, atomic checkpoints every N steps and on SIGTERM/Ctrl-C, exact
resume, tqdm, wandb. What differs between Accelerate's backends lives in ``vqgen.train.backends``.

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
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from vqgen.checkpoint import atomic_write_text, load_weights, save_weights
from vqgen.config import Config, TrainConfig
from vqgen.train.backends import (
    check_backend,
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
class Task:
    """What the loop needs from a model family."""

    kind: str  # "tokenizer" | "transformer"
    model: nn.Module  # everything trainable; forward(batch, step) -> (loss, metrics)
    # (micro-step, rank, world) -> this process's batch; one with a ``skipped`` dict (reason ->
    # samples it dropped in this process) has the totals over processes logged as skipped_<reason>
    batches: Callable[[int, int, int], dict]
    export: Callable[[dict[str, torch.Tensor], Path], None]  # (model's full state dict, dir) -> loadable checkpoint
    preview: Callable[[nn.Module, int], dict[str, Any]] | None = None  # -> named PIL images
    param_groups: Callable[[nn.Module, float], list[dict]] | None = None


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# Data: a pure function of (micro-step, rank, world)
# --------------------------------------------------------------------------------------


def collate(samples: list[dict]) -> dict:
    """Stack tensors, list everything else (captions, scenes)."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class IndexedBatches:
    """Batches of a map-style dataset as a pure function of ``(i, rank, world)``.

    The global batch of micro-step ``i`` is positions ``[i * world * B, (i + 1) * world * B)``
    of an endless stream of epochs, each a permutation seeded by ``(seed, epoch)``; rank ``r``
    takes its contiguous slice. So resuming at step ``s`` reads exactly what an uninterrupted
    run would, and processes never read the same sample within a step.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, order)
        return self._perm[1]

    def indices(self, i: int, rank: int, world: int) -> list[int]:
        n = len(self.dataset)
        start = (i * world + rank) * self.batch_size
        return [int(self._order(p // n)[p % n]) for p in range(start, start + self.batch_size)]

    def __call__(self, i: int, rank: int, world: int) -> dict:
        return collate([self.dataset[j] for j in self.indices(i, rank, world)])


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
    it after ``accelerator.prepare``, which is where FSDP shards the parameters."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.shadow = [_local(p).detach().float().clone() for _, p in trainable]  # each of its local shape

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [_local(p).detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        """Load what ``state_dict`` returned (read from ``source``) onto the shadows' devices."""
        missing = set(self.names) - set(state)
        if missing:
            raise TrainingError(f"EMA weights in {source} lack {sorted(missing)[:5]}")
        wrong = [f"{n}: saved {tuple(state[n].shape)}, held here {tuple(s.shape)}"
                 for n, s in zip(self.names, self.shadow) if state[n].shape != s.shape]
        if wrong:
            raise TrainingError(f"EMA weights in {source} do not fit this model: {'; '.join(wrong[:5])}")
        self.shadow = [state[n].to(s.device, torch.float32).clone() for n, s in zip(self.names, self.shadow)]

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
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
        ema.load_state_dict(load_weights(ema_file), ema_file)
    return int(state["step"])


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step."""

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


def _scalar(v: Any) -> torch.Tensor:
    return v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))


def _plain_norm(norm: Any) -> torch.Tensor | None:
    """``accelerator.clip_grad_norm_``'s result as a float tensor: FSDP2 returns a replicated
    DTensor, DeepSpeed a float (None before its engine has computed one)."""
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return None if norm is None else torch.as_tensor(norm).detach().float()


def fit(accelerator, task: Task, cfg: TrainConfig, run_cfg: Config, out_dir: Path) -> dict[str, float]:
    """Train ``task.model`` for ``cfg.steps`` optimizer steps (resuming if a checkpoint exists).

    Returns the last log window's mean metrics plus ``step``, ``seconds`` and ``stopped_early``.
    """
    out_dir = Path(out_dir)
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_cfg.save(out_dir / "run_config.json")

    model = task.model
    # Under FSDP no process holds the full model after prepare(): the main process previews a
    # full copy made now, into which it loads the gathered weights (kept on CPU in between)
    replica = copy.deepcopy(model).cpu() if task.preview is not None and _is_sharded(accelerator) and main else None
    groups = (task.param_groups or default_param_groups)(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    if layout(accelerator) == "deepspeed":
        use_safe_deepspeed_checkpoints(model)  # ``model`` is DeepSpeed's engine
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, cfg.ema_decay) if cfg.ema_decay > 0 else None

    step = 0
    resume_from = latest_checkpoint(out_dir)
    if resume_from is not None:
        step = _load_checkpoint(accelerator, resume_from, ema, task.kind)
        accelerator.print(f"resumed from {resume_from} at step {step}")

    if cfg.report_to == "wandb":
        accelerator.init_trackers(
            "vqgen", config=run_cfg.to_dict(), init_kwargs={"wandb": {"name": f"{run_cfg.name}-{task.kind}", "dir": str(out_dir)}}
        )

    rank, world = accelerator.process_index, accelerator.num_processes
    window: dict[str, torch.Tensor] = {}
    last: dict[str, float] = {}
    window_steps = skipped = 0
    data_skipped: dict[str, int] = {}
    t_start = t_window = time.perf_counter()
    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=step, disable=not main, desc=f"train {task.kind}", dynamic_ncols=True)

    def flags(*values: bool) -> list[bool]:
        """Agree on per-process flags across processes (any process -> all)."""
        t = torch.tensor([float(v) for v in values], device=accelerator.device)
        if world > 1:
            t = accelerator.reduce(t, reduction="sum")
        return [bool(x > 0) for x in t.tolist()]

    with _StopSignal() as stop:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            metrics_sum: dict[str, torch.Tensor] = {}
            nonfinite = False
            for micro in range(cfg.grad_accum):
                batch = task.batches(step * cfg.grad_accum + micro, rank, world)
                sync = micro == cfg.grad_accum - 1
                accelerator.sync_gradients = sync  # DeepSpeed's engine steps in the last micro-batch's backward()
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with input_autocast(accelerator):
                        loss, metrics = model(batch, step)
                    (bad,) = flags(not torch.isfinite(loss.detach()).item())
                    if bad:
                        nonfinite = True
                        break
                    accelerator.backward(loss)  # divides it by grad_accum
                metrics_sum["loss"] = metrics_sum.get("loss", 0) + loss.detach().float() / cfg.grad_accum
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0) + _scalar(v) / (1 if k == "tokens" else cfg.grad_accum)
            # the micro-batches are over, even when a non-finite loss cut them short: zero_grad()
            # and step() act only at a synced step
            accelerator.sync_gradients = True

            grad_norm = None
            if not nonfinite:
                grad_norm = _plain_norm(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                )
                # with a loss scaler a non-finite gradient is its overflow: it skips the step itself
                finite = grad_norm is None or torch.isfinite(grad_norm).item()
                nonfinite = not finite and not has_loss_scaler(accelerator)
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nan == "stop":
                    skipping = "" if layout(accelerator) == "deepspeed" else (
                        f", or set training.{task.kind}.on_nan=skip to skip such steps")
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step} ({task.kind}); the last good checkpoint "
                        f"is {latest_checkpoint(out_dir)}. Lower the learning rate{skipping}."
                    )
                skipped += 1
                accelerator.print(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
            else:
                optimizer.step()  # a no-op under DeepSpeed, whose engine stepped inside backward()
                optimizer.zero_grad(set_to_none=True)
                if optimizer.step_was_skipped:  # an fp16 overflow: the loss scaler lowered its scale instead
                    skipped += 1
                    accelerator.print(f"step {step}: fp16 gradient overflow, step skipped by the loss scaler")
                else:
                    if ema is not None:
                        ema.update(unwrapped)
                    if grad_norm is not None:
                        metrics_sum["grad_norm"] = grad_norm
                    for k, v in metrics_sum.items():
                        window[k] = window.get(k, 0) + v
                    window_steps += 1
            step += 1
            bar.update(1)

            over_time = cfg.max_minutes > 0 and time.perf_counter() - t_start > cfg.max_minutes * 60
            (stop_now,) = flags(stop.requested or over_time)
            finishing = step >= cfg.steps or stop_now

            if window_steps and (step % cfg.log_every == 0 or finishing):
                names = sorted(window)
                values = torch.stack([window[k].to(accelerator.device) / window_steps for k in names])
                values = accelerator.reduce(values, reduction="mean") if world > 1 else values
                last = dict(zip(names, values.tolist()))
                data_skipped = _skipped_samples(task.batches, accelerator)
                last |= {f"skipped_{k}": v for k, v in data_skipped.items() if v}
                elapsed = time.perf_counter() - t_window
                if "tokens" in last:  # a per-step count: report the global throughput
                    last["tokens_per_s"] = last.pop("tokens") * window_steps * world / elapsed
                last.update(lr=lr, steps_per_s=window_steps / elapsed)
                window, window_steps, t_window = {}, 0, time.perf_counter()
                if main:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "lr"})
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **last}) + "\n")
                accelerator.log({f"{task.kind}/{k}": v for k, v in last.items()}, step=step)

            if task.preview is not None and (finishing or (cfg.sample_every and step % cfg.sample_every == 0)):
                _preview(task, model, ema, replica, step, out_dir, accelerator)

            if step % cfg.checkpoint_every == 0 or finishing:
                _save_checkpoint(accelerator, out_dir, step, ema, run_cfg, task.kind)
            if stop_now:
                stopped_early = step < cfg.steps
                why = "stop requested" if stop.requested else f"time limit of {cfg.max_minutes} min reached"
                accelerator.print(f"{why}: checkpoint saved at step {step}")
                break
    bar.close()

    with _full_state(accelerator, model, ema) as state:  # every process: a collective under FSDP
        if main:
            task.export(state, out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop.requested:
        raise KeyboardInterrupt(f"training stopped at step {step}; run the same command again to resume")
    return {**last, "step": step, "skipped_steps": skipped, "skipped_samples": data_skipped,
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
