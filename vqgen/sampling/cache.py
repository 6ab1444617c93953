"""Static key/value caches for sampling, allocated once per shape and reused across calls.

A ``Decoder`` owns one ``LayerKV`` per transformer block for a fixed shape: ``streams`` rows
(images, doubled under guidance), ``length`` self-attention slots and ``text_len`` text slots.
The prompt's text is padded to a few length buckets (powers of two from 8 up to the model's
longest text), so across prompts a compiled decode step sees the same shapes and the same
tensors and is recorded once (CUDA graphs on GPU). ``decoder_for`` keeps the decoders of a
model's four most recent shapes (e.g. a run's full batches and its last, smaller one, for the
plain and the speculative sampler) and frees them with the model.

The caches implement ``vqgen.model.LayerCache``: the model stores and reads keys through it
and never looks inside.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgen.model import Context, Transformer

MIN_TEXT_BUCKET = 8
KEPT_SHAPES = 4  # decoders kept per model


def text_bucket(length: int, longest: int) -> int:
    """Text slots for a context of ``length`` tokens (null token included): the next power of
    two from 8, capped at ``longest`` (the model's null token + max_text_len)."""
    bucket = max(MIN_TEXT_BUCKET, 1 << (length - 1).bit_length())
    return max(length, min(bucket, longest))


class LayerKV(nn.Module):
    """One block's cache: self-attention keys/values [S, Hkv, T, Dh] and the cross-attention
    keys/values [S, Hkv, L, Dh] + mask [S, 1, 1, L] of the prompt's text.

    Eager callers may ``narrow`` it to the first ``rows`` rows and ``end`` slots (images that
    finished leave the batch; attention reads only the slots in use); compiled steps keep it whole.
    """

    PER_ROW = ("k", "v", "context_k", "context_v", "context_mask")

    def __init__(
        self, streams: int, kv_heads: int, length: int, head_dim: int, text_len: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        slots = (streams, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        text = (streams, kv_heads, text_len, head_dim)
        self.register_buffer("context_k", torch.zeros(text, dtype=dtype, device=device), persistent=False)
        self.register_buffer("context_v", torch.zeros(text, dtype=dtype, device=device), persistent=False)
        self.register_buffer("context_mask", torch.zeros(streams, 1, 1, text_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(length, device=device), persistent=False)  # [T]
        self.rows, self.end = streams, length

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v [S, Hkv, n, Dh] at ``pos``; return keys, values and mask to attend over."""
        keys, values = self.k[: self.rows], self.v[: self.rows]
        if k.dtype != keys.dtype:
            k, v = k.to(keys.dtype), v.to(values.dtype)
        n = k.shape[2]
        if isinstance(pos, int):  # eager, the same positions in every row: attend over the filled prefix
            end = pos + n
            keys[:, :, pos:end], values[:, :, pos:end] = k, v
            mask = None if n == 1 else torch.ones(n, end, dtype=torch.bool, device=k.device).tril(pos)  # [n, end]
            return keys[:, :, :end], values[:, :, :end], mask
        if pos.ndim == 1:  # static shapes for torch.compile: write by index, mask the slots not yet filled
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            return keys, values, self.slots <= pos[:, None]  # mask [n, T]
        # each row its own positions [S, n] (speculative windows): row r's keys go to slots pos[r]
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]  # [S, 1]
        keys.transpose(1, 2)[rows, pos] = k.transpose(1, 2)  # [S, n, Hkv, Dh] into [S, T, Hkv, Dh]
        values.transpose(1, 2)[rows, pos] = v.transpose(1, 2)
        mask = self.slots[: self.end] <= rearrange(pos, "s n -> s 1 n 1")  # [S, 1, n, end]
        return keys[:, :, : self.end], values[:, :, : self.end], mask

    @property
    def context(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.context_k[: self.rows], self.context_v[: self.rows], self.context_mask[: self.rows]


class Decoder(nn.Module):
    """The caches of every block for one shape (see the module docstring)."""

    def __init__(self, model: Transformer, streams: int, length: int, text_len: int, dtype: torch.dtype):
        super().__init__()
        cfg, device = model.cfg, model.bos.device
        self.streams, self.length, self.text_len = streams, length, text_len
        self.layers = nn.ModuleList(
            LayerKV(streams, cfg.kv_heads, length, cfg.head_dim, text_len, dtype, device) for _ in model.blocks
        )

    def load(self, model: Transformer, context: Context) -> None:
        """Compute the prompt's cross-attention keys/values once per block and write them in
        place, the text padded to ``text_len`` slots (masked out); the caches are whole again."""
        tokens, mask = context.tokens, context.mask  # [S, L, D], [S, 1, 1, L]
        S, L = tokens.shape[:2]
        if S != self.streams or L > self.text_len:
            raise ValueError(f"a decoder for {self.streams} streams and {self.text_len} text slots got a context of {S} x {L}")
        tokens = F.pad(tokens, (0, 0, 0, self.text_len - L))
        mask = F.pad(mask, (0, self.text_len - L), value=False)
        for block, layer in zip(model.blocks, self.layers):
            k, v = block.cross.context_kv(tokens)  # [S, Hkv, text_len, Dh]
            layer.context_k.copy_(k)
            layer.context_v.copy_(v)
            layer.context_mask.copy_(mask)
        self.narrow(self.streams, self.length)

    def narrow(self, rows: int, end: int) -> None:
        """Attend with the first ``rows`` rows and ``end`` self-attention slots only (eager)."""
        for layer in self.layers:
            layer.rows, layer.end = rows, end

    def keep(self, index: Tensor) -> None:
        """Move rows ``index`` [R] of the in-use rows to the front, in that order."""
        for layer in self.layers:
            for name in LayerKV.PER_ROW:
                buffer = getattr(layer, name)
                buffer[: len(index)] = buffer[index]


_DECODERS: weakref.WeakKeyDictionary[Transformer, OrderedDict] = weakref.WeakKeyDictionary()


def decoder_for(model: Transformer, streams: int, length: int, text_len: int, dtype: torch.dtype) -> Decoder:
    """The model's decoder for this shape, made on first use and reused afterwards."""
    key = (streams, length, text_len, dtype, model.bos.device, model.bos.dtype)
    decoders = _DECODERS.setdefault(model, OrderedDict())
    if key not in decoders:
        decoders[key] = Decoder(model, streams, length, text_len, dtype)
        while len(decoders) > KEPT_SHAPES:
            decoders.popitem(last=False)
    decoders.move_to_end(key)
    return decoders[key]
