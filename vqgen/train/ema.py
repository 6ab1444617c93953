"""Exponential moving average of the trained weights, kept on the device and never read by the host."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vqgen.train import TrainingError


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
    nearest-code search by dot product then passes over, so codebook usage collapses
    (docs/benchmarks.md, "Training runs", gives the measurement). With the warm-up, the EMA
    weights trail the codebook by a short window only.
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
