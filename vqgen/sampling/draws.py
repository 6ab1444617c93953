"""Turning logits into codes: guidance, temperature/top-k/top-p, seeded inverse-CDF draws.

Every draw is an inverse CDF of one uniform, and each image's uniforms come from its own seed,
so an image does not depend on the batch it was generated in. ``probabilities`` gives the exact
distribution ``sample_logits`` draws from, which speculative decoding needs for its
acceptance test.
"""

from __future__ import annotations

import typing

import torch
from einops import rearrange
from torch import Tensor

from vqgen.config import GuidanceSchedule

SCHEDULES = typing.get_args(GuidanceSchedule)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """probs [B, K] (rows may be unnormalised) + uniforms u [B] in [0, 1) -> indices [B]:
    the first index whose cumulative mass exceeds u * total; zero-mass entries never win."""
    cdf = probs.cumsum(-1)  # [B, K]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    return index.clamp_(max=probs.shape[-1] - 1)[:, 0]


def top_p_mask(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest prefix of descending probs [..., K] whose mass reaches ``top_p``:
    a token stays when the mass before it is still below top_p (so the first always stays)."""
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    return mass_before < top_p


def sample_logits(logits: Tensor, u: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [B, V] + uniforms u [B] -> codes [B]. Without top-k/top-p nothing is sorted."""
    if temperature != 1.0:
        logits = logits / temperature
    if not top_k and top_p >= 1.0:
        return inverse_cdf(logits.softmax(-1), u)
    if top_k:
        logits, index = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # [B, k], descending
    else:
        logits, index = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = logits.softmax(-1)
    if top_p < 1.0:
        probs = probs * top_p_mask(probs, top_p)
    return index.gather(-1, inverse_cdf(probs, u)[:, None])[:, 0]


def probabilities(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [..., V] -> the normalised distribution [..., V] that ``sample_logits`` draws
    from: tempered, then cut to the top-k tokens and the top-p nucleus (ties broken as topk does)."""
    if temperature != 1.0:
        logits = logits / temperature
    if not top_k and top_p >= 1.0:
        return logits.softmax(-1)
    if top_k:
        kept, index = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # [..., k], descending
    else:
        kept, index = logits.sort(dim=-1, descending=True)
    probs = kept.softmax(-1)
    if top_p < 1.0:
        probs = probs * top_p_mask(probs, top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, index, probs)


def guide(logits: Tensor, scale: Tensor, guided: bool) -> Tensor:
    """Guided logits [B, ...] from the streams' logits [2B, ...] (image b's conditional row 2b,
    its null-caption row 2b + 1): uncond + scale * (cond - uncond), exact at scale 1; unguided
    logits pass through."""
    if not guided:
        return logits
    cond, uncond = rearrange(logits, "(b s) ... -> s b ...", s=2)
    return torch.lerp(uncond, cond, scale)


def guidance_scales(cfg_scale: float, schedule: str, steps: int) -> Tensor:
    """Guidance per step [steps]: constant, or linear from 1 at the first code to cfg_scale at the last."""
    if schedule == "constant":
        return torch.full((steps,), float(cfg_scale))
    if schedule == "linear":
        return 1 + (cfg_scale - 1) * torch.linspace(0, 1, steps)
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {list(SCHEDULES)}")


def draw_uniforms(seeds: Tensor, steps: int) -> Tensor:
    """``steps`` uniforms per image [B, steps], each image's row from its own seed (on CPU,
    so a seed gives the same draws on every device)."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
