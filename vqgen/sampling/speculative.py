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

import torch
import torch.nn.functional as F
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


def _draft(row_codes: Tensor, pos: Tensor, fresh: Tensor, jacobi: Tensor, u: Tensor, width: int, prior: str) -> Tensor:
    """Write drafts at window positions pos [A, W] into row_codes [A, N + W] and return the
    distribution each was drawn from [A, W, V].

    fresh [A]: the first position no forward has covered yet; positions before it draw from
    jacobi [A, W, V], the last forward's p there. u [A, W]: each position's draft uniform.
    """
    vocab = jacobi.shape[-1]
    seen = pos < fresh[:, None]
    noise = (u * vocab).long().clamp_(max=vocab - 1)  # a uniformly random code
    from_p = inverse_cdf(jacobi.flatten(0, 1), u.flatten()).view_as(pos)
    drafts = torch.where(seen, from_p, noise)
    copied = torch.zeros_like(seen)
    if prior == "above":
        # the nearest code above that is not fresh itself; in the first row, the last code before the fresh ones
        rows_up = ((pos - fresh[:, None] + width) // width).clamp(min=1)  # rows up to leave the fresh positions
        up = pos - rows_up * width
        source = torch.where(up >= 0, up, fresh[:, None] - 1)  # < fresh: accepted, or drafted just now from p
        copied = ~seen & (source >= 0)
        row_codes.scatter_(1, pos, drafts)
        drafts = torch.where(copied, row_codes.gather(1, source.clamp(min=0)), drafts)
    row_codes.scatter_(1, pos, drafts)
    point = F.one_hot(drafts, vocab).to(jacobi.dtype)  # [A, W, V]
    uniform = torch.full_like(point, 1 / vocab)
    return torch.where(seen[..., None], jacobi, torch.where(copied[..., None], point, uniform))


def speculative_decode(
    model: Transformer,
    decoder: Decoder,
    step,
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
    position. ``compact``: finished images leave the batch (eager only).
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown draft prior {prior!r}; choose one of {list(PRIORS)}")
    N, width, V = model.cfg.seq_len, model.cfg.grid[1], model.cfg.vocab_size
    W, B, device = window, len(seeds), model.bos.device
    streams = 2 if guided else 1
    u_draft, u_accept, u_redraw = draw_uniforms(seeds, 3 * (N + W)).to(device).view(B, 3, N + W).unbind(1)  # [B, N + W]
    codes = torch.zeros(B, N + W, dtype=torch.long, device=device)  # accepted codes, then the drafts (W slack slots)
    start = torch.zeros(B, dtype=torch.long, device=device)  # codes accepted = the window's first position
    forwards = torch.zeros(B, dtype=torch.long)
    slots = torch.arange(W, device=device)
    rows, rows_host = torch.arange(B, device=device), torch.arange(B)  # images in the decoder's rows, in order

    q = _draft(codes, slots.expand(B, W), start, torch.full((B, W, V), 1 / V, device=device), u_draft[:, :W], width,
               prior)  # [B, W, V]: each window slot's draft distribution
    while True:
        n = start[rows]  # [A]
        pos = n[:, None] + slots  # [A, W]
        row_codes = codes[rows]  # [A, N + W]
        inputs = row_codes.gather(1, (pos - 1).clamp(min=0))  # the code before each position
        logits = step(model, decoder.layers, repeat(inputs, "a w -> (s a) w", s=streams), repeat(pos, "a w -> (s a) w", s=streams))
        cells = pos.clamp(max=N - 1)  # positions past the grid (slack) read the last cell's guidance and uniforms
        p = probabilities(guide(logits, scales[cells][..., None], guided), temperature, top_k, top_p)  # [A, W, V]

        # verify left to right: the leading accepted drafts, then a redraw at the first rejection
        qa, drafts = q[rows], row_codes.gather(1, pos)
        p_x, q_x = p.gather(-1, drafts[..., None])[..., 0], qa.gather(-1, drafts[..., None])[..., 0]  # [A, W]
        accepted = (u_accept[rows].gather(1, cells) * q_x < p_x).long().cumprod(1).sum(1)  # [A]
        rejected = accepted < W
        at = accepted.clamp(max=W - 1)[:, None]  # [A, 1]: the first rejected slot
        p_r = p.gather(1, repeat(at, "a 1 -> a 1 v", v=V))[:, 0]  # [A, V]
        residual = (p_r - qa.gather(1, repeat(at, "a 1 -> a 1 v", v=V))[:, 0]).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_r)  # p = q up to rounding: p itself
        redraw = inverse_cdf(residual, u_redraw[rows].gather(1, cells.gather(1, at))[:, 0])  # [A]
        where = pos.gather(1, at)  # [A, 1]
        row_codes.scatter_(1, where, torch.where(rejected, redraw, row_codes.gather(1, where)[:, 0])[:, None])
        advance = accepted + rejected.long()
        new_start = (n + advance).clamp(max=N)

        # the next window: slots this forward covered draft from its p (Jacobi), fresh ones from the prior
        source = (advance[:, None] + slots).clamp(max=W - 1)  # [A, W]: each next slot's slot in this window
        jacobi = p.gather(1, repeat(source, "a w -> a w v", v=V))
        new_pos = new_start[:, None] + slots
        q[rows] = _draft(row_codes, new_pos, n + W, jacobi, u_draft[rows].gather(1, new_pos), width, prior)
        codes[rows], start[rows] = row_codes, new_start

        before, after = torch.stack([n, new_start]).cpu()  # the one host read per window
        forwards[rows_host] += (before < N).long()
        finished = after >= N
        if finished.all():
            return codes[:, :N], forwards
        if compact:
            if finished.any():
                keep = (~finished).nonzero()[:, 0]
                decoder.keep(torch.cat([keep + s * len(rows_host) for s in range(streams)]).to(device))
                rows, rows_host, after = rows[keep.to(device)], rows_host[keep], after[keep]
            decoder.narrow(streams * len(rows_host), min(decoder.length, int(after.max()) + W))
