"""Fast autoregressive sampling: static KV cache, classifier-free guidance, seeded draws.

The text enters through cross-attention, so a prompt is a single start token: prefill runs
it at position 0 and every later step decodes one code. Per prompt, each layer's
cross-attention keys/values are computed once and reused at every step; self-attention
keys/values go into a preallocated cache. Eagerly, attention reads only the filled part of
the cache; compiled, shapes stay static (a mask hides the unfilled tail) so the decode step
is one graph, CUDA-graphed on GPU.

Guidance doubles the batch: rows [0, B) are conditional, rows [B, 2B) see the null caption,
and both streams receive the same sampled code. Each image's uniforms are drawn up front
from its own seed, and a code is drawn by inverse CDF (cumsum + searchsorted), so an image
does not depend on the batch it was generated in.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from einops import repeat
from torch import Tensor, nn

from vqgen.config import SamplingConfig
from vqgen.model import Context, Transformer

SCHEDULES = ("constant", "linear")


class KVCache(nn.Module):
    """One block's cache: self-attention keys/values [B, Hkv, T, Dh] filled in place, and the
    block's cross-attention keys/values over the prompt's text (``context``)."""

    def __init__(
        self, batch: int, kv_heads: int, max_len: int, head_dim: int, context: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype
    ):
        super().__init__()
        device = context[0].device
        self.register_buffer("k", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("slots", torch.arange(max_len, device=device))  # [T]
        k, v, mask = context
        self.context = k.to(dtype), v.to(dtype), mask

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v [B, Hkv, n, Dh] at ``pos``; return keys, values and mask to attend over."""
        n = k.shape[2]
        if isinstance(pos, int):  # eager: attend over only the filled prefix
            end = pos + n
            self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
            mask = None if n == 1 else torch.ones(n, end, dtype=torch.bool, device=k.device).tril(pos)  # [n, end]
            return self.k[:, :, :end], self.v[:, :, :end], mask
        # static shapes for torch.compile: write by index, mask the slots not yet filled
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v, self.slots <= pos[:, None]  # mask [n, T]


def make_caches(model: Transformer, context: Context, max_len: int | None = None, dtype: torch.dtype | None = None) -> nn.ModuleList:
    """One ``KVCache`` per block for the streams of ``context``, cross-attention K/V computed now.

    ``dtype`` defaults to the model's on GPU and to float32 on CPU, where bf16/fp16 attention
    kernels run several times slower than fp32 ones (the cache is small next to the weights).
    """
    cfg = model.cfg
    batch, device = context.tokens.shape[0], context.tokens.device
    dtype = dtype or (torch.float32 if device.type == "cpu" else context.tokens.dtype)
    caches = []
    for block in model.blocks:
        k, v = block.cross.context_kv(context.tokens)  # [B, Hkv, S, Dh]
        caches.append(KVCache(batch, cfg.kv_heads, max_len or cfg.seq_len, cfg.head_dim, (k, v, context.mask), dtype))
    return nn.ModuleList(caches)


# --------------------------------------------------------------------------------------
# Drawing a code from logits
# --------------------------------------------------------------------------------------


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """probs [B, K] (rows may be unnormalised) + uniforms u [B] in [0, 1) -> indices [B]:
    the first index whose cumulative mass exceeds u * total; zero-mass entries never win."""
    cdf = probs.cumsum(-1)  # [B, K]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    return index.clamp_(max=probs.shape[-1] - 1)[:, 0]


def top_p_mask(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest prefix of descending probs [B, K] whose mass reaches ``top_p``:
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


def guidance_scales(cfg_scale: float, schedule: str, steps: int) -> Tensor:
    """Guidance per step [steps]: constant, or linear from 1 at the first code to cfg_scale at the last."""
    if schedule == "constant":
        return torch.full((steps,), float(cfg_scale))
    if schedule == "linear":
        return 1 + (cfg_scale - 1) * torch.linspace(0, 1, steps)
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {list(SCHEDULES)}")


def draw_uniforms(seeds: Tensor, steps: int) -> Tensor:
    """One uniform per image and step [B, steps], each image's row from its own seed (on CPU,
    so a seed gives the same draws on every device)."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# --------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------


def next_code(
    model: Transformer, caches: nn.ModuleList | None, context: Context | None, x: Tensor, pos: int | Tensor,
    u: Tensor, scale: Tensor, guided: bool, temperature: float, top_k: int, top_p: float,
) -> Tensor:
    """Inputs x [S, n, D] at ``pos`` -> the next code of each image [B] (S = 2B when guided)."""
    logits = model.head(model.run(x, pos, context, caches)[:, -1]).float()  # [S, V]
    if guided:
        cond, uncond = logits.chunk(2)
        logits = torch.lerp(uncond, cond, scale)  # uncond + scale * (cond - uncond); exact at scale 1
    return sample_logits(logits, u, temperature, top_k, top_p)


def decode_one(model: Transformer, caches: nn.ModuleList, code: Tensor, pos: int | Tensor, u: Tensor, scale: Tensor, **opts) -> Tensor:
    """The cached decode step: the previous codes [B] at ``pos`` -> the next codes [B]."""
    streams = caches[0].k.shape[0] // code.shape[0]
    x = model.tok_emb(repeat(code, "b -> (s b) 1", s=streams))  # [S, 1, D]
    return next_code(model, caches, None, x, pos, u, scale, **opts)


@functools.cache
def _compiled_decode_one(device_type: str):
    mode = "reduce-overhead" if device_type == "cuda" else None  # CUDA graphs where available
    return torch.compile(decode_one, mode=mode, fullgraph=True)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: Transformer,
    text: Tensor,
    text_mask: Tensor,
    *,
    num_images: int = 1,
    cfg_scale: float = 1.5,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Tensor | int = 0,
    use_cache: bool = True,
    compile: bool = False,
) -> Tensor:
    """Sample ``num_images`` code grids per prompt -> codes [P * num_images, h, w] (prompt-major).

    text [P, L, d_text] and text_mask [P, L] come from ``vqgen.text``. ``seeds``: an int gives
    image i of every prompt the seed ``seeds + i`` (so a prompt gives the same images alone or
    in a batch); a LongTensor [P * num_images] sets each image's seed. ``use_cache=False``
    recomputes the whole prefix at every step (the baseline the fast path is measured against).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; for greedy decoding use top_k=1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    h, w = model.cfg.grid
    N, device = h * w, model.bos.device
    B = text.shape[0] * num_images
    if isinstance(seeds, int):
        seeds = seeds + torch.arange(num_images).repeat(text.shape[0])  # image i of each prompt: seed + i
    if seeds.shape != (B,):
        raise ValueError(f"seeds must be an int or a tensor of shape [{B}] (prompts x num_images), got {tuple(seeds.shape)}")
    u = draw_uniforms(seeds, N).to(device)  # [B, N]
    scales = guidance_scales(cfg_scale, cfg_schedule, N).to(device)  # [N]
    guided = bool((scales != 1).any())

    # streams: the conditional rows, then (guided) the same rows with the null caption
    text = repeat(text.to(device), "p l d -> (p i) l d", i=num_images)
    text_mask = repeat(text_mask.to(device), "p l -> (p i) l", i=num_images)
    drop = torch.zeros(B, dtype=torch.bool, device=device)
    if guided:
        text, text_mask, drop = torch.cat([text, text]), torch.cat([text_mask, text_mask]), torch.cat([drop, ~drop])
    opts: dict[str, Any] = dict(guided=guided, temperature=temperature, top_k=top_k, top_p=top_p)

    was_training = model.training
    model.eval()
    try:
        context = model.context(text, text_mask, drop)
        codes = torch.zeros(B, N, dtype=torch.long, device=device)
        if not use_cache:
            for t in range(N):
                x = model.inputs(repeat(codes[:, : t + 1], "b n -> (s b) n", s=2 if guided else 1))  # [S, t+1, D]
                codes[:, t] = next_code(model, None, context, x, 0, u[:, t], scales[t], **opts)
            return codes.view(B, h, w)

        caches = make_caches(model, context)
        step = _compiled_decode_one(device.type) if compile else decode_one
        # compiled: positions as tensors keep every step's shapes identical
        positions = torch.arange(N, device=device)
        at = (lambda t: positions[t : t + 1]) if compile else (lambda t: t)
        bos = model.bos.expand(context.tokens.shape[0], 1, -1)  # [S, 1, D]
        codes[:, 0] = next_code(model, caches, None, bos, at(0), u[:, 0], scales[0], **opts)
        for t in range(1, N):
            codes[:, t] = step(model, caches, codes[:, t - 1], at(t), u[:, t], scales[t], **opts)
        return codes.view(B, h, w)
    finally:
        model.train(was_training)


def sampling_options(cfg: SamplingConfig) -> dict[str, Any]:
    """``generate`` keyword arguments from the run config's ``sampling`` section."""
    return dict(
        num_images=cfg.num_images, cfg_scale=cfg.cfg_scale, cfg_schedule=cfg.cfg_schedule, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, seeds=cfg.seed, compile=cfg.compile,
    )
