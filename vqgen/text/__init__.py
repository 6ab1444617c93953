"""Text conditioning: frozen Hugging Face encoders and the on-disk embedding cache."""

from vqgen.text.encoder import (
    CacheError,
    CacheMissError,
    EmbeddingCache,
    PromptError,
    TextEncoder,
    TextEncoderError,
    caption_key,
    fingerprint,
    resolve_encoder,
)

__all__ = [
    "CacheError",
    "CacheMissError",
    "EmbeddingCache",
    "PromptError",
    "TextEncoder",
    "TextEncoderError",
    "caption_key",
    "fingerprint",
    "resolve_encoder",
]
