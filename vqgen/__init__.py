"""vqgen: autoregressive text-to-image generation over discrete image tokens."""

__version__ = "0.1.0"
