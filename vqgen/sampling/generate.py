"""Fast autoregressive sampling: static KV cache, classifier-free guidance, seeded draws,
optional speculative Jacobi decoding.

The text enters through cross-attention, so a prompt is a single start token: the first step
runs it at position 0 and every later step decodes one code. Per prompt, each layer's
cross-attention keys/values are computed once and reused at every step; self-attention
keys/values go into preallocated caches that a ``Decoder`` owns per shape and reuses across
calls (see ``cache.py``). The model is reached through one entry, ``Transformer.decode_step``.
Eagerly, attention reads only the filled part of the cache; compiled, shapes stay static (a
mask hides the unfilled tail) so the decode step is one graph, recorded once and CUDA-graphed
on GPU.

Guidance doubles the batch: rows [0, B) are conditional, rows [B, 2B) see the null caption,
and both streams receive the same sampled code. Each image's uniforms are drawn up front
from its own seed, and a code is drawn by inverse CDF (cumsum + searchsorted), so an image
does not depend on the batch it was generated in.

``speculative=W`` verifies windows of W draft codes per forward instead (``speculative.py``):
the same distribution over images, fewer forwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from einops import repeat
from torch import Tensor, nn

from vqgen.config import SETTINGS, DraftPrior, GuidanceSchedule, SamplingConfig, SamplingSettings
from vqgen.model import Transformer
from vqgen.sampling.cache import decoder_for, text_bucket
from vqgen.sampling.draws import SCHEDULES, draw_uniforms, guidance_scales, guide, sample_logits
from vqgen.sampling.speculative import speculative_decode, window_logits

__all__ = ["SCHEDULES", "decode_one", "generate", "sampling_options"]


def decode_one(
    model: Transformer, caches: nn.ModuleList, code: Tensor, pos: int | Tensor, u: Tensor, scale: Tensor,
    guided: bool, temperature: float, top_k: int, top_p: float,
) -> Tensor:
    """The cached decode step: each image's previous code [B] (ignored at position 0) at
    ``pos`` -> its next code [B], drawn with uniforms u [B] at guidance ``scale``."""
    codes = repeat(code, "b -> (s b) 1", s=2 if guided else 1)  # [S, 1]
    logits = model.decode_step(codes, pos, caches)[:, -1].float()  # [S, V]
    return sample_logits(guide(logits, scale, guided), u, temperature, top_k, top_p)


@functools.cache
def compiled(step, device_type: str):
    """``torch.compile`` of a step function, one per (function, device type): CUDA graphs on GPU."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)


@torch.inference_mode()
def generate(
    model: Transformer,
    text: Tensor,
    text_mask: Tensor,
    *,
    num_images: int = 1,
    cfg_scale: float = 1.5,
    cfg_schedule: GuidanceSchedule = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Tensor | int = 0,
    speculative: int = 0,
    speculative_prior: DraftPrior = "above",
    use_cache: bool = True,
    compile: bool = False,
    cache_dtype: torch.dtype | None = None,
    return_forwards: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample ``num_images`` code grids per prompt -> codes [P * num_images, h, w] (prompt-major).

    text [P, L, d_text] and text_mask [P, L] come from ``vqgen.text``. The sampling settings
    mean what the fields of ``vqgen.config.SamplingSettings`` say, and are checked by building
    one (a bad value raises the ``ConfigError`` config loading raises). The defaults here are
    generate's own (temperature 1, no top-k/top-p cut); a run's settings come in through
    ``sampling_options``. ``seeds``: an int gives image i of every prompt the seed ``seeds + i``
    (so a prompt gives the same images alone or in a batch); a LongTensor [P * num_images] sets
    each image's seed.

    ``speculative=W`` (W >= 1; 0 = off) decodes by speculative Jacobi windows of W codes: the
    images follow exactly the plain sampler's distribution, in fewer forwards, but are other
    draws from it (the seed fixes each image's draws for a given W; see ``speculative.py``).
    ``speculative_prior``: the draft of a position entering a window, ``"above"`` (the code
    above it in the grid) or ``"uniform"`` (a random code).
    ``use_cache=False`` recomputes the whole prefix at every step (the baseline the fast path
    is measured against). ``cache_dtype`` stores keys/values in another dtype (default: the
    model's on GPU, float32 on CPU); attention math runs in the wider of it and the model's.
    ``return_forwards``: also return each image's number of model forwards [P * num_images].
    """
    SamplingSettings(  # a bad setting raises here, as at config load and on the command line
        cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
        num_images=num_images, speculative=speculative, speculative_prior=speculative_prior,
        **({"seed": seeds} if isinstance(seeds, int) else {}),
    )
    if speculative and not use_cache:
        raise ValueError("speculative decoding needs the cache; drop use_cache=False or set speculative=0")
    h, w = model.cfg.grid
    N, device = h * w, model.bos.device
    B = text.shape[0] * num_images
    if isinstance(seeds, int):
        seeds = seeds + torch.arange(num_images).repeat(text.shape[0])  # image i of each prompt: seed + i
    if seeds.shape != (B,):
        raise ValueError(f"seeds must be an int or a tensor of shape [{B}] (prompts x num_images), got {tuple(seeds.shape)}")
    window = min(speculative, N)
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
        forwards = torch.full((B,), N, dtype=torch.long)
        if not use_cache:
            codes = torch.zeros(B, N, dtype=torch.long, device=device)
            u = draw_uniforms(seeds, N).to(device)  # [B, N]
            for t in range(N):
                x = model.inputs(repeat(codes[:, : t + 1], "b n -> (s b) n", s=2 if guided else 1))  # [S, t+1, D]
                logits = model.head(model.run(x, 0, context)[:, -1]).float()  # [S, V]
                codes[:, t] = sample_logits(guide(logits, scales[t], guided), u[:, t], temperature, top_k, top_p)
            return (codes.view(B, h, w), forwards) if return_forwards else codes.view(B, h, w)

        dtype = cache_dtype or (torch.float32 if device.type == "cpu" else model.bos.dtype)
        text_len = text_bucket(context.tokens.shape[1], model.cfg.max_text_len + 1)
        decoder = decoder_for(model, context.tokens.shape[0], N + window, text_len, dtype)
        decoder.load(model, context)
        if window:
            step = compiled(window_logits, device.type) if compile else window_logits
            codes, forwards = speculative_decode(
                model, decoder, step, seeds, window, scales, compact=not compile, prior=speculative_prior, **opts
            )
        else:
            codes = plain_decode(model, decoder.layers, seeds, scales, compile, opts)
        return (codes.view(B, h, w), forwards) if return_forwards else codes.view(B, h, w)
    finally:
        model.train(was_training)


def plain_decode(model: Transformer, caches: nn.ModuleList, seeds: Tensor, scales: Tensor, compile: bool, opts: dict) -> Tensor:
    """One code per forward for every image -> codes [B, N]."""
    N, device = model.cfg.seq_len, model.bos.device
    u = draw_uniforms(seeds, N).to(device)  # [B, N]
    step = compiled(decode_one, device.type) if compile else decode_one
    # compiled: positions as tensors keep every step's shapes identical
    positions = torch.arange(N, device=device)
    at = (lambda t: positions[t : t + 1]) if compile else (lambda t: t)
    codes = torch.zeros(len(seeds), N, dtype=torch.long, device=device)
    for t in range(N):  # at t = 0 the start embedding goes in and the code passed is ignored
        codes[:, t] = step(model, caches, codes[:, max(t - 1, 0)], at(t), u[:, t], scales[t], **opts)
    return codes


def sampling_options(settings: SamplingSettings) -> dict[str, Any]:
    """``generate`` keyword arguments for ``settings`` (``seeds=seed``: image i of every prompt
    at seed + i); a run config's ``sampling`` section also gives ``compile``."""
    options = {name: getattr(settings, name) for name in SETTINGS}
    options["seeds"] = options.pop("seed")
    if isinstance(settings, SamplingConfig):
        options["compile"] = settings.compile
    return options
