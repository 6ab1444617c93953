"""The text-conditioned transformer over image codes (see ``transformer.py``) and its decode
cache (``cache.py``).

Its architecture, ``TransformerConfig``, and the named sizes ``SIZES`` are declared in
``vqgen.config`` beside the run config whose ``model:`` section is one; they are exported here
with the model they build.
"""

from vqgen.config import SIZES, TransformerConfig
from vqgen.model.cache import KVCache, LayerKV
from vqgen.model.transformer import Context, TextKV, Transformer, apply_rope, rope_tables
