"""Fast sampling: static KV cache, classifier-free guidance, seeded inverse-CDF draws,
speculative Jacobi decoding."""

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
from vqgen.sampling.generate import decode_one, generate, sampling_options, text_bucket
from vqgen.sampling.speculative import PRIORS, speculative_decode, start_guess

__all__ = [
    "PRIORS",
    "SCHEDULES",
    "decode_one",
    "draw_uniforms",
    "generate",
    "guidance_scales",
    "guide",
    "inverse_cdf",
    "probabilities",
    "sample_logits",
    "sampling_options",
    "speculative_decode",
    "start_guess",
    "text_bucket",
    "top_p_mask",
]
