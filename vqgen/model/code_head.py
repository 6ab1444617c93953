"""How a code enters and leaves the transformer: its input embedding and its output head.

``TransformerConfig.code_head`` picks one pair:

    softmax             one embedding row and one logit per code id (``nn.Embedding``, ``nn.Linear``)
    fsq_digits          an FSQ code as its digits: embedding = sum of per-digit embeddings, and
                        p(code) = prod_d p_d(digit_d), so logit(code) = sum_d z_d[digit_d]
    fsq_autoregressive  the same embedding; p(code) = prod_d p(digit_d | h, digit_<d), each digit
                        given the ones before it

An FSQ code id is a mixed-radix number of per-dimension digits, least significant first (as
``vector_quantize_pytorch.FSQ`` numbers its implicit codebook): with levels (l_0, ..., l_{k-1}),
``code = sum_d digit_d * prod(levels[:d])``. A softmax head learns a code that training never
shows only as a negative, so it never emits it; the digit heads score it from digits that
training did show, so held-out combinations of seen parts keep probability mass.

Every head returns logits over all V code ids (broadcast from the digits' when factorised), so
sampling, guidance, top-k/top-p, speculative decoding and int8 quantization see the same
``[..., V]`` tensor whichever head made it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from vqgen.config import TransformerConfig

# the width of the autoregressive head's digit queries and tables: a handful of classes per
# digit needs few dimensions, and the tables (one row per digit prefix, up to V rows) are
# recomputed every call, so they must stay narrow
DIGIT_WIDTH = 64


def code_digits(levels: Sequence[int]) -> Tensor:
    """The digits [V, k] of every code id 0..V-1 (V = prod(levels)): digit_d = code // prod(levels[:d]) % levels[d]."""
    levels_t = torch.tensor(list(levels))
    basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), dim=0)  # [k]
    return torch.arange(math.prod(levels))[:, None] // basis % levels_t  # [V, k]


def digit_rows(levels: Sequence[int]) -> Tensor:
    """Rows [V, k] into a table of sum(levels) rows holding digit 0's values, then digit 1's, ...:
    row (d, value) sits at sum(levels[:d]) + value."""
    offsets = torch.cumsum(torch.tensor([0, *levels[:-1]]), dim=0)  # [k]
    return code_digits(levels) + offsets


class DigitEmbedding(nn.Module):
    """codes [...] -> embeddings [..., D]: the sum of one learned embedding per digit value."""

    def __init__(self, levels: Sequence[int], dim: int):
        super().__init__()
        self.digits = nn.Embedding(sum(levels), dim)
        self.register_buffer("rows", digit_rows(levels), persistent=False)  # [V, k]

    def forward(self, codes: Tensor) -> Tensor:
        return self.digits(self.rows[codes]).sum(-2)


class DigitHead(nn.Module):
    """h [..., D] -> logits [..., V], logit(c) = sum_d z_d[digit_d(c)] with z = proj(h) [..., sum(levels)]:
    a product of independent per-digit softmaxes, log p(c) = sum_d log_softmax(z_d)[digit_d(c)]."""

    def __init__(self, dim: int, levels: Sequence[int]):
        super().__init__()
        self.proj = nn.Linear(dim, sum(levels), bias=False)
        self.register_buffer("rows", digit_rows(levels).T.contiguous(), persistent=False)  # [k, V]

    def forward(self, h: Tensor) -> Tensor:
        z = self.proj(h)  # [..., sum(levels)]
        # k gathers of [..., V] rather than one of [..., V, k]: a training batch's logits stay V wide
        return sum(z[..., rows] for rows in self.rows)


class AutoregressiveDigitHead(nn.Module):
    """h [..., D] -> log p(c) [..., V] for every code, p(c) = prod_d p(digit_d | h, digit_<d).

    Digit d's logits, for every prefix of digits 0..d-1 at once, are one bilinear form:

        logit_d(x | h, prefix) = q_d(h) . t_d(prefix, x),    t_d = u + MLP_d(u),
        u = the sum of table d's embeddings of digits 0..d (the prefix, then x)

    ``q = proj(h)`` is [..., k, r]; the tables t_d [prod(levels[:d+1]), r] depend on the weights
    alone, so each is computed once per call rather than per position. The MLP mixes the
    digits nonlinearly, so each digit's distribution depends on the ones before it, and a code
    never seen in training is still scored from the embeddings of its digits. The output is
    normalised: the logits are the log-probabilities. The tables cost a fixed ~8 r^2 flops per
    row (about 1.25 V rows for levels of 5 to 8) in every call, decode steps included, whatever
    the number of positions: for a small model sampling few rows, about as much as the model.
    """

    def __init__(self, dim: int, levels: Sequence[int], width: int = DIGIT_WIDTH):
        super().__init__()
        self.levels = tuple(levels)
        self.spans = tuple(math.prod(levels[: d + 1]) for d in range(len(levels)))  # rows of each table
        self.proj = nn.Linear(dim, len(levels) * width, bias=False)
        self.tables = nn.ModuleList(nn.Embedding(sum(levels[: d + 1]), width) for d in range(len(levels)))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)) for _ in levels
        )
        # codes 0..span_d-1 run through every prefix and value of digits 0..d (digit d most
        # significant), so their rows [span_d, d+1] index table d; and code c's own prefix + value
        # is row c mod span_d of it
        self.register_buffer("rows", digit_rows(levels), persistent=False)  # [V, k]
        codes = torch.arange(math.prod(levels))
        self.register_buffer("row_of", torch.stack([codes % span for span in self.spans]), persistent=False)  # [k, V]

    def forward(self, h: Tensor) -> Tensor:
        q = rearrange(self.proj(h), "... (k r) -> ... k r", k=len(self.levels))  # [..., k, r]
        log_p = 0
        for d, (level, span, table, mlp) in enumerate(zip(self.levels, self.spans, self.tables, self.mlps)):
            u = table(self.rows[:span, : d + 1]).sum(-2)  # [span, r]
            t = u + mlp(u)
            logits = q[..., d, :] @ t.T.to(q.dtype)  # [..., span]
            # normalise over digit d's value (the most significant place) within each prefix
            per_prefix = rearrange(logits, "... (x p) -> ... x p", x=level).log_softmax(-2)
            log_p = log_p + rearrange(per_prefix, "... x p -> ... (x p)")[..., self.row_of[d]]  # [..., V]
        return log_p


def code_embedding(cfg: TransformerConfig) -> nn.Module:
    """The input embedding of ``cfg.code_head``: codes [...] -> [..., dim]."""
    if cfg.code_head == "softmax":
        return nn.Embedding(cfg.vocab_size, cfg.dim)
    return DigitEmbedding(cfg.code_levels, cfg.dim)


def code_head(cfg: TransformerConfig) -> nn.Module:
    """The output head of ``cfg.code_head``: h [..., dim] -> logits [..., vocab_size]."""
    if cfg.code_head == "softmax":
        return nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    if cfg.code_head == "fsq_digits":
        return DigitHead(cfg.dim, cfg.code_levels)
    return AutoregressiveDigitHead(cfg.dim, cfg.code_levels)


def head_output_layer(head: nn.Module) -> nn.Linear:
    """The head's layer that reads the hidden state; zeroing it starts training at uniform predictions."""
    return head if isinstance(head, nn.Linear) else head.proj
