"""Speculative decoding with a draft model, exact in distribution (Leviathan et al. 2023; Chen et al. 2023).

A small model over the same codes and text (a distilled checkpoint: ``train.py distill``)
proposes each window: from the accepted codes it draws W codes autoregressively, W cheap
steps against its own static KV cache, each from its distribution q (guided with the target's
scale and cut with the same temperature/top-k/top-p, so q is the distribution the test uses).
The target then scores the W drafts and one position more in a single forward of n = W + 1
and ``Windows.verify`` (the Jacobi windows' acceptance math, ``speculative.py``) keeps the
leading drafts it accepts with min(1, p / q), redraws the first rejected one from
norm(max(0, p - q)), and, when all W pass, draws the bonus position from p: each window
advances an image by 1 to W + 1 codes. Both caches roll back for free: keys past the accepted
codes are overwritten before any query may see them.

The draft's cache follows the accepted codes: each window's first draft step re-enters the
slot of the last accepted code as well (n = 2), since after a window whose drafts all passed,
the draft has never seen its own last draft as an input; later steps run one position (n = 1).

Randomness: from its seed each image draws three uniforms per position (the draft's draw, the
acceptance test and the redraw or bonus draw), as the Jacobi windows do, so (seed, W, draft)
gives the same image alone or in any batch. Guidance pairs (rows 2b, 2b + 1) run in both
models, and finished images leave both caches together. The loop reads the accepted counts on
the host once per window, as the Jacobi loop does.

Why not mix in Jacobi drafts: after a rejection, a Jacobi draft at a position the forward
covered was scored from the rejected prefix, while the draft model proposes again from the
corrected one for one cheap step; mixing them would give a window two kinds of q and the draft
a multi-position catch-up step, for a gain nothing here measures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import repeat
from torch import Tensor

from vqgen.config import ConfigError
from vqgen.model import KVCache, Transformer
from vqgen.sampling.draws import draw_uniforms, guide, inverse_cdf, probabilities
from vqgen.sampling.speculative import Windows

MUST_MATCH = ("vocab_size", "grid", "text_dim", "text_encoder")  # the codes and the text both models read


def check_draft(
    model: Transformer, draft: Transformer, target_name: str = "the target", draft_name: str = "the draft"
) -> None:
    """Fail unless ``draft`` can propose codes for ``model``: the same codes (vocabulary, grid,
    FSQ levels where both record them) and the same text embeddings (encoder, width, at least
    the target's text length). Its code head, width and depth may differ."""
    target, small = model.cfg, draft.cfg
    differ = [f"{name} {getattr(small, name)!r} (target: {getattr(target, name)!r})"
              for name in MUST_MATCH if getattr(small, name) != getattr(target, name)]
    if None not in (target.code_levels, small.code_levels) and tuple(target.code_levels) != tuple(small.code_levels):
        differ.append(f"code_levels {list(small.code_levels)} (target: {list(target.code_levels)})")
    if small.max_text_len < target.max_text_len:
        differ.append(f"max_text_len {small.max_text_len} (target: {target.max_text_len})")
    if differ:
        raise ConfigError(
            f"draft model {draft_name} does not fit target {target_name}: its {'; '.join(differ)}; a draft must be "
            "trained on the target's tokenizer and text encoder (train.py distill from the target)"
        )


def draft_logits(model: Transformer, cache: KVCache, codes: Tensor, input_pos: Tensor) -> Tensor:
    """Logits [S, 1, V] (float32) of the last of positions input_pos [S, n] of rows [0, S)."""
    return model.decode_step(codes, input_pos, cache, logits_to_keep=1).float()


def draft_decode(
    model: Transformer,
    draft: Transformer,
    cache: KVCache,
    draft_cache: KVCache,
    steps: tuple[Callable[..., Tensor], Callable[..., Tensor]],
    seeds: Tensor,
    window: int,
    scales: Tensor,
    *,
    guided: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    compact: bool = True,
    tolerance: float = 0.0,
    neighbours: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode every image by draft-model windows of ``window`` codes -> (codes [B, N], forwards
    [B] on CPU: the target forwards each image took part in; the draft took ``window`` steps
    for each).

    ``cache`` (the target's) and ``draft_cache`` hold the prompts' text in the same rows (image
    b's streams in rows ``streams * b + s``), and ``N + window + 1`` and ``N + window`` slots. ``steps``: the target's
    step (``window_logits``) and the draft's (``draft_logits``), or their compiled forms;
    ``scales`` [N] the guidance per position. ``compact``: finished images leave the batch
    (eager only). ``tolerance`` > 0 relaxes the acceptance test (lossy: ``relaxed.py``).
    """
    N, W, B, V, device = model.cfg.seq_len, window, len(seeds), model.cfg.vocab_size, model.bos.device
    streams = 2 if guided else 1
    target_step, draft_step = steps
    # each position's draft, acceptance and redraw (or bonus) uniforms [B, N + W + 1, 3]: a finished
    # image (compiled, it stays in the batch) keeps verifying W + 1 slack positions from N on
    uniforms = draw_uniforms(seeds, 3 * (N + W + 1)).to(device).view(B, N + W + 1, 3)
    codes = torch.zeros(B, N + W + 1, dtype=torch.long, device=device)  # accepted codes, then the drafts
    start = torch.zeros(B, dtype=torch.long, device=device)  # codes accepted = the window's first position
    out = torch.zeros(B, N, dtype=torch.long, device=device)
    forwards = torch.zeros(B, dtype=torch.long)
    images = torch.arange(B)  # the image in each row
    windows = Windows(model, W + 1, B, None, tolerance, neighbours)  # W drafts and the bonus position
    rows = torch.arange(B, device=device)

    def distribution(logits: Tensor, pos: Tensor) -> Tensor:
        """Both streams' logits [S, n, V] at positions pos [A, n] -> the guided, cut distribution [A, n, V]."""
        return probabilities(guide(logits, scales[pos.clamp(max=N - 1)][..., None], guided), temperature, top_k, top_p)

    def run(step: Callable[..., Tensor], net: Transformer, kv: KVCache, pos: Tensor) -> Tensor:
        inputs = codes.gather(1, (pos - 1).clamp(min=0))  # the code before each position
        return step(net, kv, repeat(inputs, "a n -> (a s) n", s=streams), repeat(pos, "a n -> (a s) n", s=streams))

    while True:
        A = len(start)
        # the draft proposes W codes, one step each; the first also re-enters the last accepted code's slot
        at = torch.stack([(start - 1).clamp(min=0), start], dim=1)  # [A, 2]
        qs = []
        for _ in range(W):
            q = distribution(run(draft_step, draft, draft_cache, at), at[:, -1:])  # [A, 1, V]
            code = inverse_cdf(q[:, 0], uniforms[rows[:A], at[:, -1], 0])  # [A]
            codes.scatter_(1, at[:, -1:], code[:, None])
            qs.append(q)
            at = at[:, -1:] + 1
        q = torch.cat([*qs, q.new_zeros(A, 1, V)], dim=1)  # [A, W + 1, V]: the bonus slot has no draft

        pos = windows.positions(start)  # [A, W + 1]
        p = distribution(run(target_step, model, cache, pos), pos)  # [A, W + 1, V]
        before, start = start, (start + windows.verify(p, q, codes, pos, uniforms, drafted=W)).clamp(max=N)

        was, now = torch.stack([before, start]).cpu()  # the one host read per window
        forwards[images] += (was < N).long()
        finished = now >= N
        if finished.all():
            out[images.to(device)] = codes[:, :N]
            return out, forwards
        if compact:
            if finished.any():  # finished images leave both caches: their codes out, the rest move up
                done, keep = finished.nonzero()[:, 0], (~finished).nonzero()[:, 0]
                out[images[done].to(device)] = codes[done.to(device), :N]
                kept_rows = (keep[:, None] * streams + torch.arange(streams)).flatten().to(device)  # pairs stay pairs
                cache.keep(kept_rows)
                draft_cache.keep(kept_rows)
                kept = keep.to(device)
                codes, start, uniforms = (t[kept] for t in (codes, start, uniforms))
                images, now = images[keep], now[keep]
            furthest = int(now.max())
            cache.narrow(min(cache.length, furthest + W + 1))
            draft_cache.narrow(min(draft_cache.length, furthest + W))
