"""The decode cache: S rows of keys/values that ``Transformer.decode_step`` reads and writes.

A ``KVCache`` holds, for every block, ``rows`` rows of ``length`` self-attention slots and
``text_len`` text slots. A row is one stream of one image (guidance gives an image two rows).
Between steps a sampler (``vqgen.sampling``) writes a prompt's text into chosen rows
(``Transformer.write_text``), moves the rows in use to the front (``keep``) and narrows the
slots a step attends over (``narrow``); a step runs on the first rows only. A row needs no
freeing: once its text is rewritten and it restarts at position 0, its stale keys sit in
slots beyond its position, which the mask ``slots <= input_pos`` hides until the row's own
steps overwrite them. The same holds for a speculative window that rolls back.

The shapes are fixed at allocation, so a compiled step that runs against one cache sees the
same tensors every step and is recorded once (CUDA graphs on GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vqgen.config import TransformerConfig


class LayerKV(nn.Module):
    """One block's rows: self-attention keys/values [S, Hkv, T, Dh]; the text's cross-attention
    keys/values [S, Hkv, L, Dh] and mask [S, 1, 1, L] (True = attend)."""

    PER_ROW = ("k", "v", "text_k", "text_v", "text_mask")

    def __init__(self, rows: int, kv_heads: int, length: int, head_dim: int, text_len: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        slots, text = (rows, kv_heads, length, head_dim), (rows, kv_heads, text_len, head_dim)
        self.register_buffer("k", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        self.register_buffer("text_k", torch.zeros(text, dtype=dtype, device=device), persistent=False)
        self.register_buffer("text_v", torch.zeros(text, dtype=dtype, device=device), persistent=False)
        self.register_buffer("text_mask", torch.zeros(rows, 1, 1, text_len, dtype=torch.bool, device=device), persistent=False)
        self.span = length  # the slots a step attends over

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [A, Hkv, n, Dh] of rows [0, A) at their slots input_pos [A, n]; return those
        rows' keys and values [A, Hkv, span, Dh] (the mask hides the slots not yet written)."""
        keys, values = self.k[: k.shape[0]], self.v[: k.shape[0]]
        index = input_pos[:, None, :, None].expand_as(k)  # [A, Hkv, n, Dh]: row a's slots input_pos[a]
        keys.scatter_(2, index, k.to(keys.dtype))
        values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, : self.span], values[:, :, : self.span]

    def text(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """The text keys, values [rows, Hkv, L, Dh] and mask [rows, 1, 1, L] of rows [0, rows)."""
        return self.text_k[:rows], self.text_v[:rows], self.text_mask[:rows]

    def write_text(self, rows: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> None:
        """Write the text keys, values [R, Hkv, L, Dh] and mask [R, 1, 1, L] into rows [R]."""
        self.text_k[rows], self.text_v[rows], self.text_mask[rows] = k.to(self.text_k.dtype), v.to(self.text_v.dtype), mask


class KVCache(nn.Module):
    """Every block's ``LayerKV`` for ``rows`` rows, ``length`` slots and ``text_len`` text slots."""

    def __init__(self, cfg: TransformerConfig, rows: int, length: int, text_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.rows, self.length, self.text_len = rows, length, text_len
        self.layers = nn.ModuleList(
            LayerKV(rows, cfg.kv_heads, length, cfg.head_dim, text_len, dtype, torch.device(device)) for _ in range(cfg.depth)
        )
        self.register_buffer("slots", torch.arange(length, device=device), persistent=False)  # [T]

    @property
    def layout(self) -> tuple[int, int, int, torch.dtype, torch.device]:
        """(rows, length, text_len, dtype, device): what ``Transformer.setup_caches`` reuses it for."""
        return self.rows, self.length, self.text_len, self.layers[0].k.dtype, self.slots.device

    @property
    def span(self) -> int:
        return self.layers[0].span

    def mask(self, input_pos: Tensor) -> Tensor:
        """input_pos [A, n] -> the attention mask [A, 1, n, span]: a query sees the slots up to its own."""
        return self.slots[: self.span] <= input_pos[:, None, :, None]

    def narrow(self, span: int) -> None:
        """Attend over slots [0, span) only: eagerly, a step then reads only the slots in use. A
        compiled step keeps the whole length, so that its shapes never change."""
        if not 0 < span <= self.length:
            raise ValueError(f"a cache of {self.length} slots cannot attend over {span}")
        for layer in self.layers:
            layer.span = span

    def keep(self, index: Tensor) -> None:
        """Move rows ``index`` [R] to the front, in that order (rows that left fall behind them)."""
        for layer in self.layers:
            for name in LayerKV.PER_ROW:
                buffer = getattr(layer, name)
                buffer[: len(index)] = buffer[index]
