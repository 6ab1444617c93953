"""A decoder-only transformer over image codes, conditioned on text by cross-attention.

Each block is pre-norm (RMSNorm) and runs, in order:

    causal self-attention over the codes (2-D rotary positions, optional grouped-query heads)
    cross-attention to the projected text embeddings (padding masked out)
    a SwiGLU MLP

The text is projected to the model's width and, when
``text_depth`` > 0, mixed by bidirectional text blocks; the code inputs carry absolute
(row, column) embeddings as well as the rotary positions of self-attention.

Every block and text block has ``heads`` heads of width ``cfg.head_dim`` and a SwiGLU of width
``cfg.mlp_hidden``: dim / heads and mlp_ratio * dim, unless ``head_width`` / ``mlp_width`` set
them independently of dim, as a structurally pruned model's do (``vqgen.compress``).

Position t of the input holds a learned start embedding (t = 0) or the code t - 1, and its
output predicts code t, so ``logits[:, t]`` sees ``codes[:, :t]`` and the text. The text
sequence always begins with a learned null token; dropping a caption (classifier-free
guidance) masks out every other text token, so a dropped or empty caption attends to the
null token alone and never produces NaN.

Sampling meets the model at one contract, on gpt-fast's pattern: ``setup_caches`` allocates a
``KVCache`` of S rows (``cache.py``), ``write_text`` writes a prompt's cross-attention
keys/values into chosen rows, and ``decode_step`` runs codes [S, n] at positions
``input_pos`` [S, n], each row at its own positions, under the mask ``slots <= input_pos``.
Plain decoding (n = 1), speculative windows (n = W) and a full recompute (n = t + 1) are the
same step. Attention against a cache runs in the wider of the model's and the cache's dtype,
so a half-precision cache can feed fp32 attention math.

The architecture is one ``TransformerConfig`` (``vqgen.config``, beside the named sizes
``SIZES``); a checkpoint's ``config.json`` holds it under ``"transformer"``. How codes are
embedded and scored (one row per code id, or per FSQ digit) is ``code_head.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgen.checkpoint import load_architecture, load_config_json, load_state_into, load_weights, save_pretrained
from vqgen.config import ConfigError, TransformerConfig
from vqgen.model.cache import KVCache, LayerKV
from vqgen.model.code_head import code_embedding, code_head, head_output_layer

KIND = "transformer"

# --------------------------------------------------------------------------------------
# 2-D rotary position embeddings
# --------------------------------------------------------------------------------------


def rope_tables(grid: tuple[int, int], head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [h*w, head_dim/2] for the code grid in raster order.

    Half of each head's rotation pairs turn with the row, half with the column, so the score
    between a query at (r, c) and a key at (r', c') depends only on (r - r', c - c'): the
    model sees that the code above is one row up, not w positions back. Position t of the
    input sits at the grid cell of the code it predicts, so the start token is at (0, 0).
    """
    h, w = grid
    freqs = base ** -(torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))  # [Dh/4]
    t = torch.arange(h * w)
    rows, cols = (t // w).double(), (t % w).double()  # [N]
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # [N, Dh/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, H, n, Dh] by the angles of cos/sin [n, Dh/2] (the same
    positions in every row) or [B, 1, n, Dh/2] (each row its own)."""
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
    x1, x2 = pairs.unbind(-1)  # [B, H, n, Dh/2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class Context(NamedTuple):
    """Projected text: tokens [B, S, D] (the null token first) and mask [B, 1, 1, S] (True = attend)."""

    tokens: Tensor
    mask: Tensor


class TextKV(NamedTuple):
    """What cross-attention reads: the text's keys, values [B, Hkv, L, Dh] and mask [B, 1, 1, L]."""

    k: Tensor
    v: Tensor
    mask: Tensor


def _common_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in the wider of the model's and the cache's dtype: a bf16 cache under an fp32
    model still gets fp32 math, and an fp32 cache under a bf16 model on CPU keeps fp32 kernels."""
    if q.dtype == k.dtype:
        return q, k, v
    dtype = torch.promote_types(q.dtype, k.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.attn_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None, cache: LayerKV | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """x [B, n, D] -> [B, n, D]. Without a cache, x is a whole prefix and attention is causal;
        with one, x's keys go into the cache at input_pos [B, n] and queries attend over the
        cache's slots under ``mask`` [B, 1, n, T]."""
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, *2 * [self.kv_heads * self.head_dim]], dim=-1)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)  # [B, H, n, Dh]
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.kv_heads) for t in (k, v))  # [B, Hkv, n, Dh]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # [B, Hkv, T, Dh]
            q, k, v = _common_dtype(q, k, v)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, enable_gqa=self.kv_heads != self.heads
        )
        return self.proj(rearrange(y.to(x.dtype), "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.attn_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.attn_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def text_kv(self, context: Context) -> TextKV:
        """Projected text [B, L, D] -> this block's keys, values [B, Hkv, L, Dh] and the text mask."""
        k, v = rearrange(self.kv(context.tokens), "b s (two h d) -> two b h s d", two=2, h=self.kv_heads)
        return TextKV(k, v, context.mask)

    def forward(self, x: Tensor, text: TextKV) -> Tensor:
        """x [B, n, D] attends to the text's keys and values -> [B, n, D]."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)  # [B, H, n, Dh]
        q, k, v = _common_dtype(q, text.k, text.v)
        dropout = self.dropout if self.training else 0.0
        gqa = self.kv_heads != self.heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=text.mask, dropout_p=dropout, enable_gqa=gqa)
        return self.proj(rearrange(y.to(x.dtype), "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both halves
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TextBlock(nn.Module):
    """Bidirectional self-attention over the text tokens, then a SwiGLU MLP (pre-norm).

    The frozen encoder's token embeddings say which words are present; these trainable blocks
    let each word gather its phrase ("red" <- "circle" <- "top left") before image codes read
    the text, so a cross-attention query for one grid cell can find all of that cell's object.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.attn_dim, bias=False)
        self.proj = nn.Linear(cfg.attn_dim, cfg.dim, bias=False)
        self.norm2, self.mlp = nn.RMSNorm(cfg.dim, eps=1e-6), SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x [B, S, D], mask [B, 1, 1, S] (True = attend), rope tables [S, Dh/2] -> [B, S, D]."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(rearrange(y, "b h s d -> b s (h d)"))
        return x + self.mlp(self.norm2(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(cfg.dim, eps=1e-6), SelfAttention(cfg)
        self.norm2, self.cross = nn.RMSNorm(cfg.dim, eps=1e-6), CrossAttention(cfg)
        self.norm3, self.mlp = nn.RMSNorm(cfg.dim, eps=1e-6), SwiGLU(cfg.dim, cfg.mlp_hidden)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], text: TextKV, mask: Tensor | None = None,
        cache: LayerKV | None = None, input_pos: Tensor | None = None,
    ) -> Tensor:
        """x [B, n, D] -> [B, n, D]; ``SelfAttention`` says what mask, cache and input_pos do."""
        p = self.dropout if self.training else 0.0
        x = x + F.dropout(self.attn(self.norm1(x), rope, mask, cache, input_pos), p)
        x = x + F.dropout(self.cross(self.norm2(x), text), p)
        return x + F.dropout(self.mlp(self.norm3(x)), p)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        unset = [name for name in ("vocab_size", "grid", "text_dim") if getattr(cfg, name) is None]
        if unset:
            raise ConfigError(
                f"the transformer's config leaves {', '.join(unset)} unset: build it from cfg.complete(vocab_size, "
                "grid, text_dim), the tokenizer's codebook and grid and the text encoder's width"
            )
        self.cfg = cfg
        self.tok_emb = code_embedding(cfg)  # codes [...] -> [..., D] (code_head.py: per id, or per FSQ digit)
        # Absolute 2-D positions (row + column), added to the input: rotary positions tell
        # self-attention how far apart two codes are, but a cross-attention query must know
        # where on the grid it is to read the words that describe that place ("top left").
        self.row_emb = nn.Parameter(torch.empty(cfg.grid[0], cfg.dim))
        self.col_emb = nn.Parameter(torch.empty(cfg.grid[1], cfg.dim))
        self.bos = nn.Parameter(torch.empty(cfg.dim))  # the input at position 0
        self.null = nn.Parameter(torch.empty(1, cfg.dim))  # the text token every caption starts with
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.text_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.text_depth))
        self.text_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.head = code_head(cfg)  # [..., D] -> logits [..., V], whichever head
        cos, sin = rope_tables(cfg.grid, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # [N, Dh/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        cos, sin = rope_tables((1, cfg.max_text_len + 1), cfg.head_dim, cfg.rope_base)  # 1-D: along the text
        self.register_buffer("text_rope_cos", cos, persistent=False)  # [1+max_text_len, Dh/2]
        self.register_buffer("text_rope_sin", sin, persistent=False)
        self.kv_cache: KVCache | None = None  # sampling's, from setup_caches: non-persistent buffers only
        # speculative decoding's start guess, with the weights' versions and the dtype it was computed for
        self.start_guess: tuple[tuple[int, ...], torch.dtype, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """std 0.02 everywhere; residual projections scaled by 1/sqrt(#residual branches) so the
        residual stream's variance does not grow with depth; a zero head so training starts at
        uniform predictions (loss = ln V)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for proj in (block.attn.proj, block.cross.proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(3 * self.cfg.depth))
        for block in self.text_blocks:
            for proj in (block.proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.text_depth))
        nn.init.normal_(self.bos, std=0.02)
        nn.init.normal_(self.row_emb, std=0.02)
        nn.init.normal_(self.col_emb, std=0.02)
        nn.init.normal_(self.null, std=0.02)
        nn.init.zeros_(head_output_layer(self.head).weight)

    # -- the text and the forward ------------------------------------------------------

    def context(self, text: Tensor, text_mask: Tensor, drop_cond: Tensor | None = None) -> Context:
        """Text embeddings [B, L, d_text] + mask [B, L] -> the null token and projected text.

        ``drop_cond`` [B] (True = use the null conditioning) drops those rows' captions, as
        classifier-free guidance training does; None drops none.
        """
        B, L, d = text.shape if text.ndim == 3 else (None, None, None)
        if d != self.cfg.text_dim:
            raise ValueError(
                f"text embeddings must have shape [B, L, {self.cfg.text_dim}], got {tuple(text.shape)}; "
                f"this model was built for the text encoder {self.cfg.text_encoder!r}"
            )
        if text_mask.shape != (B, L) or text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be a bool tensor of shape {(B, L)}, got {text_mask.dtype} {tuple(text_mask.shape)}")
        if drop_cond is not None:
            text_mask = text_mask & ~drop_cond.to(text_mask.device)[:, None]
        tokens = torch.cat([self.null.expand(B, 1, -1), self.text_proj(text.to(self.null.dtype))], dim=1)  # [B, 1+L, D]
        mask = rearrange(F.pad(text_mask, (1, 0), value=True), "b s -> b 1 1 s")  # the null token is always attendable
        if self.text_blocks:
            if L + 1 > self.text_rope_cos.shape[0]:
                raise ValueError(f"text of {L} tokens is longer than this model's max_text_len ({self.cfg.max_text_len})")
            rope = self.text_rope_cos[: L + 1], self.text_rope_sin[: L + 1]  # [1+L, Dh/2]
            for block in self.text_blocks:
                tokens = block(tokens, mask, rope)
        return Context(self.text_norm(tokens), mask)

    def _at(self, x: Tensor, cells: Tensor) -> Tensor:
        """Inputs x [..., D] at grid cells [...] plus their absolute (row, column) embeddings."""
        w = self.cfg.grid[1]
        return x + self.row_emb[cells // w] + self.col_emb[cells % w]

    def forward(self, codes: Tensor, text: Tensor, text_mask: Tensor, drop_cond: Tensor | None = None) -> Tensor:
        """codes [B, N] (raster order, N <= h*w) + text [B, L, d_text], text_mask [B, L]
        -> logits [B, N, V]; logits[:, t] predicts codes[:, t] from codes[:, :t] and the text."""
        if codes.ndim != 2 or codes.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"codes must have shape [B, N] with N <= {self.cfg.seq_len} ({self.cfg.grid[0]}x{self.cfg.grid[1]} grid), "
                f"got {tuple(codes.shape)}; flatten [B, h, w] codes in raster order"
            )
        context = self.context(text, text_mask, drop_cond)
        n = codes.shape[1]
        x = torch.cat([self.bos.expand(codes.shape[0], 1, -1), self.tok_emb(codes[:, :-1])], dim=1)  # [B, N, D]
        x = self._at(x, torch.arange(n, device=codes.device))
        rope = self.rope_cos[:n], self.rope_sin[:n]  # [N, Dh/2]
        for block in self.blocks:
            x = block(x, rope, block.cross.text_kv(context))
        return self.head(self.norm(x))

    # -- the decode contract -----------------------------------------------------------

    def setup_caches(self, rows: int, length: int, text_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """The model's ``KVCache`` of ``rows`` rows, ``length`` self-attention slots and
        ``text_len`` text slots (keys/values in ``dtype``, default the model's), attending over
        all its slots. The model keeps the cache of its last shape and hands it out again while
        the shape is unchanged, so a compiled step against it is recorded once."""
        dtype = dtype or self.bos.dtype
        layout = (rows, length, text_len, dtype, self.bos.device)
        if self.kv_cache is None or self.kv_cache.layout != layout:
            self.kv_cache = None  # the old cache's memory goes before the new one's is taken
            self.kv_cache = KVCache(self.cfg, rows, length, text_len, dtype, self.bos.device)
        self.kv_cache.narrow(length)
        return self.kv_cache

    def write_text(self, cache: KVCache, rows: Tensor, context: Context) -> None:
        """Write each block's cross-attention keys/values of ``context`` (tokens [R, L, D], mask
        [R, 1, 1, L]) into rows [R] of ``cache``; the text is padded to the cache's text slots,
        masked out there."""
        tokens, mask = context.tokens, context.mask
        R, L = tokens.shape[:2]
        if rows.shape != (R,) or L > cache.text_len:
            raise ValueError(
                f"write_text: a context of {R} rows x {L} text tokens does not fit rows of shape {tuple(rows.shape)} "
                f"of a cache with {cache.text_len} text slots"
            )
        padded = Context(F.pad(tokens, (0, 0, 0, cache.text_len - L)), F.pad(mask, (0, cache.text_len - L), value=False))
        for block, layer in zip(self.blocks, cache.layers):
            layer.write_text(rows, *block.cross.text_kv(padded))

    def decode_step(self, codes: Tensor, input_pos: Tensor, cache: KVCache, logits_to_keep: int = 0) -> Tensor:
        """One step of rows [0, S) of ``cache``: codes [S, n] at positions input_pos [S, n] -> logits
        [S, n, V] (of the last ``logits_to_keep`` positions only, when > 0: the head is a large matmul).

        ``codes`` holds the code before each position (the input that predicts it); at position
        0 the start embedding goes in instead, whatever ``codes`` says there. Each row has its own
        positions; their keys go into its slots input_pos and every query attends over the slots
        up to its own. A speculative window may run past the grid's last cell into spare slots:
        those positions reuse its tables, and their outputs are meaningless.
        """
        S, n = codes.shape if codes.ndim == 2 else (None, None)
        if input_pos.shape != codes.shape or S is None or S > cache.rows or n > cache.span:
            raise ValueError(
                f"decode_step: codes {tuple(codes.shape)} and input_pos {tuple(input_pos.shape)} must both be [S, n] "
                f"with S <= {cache.rows} cache rows and n <= {cache.span} slots"
            )
        cells = input_pos.clamp(max=self.cfg.seq_len - 1)
        x = torch.where((input_pos == 0)[..., None], self.bos, self.tok_emb(codes))  # [S, n, D]; static shapes: no branch
        x = self._at(x, cells)
        rope = self.rope_cos[cells][:, None], self.rope_sin[cells][:, None]  # [S, 1, n, Dh/2]: each row its own
        mask = cache.mask(input_pos)  # [S, 1, n, T]
        for block, layer in zip(self.blocks, cache.layers):
            x = block(x, rope, TextKV(*layer.text(S)), mask, layer, input_pos)
        return self.head(self.norm(x)[:, -logits_to_keep:])  # -0: every position

    # -- training and checkpoints ------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_compatible(
        self, tokenizer_codebook_size: int, tokenizer_grid: tuple[int, int], tokenizer_levels: Sequence[int] | None = None
    ) -> None:
        """Fail early when this model was built for a different tokenizer (of another codebook,
        grid, or, for a digit head, FSQ levels: ``VQTokenizer.code_levels``)."""
        grid = tuple(tokenizer_grid)
        if tokenizer_codebook_size != self.cfg.vocab_size or grid != self.cfg.grid:
            raise ConfigError(
                f"the transformer expects codebook size {self.cfg.vocab_size} on a {self.cfg.grid[0]}x{self.cfg.grid[1]} "
                f"grid, but the tokenizer has codebook size {tokenizer_codebook_size} on a {grid[0]}x{grid[1]} grid; "
                "use the tokenizer this transformer was trained with (training.transformer.tokenizer) or retrain it"
            )
        levels = None if tokenizer_levels is None else tuple(tokenizer_levels)
        if self.cfg.code_head != "softmax" and levels != self.cfg.code_levels:
            raise ConfigError(
                f"the transformer's {self.cfg.code_head} head reads codes as FSQ digits of levels "
                f"{list(self.cfg.code_levels)}, but the tokenizer's codes have levels {None if levels is None else list(levels)}; "
                "use the tokenizer this transformer was trained with (training.transformer.tokenizer) or retrain it"
            )

    def save_pretrained(
        self,
        directory: str | Path,
        extra_config: dict[str, Any] | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> Path:
        """``directory/{config.json, model.safetensors}``; ``extra_config``
        (e.g. the run's full config) is stored beside the model's own ``transformer`` entry.
        ``state`` is written as the weights (default: ``self.state_dict()``; the full weights
        gathered from a sharded run)."""
        extra = dict(extra_config or {})
        if KIND in extra:
            raise ValueError(f"extra_config must not have a {KIND!r} key: it holds the model's architecture")
        weights = self.state_dict() if state is None else state
        return save_pretrained(directory, KIND, {KIND: dataclasses.asdict(self.cfg), **extra}, weights)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
        """Rebuild from ``config.json`` and load ``model.safetensors`` (the EMA weights when the
        run kept an EMA: the training loop exports those)."""
        directory = Path(directory)
        model = cls(load_architecture(load_config_json(directory, KIND), KIND, TransformerConfig, directory))
        path = directory / "model.safetensors"
        load_state_into(model, load_weights(path), path)
        return model.to(device)
