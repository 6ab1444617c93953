"""Relaxed (lossy) speculative acceptance by latent proximity, after LANTERN (Jang et al., 2024).

Image models spread their mass over many codes that decode to nearly the same patch, so an
exact test rejects a draft whose close neighbours the target likes. The relaxed test moves
the target's mass of a draft's nearest codes (in the tokenizer's latent space) onto the draft
before the test, as long as the mass moved stays within a total-variation budget delta:

    for a draft x at a position with target p and draft distribution q, take x's neighbours
    nearest first while their cumulative mass under p is <= delta; p~ is p with that mass
    moved onto x (so TV(p, p~) <= delta); accept x with min(1, p~(x) / q(x)); at the first
    rejection, redraw from norm(max(0, p~ - q)).

With delta = 0 nothing moves and the test is exact. With delta > 0 the images no longer follow
the model's distribution: every setting, record and report that uses it says "lossy".

Neighbours: ``nearest_codes`` over the tokenizer's code vectors (``VQTokenizer.code_vectors``):
for FSQ, digit space (each digit scaled to [-1, 1]); for a VQ codebook, its vectors. Ties go
to the lower code id, so a table is a pure function of the tokenizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1024  # rows of the distance matrix sorted at once: [CHUNK, V] floats, not [V, V]


def nearest_codes(vectors: Tensor, k: int) -> Tensor:
    """Code vectors [V, D] -> each code's k nearest other codes, nearest first [V, k] (long;
    Euclidean distance, ties to the lower id)."""
    V = len(vectors)
    if not 1 <= k < V:
        raise ValueError(f"a code has {V - 1} other codes; cannot take its {k} nearest")
    vectors = vectors.float()
    out = []
    for start in range(0, V, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, V), device=vectors.device)
        distance = torch.cdist(vectors[rows], vectors)  # [C, V]
        distance[rows - start, rows] = -1.0  # the code itself sorts first, then is dropped
        out.append(distance.sort(dim=-1, stable=True).indices[:, 1 : k + 1])
    return torch.cat(out)


def relax(p: Tensor, drafts: Tensor, neighbours: Tensor, tolerance: float, drafted: int) -> Tensor:
    """The relaxed targets p~ [A, n, V] of target distributions p [A, n, V] for drafts [A, n]:
    at each of the first ``drafted`` slots, the mass of the draft's nearest ``neighbours``
    [V, k] (a table of ``nearest_codes``) moved onto it, nearest first, while the mass moved
    stays <= ``tolerance``; later slots (a bonus position, drafted by nobody) keep p."""
    near = neighbours[drafts]  # [A, n, k]
    mass = p.gather(-1, near)  # [A, n, k]
    moved = (mass.cumsum(-1) <= tolerance) & (torch.arange(p.shape[1], device=p.device) < drafted)[None, :, None]
    taken = (mass * moved).sum(-1, keepdim=True)  # [A, n, 1]: the total-variation distance to p
    relaxed = p.scatter(-1, near, mass * ~moved)
    return relaxed.scatter_add(-1, drafts[..., None], taken)
