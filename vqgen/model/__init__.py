"""The text-conditioned transformer over image codes (see ``transformer.py``)."""

from vqgen.model.transformer import (
    SIZES,
    Context,
    LayerCache,
    Transformer,
    TransformerConfig,
    apply_rope,
    rope_tables,
)

__all__ = ["SIZES", "Context", "LayerCache", "Transformer", "TransformerConfig", "apply_rope", "rope_tables"]
