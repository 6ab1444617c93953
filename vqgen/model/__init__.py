"""The text-conditioned transformer over image codes (see ``transformer.py``) and its decode cache (``cache.py``)."""

from vqgen.model.cache import KVCache, LayerKV
from vqgen.model.transformer import (
    SIZES,
    Context,
    TextKV,
    Transformer,
    TransformerConfig,
    apply_rope,
    rope_tables,
)

__all__ = ["SIZES", "Context", "KVCache", "LayerKV", "TextKV", "Transformer", "TransformerConfig", "apply_rope", "rope_tables"]
