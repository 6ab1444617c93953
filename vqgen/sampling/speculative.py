"""Speculative Jacobi decoding, exact in distribution (SJD: Teng et al., ICLR 2025).

Each image keeps a window of W draft codes after the codes it has accepted. One forward runs
the window against the static cache and gives, at every window position t, the model's
distribution p_t (guided, tempered, cut to top-k/top-p) given the codes before t as they stand
in the window. Left to right, the draft x at t, drawn from a distribution q_t, is accepted with
probability min(1, p_t(x) / q_t(x)); the first rejected position draws from
norm(max(0, p_t - q_t)) instead and the window moves past it. Every position up to the first
rejection was scored with its true prefix, so each kept code is an exact draw from the model's
conditional and the images follow the plain sampler's distribution (a test enumerates it on a
small model). Rolling the cache back costs nothing: keys past the accepted prefix are
overwritten by the next window before any query may see them.

Drafts:

- a position this forward already covered (Jacobi iteration): drawn from its p_t, which was
  computed from the window's not yet verified codes before it;
- a position entering the window: the code above it in the grid (the nearest one a forward has
  covered), as a point mass; in the first row the last code before the new positions; at the
  very first position a uniformly random code. On images a code often repeats its neighbours;
  docs/benchmarks.md measures this prior against noise.

Draws are coupled across iterations, in the spirit of MC-SJD (So et al., 2025): a position's
draft always inverts the same uniform, so it changes only where its q moved, and a stable
draft is accepted more often. The coupling keeps the test exact because a position's uniforms
reach nothing at or before it except its own draft.

Randomness: from its seed each image draws three uniforms per position (its draft's, its
acceptance test's and its redraw's), so a (seed, W) pair gives the same image alone or in any
batch; another W, or the plain sampler, gives another draw from the same distribution.

Per image: each image advances by its own accepted count; under guidance its two streams
advance together. Eagerly, finished images leave the batch (their cache rows move behind the
others), so they stop costing compute; compiled, the batch keeps its shape so the graph is
recorded once. The loop reads the accepted counts on the host once per window, to know which
images finished.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import repeat
from torch import Tensor, nn

from vqgen.model import Transformer
from vqgen.sampling.cache import Decoder
from vqgen.sampling.draws import draw_uniforms, guide, inverse_cdf, probabilities

PRIORS = ("above", "uniform")  # drafts for positions entering a window


def window_logits(model: Transformer, caches: nn.ModuleList, codes: Tensor, pos: Tensor) -> Tensor:
    """Logits [S, W, V] (float32) of windows at positions pos [S, W], codes [S, W] the code
    before each position."""
    return model.decode_step(codes, pos, caches).float()


JACOBI, POINT, UNIFORM = 0, 1, 2  # what a draft was drawn from: a forward's p, a copied code, noise


def _draft(codes: Tensor, pos: Tensor, fresh: Tensor, jacobi: Tensor, u: Tensor, width: int, prior: str) -> tuple[Tensor, Tensor]:
    """Write drafts at window positions pos [A, W] into codes [A, N + W]; return what each was
    drawn from [A, W] (JACOBI, POINT or UNIFORM) and its probability there q(x) [A, W].

    fresh [A]: the first position no forward has covered yet; positions before it draw from
    jacobi [A, W, V], the last forward's p there. u [A, W]: each position's draft uniform.
    """
    vocab = jacobi.shape[-1]
    seen = pos < fresh[:, None]
    noise = (u * vocab).long().clamp_(max=vocab - 1)  # a uniformly random code
    drafts = torch.where(seen, inverse_cdf(jacobi.flatten(0, 1), u.flatten()).view_as(pos), noise)
    kind = torch.where(seen, JACOBI, UNIFORM)
    if prior == "above":
        # the nearest code above that is not fresh itself; in the first row, the last code before the fresh ones
        rows_up = ((pos - fresh[:, None] + width) // width).clamp(min=1)
        up = pos - rows_up * width
        source = torch.where(up >= 0, up, fresh[:, None] - 1)  # < fresh: accepted, or drafted just now from p
        copied = ~seen & (source >= 0)
        codes.scatter_(1, pos, drafts)
        drafts = torch.where(copied, codes.gather(1, source.clamp(min=0)), drafts)
        kind = torch.where(copied, POINT, kind)
    codes.scatter_(1, pos, drafts)
    q_x = torch.where(kind == JACOBI, jacobi.gather(-1, drafts[..., None])[..., 0], torch.where(kind == POINT, 1.0, 1 / vocab))
    return kind, q_x


def _residual(p: Tensor, q_jacobi: Tensor, kind: Tensor, draft: Tensor) -> Tensor:
    """norm(max(0, p - q)) up to normalisation, for rows p [A, V] whose draft [A] came from
    q_jacobi [A, V], a point mass on it or the uniform distribution (``kind`` [A])."""
    vocab = p.shape[-1]
    point = p.scatter(-1, draft[:, None], 0.0)  # p - one_hot(draft), clamped
    residual = torch.where((kind == JACOBI)[:, None], (p - q_jacobi).clamp(min=0),
                           torch.where((kind == POINT)[:, None], point, (p - 1 / vocab).clamp(min=0)))
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p = q up to rounding: p itself is exact


def speculative_decode(
    model: Transformer,
    decoder: Decoder,
    step: Callable[..., Tensor],
    seeds: Tensor,
    window: int,
    scales: Tensor,
    *,
    guided: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    compact: bool = True,
    prior: str = "above",
) -> tuple[Tensor, Tensor]:
    """Decode every image by windows of ``window`` codes -> (codes [B, N], forwards [B] on CPU:
    the model forwards each image took part in).

    ``decoder`` holds the prompt's context and ``N + window`` self-attention slots per stream;
    ``step`` is ``window_logits`` or its compiled form; ``scales`` [N] the guidance per
    position. ``compact``: finished images leave the batch (eager only). The state of the
    images still running is kept in the decoder's row order, so it is reordered only when
    images finish.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown draft prior {prior!r}; choose one of {list(PRIORS)}")
    N, width, V = model.cfg.seq_len, model.cfg.grid[1], model.cfg.vocab_size
    W, B, device = window, len(seeds), model.bos.device
    streams = 2 if guided else 1
    uniforms = draw_uniforms(seeds, 3 * (N + W)).to(device).view(B, 3, N + W)  # draft, accept, redraw [B, 3, N + W]
    codes = torch.zeros(B, N + W, dtype=torch.long, device=device)  # accepted codes, then the drafts (W slack slots)
    start = torch.zeros(B, dtype=torch.long, device=device)  # codes accepted = the window's first position
    slots = torch.arange(W, device=device)
    out = torch.zeros(B, N, dtype=torch.long, device=device)
    forwards = torch.zeros(B, dtype=torch.long)
    images = torch.arange(B)  # the image in each row

    q_jacobi = torch.full((B, W, V), 1 / V, device=device)  # the distribution each JACOBI draft came from
    kind, q_x = _draft(codes, slots.expand(B, W), start, q_jacobi, uniforms[:, 0, :W], width, prior)
    while True:
        A = len(images)
        pos = start[:, None] + slots  # [A, W]
        inputs = codes.gather(1, (pos - 1).clamp(min=0))  # the code before each position
        logits = step(model, decoder.layers, repeat(inputs, "a w -> (s a) w", s=streams), repeat(pos, "a w -> (s a) w", s=streams))
        cells = pos.clamp(max=N - 1)  # positions past the grid (slack) read the last cell's guidance and uniforms
        p = probabilities(guide(logits, scales[cells][..., None], guided), temperature, top_k, top_p)  # [A, W, V]

        # verify left to right: the leading accepted drafts, then a redraw at the first rejection
        drafts = codes.gather(1, pos)
        p_x = p.gather(-1, drafts[..., None])[..., 0]  # [A, W]
        accepted = (uniforms[:, 1].gather(1, cells) * q_x < p_x).long().cumprod(1).sum(1)  # [A]
        rejected = accepted < W
        at = accepted.clamp(max=W - 1)[:, None]  # [A, 1]: the first rejected slot
        row = repeat(at, "a 1 -> a 1 v", v=V)
        residual = _residual(p.gather(1, row)[:, 0], q_jacobi.gather(1, row)[:, 0], kind.gather(1, at)[:, 0],
                             drafts.gather(1, at)[:, 0])
        redraw = inverse_cdf(residual, uniforms[:, 2].gather(1, cells.gather(1, at))[:, 0])  # [A]
        where = pos.gather(1, at)  # [A, 1]
        codes.scatter_(1, where, torch.where(rejected, redraw, codes.gather(1, where)[:, 0])[:, None])
        advance = accepted + rejected.long()
        before, start = start, (start + advance).clamp(max=N)

        # the next window: slots this forward covered draft from its p (Jacobi), fresh ones from the prior
        source = (advance[:, None] + slots).clamp(max=W - 1)  # [A, W]: each next slot's slot in this window
        q_jacobi = p.gather(1, repeat(source, "a w -> a w v", v=V))
        new_pos = start[:, None] + slots
        kind, q_x = _draft(codes, new_pos, before + W, q_jacobi, uniforms[:, 0].gather(1, new_pos), width, prior)

        was, now = torch.stack([before, start]).cpu()  # the one host read per window
        forwards[images] += (was < N).long()
        finished = now >= N
        if finished.all():
            out[images.to(device)] = codes[:, :N]
            return out, forwards
        if compact:
            if finished.any():  # finished images leave: their codes out, the rest of the state moves up
                done, keep = finished.nonzero()[:, 0], (~finished).nonzero()[:, 0]
                out[images[done].to(device)] = codes[done.to(device), :N]
                decoder.keep(torch.cat([keep + s * A for s in range(streams)]).to(device))
                rows = keep.to(device)
                codes, start, uniforms, q_jacobi, kind, q_x = (
                    t[rows] for t in (codes, start, uniforms, q_jacobi, kind, q_x)
                )
                images, now = images[keep], now[keep]
            decoder.narrow(streams * len(images), min(decoder.length, int(now.max()) + W))
