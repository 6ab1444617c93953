"""Fast sampling: static KV cache, classifier-free guidance, seeded inverse-CDF draws,
speculative Jacobi decoding."""

from vqgen.sampling.cache import Decoder, LayerKV, decoder_for, text_bucket
from vqgen.sampling.draws import (
    SCHEDULES,
    draw_uniforms,
    guidance_scales,
    guide,
    inverse_cdf,
    probabilities,
    sample_logits,
    top_p_mask,
)
from vqgen.sampling.generate import decode_one, generate, sampling_options
from vqgen.sampling.speculative import PRIORS, speculative_decode

__all__ = [
    "PRIORS",
    "SCHEDULES",
    "Decoder",
    "LayerKV",
    "decode_one",
    "decoder_for",
    "draw_uniforms",
    "generate",
    "guidance_scales",
    "guide",
    "inverse_cdf",
    "probabilities",
    "sample_logits",
    "sampling_options",
    "speculative_decode",
    "text_bucket",
    "top_p_mask",
]
