"""The optimizer of a run: parameter sets, the weight-decay rule, one fused AdamW, the schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vqgen.config import TrainConfig


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


# the layers whose weights are decayed
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups of ``model``'s trainable parameters: ``weight_decay`` on the weights of
    linear and convolution layers, none on embeddings (code tables, learned positions and
    tokens), norms, biases and gains.

    Embeddings are left alone (as in minGPT) because decoupled decay shrinks every row at every
    step while a row of a code table gets a gradient only in the steps that use its code: rare
    codes would be pulled towards zero between uses. nanoGPT decays every 2-D tensor instead,
    simpler with its embedding tied to the output head; here learned positions and tokens are
    2-D too, so the rule goes by layer type, not by shape.
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def default_optimizers(model: nn.Module, cfg: TrainConfig) -> list[OptimizerSpec]:
    """Every trainable parameter in one set with the run's lr, betas and clip."""
    return [OptimizerSpec("model", param_groups(model, cfg.weight_decay), cfg.lr, tuple(cfg.betas), cfg.grad_clip)]


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
