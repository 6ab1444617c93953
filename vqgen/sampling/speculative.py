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
  covered), as a point mass; in the first row the last code before the new positions; at
  position 0 the code the model finds most likely there under the null caption (one forward,
  kept with the model until the weights change: ``start_guess``). On images a code often
  repeats its neighbours, and
  most images start on their background; docs/benchmarks.md measures this prior against noise.

Draws are coupled across iterations, in the spirit of MC-SJD (So et al., 2025): a position's
draft always inverts the same uniform, so it changes only where its q moved, and a stable
draft is accepted more often. The coupling keeps the test exact because a position's uniforms
reach nothing at or before it except its own draft.

Randomness: from its seed each image draws three uniforms per position (its draft's, its
acceptance test's and its redraw's), so a (seed, W) pair gives the same image alone or in any
batch; another W, or the plain sampler, gives another draw from the same distribution.

Per image: each image advances by its own accepted count, each of its rows at its own
positions; under guidance its two rows (a linked pair) advance together. Eagerly, finished
images leave the batch (``KVCache.keep`` moves their rows behind the others), so they stop
costing compute; compiled, the batch keeps its shape so the graph is recorded once. The loop
reads the accepted counts on the host once per window, to know which images finished.

One implementation of the window math: ``Windows.verify`` verifies one forward's windows and
redraws at the first rejection; ``Windows.step`` adds the next windows' Jacobi drafts, for any
set of images at their own positions (each with its own prior). ``speculative_decode``
(``generate``'s loop) and the server's continuous-batching scheduler (``vqgen.serve``), where
images join and leave between windows, both drive ``step``; draft-model speculation
(``draft.py``) drives ``verify``; each owns its forward, its guidance and the images' state.
A relaxed test (``relaxed.py``, lossy) replaces p by a relaxed target inside ``verify``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from vqgen.config import DraftPrior
from vqgen.model import KVCache, Transformer
from vqgen.sampling.draws import draw_uniforms, guide, inverse_cdf, probabilities
from vqgen.sampling.relaxed import relax

PRIORS = typing.get_args(DraftPrior)  # drafts for positions entering a window


def start_guess(model: Transformer, dtype: torch.dtype | None = None) -> Tensor:
    """The code [] the model finds most likely at position 0 under the null caption: the draft
    of the first position, where there is no code to copy (on images, usually the background).
    One step of one row through a cache of its own, so it leaves the model's cache alone and
    follows any change of the weights; the result stays on the device (no host read)."""
    device = model.bos.device
    null = model.context(torch.zeros(1, 1, model.cfg.text_dim, device=device),
                         torch.zeros(1, 1, dtype=torch.bool, device=device))  # the null token alone
    cache = KVCache(model.cfg, 1, 1, null.tokens.shape[1], dtype or model.bos.dtype, device)
    row = torch.zeros(1, dtype=torch.long, device=device)
    model.write_text(cache, row, null)
    return model.decode_step(row[:, None], row[:, None], cache)[0, 0].argmax()


def cached_start_guess(model: Transformer, dtype: torch.dtype) -> Tensor:
    """``start_guess`` kept with the model while its weights stay as they were (an in-place
    change moves their version counters; inference tensors, e.g. weights loaded under
    ``torch.inference_mode``, keep none), across caches of any shape: an image takes few window
    forwards, so one more per call would show."""
    versions = tuple(0 if p.is_inference() else p._version for p in model.parameters())
    if model.start_guess is None or model.start_guess[:2] != (versions, dtype):
        model.start_guess = versions, dtype, start_guess(model, dtype)
    return model.start_guess[2]


def window_logits(model: Transformer, cache: KVCache, codes: Tensor, input_pos: Tensor) -> Tensor:
    """Logits [S, W, V] (float32) of rows [0, S) of ``cache``: windows at positions input_pos
    [S, W], codes [S, W] the code before each position."""
    return model.decode_step(codes, input_pos, cache).float()


def _draft(
    codes: Tensor, pos: Tensor, covered: Tensor, jacobi: Tensor, u: Tensor, width: int, start: Tensor | None,
    copy: Tensor | None = None,
) -> Tensor:
    """Write drafts at window positions pos [A, W] into codes [A, N + W]; return the
    distribution each was drawn from, q [A, W, V].

    Positions before covered [A] were covered by the last forward and draw from its p there,
    jacobi [A, W, V]; later ones are fresh. u [A, W]: each position's draft uniform. A fresh
    position copies the nearest code above it that is not fresh itself (in the first row, the
    last code before the fresh ones; at position 0, ``start``), as a point mass; with
    ``start=None`` (the "uniform" prior) it is a uniformly random code. ``copy`` [A] (bool):
    the rows that copy when not all do (the others draw fresh positions uniformly).
    """
    vocab = jacobi.shape[-1]
    fresh = pos >= covered[:, None]
    q = torch.where(fresh[..., None], 1 / vocab, jacobi)
    drafts = inverse_cdf(q.flatten(0, 1), u.flatten()).view_as(pos)
    codes.scatter_(1, pos, drafts)  # the Jacobi drafts first: fresh positions below may copy them
    if start is None:
        return q
    copied = fresh if copy is None else fresh & copy[:, None]
    rows_up = ((pos - covered[:, None] + width) // width).clamp(min=1)
    up = pos - rows_up * width
    source = torch.where(up >= 0, up, covered[:, None] - 1)  # < covered: accepted, or drafted just now from p
    copies = torch.where(source >= 0, codes.gather(1, source.clamp(min=0)), start)
    drafts = torch.where(copied, copies, drafts)
    codes.scatter_(1, pos, drafts)
    return torch.where(copied[..., None], F.one_hot(drafts, vocab).to(q.dtype), q)


class Windows:
    """The window math of a set of images, each at its own position: one forward's verification,
    the redraw at the first rejection and the next window's drafts. ``speculative_decode`` and
    the server's scheduler (``vqgen.serve``) both drive it; they own the forward and the state.

    The state is per image, in the order of the forward's images: codes [A, N + W] (the accepted
    codes, then the window's drafts), start [A] (the codes accepted: the window's first
    position), q [A, W, V] (the distribution each draft was drawn from) and uniforms
    [A, N + W, 3] (each position's draft, acceptance and redraw uniforms, from the image's seed:
    ``draw_uniforms([seed], 3 * (N + W))``). ``rows``: the most images a step may hold.
    ``guess``: the draft at position 0 (``cached_start_guess``), or None where no image copies
    (the "uniform" prior). A ``copy`` [A] (bool) argument picks the images that copy ("above")
    when not all do.
    """

    def __init__(
        self, model: Transformer, window: int, rows: int, guess: Tensor | None, tolerance: float = 0.0,
        neighbours: Tensor | None = None,
    ):
        device = model.bos.device
        self.length, self.width, self.vocab = model.cfg.seq_len, model.cfg.grid[1], model.cfg.vocab_size
        self.slots = torch.arange(window, device=device)  # [W]
        self.lanes = torch.arange(rows, device=device)  # row indices, for picking each image's own slot
        self.guess = guess
        if tolerance and neighbours is None:
            raise ValueError("relaxed acceptance (tolerance > 0) needs the codes' neighbours: relaxed.nearest_codes")
        self.tolerance, self.neighbours = tolerance, neighbours  # lossy when tolerance > 0 (relaxed.py)

    def positions(self, start: Tensor) -> Tensor:
        """start [A] -> the windows' positions [A, W]."""
        return start[:, None] + self.slots

    def open(self, codes: Tensor, uniforms: Tensor, copy: Tensor | None = None) -> Tensor:
        """Draft the first window of images that have accepted nothing yet into codes [A, N + W];
        -> q [A, W, V]."""
        (A, W), V = (len(codes), len(self.slots)), self.vocab
        uniform = torch.full((A, W, V), 1 / V, device=codes.device)
        return _draft(codes, self.slots.expand(A, W), codes.new_zeros(A), uniform, uniforms[:, :W, 0], self.width, self.guess, copy)

    def verify(
        self, p: Tensor, q: Tensor, codes: Tensor, pos: Tensor, uniforms: Tensor, drafted: int | None = None,
    ) -> Tensor:
        """Verify one forward's windows: the forward gave p [A, n, V] at positions pos [A, n] (its
        distribution at every position, given the codes before it in the window), whose drafts
        in codes were drawn from q [A, n, V]. Keep the leading accepted drafts and, at the first
        rejection, a redraw from norm(max(0, p - q)) in codes -> the codes each image advances [A].

        ``drafted``: only the first that many slots hold drafts (default all); a slot after them
        is a bonus position, which draws from p when every draft before it was accepted (give it
        q = 0). The acceptance test is exact, or relaxed (lossy) when the windows' tolerance > 0."""
        A, n = pos.shape
        drafted = n if drafted is None else drafted
        rows = self.lanes[:A]
        drafts = codes.gather(1, pos)  # [A, n]
        if self.tolerance:
            p = relax(p, drafts, self.neighbours, self.tolerance, drafted)
        u = uniforms[rows[:, None], pos]  # [A, n, 3]
        p_x, q_x = (dist.gather(-1, drafts[..., None])[..., 0] for dist in (p, q))  # [A, n]
        accepted = (u[..., 1] * q_x < p_x)[:, :drafted].long().cumprod(1).sum(1)  # [A]
        rejected = accepted < n
        at = accepted.clamp(max=n - 1)  # [A]: the first rejected slot
        p_at = p[rows, at]  # [A, V]
        residual = (p_at - q[rows, at]).clamp(min=0)  # norm(max(0, p - q)), unnormalised
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)  # p = q up to rounding: p is exact
        redraw = inverse_cdf(residual, u[rows, at, 2])  # [A]
        codes[rows, pos[rows, at]] = torch.where(rejected, redraw, drafts[rows, at])
        return accepted + rejected.long()

    def step(
        self, p: Tensor, q: Tensor, codes: Tensor, pos: Tensor, uniforms: Tensor, copy: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One Jacobi window step: ``verify`` the forward's windows (p [A, W, V] at pos [A, W]),
        then draft the next window in codes -> (start [A] after the accepted codes, at most N; its
        drafts' q [A, W, V])."""
        A, W = pos.shape
        rows = self.lanes[:A]
        advance = self.verify(p, q, codes, pos, uniforms)
        before = pos[:, 0]
        start = (before + advance).clamp(max=self.length)

        # the next window: slots this forward covered draft from its p (Jacobi), fresh ones from the prior
        source = (advance[:, None] + self.slots).clamp(max=W - 1)  # [A, W]: each next slot's slot in this window
        new_pos = self.positions(start)
        q = _draft(codes, new_pos, before + W, p[rows[:, None], source], uniforms[rows[:, None], new_pos, 0], self.width,
                   self.guess, copy)
        return start, q


def speculative_decode(
    model: Transformer,
    cache: KVCache,
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
    tolerance: float = 0.0,
    neighbours: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode every image by windows of ``window`` codes -> (codes [B, N], forwards [B] on CPU:
    the model forwards each image took part in).

    ``cache`` holds the prompts' text in its rows (image b's streams in rows ``streams * b + s``)
    and ``N + window`` self-attention slots; ``step`` is ``window_logits`` or its compiled form;
    ``scales`` [N] the guidance per position. ``compact``: finished images leave the batch
    (eager only). The state of the images still running is kept in the cache's row order, so
    it is reordered only when images finish. ``tolerance`` > 0 relaxes the acceptance test
    (lossy: ``relaxed.py``) over the codes' ``neighbours`` [V, k].
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown draft prior {prior!r}; choose one of {list(PRIORS)}")
    N, W, B, device = model.cfg.seq_len, window, len(seeds), model.bos.device
    streams = 2 if guided else 1
    # each position's draft, acceptance and redraw uniforms [B, N + W, 3]
    uniforms = draw_uniforms(seeds, 3 * (N + W)).to(device).view(B, N + W, 3)
    codes = torch.zeros(B, N + W, dtype=torch.long, device=device)  # accepted codes, then the drafts (W slack slots)
    start = torch.zeros(B, dtype=torch.long, device=device)  # codes accepted = the window's first position
    out = torch.zeros(B, N, dtype=torch.long, device=device)
    forwards = torch.zeros(B, dtype=torch.long)
    images = torch.arange(B)  # the image in each row

    guess = cached_start_guess(model, cache.layers[0].k.dtype) if prior == "above" else None
    windows = Windows(model, W, B, guess, tolerance, neighbours)
    q = windows.open(codes, uniforms)
    while True:
        pos = windows.positions(start)  # [A, W]
        inputs = codes.gather(1, (pos - 1).clamp(min=0))  # the code before each position
        logits = step(model, cache, repeat(inputs, "a w -> (a s) w", s=streams), repeat(pos, "a w -> (a s) w", s=streams))
        p = probabilities(guide(logits, scales[pos.clamp(max=N - 1)][..., None], guided), temperature, top_k, top_p)  # [A, W, V]
        before, (start, q) = start, windows.step(p, q, codes, pos, uniforms)

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
                cache.keep((keep[:, None] * streams + torch.arange(streams)).flatten().to(device))  # pairs stay pairs
                kept = keep.to(device)
                codes, start, uniforms, q = (t[kept] for t in (codes, start, uniforms, q))
                images, now = images[keep], now[keep]
            cache.narrow(min(cache.length, int(now.max()) + W))
