"""Fast autoregressive sampling: static KV cache, classifier-free guidance, seeded draws,
optional speculative Jacobi decoding.

The text enters through cross-attention, so a prompt is a single start token: the first step
runs it at position 0 and every later step decodes one code. Every path runs through the
model's decode contract (``Transformer.setup_caches``, ``write_text``, ``decode_step``): per
prompt, each block's cross-attention keys/values are written into the cache's rows once, and
each step writes its self-attention keys/values at ``input_pos`` [S, n]. The model keeps the
cache of its last shape (rows, slots, text bucket), so calls of one shape reuse it. Eager and
compiled steps are the same code; eagerly the loop narrows the slots a step attends over to
those filled so far, compiled it keeps them all (a mask hides the unfilled tail), so the step
is one graph, recorded once and CUDA-graphed on GPU. The decode loops never wait on the host,
except speculative decoding's one read per window (which images finished).

Guidance doubles the rows: image b's conditional stream is row 2b, its null-caption stream
row 2b + 1 (a linked pair), and both receive the same sampled code. Each image's uniforms are
drawn up front from its own seed, and a code is drawn by inverse CDF (cumsum + searchsorted),
so an image does not depend on the batch it was generated in.

``speculative=W`` verifies windows of W draft codes per forward instead (``speculative.py``):
the same distribution over images, fewer forwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from vqgen.config import SETTINGS, DraftPrior, GuidanceSchedule, SamplingConfig, SamplingSettings
from vqgen.model import Context, KVCache, Transformer
from vqgen.sampling.draft import check_draft, draft_decode, draft_logits
from vqgen.sampling.draws import SCHEDULES, draw_uniforms, guidance_scales, guide, sample_logits
from vqgen.sampling.relaxed import nearest_codes
from vqgen.sampling.speculative import speculative_decode, window_logits
from vqgen.tokenizer import digit_vectors

__all__ = ["SCHEDULES", "decode_one", "generate", "sampling_options", "text_bucket"]

MIN_TEXT_BUCKET = 8


def decode_one(
    model: Transformer, cache: KVCache, code: Tensor, t: Tensor, u: Tensor, scale: Tensor,
    guided: bool, temperature: float, top_k: int, top_p: float,
) -> Tensor:
    """The cached decode step at position t [1]: each image's previous code [B] (ignored at
    position 0) -> its next code [B], drawn with uniforms u [B] at guidance ``scale``."""
    codes = repeat(code, "b -> (b s) 1", s=2 if guided else 1)  # [S, 1]
    logits = model.decode_step(codes, t.expand_as(codes), cache)[:, -1].float()  # [S, V]
    return sample_logits(guide(logits, scale, guided), u, temperature, top_k, top_p)


def text_bucket(length: int, longest: int) -> int:
    """Text slots for a context of ``length`` tokens (null token included): the next power of
    two from 8, capped at ``longest`` (the model's null token + max_text_len), so prompts of
    other lengths share a cache shape and a compiled step."""
    bucket = max(MIN_TEXT_BUCKET, 1 << (length - 1).bit_length())
    return max(length, min(bucket, longest))


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
    draft: Transformer | None = None,
    speculative_tolerance: float = 0.0,
    speculative_neighbours: int = 8,
    neighbours: Tensor | None = None,
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
    ``draft``: a small model over the same codes and text (``draft.check_draft``) proposes each
    window of W codes instead, and the target verifies them and a bonus position in one forward
    (``draft.py``); still exact, other draws again (fixed by seed, W and draft).
    ``speculative_tolerance`` delta > 0 (lossy, off by default): relaxed acceptance by latent
    proximity (``relaxed.py``), over each code's ``speculative_neighbours`` k nearest codes:
    ``neighbours`` [V, >= k] from ``relaxed.nearest_codes`` over the tokenizer's code vectors
    (default for an FSQ model that records its levels: digit space). The images then no longer
    follow the model's distribution.
    ``use_cache=False`` recomputes the whole prefix at every step (the baseline the fast path
    is measured against). ``cache_dtype`` stores keys/values in another dtype (default: the
    model's on GPU, float32 on CPU); attention math runs in the wider of it and the model's.
    ``return_forwards``: also return each image's number of model forwards [P * num_images].
    """
    SamplingSettings(  # a bad setting raises here, as at config load and on the command line
        cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
        num_images=num_images, speculative=speculative, speculative_prior=speculative_prior,
        speculative_tolerance=speculative_tolerance, speculative_neighbours=speculative_neighbours,
        **({"seed": seeds} if isinstance(seeds, int) else {}),
    )
    if speculative and not use_cache:
        raise ValueError("speculative decoding needs the cache; drop use_cache=False or set speculative=0")
    if draft is not None:
        check_draft(model, draft)
    relaxed = speculative_tolerance if speculative else 0.0  # plain decoding is exact whatever the tolerance
    if relaxed:
        neighbours = code_neighbours(model, neighbours, speculative_neighbours)
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

    # rows: each image's conditional stream and (guided) beside it the same text under the null caption
    streams = 2 if guided else 1
    text = repeat(text.to(device), "p l d -> (p i s) l d", i=num_images, s=streams)
    text_mask = repeat(text_mask.to(device), "p l -> (p i s) l", i=num_images, s=streams)
    drop = torch.tensor([False, True][:streams], device=device).repeat(B)  # [S]
    opts: dict[str, Any] = dict(guided=guided, temperature=temperature, top_k=top_k, top_p=top_p)

    was_training, draft_training = model.training, draft is not None and draft.training
    model.eval()
    if draft is not None:
        draft.eval()
    try:
        context = model.context(text, text_mask, drop)
        rows = torch.arange(len(drop), device=device)
        dtype = cache_dtype or (torch.float32 if device.type == "cpu" else model.bos.dtype)
        # the text padded to a bucket lets a compiled step serve prompts of other lengths; the
        # baseline recomputes everything each step, so it gets its text unpadded
        L = context.tokens.shape[1]
        text_len = text_bucket(L, model.cfg.max_text_len + 1) if use_cache else L
        # a draft window verifies W drafts and a bonus position: one slot more than a Jacobi window
        cache = model.setup_caches(len(rows), N + window + (draft is not None and window > 0), text_len, dtype)
        model.write_text(cache, rows, context)
        forwards = torch.full((B,), N, dtype=torch.long)
        if not use_cache:
            codes = full_recompute(model, cache, context, seeds, scales, **opts)
        elif window and draft is not None:
            # the draft's own cache and context: its text blocks over the same embeddings, the same rows
            draft_context = draft.context(text, text_mask, drop)
            draft_len = text_bucket(L, draft.cfg.max_text_len + 1)
            draft_cache = (draft.setup_caches(len(rows), N + window, draft_len, dtype) if draft is not model
                           else KVCache(draft.cfg, len(rows), N + window, draft_len, dtype, device))  # not the target's
            draft.write_text(draft_cache, rows, draft_context)
            steps = tuple(compiled(f, device.type) if compile else f for f in (window_logits, draft_logits))
            codes, forwards = draft_decode(model, draft, cache, draft_cache, steps, seeds, window, scales,
                                           compact=not compile, tolerance=relaxed, neighbours=neighbours, **opts)
        elif window:
            step = compiled(window_logits, device.type) if compile else window_logits
            codes, forwards = speculative_decode(
                model, cache, step, seeds, window, scales, compact=not compile, prior=speculative_prior,
                tolerance=relaxed, neighbours=neighbours, **opts
            )
        else:
            codes = plain_decode(model, cache, seeds, scales, compile, opts)
        return (codes.view(B, h, w), forwards) if return_forwards else codes.view(B, h, w)
    finally:
        model.train(was_training)
        if draft is not None:
            draft.train(draft_training)


def plain_decode(model: Transformer, cache: KVCache, seeds: Tensor, scales: Tensor, compile: bool, opts: dict) -> Tensor:
    """One code per step for every image -> codes [B, N]. Eagerly each step attends over the
    slots filled so far; compiled, over all of them (one shape, one recorded graph)."""
    N, device = model.cfg.seq_len, model.bos.device
    u = draw_uniforms(seeds, N).to(device)  # [B, N]
    step = compiled(decode_one, device.type) if compile else decode_one
    positions = torch.arange(N, device=device)
    codes = torch.zeros(len(seeds), N, dtype=torch.long, device=device)
    for t in range(N):  # at t = 0 the start embedding goes in and the code passed is ignored
        if not compile:
            cache.narrow(t + 1)
        codes[:, t] = step(model, cache, codes[:, max(t - 1, 0)], positions[t : t + 1], u[:, t], scales[t], **opts)
    return codes


def full_recompute(
    model: Transformer, cache: KVCache, context: Context, seeds: Tensor, scales: Tensor, *,
    guided: bool, temperature: float, top_k: int, top_p: float,
) -> Tensor:
    """The baseline without a cache -> codes [B, N]: every step recomputes the text's keys/values
    and the whole prefix, whose keys rewrite slots 0..t (nothing carries over between steps)."""
    N, device = model.cfg.seq_len, model.bos.device
    streams = 2 if guided else 1
    rows, positions = torch.arange(len(seeds) * streams, device=device), torch.arange(N, device=device)
    u = draw_uniforms(seeds, N).to(device)  # [B, N]
    codes = torch.zeros(len(seeds), N, dtype=torch.long, device=device)
    for t in range(N):
        model.write_text(cache, rows, context)
        cache.narrow(t + 1)
        before = repeat(F.pad(codes[:, :t], (1, 0)), "b n -> (b s) n", s=streams)  # [S, t+1]: the code before each position
        input_pos = repeat(positions[: t + 1], "n -> s n", s=len(rows))
        logits = model.decode_step(before, input_pos, cache, logits_to_keep=1)[:, 0].float()  # [S, V]
        codes[:, t] = sample_logits(guide(logits, scales[t], guided), u[:, t], temperature, top_k, top_p)
    return codes


def code_neighbours(model: Transformer, neighbours: Tensor | None, k: int) -> Tensor:
    """The table [V, k] of each code's k nearest codes that relaxed acceptance reads: the first
    k columns of ``neighbours``, or, where none is given, those of an FSQ model's digit space."""
    if neighbours is None:
        if model.cfg.code_levels is None:
            raise ValueError(
                "relaxed acceptance (speculative_tolerance > 0) needs each code's nearest codes in the tokenizer's "
                "latent space: pass neighbours=nearest_codes(tokenizer.code_vectors(), k) (Pipeline does)"
            )
        neighbours = nearest_codes(digit_vectors(model.cfg.code_levels), k)
    if neighbours.shape[0] != model.cfg.vocab_size or neighbours.shape[1] < k:
        raise ValueError(f"neighbours must be [{model.cfg.vocab_size}, >= {k}] (codes x nearest codes), "
                         f"got {tuple(neighbours.shape)}")
    return neighbours[:, :k].to(model.bos.device)


def sampling_options(settings: SamplingSettings) -> dict[str, Any]:
    """``generate`` keyword arguments for ``settings`` (``seeds=seed``: image i of every prompt
    at seed + i); a run config's ``sampling`` section also gives ``compile``. A draft is a
    model, not a setting, to ``generate``: ``speculative_draft`` (its checkpoint) is left out;
    load it and pass ``draft=`` (``Pipeline`` does). Exact draft speculation leaves the
    distribution as it is, so a sampler without it draws from the same one."""
    options = {name: getattr(settings, name) for name in SETTINGS if name != "speculative_draft"}
    options["seeds"] = options.pop("seed")
    if isinstance(settings, SamplingConfig):
        options["compile"] = settings.compile
    return options
